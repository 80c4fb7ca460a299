"""SIGKILL the registry server during uploads, restart it, and check integrity.

After every restart: versions are numbered 1..n with no gap, every listed
version fetches with a matching sha256 (no partial version), no temp file
survives recovery, and every stored blob re-verifies against its name.
"""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mnemosyne_core.registry_client import RegistryClient, RegistryClientError

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


def test_sigkill_during_uploads_leaves_no_partial_version(tmp_path):
    data = tmp_path / "data"
    total_before = 0
    interrupted = 0  # unfinished uploads found on disk after a kill
    for round_ in range(3):
        proc, port = start_server(data)
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
                            client.publish(payload, "crash", chunk_size=64 << 10)
                        except RegistryClientError:
                            return  # the server died under us
                        finished.release()
                        i += 1

            threads = [threading.Thread(target=uploader, args=(s,)) for s in range(4)]
            for t in threads:
                t.start()
            for _ in range(3):  # some uploads completed, others are in flight
                finished.acquire()
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            stop.set()
            for t in threads:
                t.join()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        interrupted += len(list((data / "tmp").iterdir()))
        proc, port = start_server(data)
        try:
            total = check_integrity(port, data)
            assert total >= total_before + 3
            total_before = total
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait() == 0  # graceful stop exits cleanly
    assert interrupted > 0, "no upload was in flight at any kill: the test did not exercise recovery"
