"""Errors raised by the registry client (no gRPC import needed to catch them).

>>> err = RegistryClientError("NOT_FOUND", "unknown optimizer 'x'")
>>> err.code, str(err)
('NOT_FOUND', "NOT_FOUND: unknown optimizer 'x'")
"""
from __future__ import annotations


class RegistryClientError(Exception):
    """A registry call failed; ``code`` is the gRPC status name (e.g. ``"NOT_FOUND"``)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class IntegrityError(RegistryClientError):
    """Downloaded bytes do not match the version's sha256 (or size)."""

    def __init__(self, message: str):
        super().__init__("DATA_LOSS", message)


class IncompatibleVersionError(RegistryClientError):
    """The artifact does not fit what the caller runs (architecture, θ structure, or its own metadata)."""

    def __init__(self, message: str):
        super().__init__("FAILED_PRECONDITION", message)


class InvalidURIError(ValueError):
    """A ``grpc://`` URI that can't be parsed."""


def from_rpc_error(exc) -> RegistryClientError:
    """A :class:`RegistryClientError` from a ``grpc.RpcError`` (duck-typed: no grpc import)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    name = getattr(code, "name", None) or "UNKNOWN"
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    return RegistryClientError(name, details or str(exc))
