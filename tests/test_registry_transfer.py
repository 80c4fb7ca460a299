"""Verified fetch (mnemosyne_registry.transfer) against fake streams, and the blob store's chunks.

No server: ``stream(name, ref, offset)`` is a function returning ``(Version, chunks)``,
so broken, short, long and corrupt streams are easy to make.
"""
from __future__ import annotations

import hashlib
import os

import pytest

from mnemosyne_registry import registry_pb2 as pb
from mnemosyne_registry.errors import IntegrityError, RegistryClientError
from mnemosyne_registry.transfer import BackgroundHash, fetch_verified
from service.registry.blobs import BlobStore

DATA = os.urandom(5 * (1 << 16) + 321)
CHUNK = 1 << 16


def _version(data: bytes = DATA, number: int = 4) -> pb.Version:
    return pb.Version(name="opt", number=number, size=len(data), sha256=hashlib.sha256(data).hexdigest())


def _stream(data: bytes = DATA, version: pb.Version | None = None, fail_after: dict | None = None, calls=None):
    """A fake ``stream``: chunks of ``data`` from the offset; ``fail_after[attempt]`` chunks, then UNAVAILABLE."""
    version = version or _version(data)
    fail_after = fail_after or {}

    def stream(name, ref, offset):
        attempt = len(calls) if calls is not None else 0
        if calls is not None:
            calls.append((ref, offset))

        def chunks():
            for i, start in enumerate(range(offset, len(data), CHUNK)):
                if i == fail_after.get(attempt):
                    raise RegistryClientError("UNAVAILABLE", "connection reset")
                yield memoryview(data)[start:start + CHUNK]

        return version, chunks()

    return stream


def test_fetch_verified_returns_the_bytes_and_the_version():
    version, data = fetch_verified(_stream(), "opt", "latest")
    assert version.number == 4 and bytes(data) == DATA


@pytest.mark.parametrize("size", [0, 1, CHUNK, 9 << 20])  # 9 MiB: the huge-page buffer
def test_fetch_verified_sizes(size):
    payload = os.urandom(size)
    _, data = fetch_verified(_stream(payload), "opt", 1)
    assert len(data) == size and bytes(data) == payload


def test_a_broken_stream_resumes_from_the_last_byte_pinned_to_the_version_number():
    calls = []
    version, data = fetch_verified(_stream(fail_after={0: 2, 1: 1}, calls=calls), "opt", "latest")
    assert calls == [("latest", 0), (4, 2 * CHUNK), (4, 3 * CHUNK)]
    assert version.number == 4 and bytes(data) == DATA


def test_retries_run_out():
    calls = []
    with pytest.raises(RegistryClientError) as info:
        fetch_verified(_stream(fail_after={0: 1, 1: 0, 2: 0}, calls=calls), "opt", 1, retries=2)
    assert info.value.code == "UNAVAILABLE" and len(calls) == 3


def test_errors_that_are_not_transient_are_not_retried():
    calls = []

    def stream(name, ref, offset):
        calls.append(offset)
        raise RegistryClientError("NOT_FOUND", "no such optimizer")

    with pytest.raises(RegistryClientError) as info:
        fetch_verified(stream, "opt", 1)
    assert info.value.code == "NOT_FOUND" and calls == [0]


def test_corrupt_bytes_raise_integrity_error():
    corrupt = bytearray(DATA)
    corrupt[CHUNK + 7] ^= 1
    with pytest.raises(IntegrityError, match="sha256"):
        fetch_verified(_stream(bytes(corrupt), version=_version()), "opt", 1)


def test_short_and_long_streams_raise_integrity_error():
    with pytest.raises(IntegrityError, match="expected"):
        fetch_verified(_stream(DATA[:-1], version=_version()), "opt", 1)
    with pytest.raises(IntegrityError, match="more than"):
        fetch_verified(_stream(DATA + b"x", version=_version()), "opt", 1)


def test_a_resume_prefix_is_verified_with_the_rest():
    _, data = fetch_verified(_stream(), "opt", 1, prefix=DATA[:1000])
    assert bytes(data) == DATA
    with pytest.raises(IntegrityError):
        fetch_verified(_stream(), "opt", 1, prefix=b"\0" * 1000)


def test_fetch_into_a_caller_buffer():
    out = bytearray(len(DATA) + 10)
    _, data = fetch_verified(_stream(), "opt", 1, out=out)
    assert data.obj is out and bytes(data) == DATA
    with pytest.raises(ValueError, match=f"needs {len(DATA)}"):
        fetch_verified(_stream(), "opt", 1, out=bytearray(10))


def test_background_hash_equals_hashlib():
    h = BackgroundHash(b"head")
    for start in range(0, len(DATA), 4096):
        h.update(memoryview(DATA)[start:start + 4096])
    assert h.hexdigest() == hashlib.sha256(b"head" + DATA).hexdigest()
    assert h.hexdigest() == hashlib.sha256(b"head" + DATA).hexdigest()  # idempotent once stopped


def _store_with(tmp_path, data: bytes) -> tuple[BlobStore, str]:
    store = BlobStore(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    with store.writer(digest, len(data)) as w:
        w.write(data)
        w.commit()
    return store, digest


@pytest.mark.parametrize("offset", [0, 1, CHUNK, len(DATA) - 1, len(DATA)])
def test_blob_chunks_from_an_offset(tmp_path, offset):
    store, digest = _store_with(tmp_path, DATA)
    chunks = list(store.iter_chunks(digest, offset, CHUNK))  # all held at once: each keeps its bytes
    assert b"".join(chunks) == DATA[offset:]
    assert all(len(c) == CHUNK for c in chunks[:-1])


def test_blob_chunks_release_the_file_when_done(tmp_path):
    store, digest = _store_with(tmp_path, DATA)
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    for _ in range(50):
        assert sum(len(c) for c in store.iter_chunks(digest, 0, CHUNK)) == len(DATA)
        gen = store.iter_chunks(digest, 0, CHUNK)
        next(gen)
        gen.close()  # a cancelled fetch
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds
    store.path(digest).unlink()  # a blob being served can be collected


# -- against a real server: the fetch channel's stream lifecycle ------------------------------------------


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from mnemosyne_registry import RegistryClient
    from service.registry.server import create_server, shutdown

    srv, port = create_server(tmp_path_factory.mktemp("transfer-registry"), port=0)
    srv.start()
    with RegistryClient(f"grpc://127.0.0.1:{port}") as c:
        c.publish(DATA * 8, "big", {"compatibility": {"format": "opaque"}})  # ~2.6 MB: several 1 MiB messages
    yield f"grpc://127.0.0.1:{port}"
    shutdown(srv, grace=1)


@pytest.fixture
def client(target):
    from mnemosyne_registry import RegistryClient

    with RegistryClient(target) as c:
        yield c


def test_fetch_asks_for_the_chunk_size(client, monkeypatch):
    real_stream, sizes = client.stream, []

    def recording_stream(name, ref=None, offset=0, chunk_size=0):
        version, chunks = real_stream(name, ref, offset, chunk_size)

        def recorded():
            for chunk in chunks:
                sizes.append(len(chunk))
                yield chunk

        return version, recorded()

    monkeypatch.setattr(client, "stream", recording_stream)
    _, data = client.fetch("big", 1, chunk_size=100_000)
    assert bytes(data) == DATA * 8
    assert set(sizes[:-1]) == {100_000}


def test_a_stream_closed_from_another_thread_ends_its_reader(client):
    import threading

    for _ in range(20):
        _, chunks = client.stream("big", 1)
        first = next(chunks)
        outcome = []

        def read(chunks=chunks, first=first, outcome=outcome):
            try:
                outcome.append(len(first) + sum(len(x) for x in chunks))
            except RegistryClientError as exc:
                outcome.append(exc.code)

        reader = threading.Thread(target=read)
        reader.start()
        chunks.close()
        reader.join()
        assert outcome in ([len(DATA) * 8], ["CANCELLED"])  # it had finished, or it was cancelled
    assert bytes(client.fetch("big", 1)[1]) == DATA * 8  # the channel still works


def test_abandoned_and_cancelled_streams_leave_the_client_usable(client):
    for _ in range(50):
        _, chunks = client.stream("big", 1)
        next(chunks)
        del chunks  # abandoned: __del__ cancels and takes the call's last events
        _, chunks = client.stream("big", 1)
        next(chunks)
        chunks.close()
        chunks.close()  # idempotent
        with pytest.raises(RegistryClientError) as info:
            next(chunks)
        assert info.value.code == "CANCELLED"
    assert bytes(client.fetch("big", 1)[1]) == DATA * 8
