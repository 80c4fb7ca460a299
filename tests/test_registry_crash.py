"""SIGKILL the registry server during uploads, restart it, and check integrity.

After every restart: versions are numbered 1..n with no gap, every listed
version fetches with a matching sha256 (no partial version), no temp file
survives recovery, and every stored blob re-verifies against its name.
"""
from __future__ import annotations

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

OPAQUE = {"compatibility": {"format": "opaque"}}  # test bytes, not checkpoints

pytestmark = pytest.mark.xdist_group("registry")
ROOT = Path(__file__).resolve().parent.parent


def start_server(data: Path) -> tuple[subprocess.Popen, int]:
    code = "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "registry", "serve", "--data", str(data), "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = proc.stdout.readline()  # "mnemosyne registry listening on grpc://127.0.0.1:PORT"
    assert "listening on" in line, f"server did not start: {line!r}"
    return proc, int(line.rsplit(":", 1)[1])


def check_integrity(port: int, data: Path) -> int:
    with RegistryClient(f"127.0.0.1:{port}") as client:
        versions = client.list("crash") if client.list() else []
        assert [v.number for v in versions] == list(range(1, len(versions) + 1))
        for v in versions:
            client.fetch("crash", v.number)  # raises IntegrityError on any mismatch
    assert list((data / "tmp").iterdir()) == []
    for blob in (data / "blobs").glob("*/*"):
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    return len(versions)


def stalled_upload(port: int, release: threading.Event):
    """An upload that sends its header and 5 of 20 chunks, then hangs: surely in flight at the kill."""
    payload = os.urandom(20 * (64 << 10))
    header = pb.PublishHeader(name="crash", size=len(payload), sha256=hashlib.sha256(payload).hexdigest(),
                              metadata=pb.VersionMetadata(compatibility=pb.Compatibility(format="opaque")))

    def requests():
        yield pb.PublishRequest(header=header)
        for i in range(5):
            yield pb.PublishRequest(chunk=payload[i << 16:(i + 1) << 16])
        release.wait()

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    future = pb_grpc.RegistryServiceStub(channel).Publish.future(requests())
    return channel, future


def test_sigkill_during_uploads_leaves_no_partial_version(tmp_path):
    data = tmp_path / "data"
    total_before = 0
    for round_ in range(3):
        proc, port = start_server(data)
        release = threading.Event()
        try:
            assert check_integrity(port, data) == total_before  # recovery kept every finished version
            finished = threading.Semaphore(0)
            stop = threading.Event()

            def uploader(seed: int, port=port, stop=stop, round_=round_, finished=finished):
                with RegistryClient(f"127.0.0.1:{port}") as client:
                    i = 0
                    while not stop.is_set():
                        payload = hashlib.sha256(f"{round_}/{seed}/{i}".encode()).digest() * (40_000 + seed)
                        try:
                            client.publish(payload, "crash", OPAQUE, chunk_size=64 << 10)
                        except RegistryClientError:
                            return  # the server died under us
                        finished.release()
                        i += 1

            threads = [threading.Thread(target=uploader, args=(s,)) for s in range(3)]
            for t in threads:
                t.start()
            channel, stalled = stalled_upload(port, release)
            for _ in range(3):  # some uploads completed, others are in flight
                finished.acquire()
            while not list((data / "tmp").iterdir()):  # the stalled upload has reached the disk
                threading.Event().wait(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            release.set()
            for t in threads:
                t.join()
            with pytest.raises(grpc.RpcError):
                stalled.result()
            channel.close()
        finally:
            release.set()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert list((data / "tmp").iterdir()), "an unfinished upload should be on disk after the kill"
        proc, port = start_server(data)
        try:
            total = check_integrity(port, data)  # temp files gone, blobs verified, no partial version
            assert total >= total_before + 3
            total_before = total
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait() == 0  # graceful stop exits cleanly
