"""Thin gRPC servicer: converts protos to plain values, delegates to :class:`Registry`.

The one error→status table lives here (:data:`STATUS_BY_ERROR`). Domain
errors keep their message; anything else becomes ``INTERNAL`` with a generic
message (the traceback goes to the server log, never to the client).
"""
from __future__ import annotations

import functools
import logging
import threading

import grpc
from google.protobuf import json_format

from mnemosyne_core.registry_client import registry_pb2 as pb
from mnemosyne_core.registry_client import registry_pb2_grpc as pb_grpc
from mnemosyne_core.registry_client.wire import encode_chunk, serialize_response

from . import errors
from .handlers import PublishSpec, Registry
from .storage import AliasRecord, LRUCache, OptimizerRecord, VersionRecord

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


def _report(exc: Exception, context: grpc.ServicerContext) -> None:
    if not isinstance(exc, errors.RegistryError) and context.is_active():
        log.exception("registry: unexpected error")
    code, message = status_for(exc)
    context.abort(code, message)


def _unary(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped by the table
            _report(exc, context)
    return wrapper


def _streaming(method):
    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - mapped by the table
            _report(exc, context)
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
    """``mnemosyne.registry.v1.RegistryService`` on top of a :class:`Registry`."""

    def __init__(self, registry: Registry):
        self.registry = registry

    @_unary
    def Publish(self, request_iterator, context):
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise errors.InvalidArgument("the first Publish message must carry the header")
        h = first.header
        spec = PublishSpec(h.name, metadata_to_dict(h.metadata), h.size, h.sha256)

        def chunks():
            for request in request_iterator:
                if request.WhichOneof("payload") != "chunk":
                    raise errors.InvalidArgument("only the first Publish message may carry a header")
                yield request.chunk

        return pb.PublishResponse(version=version_to_proto(self.registry.publish(spec, chunks())))

    @_unary
    def GetVersion(self, request, context):
        return version_to_proto(self.registry.get_version(**_ref(request.ref)))

    @_unary
    def ListOptimizers(self, request, context):
        rows, token = self.registry.list_optimizers(request.page_size, request.page_token, request.name_prefix)
        return pb.ListOptimizersResponse(optimizers=[optimizer_to_proto(o) for o in rows], next_page_token=token)

    @_unary
    def ListVersions(self, request, context):
        rows, token = self.registry.list_versions(request.name, request.page_size, request.page_token)
        return pb.ListVersionsResponse(versions=[version_to_proto(v) for v in rows], next_page_token=token)

    @_streaming
    def Fetch(self, request, context):
        version, chunks = self.registry.open_fetch(
            **_ref(request.ref), offset=request.offset, chunk_size=request.chunk_size
        )
        yield pb.FetchResponse(version=version_to_proto(version))
        for chunk in chunks:
            yield encode_chunk(chunk)  # pre-encoded FetchResponse: one copy instead of three

    @_unary
    def SetAlias(self, request, context):
        a = self.registry.set_alias(request.name, request.alias, request.version)
        return pb.Alias(name=a.name, alias=a.alias, version=a.version, updated_unix_ms=a.updated_ms)

    @_unary
    def DeleteAlias(self, request, context):
        self.registry.delete_alias(request.name, request.alias)
        return pb.DeleteAliasResponse()

    @_streaming
    def WatchAlias(self, request, context):
        stop = threading.Event()

        def on_done():
            stop.set()
            self.registry.wake_watchers()

        context.add_callback(on_done)
        for event in self.registry.watch(request.name, request.alias, stop):
            yield alias_event_to_proto(event)


SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"]


def add_to_server(servicer: RegistryServicer, server: grpc.Server) -> None:
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
