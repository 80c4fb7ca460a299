"""Domain errors of the registry, independent of gRPC.

Handlers raise these; the servicer maps them to gRPC status codes through
one table (:data:`service.registry.servicer.STATUS_BY_ERROR`). Messages are
written for the user: they are sent to the client verbatim. Anything that is
not a :class:`RegistryError` becomes ``INTERNAL`` with a generic message.

>>> try:
...     raise NotFound("optimizer 'adam' has no alias 'best'")
... except RegistryError as exc:
...     print(type(exc).__name__, exc)
NotFound optimizer 'adam' has no alias 'best'
"""
from __future__ import annotations


class RegistryError(Exception):
    """Base class of all user-facing registry errors."""


class InvalidArgument(RegistryError):
    """Malformed request: bad name, sha256 mismatch, size mismatch, bad chunk."""


class NotFound(RegistryError):
    """Unknown optimizer, version or alias."""


class OutOfRange(RegistryError):
    """A watch asked to resume after an event the server no longer keeps."""


class FailedPrecondition(RegistryError):
    """The request is well-formed but not allowed now (e.g. moving ``latest`` by hand)."""


class ResourceExhausted(RegistryError):
    """A size limit was exceeded (chunk or artifact)."""


class Unauthenticated(RegistryError):
    """Missing or wrong bearer token."""


class Unavailable(RegistryError):
    """The server is shutting down."""


class DataLoss(RegistryError):
    """A stored artifact is missing or failed re-verification; it is never served."""


class DataDirLocked(Exception):
    """Another registry process holds the data directory's lock.

    A startup error of the server (and of ``fsck --repair``), never sent to a
    client, so it is not a :class:`RegistryError` and has no gRPC status.
    """
