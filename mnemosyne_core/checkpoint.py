"""Self-describing single-file checkpoints of a learned optimizer (θ + its architecture).

Layout (all integers big-endian)::

    MAGIC (12 bytes) | format version (uint16) | header length (uint32)
    | sha256 of the header (32 bytes) | header (UTF-8 JSON) | payload

The JSON header holds the architecture spec ``{"kind", "config"}``, the θ tree
fingerprint (sha256 of the sorted ``(path, shape, dtype)`` list), the
user's ``metadata``, the extra ``update`` arguments the optimizer requires, and
the sha256 and length of the payload (θ as flax msgpack). Reading checks
everything in that order and raises a typed :class:`CheckpointError`:

* :class:`NotACheckpointError` — wrong magic (not a Mnemosyne checkpoint);
* :class:`UnsupportedVersionError` — written by an unknown format version;
* :class:`TruncatedCheckpointError` — the file ends early;
* :class:`CorruptedCheckpointError` — a checksum does not match (bit rot, edits);
* :class:`IncompatibleCheckpointError` — θ does not fit the stored config (or the
  config is unknown to this code version).

Writes are atomic: a temporary file in the destination's directory is written,
fsynced, then renamed over the destination, so readers see the old file or the
complete new one, never a partial one.

Example:
    >>> import jax, os, tempfile
    >>> from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta
    >>> config = LSTMConfig()
    >>> theta = init_lstm_theta(jax.random.key(0), config)
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.msgpack")
    >>> save(path, theta, config, metadata={"generation": 3})
    >>> theta2, config2, meta = load(path)
    >>> config2 == config, meta["generation"], theta_fingerprint(theta2) == theta_fingerprint(theta)
    (True, 3, True)
"""
from __future__ import annotations

import hashlib
import importlib
import json
import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "CheckpointError",
    "CorruptedCheckpointError",
    "IncompatibleCheckpointError",
    "NotACheckpointError",
    "TruncatedCheckpointError",
    "UnsupportedVersionError",
    "architecture_spec",
    "from_bytes",
    "load",
    "read_header",
    "save",
    "theta_fingerprint",
    "to_bytes",
]

# The framing is shared with the registry server, which checks uploads without JAX.
from .checkpoint_format import (
    FORMAT_VERSION,
    MAGIC,
    CheckpointError,
    CheckpointVerifier,
    CorruptedCheckpointError,
    NotACheckpointError,
    TruncatedCheckpointError,
    UnsupportedVersionError,
    pack,
)

# kind -> (module, config class, init function); modules are imported only when needed.
_KINDS: dict[str, tuple[str, str, str]] = {
    "mnemosyne": ("mnemosyne_core.mnemosyne", "MnemosyneConfig", "init_theta"),
    "lstm": ("mnemosyne_core.baselines", "LSTMConfig", "init_lstm_theta"),
}


class IncompatibleCheckpointError(CheckpointError):
    """θ does not fit the stored architecture, or the architecture is unknown."""


# ------------------------------------------------------------------ helpers


def _kind_of(config: Any) -> str:
    cls = type(config)
    for kind, (module, name, _) in _KINDS.items():
        # Compare the classes themselves: a class may be defined in one module and re-exported by another.
        if cls.__name__ == name and getattr(importlib.import_module(module), name) is cls:
            return kind
    raise TypeError(f"no checkpoint kind for config type {cls.__module__}.{cls.__name__}; "
                    f"known: {', '.join(f'{m}.{c}' for m, c, _ in _KINDS.values())}")


def architecture_spec(config: Any) -> dict[str, Any]:
    """``{"kind": "mnemosyne"|"lstm", "config": config.to_dict()}`` (JSON-able, canonical)."""
    kind = _kind_of(config)
    # Round trip through JSON so tuples become lists, as they will be after loading.
    return {"kind": kind, "config": json.loads(json.dumps(config.to_dict(), sort_keys=True))}


def theta_fingerprint(theta: Any) -> str:
    """sha256 of the sorted ``(path, shape, dtype)`` list of θ's leaves: equal iff hot-swappable."""
    entries = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(theta)[0]:
        dtype = leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype
        entries.append([jax.tree_util.keystr(path), [int(d) for d in np.shape(leaf)], str(np.dtype(dtype))])
    return hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()


def _config_from_spec(spec: Any) -> tuple[Any, Any]:
    """(config, init function) from an architecture spec; unknown kinds are incompatible."""
    if not isinstance(spec, dict) or not isinstance(spec.get("config"), dict):
        raise IncompatibleCheckpointError(f"malformed architecture spec: {spec!r}")
    kind = spec.get("kind")
    if kind not in _KINDS:
        raise IncompatibleCheckpointError(
            f"unknown optimizer kind {kind!r} in checkpoint; this version knows {', '.join(_KINDS)}")
    module_name, cls_name, init_name = _KINDS[kind]
    module = importlib.import_module(module_name)
    try:
        config = getattr(module, cls_name).from_dict(spec["config"])
    except (TypeError, ValueError) as exc:
        raise IncompatibleCheckpointError(f"stored {kind} config is not valid here: {exc}") from exc
    return config, getattr(module, init_name)


def _expected_theta(config: Any, init: Any) -> Any:
    return jax.eval_shape(lambda: init(jax.random.key(0), config))


def _required_extra_args(config: Any) -> list[str]:
    return ["loss"] if getattr(config, "use_loss_feature", False) else []


# ------------------------------------------------------------------ bytes


def to_bytes(theta: Any, config: Any, metadata: dict[str, Any] | None = None) -> bytes:
    """Serialise θ with its architecture; raises :class:`IncompatibleCheckpointError` if they don't fit."""
    spec = architecture_spec(config)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    try:
        metadata = json.loads(json.dumps(metadata or {}, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {exc}") from exc
    _, init = _config_from_spec(spec)
    fingerprint = theta_fingerprint(theta)
    if fingerprint != theta_fingerprint(_expected_theta(config, init)):
        raise IncompatibleCheckpointError(
            f"theta does not match the {spec['kind']} config (its tree, shapes or dtypes differ)")
    payload = serialization.msgpack_serialize(serialization.to_state_dict(jax.device_get(theta)))
    header = {
        "format_version": FORMAT_VERSION,
        "architecture": spec,
        "theta_fingerprint": fingerprint,
        "required_extra_args": _required_extra_args(config),
        "metadata": metadata,
        "payload_encoding": "flax-msgpack",
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "payload_length": len(payload),
    }
    return pack(header, payload)


def read_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """Check the framing and checksums; return ``(header, payload)`` without decoding θ."""
    verifier = CheckpointVerifier()
    verifier.feed(data)
    header = verifier.finish()
    return header, bytes(memoryview(data)[verifier.payload_offset:])


def from_bytes(data: bytes) -> tuple[Any, Any, dict[str, Any]]:
    """Inverse of :func:`to_bytes`: ``(theta, config, metadata)``; θ leaves are ``jax.Array``."""
    header, payload = read_header(data)
    config, init = _config_from_spec(header.get("architecture"))
    expected = _expected_theta(config, init)
    expected_fp = theta_fingerprint(expected)
    if header.get("theta_fingerprint") != expected_fp:
        raise IncompatibleCheckpointError(
            f"checkpoint θ fingerprint {str(header.get('theta_fingerprint'))[:12]}… does not match its "
            f"{header['architecture']['kind']} config ({expected_fp[:12]}…)")
    try:
        state = serialization.msgpack_restore(payload)
        theta = serialization.from_state_dict(expected, state)
    except Exception as exc:
        raise IncompatibleCheckpointError(f"checkpoint θ does not fit its config: {exc}") from exc
    theta = jax.tree.map(jnp.asarray, theta)
    if theta_fingerprint(theta) != expected_fp:
        raise IncompatibleCheckpointError("checkpoint θ's shapes or dtypes do not match its config")
    return theta, config, header.get("metadata") or {}


# ------------------------------------------------------------------ files


def save(path: str | os.PathLike, theta: Any, config: Any, metadata: dict[str, Any] | None = None) -> None:
    """Atomically write a checkpoint to ``path`` (temp file in the same directory, fsync, rename)."""
    data = to_bytes(theta, config, metadata)
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # Never leave a partial temp file behind; the destination is untouched.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def load(path: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """Read a checkpoint file: ``(theta, config, metadata)``.

    Raises a :class:`CheckpointError` subclass for a file that is not a valid,
    compatible checkpoint. This module reads files only; ``mnemosyne_core.load``
    (:mod:`mnemosyne_core.loading`) also accepts registry URIs.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    return from_bytes(data)
