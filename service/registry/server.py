"""Build, run and stop the registry gRPC server.

:func:`create_server` wires the registry servicer, the health and reflection
services, the bearer-token interceptor and TLS into a ``grpc.Server`` and
returns it with its bound port (pass ``port=0`` for a free one)::

    server, port = create_server("/tmp/reg", host="127.0.0.1", port=0)
    server.start()
    server.stop(grace=2).wait()

:func:`serve` is what ``mnemosyne registry serve`` runs: it starts the server,
prints one ``listening on HOST:PORT`` line, and on SIGTERM/SIGINT marks itself
NOT_SERVING, ends watch streams with UNAVAILABLE, lets in-flight calls finish (``grace``
seconds) and exits. Startup recovery runs first: unfinished uploads are
deleted, blobs that no committed version references (orphans of a crash
between a blob's rename and its version's commit) are collected, and every
stored blob is re-verified. The data directory is locked (``DATA/LOCK``,
``flock``) for the server's life: a second server on it refuses to start.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from mnemosyne_core.registry_client import registry_pb2 as pb

from .auth import BearerTokenInterceptor
from .blobs import DataDirLock
from .handlers import MAX_CHUNK, Registry
from .servicer import RegistryServicer, add_to_server

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name


def create_server(
    data_dir: str | Path,
    *,
    db_url: str | None = None,
    host: str = "127.0.0.1",
    port: int = 50051,
    tokens: tuple[str, ...] = (),
    read_token_required: bool = False,
    tls_cert: bytes | None = None,
    tls_key: bytes | None = None,
    max_workers: int = 64,
    max_chunk_bytes: int = MAX_CHUNK,
    verify_on_start: bool = True,
    registry: Registry | None = None,
) -> tuple[grpc.Server, int]:
    """Return ``(server, port)``, not yet started; ``server.registry`` is the :class:`Registry`.

    Raises ValueError for inconsistent options (TLS half-configured, reads
    protected without tokens) and RuntimeError if the address can't be bound.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("TLS needs both a certificate and a key")
    if read_token_required and not tokens:
        raise ValueError("read_token_required needs at least one token")
    registry = registry or Registry(data_dir, db_url, max_chunk_bytes=max_chunk_bytes)
    interceptors = [BearerTokenInterceptor(tokens, read_token_required)] if tokens else []
    # Accept a chunk at the limit plus framing; bigger messages are refused by gRPC
    # itself (RESOURCE_EXHAUSTED), smaller-but-too-big ones by the handler with a clear message.
    max_message = max(4 << 20, max_chunk_bytes + (64 << 10))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="registry"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            ("grpc.so_reuseport", 0),
        ],
    )
    add_to_server(RegistryServicer(registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (SERVICE_NAME, ""):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    address = f"{host}:{port}"
    try:
        if tls_cert is not None:
            bound = server.add_secure_port(address, grpc.ssl_server_credentials([(tls_key, tls_cert)]))
        else:
            bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        registry.store.close()
        raise RuntimeError(f"could not bind {address}")
    # Lock and recover only once the port is ours: a server started by mistake on
    # a busy port fails above before it touches the data directory. A second
    # server on the same directory fails here (DataDirLocked) before recovery.
    lock = DataDirLock(registry.data_dir)
    try:
        lock.acquire()
        registry.recover(verify=verify_on_start)
    except BaseException:
        lock.release()
        registry.store.close()
        server.stop(None)
        raise
    server.registry = registry
    server.data_lock = lock
    server.health = health_servicer
    return server, bound


def shutdown(server: grpc.Server, grace: float = 5.0) -> None:
    """Graceful stop: NOT_SERVING, end watches, finish in-flight calls within ``grace`` seconds."""
    server.health.enter_graceful_shutdown()
    server.registry.close()
    server.stop(grace).wait()
    server.registry.store.close()
    server.data_lock.release()


def serve(data_dir: str | Path, *, grace: float = 5.0, **kwargs) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    server, port = create_server(data_dir, **kwargs)
    server.start()
    stopped = threading.Event()

    def on_signal(signum, _frame):
        log.info("registry: received signal %d, stopping", signum)
        stopped.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    host = kwargs.get("host", "127.0.0.1")
    scheme = "grpcs" if kwargs.get("tls_cert") else "grpc"
    print(f"mnemosyne registry listening on {scheme}://{host}:{port}", flush=True)
    try:
        while not stopped.wait(0.5):  # short waits keep signal delivery prompt
            pass
    finally:
        shutdown(server, grace)
        for s, h in previous.items():
            signal.signal(s, h)
    print("mnemosyne registry stopped", file=sys.stderr, flush=True)
    return 0
