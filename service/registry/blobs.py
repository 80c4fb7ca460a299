"""Content-addressed artifact store on the local file system.

Every artifact is stored once under its sha256: ``<root>/blobs/ab/abcdef…``.
An upload is written to ``<root>/tmp/`` while it is hashed, and only when
its size and sha256 equal what the uploader declared is it fsynced and
renamed into place (rename is atomic on POSIX), followed by an fsync of the
directory so the rename itself survives a crash. A reader therefore never
sees a partial blob: either the final path exists with the full content, or
it does not exist.

>>> import hashlib, tempfile
>>> store = BlobStore(tempfile.mkdtemp())
>>> data = b"theta"
>>> digest = hashlib.sha256(data).hexdigest()
>>> with store.writer(digest, len(data)) as w:
...     w.write(data)
...     w.commit()
>>> store.read_range(digest, 1, 3)
b'het'
>>> store.recover().verified
1
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import re
import time
import uuid
from pathlib import Path
from typing import Self

from .errors import DataDirLocked, InvalidArgument, ResourceExhausted

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HASH_BLOCK = 4 << 20


def check_sha256(value: str) -> str:
    """Return ``value`` if it is 64 lowercase hex digits, else raise :class:`InvalidArgument`."""
    if not SHA256_RE.match(value or ""):
        raise InvalidArgument(f"sha256 must be 64 lowercase hex digits, got {value!r}")
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclasses.dataclass
class RecoveryReport:
    """What :meth:`BlobStore.recover` found at startup."""

    removed_temp: int = 0
    verified: int = 0
    corrupt: list[str] = dataclasses.field(default_factory=list)  # quarantined sha256s
    orphans: list[str] = dataclasses.field(default_factory=list)  # unreferenced blobs removed
    young_orphans: list[str] = dataclasses.field(default_factory=list)  # kept: inside the grace period


class DataDirLock:
    """An exclusive ``flock`` on ``<root>/LOCK``, held while a server (or ``fsck --repair``) owns the dir.

    The kernel drops the lock when the process dies, SIGKILL included, so a
    crashed server never leaves a stale lock. A second holder gets
    :class:`DataDirLocked` naming the pid written into the file by the first.
    """

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root) / "LOCK"
        self._fd: int | None = None

    def acquire(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirLocked(
                f"data directory {self.path.parent} is in use by another registry process (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


class BlobWriter:
    """One upload in progress. Use as a context manager; :meth:`commit` publishes it.

    Leaving the ``with`` block without a successful commit deletes the temp file,
    so an aborted or failed upload leaves nothing behind.
    """

    def __init__(self, store: BlobStore, sha256: str, size: int):
        self._store = store
        self.sha256 = sha256
        self.expected_size = size
        self.received = 0
        self._hash = hashlib.sha256()
        self._tmp = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._file = open(self._tmp, "xb")  # noqa: SIM115 - lives until commit()/close()
        self.committed = False

    def write(self, chunk: bytes) -> None:
        if self.received + len(chunk) > self.expected_size:
            raise InvalidArgument(
                f"upload is larger than the declared size of {self.expected_size} bytes"
            )
        self._hash.update(chunk)
        self._file.write(chunk)
        self.received += len(chunk)

    def verify(self) -> None:
        """Raise :class:`InvalidArgument` unless exactly the declared bytes arrived."""
        if self.received != self.expected_size:
            raise InvalidArgument(
                f"upload ended after {self.received} of {self.expected_size} declared bytes"
            )
        actual = self._hash.hexdigest()
        if actual != self.sha256:
            raise InvalidArgument(f"sha256 mismatch: declared {self.sha256}, received {actual}")

    def commit(self) -> None:
        """Verify size and sha256, fsync, and atomically move the blob into place."""
        self.verify()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._store.path(self.sha256)
        final.parent.mkdir(parents=True, exist_ok=True)
        # Same content either way, so replacing an existing copy is harmless.
        os.replace(self._tmp, final)
        _fsync_dir(final.parent)
        self.committed = True

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if not self.committed:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class BlobStore:
    """Artifacts by sha256 under ``root``; see the module docstring for the layout."""

    def __init__(self, root: str | os.PathLike, max_size: int = 4 << 30):
        self.root = Path(root)
        self.blob_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.max_size = max_size
        for d in (self.blob_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self.blob_dir / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def writer(self, sha256: str, size: int) -> BlobWriter:
        check_sha256(sha256)
        if size > self.max_size:
            raise ResourceExhausted(f"artifact of {size} bytes exceeds the {self.max_size}-byte limit")
        return BlobWriter(self, sha256, size)

    def read_range(self, sha256: str, offset: int, length: int) -> bytes:
        with open(self.path(sha256), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def iter_chunks(self, sha256: str, offset: int, chunk_size: int):
        """Yield the blob's bytes from ``offset`` in pieces of ``chunk_size``."""
        with open(self.path(sha256), "rb", buffering=0) as f:
            f.seek(offset)
            while True:
                data = f.read(chunk_size)
                if not data:
                    return
                yield data

    def verify(self, sha256: str) -> bool:
        """Re-hash a stored blob; True when its content still matches its name."""
        h = hashlib.sha256()
        try:
            with open(self.path(sha256), "rb", buffering=0) as f:
                while block := f.read(_HASH_BLOCK):
                    h.update(block)
        except FileNotFoundError:
            return False
        return h.hexdigest() == sha256

    def all_digests(self) -> list[str]:
        return sorted(p.name for p in self.blob_dir.glob("*/*") if SHA256_RE.match(p.name))

    def temp_files(self) -> list[Path]:
        return sorted(self.tmp_dir.iterdir())

    def orphans(self, referenced: set[str], grace_s: float = 0.0) -> tuple[list[str], list[str]]:
        """``(old, young)`` stored blobs that no committed version references.

        A publish renames its blob into place *before* its database commit, so
        a blob younger than ``grace_s`` (by mtime, measured from now) may belong
        to a publish still in flight: it is listed in ``young`` and must be kept.
        ``referenced`` must be read *before* calling this, so a version
        committed during the scan is either in it or its blob is young.
        """
        cutoff = time.time() - grace_s
        old, young = [], []
        for digest in self.all_digests():
            if digest in referenced:
                continue
            try:
                mtime = self.path(digest).stat().st_mtime
            except FileNotFoundError:
                continue
            (old if mtime <= cutoff else young).append(digest)
        return old, young

    def quarantine(self, digest: str) -> None:
        """Move a blob that failed verification out of ``blobs/`` so it is never served."""
        self.quarantine_dir.mkdir(exist_ok=True)
        os.replace(self.path(digest), self.quarantine_dir / digest)

    def remove(self, digest: str) -> None:
        self.path(digest).unlink(missing_ok=True)

    def recover(
        self, verify: bool = True, referenced: set[str] | None = None, orphan_grace_s: float = 0.0,
    ) -> RecoveryReport:
        """Startup recovery: drop unfinished uploads, collect orphans, re-verify every stored blob.

        Orphans (blobs no version in ``referenced`` points at, left by a crash
        between the blob's rename and the version's commit) are deleted once
        older than ``orphan_grace_s``; pass ``referenced=None`` to keep them all.
        A blob whose content no longer matches its name is moved to
        ``quarantine/`` so it is never served; versions that point at it then
        fail to fetch with a clear error instead of returning wrong bytes.
        """
        report = RecoveryReport()
        for tmp in self.temp_files():
            tmp.unlink(missing_ok=True)
            report.removed_temp += 1
        if referenced is not None:
            report.orphans, report.young_orphans = self.orphans(referenced, orphan_grace_s)
            for digest in report.orphans:
                self.remove(digest)
        if not verify:
            return report
        for digest in self.all_digests():
            if self.verify(digest):
                report.verified += 1
            else:
                self.quarantine(digest)
                report.corrupt.append(digest)
        return report
