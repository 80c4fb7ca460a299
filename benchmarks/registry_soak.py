#!/usr/bin/env python3
"""Registry soak: many clients and watchers while the server is SIGKILLed and restarted.

A bounded chaos load test on loopback. It starts ``mnemosyne registry serve``
on its own temporary data directory (port 0) and then:

1. **Seed**: one opaque version per name (``--names``), aliases ``prod`` and
   ``canary`` set; a *mover* thread starts moving those aliases to random
   versions (``--move-interval-ms``) and keeps doing so until the end.
2. **Baseline**: GetVersion latency (``--latency-threads`` × ``--latency-calls``)
   and the server's thread count (``Threads:`` of ``/proc/PID/status``)
   without watchers.
3. **Watchers**: ``--watchers`` WatchAlias streams (over ``latest``, ``prod``
   and ``canary`` of every name) are opened on a few shared channels
   (``--watch-channels``, one asyncio thread); once each has received its
   first event (or ``--connect-timeout-s`` passed) latency and thread count
   are measured again.
4. **Chaos** (``--duration-s``): ``--clients`` threads publish (``--publish-frac``
   of their operations, 10-200 KB random bytes), fetch and verify, GetVersion
   and list; meanwhile the server is SIGKILLed ``--kills`` times at random
   moments and restarted on the same directory (a new port). Clients and
   watchers reconnect; watchers resume with ``after_sequence``. Right after
   each restart, before anyone reconnects, the data directory must hold no
   temp file and no orphan blob, every listed version's blob must exist, and
   versions must be numbered 1..n.
5. **Final**: clients and mover stop, watchers get time to catch up, every
   listed version is fetched and verified, the server is stopped (SIGTERM),
   the alias event log is read from the database and compared with what each
   watcher saw, and ``mnemosyne registry fsck`` runs on the directory.

Invariants (any violation: exit status 1, the summary names it):

* no partial version is ever visible: every version a client saw (publish
  ack, GetVersion, list, fetch, watch event) fetches completely and verifies;
  a fetch never fails with DATA_LOSS/IntegrityError while the server is up;
* versions are gapless 1..n per name in every listing, and no acknowledged
  publish or alias move is lost by a SIGKILL; a version's content never
  changes and is always bytes some client published under that name;
* after every restart: 0 temp files, 0 orphan blobs, 0 missing blobs;
  afterwards ``fsck`` reports 0 temp, 0 orphans, 0 corrupt, 0 missing;
* watchers: events of each stream arrive in strictly increasing sequence
  order, a resumed stream neither repeats nor skips an event (compared with
  the database's alias event log), every watcher connects and catches up;
* no call fails while the server is up (a kill during the call is fine);
  the server stops cleanly on SIGTERM.

Targets (exit status 2 if only these are missed): GetVersion p99 with the
watchers open at most ``--max-p99-ratio`` times the p99 without (default
2.0), and at most ``--max-thread-growth`` more server threads with the
watchers open (a watch should cost no thread). The timings are
machine-dependent, so tests use only the invariants.

Usage (full form, < ~2 minutes; CI runs a short form, tests/test_registry_soak.py)::

    .venv/bin/python benchmarks/registry_soak.py --clients 50 --watchers 500 --kills 20 --json out.json
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
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

from mnemosyne_registry import (
    IntegrityError,
    RegistryClient,
    RegistryClientError,
)
from mnemosyne_registry import registry_pb2 as pb
from mnemosyne_registry import registry_pb2_grpc as pb_grpc

OPAQUE = {"compatibility": {"format": "opaque"}}
MANUAL_ALIASES = ("prod", "canary")
WATCHED_ALIASES = ("latest", *MANUAL_ALIASES)
TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"})
SERVE = "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"
EXAMPLES_PER_KIND = 10


# -- server process -------------------------------------------------------------
class Server:
    """One ``registry serve`` process on ``data`` (port 0), stderr to ``log``."""

    def __init__(self, data: Path, log: Path, timeout_s: float = 60.0):
        self.log = open(log, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "registry", "serve", "--data", str(data), "--port", "0"],
            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log,
        )
        line = _read_line(self.proc, timeout_s)
        match = re.search(rb"listening on grpc://127\.0\.0\.1:(\d+)", line)
        if not match:
            self.kill()
            raise RuntimeError(f"registry server did not start (first line {line!r}; log {log})")
        self.port = int(match.group(1))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def threads(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM; the exit status, or None (then SIGKILLed) if it did not stop in time."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def wait(self, timeout_s: float | None = None) -> int:
        rc = self.proc.wait(timeout_s)
        self.proc.stdout.close()
        self.log.close()
        return rc


def _read_line(proc: subprocess.Popen, timeout_s: float) -> bytes:
    """The first stdout line of ``proc`` within ``timeout_s`` (b"" on EOF or timeout)."""
    fd, buf = proc.stdout.fileno(), b""
    deadline = time.monotonic() + timeout_s
    while b"\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        buf += chunk
    return buf


class Endpoint:
    """Where the server is: ``(epoch, port)``; port None while it is down.

    ``epoch`` grows on every down and up, so a call that failed can tell
    whether a kill happened while it ran (then the failure is expected).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self.epoch = 0
        self.port: int | None = None

    def up(self, port: int) -> None:
        with self._cond:
            self.epoch += 1
            self.port = port
            self._cond.notify_all()

    def down(self) -> None:
        with self._cond:
            self.epoch += 1
            self.port = None
            self._cond.notify_all()

    def snapshot(self) -> tuple[int, int | None]:
        with self._cond:
            return self.epoch, self.port

    def wait_up(self, timeout_s: float) -> tuple[int, int | None]:
        with self._cond:
            self._cond.wait_for(lambda: self.port is not None, timeout_s)
            return self.epoch, self.port


# -- what everyone saw ------------------------------------------------------------
class Ledger:
    """Everything clients sent and saw, and every invariant violation (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.attempted: dict[str, set[str]] = collections.defaultdict(set)  # name -> sha256s sent
        self.acked: dict[tuple[str, int], str] = {}  # (name, number) -> sha256 of acked publishes
        self.seen: dict[tuple[str, int], str] = {}   # (name, number) -> sha256 seen by anyone
        self.known_max: dict[str, int] = collections.defaultdict(int)
        self.acked_moves: list[tuple[str, str, int, int]] = []  # (name, alias, version, unix_ms)
        self.ops: collections.Counter = collections.Counter()
        self.transient: collections.Counter = collections.Counter()  # "op:CODE" failed during a kill
        self.violations: collections.Counter = collections.Counter()
        self.examples: dict[str, list[str]] = collections.defaultdict(list)
        self.bytes_published = 0
        self.bytes_fetched = 0
        self.ops_per_life: collections.Counter = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)  # op -> seconds of successful calls

    def violation(self, kind: str, detail: str) -> None:
        with self.lock:
            self.violations[kind] += 1
            if len(self.examples[kind]) < EXAMPLES_PER_KIND:
                self.examples[kind].append(detail)

    def saw(self, version: pb.Version, source: str) -> None:
        """Record a version some response showed; its content must never change."""
        key = (version.name, version.number)
        with self.lock:
            if version.sha256 not in self.attempted[version.name]:
                bad = f"{source}: {key} has sha256 {version.sha256[:12]} that no client published under this name"
            elif self.seen.setdefault(key, version.sha256) != version.sha256:
                bad = f"{source}: {key} changed from {self.seen[key][:12]} to {version.sha256[:12]}"
            else:
                bad = None
                self.known_max[version.name] = max(self.known_max[version.name], version.number)
        if bad:
            self.violation("content_mismatch", bad)


def check_gapless(ledger: Ledger, listing: dict[str, list[pb.Version]], when: str,
                  acked_before: dict[tuple[str, int], str]) -> None:
    """Versions 1..n per name, and every publish acked before the listing began is in it, unchanged."""
    for name, versions in listing.items():
        numbers = [v.number for v in versions]
        if numbers != list(range(1, len(numbers) + 1)):
            ledger.violation("gaps", f"{when}: {name} numbers {numbers[:5]}...{numbers[-5:]} are not 1..{len(numbers)}")
        for v in versions:
            ledger.saw(v, f"list ({when})")
    for (name, number), sha in acked_before.items():
        got = {v.number: v.sha256 for v in listing.get(name, [])}.get(number)
        if got != sha:
            ledger.violation("acked_publish_lost", f"{when}: acked {name}:{number} is {'missing' if got is None else 'changed'}")


def list_all(client: RegistryClient) -> dict[str, list[pb.Version]]:
    return {o.name: client.list(o.name) for o in client.list()}


# -- load -----------------------------------------------------------------------
class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path):
        self.args = args
        self.workdir = workdir
        self.data = workdir / "data"
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.names = [f"soak-{i}" for i in range(args.names)]
        self.endpoint = Endpoint()
        self.ledger = Ledger()
        self.stop = threading.Event()
        self.server: Server | None = None
        self.lives = 0
        self.up_at = 0.0  # time.monotonic() when the current server life began
        self.restart_s: list[float] = []
        self.recovery = collections.Counter()

    # -- server lives --------------------------------------------------------------
    def start_server(self) -> Server:
        self.lives += 1
        return Server(self.data, self.logs / f"server-{self.lives}.log", self.args.start_timeout_s)

    def restart(self) -> None:
        """SIGKILL, look at what the crash left, restart, check recovery, let everyone reconnect."""
        self.endpoint.down()  # before the kill: calls that fail from now on failed because of it
        self.server.kill()
        tmp = self.data / "tmp"
        self.recovery["temp_files_left_by_kill"] += sum(1 for _ in tmp.iterdir()) if tmp.is_dir() else 0
        blobs_before = blob_digests(self.data)
        t0 = time.perf_counter()
        self.server = self.start_server()
        self.restart_s.append(time.perf_counter() - t0)
        self.check_recovered(f"restart {len(self.restart_s)}", blobs_before)
        self.endpoint.up(self.server.port)

    def check_recovered(self, when: str, blobs_before: set[str]) -> None:
        """With nobody else connected: no temp file, no orphan, no missing blob, gapless versions."""
        temp = [p.name for p in (self.data / "tmp").iterdir()]
        with self.ledger.lock:
            acked_before = dict(self.ledger.acked)
        with RegistryClient(f"127.0.0.1:{self.server.port}", timeout=self.args.call_timeout_s) as client:
            listing = list_all(client)
        check_gapless(self.ledger, listing, when, acked_before)
        referenced = {v.sha256 for versions in listing.values() for v in versions}
        blobs = blob_digests(self.data)
        orphans, missing = blobs - referenced, referenced - blobs
        self.recovery["orphans_removed_by_recovery"] += len(blobs_before - blobs)
        self.recovery["temp_after_restart"] += len(temp)
        self.recovery["orphans_after_restart"] += len(orphans)
        self.recovery["missing_after_restart"] += len(missing)
        for kind, items in (("temp_after_restart", temp), ("orphans_after_restart", orphans),
                            ("missing_after_restart", missing)):
            if items:
                self.ledger.violation(kind, f"{when}: {sorted(items)[:3]}")

    # -- clients ---------------------------------------------------------------------
    def failed(self, op: str, exc: RegistryClientError, epoch: int) -> None:
        """Classify a failed call: expected if a kill happened while it ran, else a violation."""
        killed = self.endpoint.snapshot()[0] != epoch
        if isinstance(exc, IntegrityError) or exc.code == "DATA_LOSS":
            if killed and isinstance(exc, IntegrityError):
                with self.ledger.lock:  # a cut stream; the final pass re-fetches every version
                    self.ledger.transient[f"{op}:IntegrityError"] += 1
            else:
                self.ledger.violation("partial_version", f"{op}: {exc}")
        elif exc.code in TRANSIENT and killed:
            with self.ledger.lock:
                self.ledger.transient[f"{op}:{exc.code}"] += 1
        elif exc.code in TRANSIENT:
            self.ledger.violation("failed_while_up", f"{op}: {exc}")
        elif exc.code == "NOT_FOUND":
            self.ledger.violation("vanished", f"{op}: {exc}")
        else:
            self.ledger.violation("unexpected_error", f"{op}: {exc}")

    def pick_ref(self, rng: random.Random, name: str) -> int | str:
        r = rng.random()
        if r < 0.35:
            return "latest"
        if r < 0.6:
            return rng.choice(MANUAL_ALIASES)
        with self.ledger.lock:
            top = self.ledger.known_max[name]
        return rng.randint(1, top)

    def op_publish(self, client: RegistryClient, rng: random.Random, name: str | None = None) -> None:
        name = name or rng.choice(self.names)
        data = rng.randbytes(rng.randint(self.args.min_kb, self.args.max_kb) << 10)
        sha = hashlib.sha256(data).hexdigest()
        with self.ledger.lock:
            self.ledger.attempted[name].add(sha)  # before sending: it may commit although the ack is lost
        v = client.publish(data, name, OPAQUE)
        if (v.name, v.sha256, v.size) != (name, sha, len(data)):
            self.ledger.violation("content_mismatch", f"publish ack {v.name}:{v.number} does not describe the upload")
        with self.ledger.lock:
            self.ledger.acked[(name, v.number)] = sha
            self.ledger.bytes_published += len(data)
        self.ledger.saw(v, "publish")

    def op_fetch(self, client: RegistryClient, rng: random.Random) -> None:
        name = rng.choice(self.names)
        v, data = client.fetch(name, self.pick_ref(rng, name))  # sha256-verified by the client
        if len(data) != v.size or v.name != name:
            self.ledger.violation("partial_version", f"fetch {name}: {len(data)} bytes of {v.name}:{v.number} ({v.size})")
        with self.ledger.lock:
            self.ledger.bytes_fetched += len(data)
        self.ledger.saw(v, "fetch")

    def op_get_version(self, client: RegistryClient, rng: random.Random) -> None:
        name = rng.choice(self.names)
        self.ledger.saw(client.get_version(name, self.pick_ref(rng, name)), "get_version")

    def op_list(self, client: RegistryClient, rng: random.Random) -> None:
        name = rng.choice(self.names)
        with self.ledger.lock:
            acked_before = {k: s for k, s in self.ledger.acked.items() if k[0] == name}
        check_gapless(self.ledger, {name: client.list(name)}, "list during the run", acked_before)

    def client_loop(self, index: int) -> None:
        rng = random.Random(f"{self.args.seed}/client/{index}")
        a = self.args
        ops = [(a.publish_frac, "publish", self.op_publish), (a.list_frac, "list", self.op_list),
               (a.get_version_frac, "get_version", self.op_get_version), (1.0, "fetch", self.op_fetch)]
        client, client_epoch = None, None
        try:
            while not self.stop.is_set():
                epoch, port = self.endpoint.wait_up(0.5)
                if port is None:
                    continue
                if client_epoch != epoch:
                    if client is not None:
                        client.close()
                    client, client_epoch = RegistryClient(f"127.0.0.1:{port}", timeout=a.call_timeout_s), epoch
                r, acc = rng.random(), 0.0
                for frac, op, fn in ops:
                    acc += frac
                    if r < acc:
                        break
                t_op = time.perf_counter()
                try:
                    fn(client, rng)
                except RegistryClientError as exc:
                    self.failed(op, exc, epoch)
                else:
                    with self.ledger.lock:
                        self.ledger.ops[op] += 1
                        self.ledger.ops_per_life[epoch] += 1
                        self.ledger.latency[op].append(time.perf_counter() - t_op)
                self.stop.wait(a.think_ms / 1000)
        finally:
            if client is not None:
                client.close()

    def mover_loop(self) -> None:
        rng = random.Random(f"{self.args.seed}/mover")
        client, client_epoch = None, None
        try:
            while not self.stop.wait(self.args.move_interval_ms / 1000):
                epoch, port = self.endpoint.snapshot()
                if port is None:
                    continue
                if client_epoch != epoch:
                    if client is not None:
                        client.close()
                    client, client_epoch = RegistryClient(f"127.0.0.1:{port}", timeout=self.args.call_timeout_s), epoch
                name, alias = rng.choice(self.names), rng.choice(MANUAL_ALIASES)
                with self.ledger.lock:
                    version = rng.randint(1, self.ledger.known_max[name])
                try:
                    a = client.set_alias(name, alias, version)
                except RegistryClientError as exc:
                    self.failed("move", exc, epoch)
                    continue
                with self.ledger.lock:
                    self.ledger.ops["move"] += 1
                    self.ledger.acked_moves.append((name, alias, a.version, a.updated_unix_ms))
                if a.version != version:
                    self.ledger.violation("unexpected_error", f"set_alias {name}@{alias}={version} answered {a.version}")
        finally:
            if client is not None:
                client.close()

    def probe_resume(self, client: RegistryClient) -> bool:
        """Does the server honour ``after_sequence``? (Tells the watch violations' cause apart.)

        A live watch of ``prod`` sees its current target (sequence s0) and two
        moves (s1, s2). A watch resumed after s0 must start with s1; a server that
        ignores ``after_sequence`` starts with the current target, s2.
        """
        name, timeout = self.names[0], self.args.call_timeout_s
        with grpc.insecure_channel(client.target) as channel:
            stub = pb_grpc.RegistryServiceStub(channel)
            live = stub.WatchAlias(pb.WatchAliasRequest(name=name, alias="prod"), timeout=timeout)
            s0 = next(live).sequence
            for _ in range(2):
                a = client.set_alias(name, "prod", 1)
                with self.ledger.lock:
                    self.ledger.acked_moves.append((name, "prod", a.version, a.updated_unix_ms))
            s1, s2 = next(live).sequence, next(live).sequence
            live.cancel()
            resumed = stub.WatchAlias(pb.WatchAliasRequest(name=name, alias="prod", after_sequence=s0), timeout=timeout)
            first = next(resumed).sequence
            resumed.cancel()
        if first not in (s1, s2):
            self.ledger.violation("watch_unknown_event", f"resume probe: got sequence {first}, moves were {s1}, {s2}")
        return first == s1

    # -- measurements ------------------------------------------------------------------
    def measure_get_version(self) -> dict:
        """GetVersion latency from ``--latency-threads`` threads, each with its own channel."""
        a = self.args
        port = self.endpoint.snapshot()[1]
        times: list[float] = []
        failed = collections.Counter()
        lock = threading.Lock()

        def worker(seed: int) -> None:
            rng = random.Random(f"{a.seed}/latency/{seed}")
            with RegistryClient(f"127.0.0.1:{port}", timeout=a.latency_timeout_s) as client:
                mine, streak = [], 0
                for i in range(a.latency_calls + 10):
                    name = rng.choice(self.names)
                    t0 = time.perf_counter()
                    try:
                        client.get_version(name, rng.choice(WATCHED_ALIASES))
                    except RegistryClientError as exc:
                        with lock:
                            failed[exc.code] += 1
                        streak += 1
                        if streak >= 3:  # a starved server: stop here rather than wait out every deadline
                            break
                        continue
                    streak = 0
                    if i >= 10:  # the first calls warm up the channel
                        mine.append(time.perf_counter() - t0)
            with lock:
                times.extend(mine)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(a.latency_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"calls": len(times), "failed": dict(failed), **percentiles(times)}

    # -- the run -------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.args
        t_start = time.perf_counter()
        self.server = self.start_server()
        self.check_recovered("first start", set())
        self.endpoint.up(self.server.port)
        with RegistryClient(f"127.0.0.1:{self.server.port}", timeout=a.call_timeout_s) as client:
            rng = random.Random(f"{a.seed}/seed")
            for name in self.names:
                self.op_publish(client, rng, name)
                for alias in MANUAL_ALIASES:
                    client.set_alias(name, alias, 1)
            resumes = self.probe_resume(client)
        mover = threading.Thread(target=self.mover_loop, name="soak-mover")
        mover.start()

        result: dict = {"config": {k: v for k, v in vars(a).items() if k not in ("json", "workdir")},
                        "server_resumes_watches": resumes}
        baseline = self.measure_get_version()
        threads_without = self.server.threads()
        watchers = WatcherPool(self, a.watchers)
        watchers.start()
        t_connect = time.perf_counter()
        connected = watchers.wait_connected(a.connect_timeout_s)
        connect_s = time.perf_counter() - t_connect
        with_watchers = self.measure_get_version()
        threads_with = self.server.threads()
        result["server_threads"] = {"without_watchers": threads_without, "with_watchers": threads_with,
                                    "growth": threads_with - threads_without}
        ratio = (with_watchers["p99_ms"] / baseline["p99_ms"]
                 if "p99_ms" in with_watchers and "p99_ms" in baseline and not with_watchers["failed"] else None)
        result["get_version_latency"] = {"without_watchers": baseline, "with_watchers": with_watchers,
                                         "p99_ratio": None if ratio is None else round(ratio, 2)}
        result["watchers_connected_before_chaos"] = {"connected": connected, "of": a.watchers,
                                                     "seconds": round(connect_s, 2)}

        # Chaos: clients load the server while it is killed at random moments.
        clients = [threading.Thread(target=self.client_loop, args=(i,), name=f"soak-client-{i}")
                   for i in range(a.clients)]
        for t in clients:
            t.start()
        rng = random.Random(f"{a.seed}/kills")
        t0 = self.up_at = time.monotonic()
        slot = a.duration_s / max(a.kills, 1)
        for k in range(a.kills):
            # A random moment in the k-th slot, but only once this server life has had some load.
            target = t0 + slot * (k + rng.uniform(0.2, 0.9))
            time.sleep(max(0.0, target - time.monotonic(), a.min_up_s - (time.monotonic() - self.up_at)))
            self.restart()
            self.up_at = time.monotonic()
        time.sleep(max(a.min_up_s, t0 + a.duration_s - time.monotonic()))
        chaos_s = time.monotonic() - t0
        self.stop.set()
        for t in (*clients, mover):
            t.join(a.call_timeout_s + 5)
        result["stuck_threads"] = sum(t.is_alive() for t in (*clients, mover))
        if result["stuck_threads"]:
            self.ledger.violation("stuck", f"{result['stuck_threads']} client threads did not stop")

        # Final state: watchers catch up; then (watchers closed) everything listed fetches and verifies.
        listing, fetched, caught_up = {}, 0, 0
        with RegistryClient(f"127.0.0.1:{self.server.port}", timeout=a.call_timeout_s) as client:
            try:
                final = {(n, al): client.get_version(n, al).number for n in self.names for al in WATCHED_ALIASES}
            except RegistryClientError as exc:
                self.ledger.violation("final_check_failed", f"reading the final alias targets: {exc}")
            else:
                caught_up = watchers.wait_caught_up(final, a.catch_up_timeout_s)
            watchers.stop()
            with self.ledger.lock:
                acked_before = dict(self.ledger.acked)
            try:
                listing = list_all(client)
                check_gapless(self.ledger, listing, "final", acked_before)
                fetched = self.fetch_all(client, listing, watchers.versions_seen())
            except RegistryClientError as exc:
                self.ledger.violation("final_check_failed", f"listing or fetching the final versions: {exc}")
        rc = self.server.terminate(a.stop_timeout_s)
        if rc != 0:
            self.ledger.violation("unclean_stop", f"server exit status on SIGTERM: {rc}")
        result["watch"] = watchers.compare_with_log(self.data, self.names)
        result["watch"]["caught_up"] = caught_up
        self.check_moves_durable()
        result["fsck"] = run_fsck(self.data)
        if result["fsck"]["rc"] != 0 or any(result["fsck"][k] for k in ("temp", "orphans", "corrupt", "missing")):
            self.ledger.violation("fsck", result["fsck"]["output"])

        led = self.ledger
        per_life = [led.ops_per_life[e] for e in sorted(led.ops_per_life)]
        result.update({
            "elapsed_s": round(time.perf_counter() - t_start, 1),
            "chaos_s": round(chaos_s, 1),
            "kills": len(self.restart_s),
            "restart_s": {"median": round(sorted(self.restart_s)[len(self.restart_s) // 2], 2) if self.restart_s else None,
                          "max": round(max(self.restart_s), 2) if self.restart_s else None},
            "ops": dict(led.ops),
            "chaos_latency_ms": {op: percentiles(times) for op, times in sorted(led.latency.items())},
            "ops_per_server_life": {"min": min(per_life, default=0), "max": max(per_life, default=0)},
            "mb_published": round(led.bytes_published / 1e6, 1),
            "mb_fetched": round(led.bytes_fetched / 1e6, 1),
            "failed_during_kills": dict(sorted(led.transient.items())),
            "versions": {"total": sum(len(v) for v in listing.values()),
                         "acked": len(led.acked), "seen": len(led.seen), "fetched_at_end": fetched,
                         "per_name": {n: len(v) for n, v in listing.items()}},
            "recovery": dict(self.recovery),
            "violations": dict(led.violations),
            "examples": {k: v for k, v in led.examples.items()},
        })
        result["ok"] = not led.violations
        result["targets"] = self.targets(result)
        return result

    def fetch_all(self, client: RegistryClient, listing: dict[str, list[pb.Version]],
                  watched: set[tuple[str, int]]) -> int:
        """Fetch and verify every listed version; every version anyone saw must be among them."""
        listed = {(v.name, v.number): v.sha256 for versions in listing.values() for v in versions}
        with self.ledger.lock:
            seen = dict(self.ledger.seen)
        for key, sha in seen.items():
            if listed.get(key) != sha:
                self.ledger.violation("vanished", f"{key} was seen with {sha[:12]}, finally {listed.get(key)}")
        for key in sorted(watched - set(listed)):
            self.ledger.violation("vanished", f"a watch event pointed at {key}, which is not listed")

        def one(key: tuple[str, int]) -> None:
            try:
                v, data = client.fetch(*key)
            except RegistryClientError as exc:
                self.ledger.violation("partial_version", f"final fetch {key}: {exc}")
                return
            if hashlib.sha256(data).hexdigest() != listed[key] or len(data) != v.size:
                self.ledger.violation("partial_version", f"final fetch {key}: bytes do not match the version")

        with futures.ThreadPoolExecutor(4) as pool:
            list(pool.map(one, sorted(listed)))
        return len(listed)

    def check_moves_durable(self) -> None:
        """Every acknowledged alias move is in the database's event log (unless trimmed as history)."""
        from service.registry.storage import Store

        store = Store(f"sqlite:///{self.data / 'registry.db'}")
        try:
            for name in self.names:
                for alias in MANUAL_ALIASES:
                    events = store.alias_events_after(name, alias, 0)
                    logged = {(e.version, e.updated_ms) for e in events}
                    oldest = min((e.updated_ms for e in events), default=0)
                    for n, al, version, ms in self.ledger.acked_moves:
                        if (n, al) == (name, alias) and ms > oldest and (version, ms) not in logged:
                            self.ledger.violation("acked_move_lost", f"{name}@{alias}={version} at {ms}")
        finally:
            store.close()

    def targets(self, result: dict) -> dict:
        a = self.args
        ratio = result["get_version_latency"]["p99_ratio"]
        growth = result["server_threads"]["growth"]
        return {
            "p99_ratio": {"value": ratio, "max": a.max_p99_ratio, "met": ratio is not None and ratio <= a.max_p99_ratio},
            "thread_growth": {"value": growth, "max": a.max_thread_growth, "met": growth <= a.max_thread_growth},
        }


def percentiles(times: list[float]) -> dict:
    """p50/p99/max in milliseconds of ``times`` (seconds); empty if there are none."""
    times = sorted(times)
    if not times:
        return {}

    def at(q: float) -> float:
        return round(1000 * times[min(len(times) - 1, int(q * len(times)))], 3)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(1000 * times[-1], 3)}


def blob_digests(data: Path) -> set[str]:
    return {p.name for p in (data / "blobs").glob("*/*") if re.fullmatch(r"[0-9a-f]{64}", p.name)}


def run_fsck(data: Path) -> dict:
    """``mnemosyne registry fsck --data DATA`` (offline, read-only), parsed."""
    proc = subprocess.run([sys.executable, "-c", SERVE, "registry", "fsck", "--data", str(data)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = (proc.stdout + proc.stderr).strip()
    match = re.search(r"fsck: (\d+) blobs verified, (\d+) temp files, (\d+) orphans, (\d+) corrupt, (\d+) missing", output)
    counts = dict(zip(("verified", "temp", "orphans", "corrupt", "missing"),
                      (int(x) for x in match.groups()) if match else (0, -1, -1, -1, -1)))
    return {"rc": proc.returncode, **counts, "output": output[-2000:]}


# -- watchers -----------------------------------------------------------------------
class WatchState:
    """What one watcher saw: ``events`` are (sequence, version), in arrival order."""

    def __init__(self, index: int, name: str, alias: str):
        self.index, self.name, self.alias = index, name, alias
        self.first_seq: int | None = None
        self.last = 0
        self.events: list[tuple[int, int]] = []
        self.out_of_order = 0
        self.duplicates = 0
        self.wrong_alias = 0
        self.connects = 0
        self.call = None
        self.epoch: int | None = None  # the server life whose channel the open stream uses

    def observe(self, event: pb.AliasEvent) -> None:
        if (event.name, event.alias) != (self.name, self.alias):
            self.wrong_alias += 1
            return
        seq = event.sequence
        if self.first_seq is None:
            self.first_seq = seq
        elif seq < self.last:
            self.out_of_order += 1
            return
        elif seq == self.last:
            self.duplicates += 1
            return
        self.events.append((seq, 0 if event.deleted else event.version))
        self.last = seq


class WatcherPool:
    """``n`` WatchAlias streams on a few shared channels, served by one asyncio thread.

    Each stream follows one of ``latest``/``prod``/``canary`` of one name. When
    the server goes away a stream resumes on the new one with
    ``after_sequence`` = the last sequence it received.
    """

    def __init__(self, soak: Soak, n: int):
        self.soak = soak
        self.endpoint = soak.endpoint
        targets = [(name, alias) for name in soak.names for alias in WATCHED_ALIASES]
        self.watchers = [WatchState(i, *targets[i % len(targets)]) for i in range(n)]
        self.n_channels = max(1, soak.args.watch_channels)
        self._channels: dict[int, list] = {}
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="soak-watchers", daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def versions_seen(self) -> set[tuple[str, int]]:
        """(name, number) of every version a watch event pointed at."""
        return {(w.name, v) for w in self.watchers for _, v in list(w.events) if v}

    def wait_connected(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(w.first_seq is None for w in self.watchers):
            time.sleep(0.05)
        return sum(w.first_seq is not None for w in self.watchers)

    def wait_caught_up(self, final: dict[tuple[str, str], int], timeout_s: float) -> int:
        """Wait until every watcher's last event points where its alias finally points (and is quiet)."""
        deadline = time.monotonic() + timeout_s

        def done() -> int:
            return sum(bool(w.events) and w.events[-1][1] == final[(w.name, w.alias)] for w in self.watchers)

        while time.monotonic() < deadline and done() < len(self.watchers):
            time.sleep(0.05)
        time.sleep(0.5)  # let stragglers of a burst arrive: compare_with_log checks the exact sequence
        return done()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        tasks = [asyncio.create_task(self._follow(w)) for w in self.watchers]
        janitor = asyncio.create_task(self._close_stale_channels())
        await self._stop.wait()
        self._stopping = True
        for w in self.watchers:
            if w.call is not None:
                w.call.cancel()
        _, pending = await asyncio.wait(tasks, timeout=10)
        for t in pending:
            t.cancel()
        janitor.cancel()
        for channels in self._channels.values():
            for ch in channels:
                await ch.close()

    def _stub(self, epoch: int, port: int, index: int):
        if epoch not in self._channels:
            self._channels[epoch] = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(self.n_channels)]
        return pb_grpc.RegistryServiceStub(self._channels[epoch][index % self.n_channels])

    async def _close_stale_channels(self) -> None:
        """Close the channels of a past server life once no stream uses them any more.

        (Closing a channel cancels its calls: a stream must not be cut that way
        before it has seen its own failure.)
        """
        while True:
            await asyncio.sleep(0.2)
            in_use = {w.epoch for w in self.watchers}
            epoch = self.endpoint.snapshot()[0]
            for old in [e for e in self._channels if e < epoch and e not in in_use]:
                for ch in self._channels.pop(old):
                    await ch.close()

    async def _follow(self, w: WatchState) -> None:
        ledger = self.soak.ledger
        while not self._stopping:
            epoch, port = self.endpoint.snapshot()
            if port is None:
                await asyncio.sleep(0.02)
                continue
            request = pb.WatchAliasRequest(name=w.name, alias=w.alias, after_sequence=w.last)
            w.epoch = epoch
            w.call = self._stub(epoch, port, w.index).WatchAlias(request)
            w.connects += 1
            code = "OK"
            try:
                async for event in w.call:
                    w.observe(event)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            except asyncio.CancelledError:
                if self._stopping or asyncio.current_task().cancelling():
                    return
                code = "CANCELLED"  # the call was cancelled, not this task
            finally:
                w.epoch = None
            if self._stopping:
                return
            if self.endpoint.snapshot()[0] == epoch:  # the server is (still) up: this stream should not end
                ledger.violation("watch_failed_while_up", f"{w.name}@{w.alias} watcher {w.index}: {code}")
                if code == "OUT_OF_RANGE":
                    w.last = 0
                await asyncio.sleep(0.2)
            else:
                with ledger.lock:
                    ledger.transient[f"watch:{code}"] += 1
                while self.endpoint.snapshot()[0] == epoch and not self._stopping:
                    await asyncio.sleep(0.02)

    def compare_with_log(self, data: Path, names: list[str]) -> dict:
        """Compare each watcher's events with the alias event log in the (stopped) server's database."""
        from service.registry.errors import OutOfRange
        from service.registry.storage import Store

        ledger = self.soak.ledger
        store = Store(f"sqlite:///{data / 'registry.db'}")
        try:
            log = {(n, al): store.alias_events_after(n, al, 0) for n in names for al in WATCHED_ALIASES}
            totals = collections.Counter()
            for w in self.watchers:
                events = log[(w.name, w.alias)]
                by_seq = {e.sequence: (e.version or 0) for e in events}
                totals["events"] += len(w.events)
                totals["reconnects"] += max(0, w.connects - 1)
                for kind, count in (("watch_out_of_order", w.out_of_order), ("watch_duplicate", w.duplicates),
                                    ("watch_wrong_alias", w.wrong_alias)):
                    if count:
                        ledger.violation(kind, f"{w.name}@{w.alias} watcher {w.index}: {count}")
                    totals[kind] += count
                if w.first_seq is None:
                    ledger.violation("watch_never_connected", f"{w.name}@{w.alias} watcher {w.index}")
                    totals["never_connected"] += 1
                    continue
                low = w.first_seq
                try:
                    store.check_resume(w.name, w.alias, low)
                except OutOfRange:  # older events were trimmed: compare what the log still holds
                    low = max(low, events[0].sequence - 1)
                    totals["trimmed_windows"] += 1
                expected = [e.sequence for e in events if e.sequence > low]
                got = [s for s, _ in w.events if s > low]
                missed = sorted(set(expected) - set(got))
                unknown = sorted(set(got) - set(expected))
                wrong_version = [s for s, v in w.events if s in by_seq and by_seq[s] != v]
                for kind, items in (("watch_missed", missed), ("watch_unknown_event", unknown),
                                    ("watch_wrong_version", wrong_version)):
                    if items:
                        ledger.violation(kind, f"{w.name}@{w.alias} watcher {w.index}: sequences {items[:5]}")
                    totals[kind] += len(items)
                if events and w.last != events[-1].sequence:
                    ledger.violation("watch_not_caught_up",
                                     f"{w.name}@{w.alias} watcher {w.index}: at {w.last}, log at {events[-1].sequence}")
                    totals["not_caught_up"] += 1
            return {"watchers": len(self.watchers), **totals}
        finally:
            store.close()


# -- entry point ------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=50, help="client threads (own channel each)")
    p.add_argument("--watchers", type=int, default=500, help="WatchAlias streams")
    p.add_argument("--watch-channels", type=int, default=4, help="channels the watch streams share")
    p.add_argument("--kills", type=int, default=20, help="SIGKILL + restart cycles")
    p.add_argument("--duration-s", type=float, default=60.0, help="length of the chaos phase")
    p.add_argument("--names", type=int, default=4, help="optimizer names published to")
    p.add_argument("--min-kb", type=int, default=10)
    p.add_argument("--max-kb", type=int, default=200)
    p.add_argument("--publish-frac", type=float, default=0.15)
    p.add_argument("--list-frac", type=float, default=0.05)
    p.add_argument("--get-version-frac", type=float, default=0.3, help="the rest of the operations fetch")
    p.add_argument("--think-ms", type=float, default=10.0, help="pause between one client's operations")
    p.add_argument("--move-interval-ms", type=float, default=100.0, help="how often the mover moves an alias")
    p.add_argument("--min-up-s", type=float, default=0.5, help="least time a server lives before the next kill")
    p.add_argument("--call-timeout-s", type=float, default=10.0, help="deadline of client calls")
    p.add_argument("--latency-threads", type=int, default=4)
    p.add_argument("--latency-calls", type=int, default=250, help="GetVersion calls per latency thread")
    p.add_argument("--latency-timeout-s", type=float, default=3.0)
    p.add_argument("--connect-timeout-s", type=float, default=15.0, help="wait for every watcher's first event")
    p.add_argument("--catch-up-timeout-s", type=float, default=15.0)
    p.add_argument("--start-timeout-s", type=float, default=60.0, help="wait for a server to listen")
    p.add_argument("--stop-timeout-s", type=float, default=15.0, help="wait for a graceful stop")
    p.add_argument("--max-p99-ratio", type=float, default=2.0, help="target: p99 with watchers / without")
    p.add_argument("--max-thread-growth", type=int, default=8, help="target: server threads added by the watchers")
    p.add_argument("--hard-limit-s", type=float, default=0.0,
                   help="abort (exit 3) after this long; 0: duration + 150 s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", help="keep the data and server logs here (default: a temporary directory, "
                                     "removed unless something failed)")
    p.add_argument("--json", help="write the result as JSON here")
    return p.parse_args(argv)


def summary(result: dict) -> str:
    lat, thr, watch = result["get_version_latency"], result["server_threads"], result["watch"]
    fsck, rec = result["fsck"], result["recovery"]

    def p99(d: dict) -> str:
        return f"p50 {d.get('p50_ms')} ms, p99 {d.get('p99_ms')} ms, {d['calls']} calls, failed {d['failed'] or 0}"

    lines = [
        (f"registry soak: {result['config']['clients']} clients, {result['config']['watchers']} watchers, "
         f"{result['kills']} SIGKILLs in {result['chaos_s']} s (total {result['elapsed_s']} s)"),
        (f"  restart: median {result['restart_s']['median']} s, max {result['restart_s']['max']} s; "
         f"ops per server life: {result['ops_per_server_life']['min']}..{result['ops_per_server_life']['max']}"),
        f"  ops: {result['ops']}; {result['mb_published']} MB published, {result['mb_fetched']} MB fetched",
        "  latency during the chaos (successful calls, ms): " + ", ".join(
            f"{op} p50 {t.get('p50_ms')} p99 {t.get('p99_ms')} max {t.get('max_ms')}"
            for op, t in result["chaos_latency_ms"].items()),
        f"  failed because of a kill (expected): {result['failed_during_kills']}",
        (f"  versions: {result['versions']['total']} ({result['versions']['per_name']}), "
         f"{result['versions']['acked']} acked, {result['versions']['seen']} seen, "
         f"{result['versions']['fetched_at_end']} fetched and verified at the end"),
        (f"  crash leftovers removed by recovery: {rec.get('temp_files_left_by_kill', 0)} temp files, "
         f"{rec.get('orphans_removed_by_recovery', 0)} orphan blobs; after restarts: "
         f"{rec.get('temp_after_restart', 0)} temp, {rec.get('orphans_after_restart', 0)} orphans, "
         f"{rec.get('missing_after_restart', 0)} missing"),
        (f"  fsck: rc {fsck['rc']}, {fsck['verified']} verified, {fsck['temp']} temp, {fsck['orphans']} orphans, "
         f"{fsck['corrupt']} corrupt, {fsck['missing']} missing"),
        (f"  watchers: {result['watchers_connected_before_chaos']['connected']}/{watch['watchers']} connected in "
         f"{result['watchers_connected_before_chaos']['seconds']} s, {watch.get('events', 0)} events, "
         f"{watch.get('reconnects', 0)} reconnects, {watch['caught_up']} caught up"),
        f"  server threads: {thr['without_watchers']} without watchers, {thr['with_watchers']} with",
        f"  server resumes a watch after_sequence: {'yes' if result['server_resumes_watches'] else 'NO'}",
        f"  GetVersion without watchers: {p99(lat['without_watchers'])}",
        f"  GetVersion with watchers:    {p99(lat['with_watchers'])}; p99 ratio {lat['p99_ratio']}",
    ]
    for name, t in result["targets"].items():
        lines.append(f"  target {name}: {t['value']} (max {t['max']}) {'met' if t['met'] else 'MISSED'}")
    if result["violations"]:
        lines.append("  INVARIANTS VIOLATED:")
        for kind, count in sorted(result["violations"].items()):
            lines.append(f"    {kind}: {count}, e.g. {result['examples'][kind][:2]}")
    else:
        lines.append("  invariants: all held")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="registry-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, workdir)

    def give_up() -> None:  # stops by itself, whatever hangs
        print(f"registry soak: hard limit reached; data and logs in {workdir}", file=sys.stderr, flush=True)
        if soak.server is not None and soak.server.proc.poll() is None:
            soak.server.proc.send_signal(signal.SIGKILL)
        os._exit(3)

    watchdog = threading.Timer(args.hard_limit_s or args.duration_s + 150, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        result = soak.run()
    finally:
        soak.stop.set()
        if soak.server is not None and soak.server.proc.poll() is None:
            soak.server.kill()
    watchdog.cancel()
    result["workdir"] = str(workdir)
    print(summary(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: result[k] for k in ("ok", "kills", "violations", "server_threads", "targets")}))
    if result["ok"] and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not result["ok"]:
        print(f"data and server logs kept in {workdir}", file=sys.stderr)
    if not result["ok"]:
        return 1
    return 0 if all(t["met"] for t in result["targets"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())
