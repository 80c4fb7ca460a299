"""Moving artifact bytes: verified in-memory fetches, resumable file downloads, streams.

Both paths hash on the fly and resume a broken stream from the last byte
received, pinned to the version number (an alias may move meanwhile), up to
``retries`` times. ``stream`` is ``RegistryClient.stream``:
``stream(name, ref, offset) -> (Version, chunks)``.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import queue
import threading
from pathlib import Path

import grpc

from . import registry_pb2 as pb
from .errors import IntegrityError, RegistryClientError, from_rpc_error

CHUNK = 1 << 20
# Transient failures worth resuming after (by status name).
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"})


def fetch_verified(stream, name: str, ref, *, prefix: bytes = b"", retries: int = 3, out=None):
    """``(Version, data)`` from ``stream(name, ref, offset)``, sha256-verified; see ``RegistryClient.fetch``."""
    digest = BackgroundHash(prefix)
    try:
        version, data = _receive(stream, name, ref, prefix, retries, digest, out)
    finally:
        actual = digest.hexdigest()  # also stops the hashing thread on errors
    if actual != version.sha256:
        raise IntegrityError(f"{version.name}:{version.number}: sha256 {actual} != {version.sha256}")
    return version, data


def _receive(stream, name, ref, prefix: bytes, retries: int, digest, out=None):
    """Stream into one preallocated buffer (and ``digest``), resuming after retryable failures.

    Copying each chunk into place while the next one is in flight replaces a
    final join, which on a busy machine costs as much as the sha256 itself.
    """
    version, data, received = None, None, len(prefix)
    for attempt in range(retries + 1):
        try:
            # After the first response, pin the number: an alias may move meanwhile.
            v, chunks = stream(name, version.number if version else ref, received)
            if version is None:
                version = v
                if out is None:
                    data = _allocate(v.size)
                elif len(out) < v.size:
                    chunks.close()
                    raise ValueError(f"out has {len(out)} bytes; {v.name}:{v.number} needs {v.size}")
                else:
                    data = memoryview(out)[:v.size]
                if received > v.size:
                    raise IntegrityError(f"{v.name}:{v.number}: resume offset {received} > size {v.size}")
                data[:received] = prefix
            for chunk in chunks:
                end = received + len(chunk)
                if end > version.size:
                    raise IntegrityError(f"{version.name}:{version.number}: more than {version.size} bytes")
                digest.update(chunk)
                data[received:end] = chunk
                received = end
            if received != version.size:
                raise IntegrityError(
                    f"{version.name}:{version.number}: got {received} bytes, expected {version.size}")
            return version, data
        except RegistryClientError as exc:
            if attempt == retries or exc.code not in RETRYABLE:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def download_file(stream, version: pb.Version, path: str | os.PathLike, *, retries: int = 3) -> pb.Version:
    """Stream a version into ``path``; sha256-verified, atomic, resumable.

    Bytes go to ``<path>.<sha256[:16]>.part`` as they arrive; only a verified
    file is renamed to ``path``. If the transfer breaks (beyond ``retries``
    in-call resumes), the ``.part`` file stays and the next ``download`` of
    the same version continues from its end.
    """
    path = Path(path)
    part = path.with_name(f"{path.name}.{version.sha256[:16]}.part")
    held = part.stat().st_size if part.exists() else 0
    if held > version.size:
        part.unlink()
        held = 0
    digest = hashlib.sha256()
    if held:
        with open(part, "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
    with open(part, "ab") as f:
        for attempt in range(retries + 1):
            try:
                _, chunks = stream(version.name, version.number, held)
                for chunk in chunks:
                    f.write(chunk)
                    digest.update(chunk)
                    held += len(chunk)
                break
            except RegistryClientError as exc:
                f.flush()  # keep what arrived for the next attempt
                if attempt == retries or exc.code not in RETRYABLE:
                    raise
        f.flush()
        os.fsync(f.fileno())
    if held != version.size or digest.hexdigest() != version.sha256:
        part.unlink(missing_ok=True)
        raise IntegrityError(f"{version.name}:{version.number}: downloaded file does not match its sha256")
    os.replace(part, path)
    return version


_HUGE_PAGE_MIN = 8 << 20


def _allocate(size: int):
    """A zeroed writable buffer; large ones on transparent huge pages where the OS offers them.

    Filling fresh memory costs one page fault per 4 KiB page, about as much CPU
    as hashing it; with 2 MiB pages that drops ~4x (measured on Linux, THP=madvise).
    """
    if size >= _HUGE_PAGE_MIN and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            region.madvise(mmap.MADV_HUGEPAGE)
            return memoryview(region)  # keeps the mapping alive until the view is released
        except (OSError, ValueError):  # no THP or no anonymous maps here: plain memory
            pass
    return bytearray(size)


class Chunks:
    """Iterator over a Fetch stream's chunk bytes; ``close()`` cancels the call."""

    def __init__(self, call):
        self._call = call

    def __iter__(self):
        return self

    def __next__(self):
        try:
            msg = next(self._call)
        except StopIteration:
            self.close()
            raise
        except grpc.RpcError as exc:
            self.close()
            raise from_rpc_error(exc) from None
        return msg if isinstance(msg, memoryview) else msg.chunk

    def close(self) -> None:
        self._call.cancel()

    def __del__(self):  # an abandoned download must not keep the server streaming
        self._call.cancel()


class BackgroundHash:
    """sha256 computed on a helper thread while chunks keep arriving.

    hashlib releases the GIL on large buffers, so on a machine with a spare core
    verification overlaps the transfer instead of following it.
    """

    def __init__(self, initial: bytes = b""):
        self._hash = hashlib.sha256(initial)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="registry-sha256", daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._hash.update(chunk)

    def update(self, chunk) -> None:
        self._queue.put(chunk)

    def hexdigest(self) -> str:
        if self._digest is None:
            self._queue.put(None)
            self._thread.join()
            self._digest = self._hash.hexdigest()
        return self._digest


class AliasWatch:
    """Iterator of :class:`AliasEvent` messages with ``cancel()``; ends quietly when cancelled."""

    def __init__(self, call):
        self._call = call
        self._cancelled = False

    def __iter__(self):
        return self

    def __next__(self) -> pb.AliasEvent:
        try:
            return next(self._call)
        except grpc.RpcError as exc:
            if self._cancelled or exc.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise from_rpc_error(exc) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()
