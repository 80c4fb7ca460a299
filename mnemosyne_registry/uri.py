"""``grpc://HOST:PORT/NAME@ALIAS`` and ``grpc://HOST:PORT/NAME:VERSION`` URIs.

``grpcs://`` selects TLS. Without ``@ALIAS`` or ``:VERSION`` the URI means
``@latest``. Parsing needs no gRPC.

>>> parse_uri("grpc://127.0.0.1:50051/mnemosyne-digits@best")
RegistryURI(scheme='grpc', target='127.0.0.1:50051', name='mnemosyne-digits', version=None, alias='best')
>>> parse_uri("grpcs://reg.example:443/m:3").version
3
>>> parse_uri("grpc://h:1/m").alias
'latest'
"""
from __future__ import annotations

import dataclasses
import re

from .errors import InvalidURIError

_URI_RE = re.compile(
    r"^(?P<scheme>grpcs?)://(?P<target>[^/\s]+:\d+)/(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})"
    r"(?:@(?P<alias>[A-Za-z][A-Za-z0-9._-]{0,63})|:(?P<version>\d+))?$"
)
_REF_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})(?:@(?P<alias>[A-Za-z][A-Za-z0-9._-]{0,63})|:(?P<version>\d+))?$"
)


@dataclasses.dataclass(frozen=True)
class RegistryURI:
    scheme: str
    target: str
    name: str
    version: int | None
    alias: str | None

    @property
    def tls(self) -> bool:
        return self.scheme == "grpcs"


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """``NAME``, ``NAME@ALIAS`` or ``NAME:VERSION`` -> (name, version, alias); bare NAME = @latest.

    >>> parse_ref("adam:2"), parse_ref("adam")
    (('adam', 2, None), ('adam', None, 'latest'))
    """
    m = _REF_RE.match(ref or "")
    # Version numbers are database BIGINTs: 1 … 2^63-1 (a larger one cannot even be sent as uint64).
    if not m or (m["version"] is not None and not 1 <= int(m["version"]) <= 2**63 - 1):
        shown = repr(ref) if len(repr(ref)) <= 80 else repr(ref)[:80] + "…"
        raise InvalidURIError(f"invalid optimizer reference {shown}: expected NAME, NAME@ALIAS or NAME:VERSION "
                              "(1 <= VERSION <= 2^63-1)")
    version = int(m["version"]) if m["version"] else None
    return m["name"], version, m["alias"] or (None if version else "latest")


def parse_uri(uri: str) -> RegistryURI:
    m = _URI_RE.match(uri or "")
    if not m:
        raise InvalidURIError(
            f"invalid registry URI {uri!r}: expected grpc://HOST:PORT/NAME[@ALIAS|:VERSION]"
        )
    name, version, alias = parse_ref(uri.split("/", 3)[3])
    return RegistryURI(m["scheme"], m["target"], name, version, alias)


def parse_target(target: str) -> tuple[str, bool]:
    """``grpc://H:P``, ``grpcs://H:P`` or ``H:P`` -> (``H:P``, tls).

    >>> parse_target("grpcs://r:443")
    ('r:443', True)
    """
    m = re.match(r"^(?:(grpcs?)://)?([^/\s]+:\d+)/?$", target or "")
    if not m:
        raise InvalidURIError(f"invalid registry address {target!r}: expected grpc://HOST:PORT")
    return m[2], m[1] == "grpcs"
