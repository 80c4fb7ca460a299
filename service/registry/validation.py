"""What the registry accepts as a version: bounded metadata and, by default, a real checkpoint.

Two checks run on every publish, both before anything is stored:

* :func:`check_metadata` bounds every metadata field (:data:`LIMITS`), requires
  finite ``eval_metrics``, and parses ``config_json`` and
  ``architecture_spec_json`` when they are set.
* :class:`UploadCheck` follows the bytes as they arrive. With
  ``compatibility.format`` empty or ``"mnemosyne-checkpoint"`` they must be a
  valid Mnemosyne checkpoint (:mod:`mnemosyne_core.checkpoint_format`: magic,
  format version, header and payload sha256) whose header names a known
  architecture. Compatibility fields the client left empty are filled from the
  header; fields it set must agree with it. ``"opaque"`` stores the bytes
  unchecked (clients will not decode them as an optimizer).

Every failure is :class:`~service.registry.errors.InvalidArgument`.

>>> check_metadata({"lineage": {"eval_metrics": {"loss": "NaN"}}})
Traceback (most recent call last):
...
service.registry.errors.InvalidArgument: lineage.eval_metrics['loss'] must be a finite number, got 'NaN'
>>> UploadCheck({}).feed(b"random bytes")
Traceback (most recent call last):
...
service.registry.errors.InvalidArgument: the artifact is not a valid Mnemosyne checkpoint (not a Mnemosyne checkpoint (bad magic)); publish other bytes with compatibility.format = "opaque"
"""
from __future__ import annotations

import json
import math
import re
from typing import Any

from mnemosyne_core.checkpoint_format import KINDS, CheckpointError, CheckpointVerifier

from .errors import InvalidArgument

CHECKPOINT = "mnemosyne-checkpoint"
OPAQUE = "opaque"
FORMATS = (CHECKPOINT, OPAQUE)

# Upper bounds on metadata (characters, entries). The whole header message is also
# bounded by the transport (4 MiB); these keep one version's record small.
LIMITS = {
    "metadata_json_bytes": 256 << 10,  # the whole metadata as JSON
    "short_string": 256,               # run_id, code_version, jax_version, format, ...
    "description": 4096,
    "config_json": 128 << 10,
    "architecture_spec_json": 64 << 10,
    "tags": 64, "tag_key": 64, "tag_value": 256,
    "eval_metrics": 256, "metric_key": 128,
    "required_extra_args": 16, "extra_arg": 64,
}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _text(where: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{where} must be a string")
    if len(value) > limit:
        raise InvalidArgument(f"{where} has {len(value)} characters; the limit is {limit}")
    return value


def _json_text(where: str, value: str, limit: int) -> Any:
    _text(where, value, limit)
    try:
        return json.loads(value)
    except ValueError as exc:
        raise InvalidArgument(f"{where} is not valid JSON: {exc}") from None


def _architecture(where: str, spec: Any) -> dict:
    if not (isinstance(spec, dict) and isinstance(spec.get("kind"), str) and isinstance(spec.get("config"), dict)):
        raise InvalidArgument(f'{where} must be a JSON object {{"kind": ..., "config": {{...}}}}')
    if spec["kind"] not in KINDS:
        raise InvalidArgument(f"{where} names an unknown optimizer kind {spec['kind'][:64]!r}; known: {', '.join(KINDS)}")
    return spec


def check_metadata(metadata: dict) -> dict:
    """Return ``metadata`` (VersionMetadata as a proto-JSON dict) if every field is within bounds."""
    size = len(json.dumps(metadata))
    if size > LIMITS["metadata_json_bytes"]:
        raise InvalidArgument(f"metadata is {size} bytes as JSON; the limit is {LIMITS['metadata_json_bytes']}")
    lineage = metadata.get("lineage", {})
    compat = metadata.get("compatibility", {})
    short = LIMITS["short_string"]
    for key in ("run_id", "task_family_fingerprint", "code_version", "jax_version"):
        _text(f"lineage.{key}", lineage.get(key, ""), short)
    if lineage.get("config_json"):
        _json_text("lineage.config_json", lineage["config_json"], LIMITS["config_json"])
    metrics = lineage.get("eval_metrics", {})
    if len(metrics) > LIMITS["eval_metrics"]:
        raise InvalidArgument(f"lineage.eval_metrics has {len(metrics)} entries; the limit is {LIMITS['eval_metrics']}")
    for key, value in metrics.items():
        _text("an eval_metrics key", key, LIMITS["metric_key"])
        # Proto JSON spells non-finite doubles as the strings "NaN", "Infinity", "-Infinity".
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidArgument(f"lineage.eval_metrics[{key[:64]!r}] must be a finite number, got {value!r}")
    tags = metadata.get("tags", {})
    if len(tags) > LIMITS["tags"]:
        raise InvalidArgument(f"{len(tags)} tags; the limit is {LIMITS['tags']}")
    for key, value in tags.items():
        if not key:
            raise InvalidArgument("tag keys must not be empty")
        _text(f"tag key {key[:64]!r}", key, LIMITS["tag_key"])
        _text(f"tag {key[:64]!r}", value, LIMITS["tag_value"])
    _text("description", metadata.get("description", ""), LIMITS["description"])
    fmt = _text("compatibility.format", compat.get("format", ""), short)
    if fmt and fmt not in FORMATS:
        raise InvalidArgument(f"compatibility.format {fmt[:64]!r} is not one of {', '.join(FORMATS)} (empty = {CHECKPOINT})")
    if compat.get("architecture_spec_json"):
        spec = _json_text("compatibility.architecture_spec_json", compat["architecture_spec_json"],
                          LIMITS["architecture_spec_json"])
        _architecture("compatibility.architecture_spec_json", spec)
    fingerprint = compat.get("theta_fingerprint", "")
    if fingerprint and not _HEX64.match(fingerprint):
        raise InvalidArgument("compatibility.theta_fingerprint must be 64 lowercase hex digits (a sha256)")
    args = compat.get("required_extra_args", [])
    if len(args) > LIMITS["required_extra_args"]:
        raise InvalidArgument(f"{len(args)} required_extra_args; the limit is {LIMITS['required_extra_args']}")
    for arg in args:
        if not (isinstance(arg, str) and len(arg) <= LIMITS["extra_arg"] and _ARG.match(arg)):
            raise InvalidArgument(f"required_extra_args entry {str(arg)[:64]!r} is not a Python identifier")
    return metadata


def parent_version(metadata: dict) -> int:
    """``lineage.parent_version`` as an int (proto JSON writes uint64 as a string); 0 = none."""
    return int(metadata.get("lineage", {}).get("parent_version", 0) or 0)


class UploadCheck:
    """Checks an upload's bytes against its declared format while they stream in."""

    def __init__(self, metadata: dict):
        self.metadata = metadata
        self.format = metadata.get("compatibility", {}).get("format") or CHECKPOINT
        self._verifier = CheckpointVerifier() if self.format == CHECKPOINT else None

    def feed(self, chunk: bytes) -> None:
        if self._verifier is not None:
            try:
                self._verifier.feed(chunk)
            except CheckpointError as exc:
                raise _not_a_checkpoint(exc) from None

    def finish(self) -> dict:
        """The metadata to store: compatibility completed from the checkpoint header."""
        if self._verifier is None:
            return self.metadata
        try:
            header = self._verifier.finish()
        except CheckpointError as exc:
            raise _not_a_checkpoint(exc) from None
        spec = _architecture("the checkpoint header's architecture", header.get("architecture"))
        fingerprint = header.get("theta_fingerprint")
        extra = header.get("required_extra_args") or []
        if not (isinstance(fingerprint, str) and _HEX64.match(fingerprint)):
            raise InvalidArgument("the checkpoint header's theta_fingerprint is not a sha256")
        compat = dict(self.metadata.get("compatibility", {}))
        if compat.get("architecture_spec_json") and json.loads(compat["architecture_spec_json"]) != spec:
            raise InvalidArgument("compatibility.architecture_spec_json does not match the checkpoint's header "
                                  "(leave it empty to have the server fill it)")
        if compat.get("theta_fingerprint", fingerprint) != fingerprint:
            raise InvalidArgument(f"compatibility.theta_fingerprint does not match the checkpoint's header "
                                  f"({fingerprint})")
        if compat.get("required_extra_args") and list(compat["required_extra_args"]) != list(extra):
            raise InvalidArgument(f"compatibility.required_extra_args does not match the checkpoint's header "
                                  f"({extra})")
        compat.update(format=CHECKPOINT, theta_fingerprint=fingerprint,
                      architecture_spec_json=json.dumps(spec, sort_keys=True))
        if extra:
            compat["required_extra_args"] = list(extra)
        return {**self.metadata, "compatibility": compat}


def _not_a_checkpoint(exc: CheckpointError) -> InvalidArgument:
    return InvalidArgument(f"the artifact is not a valid Mnemosyne checkpoint ({exc}); "
                           f'publish other bytes with compatibility.format = "{OPAQUE}"')
