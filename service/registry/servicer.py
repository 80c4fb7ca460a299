"""Thin asyncio gRPC servicer: converts protos to plain values, delegates to :class:`Registry`.

Every RPC is a coroutine on the server's event loop. Blocking work (database,
disk, hashing, proto conversion) runs in the server's thread pool, one hop per
call or per chunk; a ``WatchAlias`` stream holds no thread at all while it
waits (:class:`~service.registry.watch.WatchHub`).

The one error→status table lives here (:data:`STATUS_BY_ERROR`). Domain
errors keep their message; anything else becomes ``INTERNAL`` with a generic
message (the traceback goes to the server log, never to the client).
"""
from __future__ import annotations

import asyncio
import functools
import logging
from concurrent import futures

import grpc
from google.protobuf import json_format

from mnemosyne_registry import registry_pb2 as pb
from mnemosyne_registry import registry_pb2_grpc as pb_grpc
from mnemosyne_registry.wire import encode_chunk, serialize_response

from . import errors
from .handlers import PublishSpec, Registry
from .storage import AliasRecord, LRUCache, OptimizerRecord, VersionRecord
from .watch import WatchHub

log = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[errors.RegistryError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Map an exception to (status code, client-visible message)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls], str(exc)
    return grpc.StatusCode.INTERNAL, "internal registry error (details are in the server log)"


async def _report(exc: Exception, context: grpc.aio.ServicerContext) -> None:
    if not isinstance(exc, errors.RegistryError):
        log.error("registry: unexpected error", exc_info=exc)
    code, message = status_for(exc)
    await context.abort(code, message)


def _unary(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped by the table
            await _report(exc, context)
    return wrapper


def _streaming(method):
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for response in method(self, request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped by the table
            await _report(exc, context)
    return wrapper


# -- conversions ----------------------------------------------------------------
def metadata_to_dict(message: pb.VersionMetadata) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def metadata_from_dict(data: dict) -> pb.VersionMetadata:
    return json_format.ParseDict(data, pb.VersionMetadata(), ignore_unknown_fields=True)


_METADATA_CACHE = LRUCache(4096)


def version_to_proto(v: VersionRecord) -> pb.Version:
    # Metadata of a version never changes: convert it once (ParseDict is slow).
    key = (v.name, v.number, v.sha256, v.created_ms)
    metadata = _METADATA_CACHE.get(key)
    if metadata is None:
        metadata = _METADATA_CACHE.put(key, metadata_from_dict(v.metadata))
    return pb.Version(
        name=v.name, number=v.number, sha256=v.sha256, size=v.size, created_unix_ms=v.created_ms,
        metadata=metadata, aliases=list(v.aliases),
    )


def optimizer_to_proto(o: OptimizerRecord) -> pb.Optimizer:
    return pb.Optimizer(name=o.name, latest_version=o.latest_version, aliases=o.aliases, updated_unix_ms=o.updated_ms)


def alias_event_to_proto(a: AliasRecord) -> pb.AliasEvent:
    return pb.AliasEvent(
        name=a.name, alias=a.alias, version=a.version or 0, deleted=a.version is None,
        sequence=a.sequence, unix_ms=a.updated_ms,
    )


def _ref(ref: pb.VersionRef) -> dict:
    which = ref.WhichOneof("selector")
    return {"name": ref.name, "number": ref.number if which == "number" else None,
            "alias": ref.alias if which == "alias" else None}


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """``mnemosyne.registry.v1.RegistryService`` on top of a :class:`Registry`.

    Construct it on the server's running event loop (it starts the watch hub there).
    """

    def __init__(self, registry: Registry, pool: futures.ThreadPoolExecutor):
        self.registry = registry
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.hub = WatchHub(registry, self._run, poll_s=registry.watch_poll_s)
        self.hub.start()

    async def _run(self, fn, *args, **kwargs):
        return await self._loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    @_unary
    async def Publish(self, request_iterator, context):
        # The blocking publish runs in the pool and pulls each message off the stream
        # through the loop; if it fails early (random bytes), the rest is never read.
        loop = self._loop

        def read():
            message = asyncio.run_coroutine_threadsafe(context.read(), loop).result()
            return None if message is grpc.aio.EOF else message

        def publish():
            first = read()
            if first is None or first.WhichOneof("payload") != "header":
                raise errors.InvalidArgument("the first Publish message must carry the header")
            h = first.header
            spec = PublishSpec(h.name, metadata_to_dict(h.metadata), h.size, h.sha256)

            def chunks():
                while (request := read()) is not None:
                    if request.WhichOneof("payload") != "chunk":
                        raise errors.InvalidArgument("only the first Publish message may carry a header")
                    yield request.chunk

            return pb.PublishResponse(version=version_to_proto(self.registry.publish(spec, chunks())))

        return await self._run(publish)

    @_unary
    async def GetVersion(self, request, context):
        return await self._run(lambda: version_to_proto(self.registry.get_version(**_ref(request.ref))))

    @_unary
    async def ListOptimizers(self, request, context):
        def run():
            rows, token = self.registry.list_optimizers(request.page_size, request.page_token, request.name_prefix)
            return pb.ListOptimizersResponse(optimizers=[optimizer_to_proto(o) for o in rows], next_page_token=token)
        return await self._run(run)

    @_unary
    async def ListVersions(self, request, context):
        def run():
            rows, token = self.registry.list_versions(request.name, request.page_size, request.page_token)
            return pb.ListVersionsResponse(versions=[version_to_proto(v) for v in rows], next_page_token=token)
        return await self._run(run)

    @_streaming
    async def Fetch(self, request, context):
        version, chunks = await self._run(
            self.registry.open_fetch, **_ref(request.ref), offset=request.offset, chunk_size=request.chunk_size)
        pending = None
        try:
            yield pb.FetchResponse(version=version_to_proto(version))
            # Read the next chunk from disk while this one is being sent.
            pending = asyncio.ensure_future(self._run(next, chunks, None))
            while (chunk := await pending) is not None:
                pending = asyncio.ensure_future(self._run(next, chunks, None))
                yield encode_chunk(chunk)  # pre-encoded FetchResponse: one copy instead of three
        finally:
            if pending is not None and not pending.done():
                await asyncio.wait([pending])  # never close the file under a running read
            await self._run(chunks.close)

    @_unary
    async def SetAlias(self, request, context):
        a = await self._run(self.registry.set_alias, request.name, request.alias, request.version)
        return pb.Alias(name=a.name, alias=a.alias, version=a.version, updated_unix_ms=a.updated_ms)

    @_unary
    async def DeleteAlias(self, request, context):
        await self._run(self.registry.delete_alias, request.name, request.alias)
        return pb.DeleteAliasResponse()

    @_streaming
    async def WatchAlias(self, request, context):
        async for event in self.hub.watch(request.name, request.alias, request.after_sequence):
            yield alias_event_to_proto(event)


SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"]


def add_to_server(servicer: RegistryServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated ``add_RegistryServiceServicer_to_server``,
    but with a response serializer that passes pre-encoded messages (Fetch chunks) through."""
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        m.name: factories[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=getattr(pb, m.input_type.name).FromString,
            response_serializer=serialize_response,
        )
        for m in SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
