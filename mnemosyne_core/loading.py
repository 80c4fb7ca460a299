"""``mnemosyne_core.load``: read an optimizer from a checkpoint file or a registry URI.

This is the one module that knows where checkpoints can come from. It sits
above the file format (:mod:`mnemosyne_core.checkpoint`, which reads and writes
bytes and files and knows nothing of networks) and above the registry client
(the separate ``mnemosyne_registry`` package, which depends on this library and
never the reverse)::

    mnemosyne_core.loading ──> mnemosyne_core.checkpoint <── mnemosyne_registry
            └─────────── lazy, by name, on a grpc:// URI ──────────┘

A ``grpc://HOST:PORT/NAME@ALIAS`` (or ``…/NAME:VERSION``; ``grpcs://`` for TLS)
is handed to ``mnemosyne_registry.load_uri``, imported only at that moment, so
``import mnemosyne_core`` never imports gRPC. Without the ``grpc`` extra such a
URI raises :class:`RegistryClientUnavailableError` saying what to install.

Example:
    >>> import jax, os, tempfile
    >>> from mnemosyne_core import checkpoint
    >>> from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta
    >>> path = os.path.join(tempfile.mkdtemp(), "opt.msgpack")
    >>> checkpoint.save(path, init_lstm_theta(jax.random.key(0), LSTMConfig()), LSTMConfig(), {"run": 1})
    >>> load(path)[2]
    {'run': 1}
    >>> is_registry_uri("grpcs://registry.example.com:443/opt@best"), is_registry_uri(path)
    (True, False)
"""
from __future__ import annotations

import importlib
import os
from typing import Any

from . import checkpoint

__all__ = ["REGISTRY_CLIENT", "URI_SCHEMES", "RegistryClientUnavailableError", "is_registry_uri", "load"]

URI_SCHEMES = ("grpc://", "grpcs://")
# The registry client package, named (not imported) here: it is imported on a registry URI only.
REGISTRY_CLIENT = "mnemosyne_registry"


class RegistryClientUnavailableError(ImportError):
    """A registry URI was given, but the registry client (or gRPC) is not installed."""


def is_registry_uri(source: Any) -> bool:
    """True for a ``grpc://`` or ``grpcs://`` string."""
    return isinstance(source, str) and source.startswith(URI_SCHEMES)


def _registry_client() -> Any:
    try:
        package = importlib.import_module(REGISTRY_CLIENT)
        importlib.import_module(f"{REGISTRY_CLIENT}.client")  # imports grpc: fail here, with the reason
    except ImportError as exc:
        raise RegistryClientUnavailableError(
            f"loading a registry URI needs the registry client ({REGISTRY_CLIENT}) and gRPC: "
            f"install the grpc extra, e.g. pip install 'mnemosyne[grpc]' ({exc})") from exc
    return package


def load(source: str | os.PathLike) -> tuple[Any, Any, dict[str, Any]]:
    """``(theta, config, metadata)`` from a checkpoint file or a ``grpc://``/``grpcs://`` URI.

    A file is read by :func:`mnemosyne_core.checkpoint.load` (``FileNotFoundError``, or a
    :class:`~mnemosyne_core.checkpoint.CheckpointError` subclass for a bad file). A URI is
    fetched from the registry, its sha256 and compatibility record verified, and returns
    exactly what loading the same checkpoint from a file returns; the token comes from
    ``$MNEMOSYNE_REGISTRY_TOKEN``, a private CA for ``grpcs://`` from ``$MNEMOSYNE_REGISTRY_CA``.
    """
    if is_registry_uri(source):
        return _registry_client().load_uri(source)
    return checkpoint.load(source)
