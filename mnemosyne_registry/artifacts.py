"""What the client knows about artifacts: integrity, checkpoint metadata, compatibility.

``describe_checkpoint`` fills a version's compatibility record (architecture
spec, θ fingerprint, required extra args) and code/JAX versions from a
Mnemosyne checkpoint's header before it is published; ``decode_checkpoint``
turns verified bytes back into ``(theta, config, metadata)`` and refuses an
artifact that contradicts its record or would not hot-swap into ``like``.
Bytes that are not a checkpoint are published only when the caller says so
(``compatibility.format = "opaque"``); they are never decoded as an optimizer.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from mnemosyne_core import checkpoint_format

from . import registry_pb2 as pb
from .errors import IncompatibleVersionError, IntegrityError, RegistryClientError


def verify(version: pb.Version, data: bytes) -> None:
    """Raise :class:`IntegrityError` unless ``data`` is exactly the version's artifact."""
    if len(data) != version.size:
        raise IntegrityError(f"{version.name}:{version.number}: got {len(data)} bytes, expected {version.size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != version.sha256:
        raise IntegrityError(f"{version.name}:{version.number}: sha256 {digest} != {version.sha256}")


def _checkpoint():
    try:
        from mnemosyne_core import checkpoint
    except ImportError:  # the checkpoint module is optional for opaque artifacts
        return None
    return checkpoint


OPAQUE = "opaque"  # compatibility.format of bytes that are not a checkpoint (never decoded)


def describe_checkpoint(data: bytes, meta: pb.VersionMetadata) -> None:
    """Fill compatibility and code/JAX versions from a checkpoint artifact, keeping what is set.

    Raises ValueError, before anything is sent, when ``data`` is not a valid checkpoint
    and ``meta.compatibility.format`` is not ``"opaque"`` (the server would refuse it).
    """
    lineage, compat = meta.lineage, meta.compatibility
    if not lineage.code_version:
        from mnemosyne_core import __version__
        lineage.code_version = __version__
    if not lineage.jax_version:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version
        try:
            lineage.jax_version = dist_version("jax")  # without importing jax itself
        except PackageNotFoundError:
            lineage.jax_version = "not installed"
    if compat.format == OPAQUE:
        return
    verifier = checkpoint_format.CheckpointVerifier()
    try:  # framing and checksums, without decoding θ
        verifier.feed(data)
        header = verifier.finish()
        spec, fingerprint = header["architecture"], header["theta_fingerprint"]
    except (checkpoint_format.CheckpointError, KeyError) as exc:
        raise ValueError(f"not a valid Mnemosyne checkpoint ({exc}); to publish other bytes set "
                         f'metadata compatibility.format = "{OPAQUE}"') from None
    extra, ckpt_meta = header.get("required_extra_args") or [], header.get("metadata") or {}
    compat.format = compat.format or "mnemosyne-checkpoint"
    compat.theta_fingerprint = compat.theta_fingerprint or fingerprint
    compat.architecture_spec_json = compat.architecture_spec_json or json.dumps(spec, sort_keys=True)
    if extra and not compat.required_extra_args:
        compat.required_extra_args.extend(extra)
    ckpt_meta = ckpt_meta if isinstance(ckpt_meta, dict) else {}
    for key in ("run_id", "task_family_fingerprint"):
        if not getattr(lineage, key) and isinstance(ckpt_meta.get(key), str):
            setattr(lineage, key, ckpt_meta[key])
    if not lineage.generation and isinstance(ckpt_meta.get("generation"), int):
        lineage.generation = ckpt_meta["generation"]
    # lineage.parent_version is a version of this registry name: only the caller knows it.


def decode_checkpoint(version: pb.Version, data: bytes, *, like: Any = None):
    """Decode verified bytes and check them against the version's compatibility metadata."""
    compat = version.metadata.compatibility
    where = f"{version.name}:{version.number}"
    if compat.format == OPAQUE:
        raise IncompatibleVersionError(f"{where} is an opaque artifact, not an optimizer checkpoint; "
                                       "fetch its bytes with RegistryClient.fetch")
    checkpoint = _checkpoint()
    if checkpoint is None:
        raise RegistryClientError("UNIMPLEMENTED", "mnemosyne_core.checkpoint is not available to decode artifacts")
    theta, config, metadata = checkpoint.from_bytes(data)
    if compat.theta_fingerprint and compat.theta_fingerprint != checkpoint.theta_fingerprint(theta):
        raise IncompatibleVersionError(f"{where}: θ fingerprint differs from the registry's compatibility record")
    stored_spec = json.loads(compat.architecture_spec_json) if compat.architecture_spec_json else None
    if stored_spec is not None and not _same_architecture(checkpoint, stored_spec, config, data):
        raise IncompatibleVersionError(f"{where}: architecture differs from the registry's compatibility record")
    if like is not None:
        from .hotswap import check_swappable, find_theta
        current = find_theta(like) if _holds_theta(like) else like
        check_swappable(current, theta)
    return theta, config, metadata


def _same_architecture(checkpoint: Any, stored_spec: Any, config: Any, data: bytes) -> bool:
    """Whether the record's spec describes this artifact's architecture.

    The record is copied from the checkpoint header at publish time. A checkpoint written by
    an older release stores the spec as it was then, without config fields added since (they
    load with their defaults), so it matches its own header even though it is not today's
    canonical ``architecture_spec(config)``.
    """
    if stored_spec == json.loads(json.dumps(checkpoint.architecture_spec(config))):
        return True
    header, _ = checkpoint.read_header(data)
    return stored_spec == header["architecture"]  # already plain JSON, as parsed from the file


def _holds_theta(obj: Any) -> bool:
    from .hotswap import find_theta
    try:
        find_theta(obj)
    except IncompatibleVersionError:
        return False
    return True
