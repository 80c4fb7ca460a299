"""WatchAlias at fleet scale and across disconnects (issue 22 item 1, issue 23 defect 4).

500 watchers on one server cost no thread each and all see every move in order; a
watcher that goes away is forgotten; ``after_sequence`` resumes without collapsing
moves; a resume older than the trimmed history is OUT_OF_RANGE; ``registry watch
--follow`` survives a server restart without losing a move.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest

from mnemosyne_registry import RegistryClient, RegistryClientError
from mnemosyne_registry import registry_pb2 as pb
from mnemosyne_registry import registry_pb2_grpc as pb_grpc
from service.registry.handlers import Registry
from service.registry.server import create_server, shutdown

pytestmark = pytest.mark.xdist_group("registry")
ROOT = Path(__file__).resolve().parent.parent
OPAQUE = {"compatibility": {"format": "opaque"}}
HISTORY = 8


@pytest.fixture
def served(tmp_path):
    # A small thread pool: the warm-up below fills it, so any thread a watch held would show.
    registry = Registry(tmp_path / "data", history_per_alias=HISTORY, watch_poll_s=0.5)
    srv, port = create_server(tmp_path / "data", port=0, registry=registry, max_workers=8)
    srv.start()
    client = RegistryClient(f"grpc://127.0.0.1:{port}")
    for i in range(4):
        client.publish(f"version {i}".encode(), "fleet", OPAQUE)
    client.set_alias("fleet", "prod", 1)
    yield srv, port, client
    client.close()
    shutdown(srv, grace=1)


def native_threads() -> int:
    """Threads of this process as the kernel counts them (gRPC's C threads included)."""
    status = Path(f"/proc/{os.getpid()}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))


def test_500_watchers_cost_no_thread_and_each_sees_every_move_in_order(served):
    srv, port, client = served
    n, channels = 500, 10

    async def scenario():
        chans = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(channels)]
        stubs = [pb_grpc.RegistryServiceStub(c) for c in chans]
        # Warm the server's thread pool to its working size with concurrent reads first.
        await asyncio.gather(*(stubs[i % channels].GetVersion(pb.GetVersionRequest(ref=pb.VersionRef(name="fleet")))
                               for i in range(200)))
        before = native_threads()
        calls = [stubs[i % channels].WatchAlias(pb.WatchAliasRequest(name="fleet", alias="prod")) for i in range(n)]
        firsts = await asyncio.gather(*(c.read() for c in calls))
        assert {e.version for e in firsts} == {1}
        opened = native_threads()
        assert srv.hub.watcher_count == n
        loop = asyncio.get_running_loop()

        def move():
            for version in (2, 3, 4):
                client.set_alias("fleet", "prod", version)
            client.delete_alias("fleet", "prod")
            client.set_alias("fleet", "prod", 2)

        await loop.run_in_executor(None, move)  # a publisher elsewhere moves the alias meanwhile

        async def rest(call):
            return [await call.read() for _ in range(5)]

        seen = await asyncio.gather(*(rest(c) for c in calls))
        for c in calls:
            c.cancel()
        for c in chans:
            await c.close()
        return before, opened, firsts, seen

    before, opened, firsts, seen = asyncio.run(scenario())
    # 500 open streams: the server (in this process) holds no thread for them (a few may come
    # and go in gRPC's own machinery; a thread per watch would be +500).
    assert opened - before <= 8, (before, opened)
    expected = [(2, False), (3, False), (4, False), (0, True), (2, False)]
    for first, events in zip(firsts, seen):
        assert [(e.version, e.deleted) for e in events] == expected
        sequences = [first.sequence] + [e.sequence for e in events]
        assert sequences == sorted(sequences) and len(set(sequences)) == 6
    # Disconnected watchers are forgotten by the hub.
    deadline = threading.Event()
    for _ in range(200):
        if srv.hub.watcher_count == 0:
            break
        deadline.wait(0.05)
    assert srv.hub.watcher_count == 0


def test_resume_after_a_sequence_gets_every_move_not_a_collapsed_one(served):
    _, _, client = served
    watch = client.watch("fleet", "prod")
    last = next(watch).sequence
    watch.cancel()
    # While disconnected: three moves and a delete (a collapsing watcher would see only the end).
    for version in (2, 3, 4):
        client.set_alias("fleet", "prod", version)
    client.delete_alias("fleet", "prod")
    resumed = client.watch("fleet", "prod", after_sequence=last)
    events = [next(resumed) for _ in range(4)]
    assert [(e.version, e.deleted) for e in events] == [(2, False), (3, False), (4, False), (0, True)]
    client.set_alias("fleet", "prod", 1)  # and then it goes on live
    assert next(resumed).version == 1
    resumed.cancel()


def test_resuming_before_the_kept_history_is_out_of_range(served):
    srv, _, client = served
    watch = client.watch("fleet", "prod")
    old = next(watch).sequence
    watch.cancel()
    for i in range(3 * HISTORY):  # more moves than the server keeps for one alias
        client.set_alias("fleet", "prod", 1 + i % 4)
    with pytest.raises(RegistryClientError) as info:
        next(client.watch("fleet", "prod", after_sequence=old))
    assert info.value.code == "OUT_OF_RANGE"
    assert f"after sequence {old}" in info.value.message and "re-read the alias" in info.value.message
    # The newest HISTORY events are still there to resume from.
    kept = srv.registry.store.alias_events_after("fleet", "prod", 0)
    assert len(kept) == HISTORY
    resumed = client.watch("fleet", "prod", after_sequence=kept[0].sequence)
    assert [next(resumed).sequence for _ in range(HISTORY - 1)] == [e.sequence for e in kept[1:]]
    resumed.cancel()
    with pytest.raises(RegistryClientError, match="after_sequence must be"):
        next(client.watch("fleet", "prod", after_sequence=2**63))


def start_server(data: Path, port: int = 0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
         "registry", "serve", "--data", str(data), "--port", str(port), "--skip-verify"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, int(line.rsplit(":", 1)[1])


def test_cli_watch_follow_resumes_across_a_server_restart(tmp_path):
    data = tmp_path / "data"
    server, port = start_server(data)
    target = f"grpc://127.0.0.1:{port}"
    watcher = None
    try:
        with RegistryClient(target) as client:
            for i in range(3):
                client.publish(f"v{i}".encode(), "deploy", OPAQUE)
            client.set_alias("deploy", "prod", 1)
        watcher = subprocess.Popen(
            [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))",
             "registry", "watch", "deploy@prod", "--follow", "--count", "4", "--registry", target],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert watcher.stdout.readline().split("\t")[1] == "deploy@prod -> 1"
        server.send_signal(signal.SIGKILL)  # not even a graceful stop
        server.wait()
        server, _ = start_server(data, port)  # same address; the watcher reconnects by itself
        with RegistryClient(target) as client:
            client.set_alias("deploy", "prod", 2)
            client.set_alias("deploy", "prod", 3)
            client.delete_alias("deploy", "prod")
        rest, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 0, err
        assert [line.split("\t")[1] for line in rest.splitlines()] == [
            "deploy@prod -> 2", "deploy@prod -> 3", "deploy@prod -> deleted"]
        assert "reconnecting" in err
    finally:
        for proc in (watcher, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_watcher_registering_during_a_fan_out_query_misses_nothing(tmp_path):
    # The soak's regression: the hub's query ran with cursors of the watchers it had; one that
    # registered meanwhile, further behind, was handed the newer events and skipped the gap.
    from service.registry.handlers import PublishSpec
    from service.registry.watch import WatchHub

    registry = Registry(tmp_path / "hub", watch_poll_s=30.0)
    data = b"hub bytes"
    registry.publish(PublishSpec("h", OPAQUE, len(data), hashlib.sha256(data).hexdigest()), [data])
    seqs = [registry.set_alias("h", "prod", 1).sequence for _ in range(6)]

    async def scenario():
        gate, queried = asyncio.Event(), asyncio.Event()
        gated = {"on": False}

        async def run_blocking(fn, *args, **kwargs):
            if fn == registry.store.alias_events_since and gated["on"]:
                queried.set()
                await gate.wait()  # the query is "in flight" while B registers
            return fn(*args, **kwargs)

        hub = WatchHub(registry, run_blocking, poll_s=30.0)
        hub.start()
        ahead = hub.watch("h", "prod", after_sequence=seqs[4])  # A: only seqs[5] is new to it
        got_a = [await ahead.__anext__()]
        gated["on"] = True
        later = registry.set_alias("h", "prod", 1).sequence
        hub.notify()
        await queried.wait()  # the fan-out query runs with A's cursor (seqs[5]...)
        behind = hub.watch("h", "prod", after_sequence=seqs[1])  # B registers, far behind
        first_b = asyncio.ensure_future(behind.__anext__())
        await asyncio.sleep(0.05)
        gated["on"] = False
        gate.set()
        async def five():
            return [await first_b] + [await behind.__anext__() for _ in range(4)]

        try:  # a skipped gap would leave B waiting for events that never come
            got_b = await asyncio.wait_for(five(), 10)
        except TimeoutError:
            got_b = []
        got_a.append(await ahead.__anext__())
        registry.close()
        await asyncio.sleep(0.05)
        return [e.sequence for e in got_a], [e.sequence for e in got_b], later

    try:
        got_a, got_b, later = asyncio.run(scenario())
    finally:
        registry.store.close()
    assert got_a == [seqs[5], later]
    assert got_b == [seqs[2], seqs[3], seqs[4], seqs[5], later]  # nothing between seqs[1] and later skipped
