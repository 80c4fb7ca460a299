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

import asyncio
import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from mnemosyne_registry import registry_pb2 as pb

from .auth import BearerTokenInterceptor
from .blobs import DataDirLock
from .handlers import MAX_CHUNK, Registry
from .reflection import enable_reflection
from .servicer import RegistryServicer, add_to_server

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class RegistryServer:
    """A ``grpc.aio`` server on its own event-loop thread, driven from plain threads.

    Every RPC is a coroutine on that loop; blocking work runs in a thread pool of
    ``max_workers`` threads, so watchers (which wait on the loop) cost no thread.
    ``start()``, ``stop(grace)`` (returns a :class:`threading.Event` set once stopped)
    and ``wait_for_termination()`` mirror ``grpc.Server``. ``registry``, ``health``,
    ``hub`` (the :class:`~service.registry.watch.WatchHub`) and ``data_lock`` are set
    by :func:`create_server`.
    """

    def __init__(self, max_workers: int):
        self.pool = futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="registry")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="registry-loop", daemon=True)
        self._thread.start()
        self._stopped = threading.Event()
        self.server: grpc.aio.Server | None = None

    def call(self, coro, timeout: float | None = None):
        """Run a coroutine on the server's loop from another thread and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.call(self.server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving; in-flight calls get ``grace`` seconds. The event is set once stopped."""
        if not self._stopped.is_set():
            if self.server is not None:
                self.call(self.server.stop(grace))
            self.call(_cancel_other_tasks())  # the watch hub's fan-out task
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
            self.loop.close()
            self.pool.shutdown(wait=False, cancel_futures=True)
            self._stopped.set()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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
) -> tuple[RegistryServer, int]:
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
    wrapper = RegistryServer(max_workers)
    address = f"{host}:{port}"

    async def build() -> int:
        # grpc.aio objects belong to the loop they are created on: build them there.
        server = grpc.aio.server(
            migration_thread_pool=wrapper.pool,
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", max_message),
                ("grpc.max_send_message_length", max_message),
                ("grpc.so_reuseport", 0),
            ],
        )
        wrapper.server = server
        servicer = RegistryServicer(registry, wrapper.pool)
        add_to_server(servicer, server)
        wrapper.hub = servicer.hub
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in (SERVICE_NAME, ""):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        wrapper.health = health_servicer
        enable_reflection((SERVICE_NAME, HEALTH_SERVICE), server)
        try:
            if tls_cert is not None:
                return server.add_secure_port(address, grpc.ssl_server_credentials([(tls_key, tls_cert)]))
            return server.add_insecure_port(address)
        except RuntimeError:
            return 0

    try:
        bound = wrapper.call(build())
    except BaseException:
        wrapper.stop(None)
        registry.store.close()
        raise
    if not bound:
        wrapper.stop(None)
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
        wrapper.stop(None)
        raise
    wrapper.registry = registry
    wrapper.data_lock = lock
    return wrapper, bound


def shutdown(server: RegistryServer, grace: float = 5.0) -> None:
    """Graceful stop: NOT_SERVING, end watches, finish in-flight calls within ``grace`` seconds."""
    server.call(server.health.enter_graceful_shutdown())
    server.registry.close()  # the watch hub ends every watch with UNAVAILABLE
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
