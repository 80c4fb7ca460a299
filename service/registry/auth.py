"""Bearer-token authentication as a gRPC (asyncio) server interceptor.

Writes (``Publish``, ``SetAlias``, ``DeleteAlias``) always need a token when
tokens are configured; reads need one only with ``require_for_reads=True``.
Health checks and reflection stay open so probes and tooling keep working.
Clients send ``authorization: Bearer <token>`` metadata.

Token files hold one token per line (blank lines and ``#`` comments are
ignored), so tokens can be rotated by listing old and new for a while.

>>> load_tokens_text("# ci\\ns3cret\\n\\n")
('s3cret',)
"""
from __future__ import annotations

import hmac
from pathlib import Path

import grpc

SERVICE_PREFIX = "/mnemosyne.registry.v1.RegistryService/"
WRITE_METHODS = frozenset(SERVICE_PREFIX + m for m in ("Publish", "SetAlias", "DeleteAlias"))


def load_tokens_text(text: str) -> tuple[str, ...]:
    return tuple(
        line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")
    )


def load_token_file(path: str | Path) -> tuple[str, ...]:
    """Read tokens from ``path``; raise ValueError with a readable message if there are none."""
    tokens = load_tokens_text(Path(path).read_text())
    if not tokens:
        raise ValueError(f"token file {path} contains no token")
    return tokens


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Reject registry calls without a valid bearer token with ``UNAUTHENTICATED`` (asyncio server)."""

    def __init__(self, tokens: tuple[str, ...], require_for_reads: bool = False):
        if not tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._tokens = tuple(t.encode() for t in tokens)
        self._require_for_reads = require_for_reads

    def _protected(self, method: str) -> bool:
        if method in WRITE_METHODS:
            return True
        return self._require_for_reads and method.startswith(SERVICE_PREFIX)

    def _valid(self, metadata) -> tuple[bool, str]:
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if header is None:
            return False, "missing bearer token: send 'authorization: Bearer <token>' (see --token-file)"
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False, "malformed authorization header: expected 'Bearer <token>'"
        given = token.strip().encode()
        # Compare against every token in constant time, without short-circuiting.
        ok = False
        for t in self._tokens:
            ok |= hmac.compare_digest(given, t)
        return ok, "" if ok else "invalid bearer token"

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not self._protected(handler_call_details.method):
            return handler
        ok, message = self._valid(handler_call_details.invocation_metadata)
        if ok:
            return handler
        return _deny(handler, message)


def _deny(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""

    async def abort(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(_request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - never reached; makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
