#!/usr/bin/env python3
"""Registry benchmark: verified fetch vs unverified fetch vs a raw gRPC byte stream; GetVersion latency.

Two server processes run side by side (so the client's GIL is not the
servers'): the registry (``mnemosyne registry serve``) and a bare gRPC
service that streams the same number of bytes from memory, in messages of the
registry's chunk size, with no protobuf, no file reads and no verification —
the ceiling for a Python gRPC stream on this machine. Its client uses the
registry client's channel options (``CHANNEL_OPTIONS``), so both
streams run on the same transport settings.

1. Fetch: a ``--size-mb`` artifact (default 100 MB) is published, then, in
   ``--repeats`` interleaved rounds (so load drift hits all rows alike):

   - ``raw``: the raw stream, bytes counted and dropped;
   - ``unverified``: ``RegistryClient.stream``, chunks counted and dropped;
   - ``verified``: ``RegistryClient.fetch`` — stream, sha256 check, bytes
     assembled in a fresh buffer (what a caller gets by default);
   - ``verified, reused buffer``: the same into one buffer passed as ``out=``
     (a trainer polling for new versions);
   - ``sha256 alone``: hashlib over the artifact in chunk-sized pieces, no
     network: the verified fetch's ceiling if nothing else needed the CPU.

   Each row reports the mean and median GiB/s with the spread, its ratio to
   the raw stream (median over median, and the median of the per-round ratios),
   and the CPU seconds per GiB of the client and of the server process.
   Targets (issue 22): verified >= 0.9x raw and >= 1 GiB/s.

   Why they may not hold: the verified fetch does the raw stream's work plus
   sha256, which runs on one thread (on the 2-core development machine 1.5-1.8
   GiB/s over cache-hot data, ~1.0 GiB/s over data that is not: the
   ``sha256 alone`` row), one copy into the result buffer and, for a fresh
   buffer, the kernel zeroing its pages, while the registry server runs on the
   same cores. When the client, its hash thread and the server together need
   more than the cores give, compare the CPU s/GiB columns rather than the rates.
2. GetVersion under load: ``--clients`` threads (default 50), each with its own
   channel, call GetVersion ``--calls`` times; p50/p99 latency in ms.

Usage::

    .venv/bin/python benchmarks/registry_fetch.py [--size-mb 100] [--repeats 7] [--chunk-kib 1024]
        [--clients 50] [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
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

from mnemosyne_registry import RegistryClient

# The registry client's channel options (message limits), so both streams run on the same settings.
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
RAW_METHOD = "/bench.Raw/Stream"
DEFAULT_CHUNK = 1 << 20  # the registry's default (and largest) fetch chunk
TARGET_RATIO, TARGET_GIB_S = 0.9, 1.0
ROWS = {"raw": "raw gRPC stream", "unverified": "registry, unverified", "verified": "registry, verified (sha256)",
        "verified_reused": "  ... into a reused buffer", "sha256": "sha256 alone, one thread"}


def raw_server_main(size: int, chunk: int) -> None:
    """Child process: stream ``size`` bytes in ``chunk``-byte messages, no serialization."""
    payload = os.urandom(chunk)
    n_full, tail = divmod(size, chunk)

    def stream(_request, _context):
        for _ in range(n_full):
            yield payload
        if tail:
            yield payload[:tail]

    handler = grpc.method_handlers_generic_handler(
        "bench.Raw", {"Stream": grpc.unary_stream_rpc_method_handler(stream, lambda b: b, lambda b: b)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_send_message_length", max(4 << 20, chunk + (64 << 10)))])
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


def process_cpu(pid: int | None) -> float | None:
    """CPU seconds used so far by all threads of ``pid`` (Linux schedstat, ns resolution), or None."""
    if pid is None:
        return None
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass  # a thread that just ended
    return total / 1e9


def measure(fn, server_pid: int | None) -> tuple[float, float, float | None]:
    """(wall seconds, this process's CPU seconds, the server's CPU seconds) of ``fn()``."""
    server0 = process_cpu(server_pid)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    server1 = process_cpu(server_pid)
    return wall, cpu, (server1 - server0 if server0 is not None and server1 is not None else None)


def raw_stream(port: int, size: int) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
    call = channel.unary_stream(RAW_METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    received = sum(len(chunk) for chunk in call(b""))
    channel.close()
    assert received == size, (received, size)


def unverified_stream(client: RegistryClient, name: str, size: int, chunk_size: int) -> None:
    _, chunks = client.stream(name, 1, chunk_size=chunk_size)
    received = sum(len(c) for c in chunks)
    assert received == size


def sha256_only(data: bytes, chunk: int) -> None:
    """The hash a verified fetch must compute, alone: its ceiling when nothing else competed for the CPU."""
    digest, view = hashlib.sha256(), memoryview(data)
    for start in range(0, len(data), chunk):
        digest.update(view[start:start + chunk])
    digest.hexdigest()


def verified_fetch(client: RegistryClient, name: str, size: int, chunk_size: int, out=None) -> None:
    _, data = client.fetch(name, 1, out=out, chunk_size=chunk_size)  # includes sha256 verification
    assert len(data) == size


def summarize(runs: dict[str, list[tuple[float, float, float | None]]], gib: float) -> dict:
    rows = {}
    raw_walls = [w for w, _, _ in runs["raw"]]
    for key, samples in runs.items():
        rates = [gib / w for w, _, _ in samples]
        server = [s for _, _, s in samples if s is not None]
        rows[key] = {
            "gib_s_median": statistics.median(rates),
            "gib_s_mean": statistics.fmean(rates),
            "gib_s_min": min(rates),
            "gib_s_max": max(rates),
            "client_cpu_s_per_gib": statistics.median(c for _, c, _ in samples) / gib,
            "server_cpu_s_per_gib": statistics.median(server) / gib if server else None,
            # the same round's raw stream over this row's time: pairs share the machine's load
            "paired_ratio_median": statistics.median(r / w for r, (w, _, _) in zip(raw_walls, samples)),
        }
    for row in rows.values():
        row["ratio_to_raw"] = row["gib_s_median"] / rows["raw"]["gib_s_median"]
    return rows


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
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunk-kib", type=int, default=0,
                        help="fetch chunk size to ask for (0: the server's default); the raw stream uses the size "
                             "the registry actually sends")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--calls", type=int, default=100, help="GetVersion calls per client")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--raw-server", type=int, nargs=2, help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args()
    if args.raw_server is not None:
        raw_server_main(*args.raw_server)
        return 0

    size = args.size_mb * 1_000_000
    gib = size / (1 << 30)
    chunk_size = args.chunk_kib << 10
    with tempfile.TemporaryDirectory() as tmp:
        registry, reg_port = start([sys.executable, "-c",
                                    "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
                                    "registry", "serve", "--data", tmp, "--port", "0"])
        raw = None
        try:
            with RegistryClient(f"127.0.0.1:{reg_port}", timeout=300) as client:
                artifact = os.urandom(size)
                client.publish(artifact, "bench", {"compatibility": {"format": "opaque"}})
                _, chunks = client.stream("bench", 1, chunk_size=chunk_size)
                chunk = len(next(chunks))  # what the server sends after clamping the request
                chunks.close()
                raw, raw_port = start([sys.executable, __file__, "--raw-server", str(size), str(chunk)])
                buffer = bytearray(size)  # a long-running trainer reuses one download buffer
                cases = {
                    "raw": (lambda: raw_stream(raw_port, size), raw.pid),
                    "unverified": (lambda: unverified_stream(client, "bench", size, chunk_size), registry.pid),
                    "verified": (lambda: verified_fetch(client, "bench", size, chunk_size), registry.pid),
                    "verified_reused": (lambda: verified_fetch(client, "bench", size, chunk_size, buffer),
                                        registry.pid),
                    "sha256": (lambda: sha256_only(artifact, chunk), None),
                }
                for fn, _ in cases.values():
                    fn()  # warm-up: page cache, connections, the reused buffer's pages
                runs: dict[str, list] = {key: [] for key in cases}
                for _ in range(args.repeats):  # interleaved so load drift hits all rows alike
                    for key, (fn, pid) in cases.items():
                        runs[key].append(measure(fn, pid))
            t0 = time.perf_counter()
            lat = get_version_latencies(reg_port, "bench", args.clients, args.calls)
            lat_wall = time.perf_counter() - t0
        finally:
            for proc in (registry, raw):
                if proc is not None:
                    proc.stdin.close()
                    proc.terminate()
                    proc.wait()
    rows = summarize(runs, gib)
    verified = rows["verified"]
    results = {
        "artifact_bytes": size,
        "chunk_bytes": chunk,
        "repeats": args.repeats,
        "rows": rows,
        "targets": {
            "verified_vs_raw": TARGET_RATIO, "verified_gib_s": TARGET_GIB_S,
            "ratio_met": verified["ratio_to_raw"] >= TARGET_RATIO,
            "throughput_met": verified["gib_s_median"] >= TARGET_GIB_S,
        },
        "load_average_1min": os.getloadavg()[0],
        "get_version_clients": args.clients,
        "get_version_calls": len(lat),
        "get_version_p50_ms": 1000 * percentile(lat, 50),
        "get_version_p99_ms": 1000 * percentile(lat, 99),
        "get_version_calls_per_s": len(lat) / lat_wall,
        "cpu_count": os.cpu_count(),
    }
    print(f"fetch of {size / 1e6:.0f} MB in {chunk >> 10} KiB messages, {args.repeats} interleaved rounds")
    print(f"{'':30s} {'median':>7s} {'mean':>6s} {'min..max':>11s}  {'x raw':>5s} {'paired':>6s}  "
          f"{'CPU s/GiB: client':>17s} {'server':>6s}")
    for key, label in ROWS.items():
        r = rows[key]
        server = f"{r['server_cpu_s_per_gib']:.2f}" if r["server_cpu_s_per_gib"] is not None else "n/a"
        print(f"{label:30s} {r['gib_s_median']:7.2f} {r['gib_s_mean']:6.2f} "
              f"{r['gib_s_min']:5.2f}..{r['gib_s_max']:<5.2f}  {r['ratio_to_raw']:5.2f} {r['paired_ratio_median']:6.2f}  "
              f"{r['client_cpu_s_per_gib']:17.2f} {server:>6s}")
    print("(GiB/s; 'x raw' = median / raw median, 'paired' = median of each round's raw time / this row's time)")
    t = results["targets"]
    print(f"target verified >= {TARGET_RATIO}x raw: {'met' if t['ratio_met'] else 'NOT met'} "
          f"({verified['ratio_to_raw']:.2f}x); >= {TARGET_GIB_S:.0f} GiB/s: "
          f"{'met' if t['throughput_met'] else 'NOT met'} ({verified['gib_s_median']:.2f} GiB/s)")
    print(f"GetVersion, {args.clients} clients: p50 {results['get_version_p50_ms']:.2f} ms, "
          f"p99 {results['get_version_p99_ms']:.2f} ms over {len(lat)} calls "
          f"({results['get_version_calls_per_s']:.0f} calls/s)")
    print(f"(load average {results['load_average_1min']:.1f} on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
