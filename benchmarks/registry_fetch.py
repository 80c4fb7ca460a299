#!/usr/bin/env python3
"""Registry benchmark: fetch throughput vs a raw gRPC byte stream, GetVersion latency.

Two server processes run side by side (so the client's GIL is not the
servers'): the registry (``mnemosyne registry serve``) and a bare gRPC
service that streams the same bytes from memory in 1 MiB messages with no
protobuf at all — the ceiling for a Python gRPC stream on this machine.

1. Fetch: a ``--size-mb`` artifact (default 100 MB) is published, then fetched
   ``--repeats`` times with ``RegistryClient.fetch`` (stream + sha256
   verification into a fresh buffer, and into a reused one), streamed without
   verification, and read from the raw stream; medians are reported in GiB/s
   with their ratio to raw (target: >= 0.8x raw and >= 1 GiB/s), plus the
   client's CPU seconds per GiB (less sensitive to other load on the machine).
2. GetVersion under load: ``--clients`` threads (default 50), each with its own
   channel, call GetVersion ``--calls`` times; p50/p99 latency in ms.

Usage::

    .venv/bin/python benchmarks/registry_fetch.py [--size-mb 100] [--clients 50] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mnemosyne_core.registry_client import RegistryClient

RAW_METHOD = "/bench.Raw/Stream"
CHUNK = 1 << 20


def raw_server_main(size: int) -> None:
    """Child process: stream ``size`` bytes in 1 MiB messages, no serialization."""
    payload = os.urandom(CHUNK)
    n_full, tail = divmod(size, CHUNK)

    def stream(_request, _context):
        for _ in range(n_full):
            yield payload
        if tail:
            yield payload[:tail]

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream, lambda b: b, lambda b: b)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"listening on grpc://127.0.0.1:{port}", flush=True)
    sys.stdin.read()  # run until the parent closes our stdin
    server.stop(0)


def start(argv: list[str]) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise SystemExit(f"benchmark server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn(*args)``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def time_raw(port: int, size: int) -> float:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 8 << 20)])
    call = channel.unary_stream(RAW_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    start_t = time.perf_counter()
    received = sum(len(chunk) for chunk in call(b""))
    elapsed = time.perf_counter() - start_t
    channel.close()
    assert received == size, (received, size)
    return elapsed


def time_fetch(client: RegistryClient, name: str, size: int, out=None) -> float:
    start_t = time.perf_counter()
    _, data = client.fetch(name, 1, out=out)  # includes sha256 verification
    elapsed = time.perf_counter() - start_t
    assert len(data) == size
    return elapsed


def time_stream_only(client: RegistryClient, name: str, size: int) -> float:
    start_t = time.perf_counter()
    _, chunks = client.stream(name, 1)
    received = sum(len(c) for c in chunks)
    elapsed = time.perf_counter() - start_t
    assert received == size
    return elapsed


def get_version_latencies(port: int, name: str, clients: int, calls: int) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def worker():
        with RegistryClient(f"127.0.0.1:{port}") as client:
            client.get_version(name)  # connect before the clock starts
            barrier.wait()
            mine = []
            for _ in range(calls):
                t = time.perf_counter()
                client.get_version(name, "latest")
                mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--calls", type=int, default=100, help="GetVersion calls per client")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args()
    if args.raw_server is not None:
        raw_server_main(args.raw_server)
        return 0

    size = args.size_mb * 1_000_000
    gib = size / (1 << 30)
    with tempfile.TemporaryDirectory() as tmp:
        registry, reg_port = start([sys.executable, "-c",
                                    "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
                                    "registry", "serve", "--data", tmp, "--port", "0"])
        raw, raw_port = start([sys.executable, __file__, "--raw-server", str(size)])
        try:
            with RegistryClient(f"127.0.0.1:{reg_port}", timeout=300) as client:
                client.publish(os.urandom(size), "bench", {"compatibility": {"format": "opaque"}})
                time_fetch(client, "bench", size)  # warm-up (page cache, connections)
                time_raw(raw_port, size)
                runs: dict[str, list[tuple[float, float]]] = {"raw": [], "fetch": [], "fetch_reused": [], "stream": []}
                buffer = bytearray(size)  # a long-running trainer reuses one download buffer
                for _ in range(args.repeats):  # interleaved so load drift hits all alike
                    runs["raw"].append(timed(time_raw, raw_port, size))
                    runs["fetch"].append(timed(time_fetch, client, "bench", size))
                    runs["fetch_reused"].append(timed(time_fetch, client, "bench", size, buffer))
                    runs["stream"].append(timed(time_stream_only, client, "bench", size))
            t0 = time.perf_counter()
            lat = get_version_latencies(reg_port, "bench", args.clients, args.calls)
            lat_wall = time.perf_counter() - t0
        finally:
            for proc in (registry, raw):
                proc.stdin.close()
                proc.terminate()
                proc.wait()
    wall = {k: statistics.median(w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    results = {
        "artifact_bytes": size,
        "raw_gib_s": gib / wall["raw"],
        "fetch_verified_gib_s": gib / wall["fetch"],
        "fetch_verified_reused_buffer_gib_s": gib / wall["fetch_reused"],
        "fetch_stream_only_gib_s": gib / wall["stream"],
        "client_cpu_s_per_gib": {k: v / gib for k, v in cpu.items()},
        "load_average_1min": os.getloadavg()[0],
        "get_version_clients": args.clients,
        "get_version_calls": len(lat),
        "get_version_p50_ms": 1000 * percentile(lat, 50),
        "get_version_p99_ms": 1000 * percentile(lat, 99),
        "get_version_calls_per_s": len(lat) / lat_wall,
        "cpu_count": os.cpu_count(),
    }
    results["fetch_vs_raw"] = results["fetch_verified_gib_s"] / results["raw_gib_s"]
    results["fetch_reused_vs_raw"] = results["fetch_verified_reused_buffer_gib_s"] / results["raw_gib_s"]
    results["stream_only_vs_raw"] = results["fetch_stream_only_gib_s"] / results["raw_gib_s"]
    print(f"raw gRPC stream          {results['raw_gib_s']:.2f} GiB/s")
    print(f"registry fetch+sha256    {results['fetch_verified_gib_s']:.2f} GiB/s  ({results['fetch_vs_raw']:.2f}x raw)")
    print(f"  ... into reused buffer {results['fetch_verified_reused_buffer_gib_s']:.2f} GiB/s  "
          f"({results['fetch_reused_vs_raw']:.2f}x raw)")
    print(f"registry stream only     {results['fetch_stream_only_gib_s']:.2f} GiB/s  "
          f"({results['stream_only_vs_raw']:.2f}x raw)")
    print("client CPU s/GiB         " + ", ".join(f"{k} {v:.2f}" for k, v in results["client_cpu_s_per_gib"].items()))
    print(f"GetVersion, {args.clients} clients: p50 {results['get_version_p50_ms']:.2f} ms, "
          f"p99 {results['get_version_p99_ms']:.2f} ms over {len(lat)} calls "
          f"({results['get_version_calls_per_s']:.0f} calls/s)")
    print(f"(load average {results['load_average_1min']:.1f} on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
