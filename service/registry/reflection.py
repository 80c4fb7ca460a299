"""Server reflection v1 and v1alpha on the asyncio server.

grpcio-reflection implements only ``grpc.reflection.v1alpha``. The v1 API has
the same messages field for field (only the package differs), so a v1 call's
bytes parse as v1alpha messages and v1alpha answers are valid v1 answers:
the v1 service is served by the same servicer object under the v1 name.
Importing :mod:`service.registry.reflection_v1` registers the v1 descriptor,
so ``grpcurl describe grpc.reflection.v1.ServerReflection`` works too.
"""
from __future__ import annotations

import grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from .reflection_v1 import reflection_pb2 as v1_pb2

V1_SERVICE = v1_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
V1ALPHA_SERVICE = reflection.SERVICE_NAME


def enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) listing ``service_names`` and both reflection services."""
    names = (*service_names, V1_SERVICE, V1ALPHA_SERVICE)
    servicer = reflection.aio.ReflectionServicer(names)
    for service in (V1_SERVICE, V1ALPHA_SERVICE):
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
            response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))
