"""The registry's operations as plain Python, unit-testable without gRPC.

:class:`Registry` combines the metadata :class:`~service.registry.storage.Store`
and the :class:`~service.registry.blobs.BlobStore`. Inputs are plain values,
outputs are the storage records, failures are
:mod:`~service.registry.errors` exceptions.

>>> import hashlib, tempfile
>>> reg = Registry(tempfile.mkdtemp())
>>> data = b"some optimizer"
>>> spec = PublishSpec("adam-ish", {}, len(data), hashlib.sha256(data).hexdigest())
>>> reg.publish(spec, [data[:4], data[4:]])
Traceback (most recent call last):
...
service.registry.errors.InvalidArgument: the artifact is not a valid Mnemosyne checkpoint (not a Mnemosyne checkpoint (bad magic)); publish other bytes with compatibility.format = "opaque"
>>> opaque = {"compatibility": {"format": "opaque"}}
>>> spec = PublishSpec("adam-ish", opaque, len(data), hashlib.sha256(data).hexdigest())
>>> reg.publish(spec, [data[:4], data[4:]]).number
1
>>> version, chunks = reg.open_fetch("adam-ish", alias="latest", offset=5)
>>> b"".join(chunks)
b'optimizer'
>>> reg.set_alias("adam-ish", "latest", 1)
Traceback (most recent call last):
...
service.registry.errors.FailedPrecondition: alias 'latest' moves automatically on publish and cannot be set or deleted by hand
"""
from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from .blobs import BlobStore, RecoveryReport, check_sha256
from .errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from .storage import LATEST, AliasRecord, OptimizerRecord, Store, VersionRecord
from .validation import UploadCheck, check_metadata, parent_version

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")
MIN_CHUNK = 64 << 10
MAX_CHUNK = 1 << 20
DEFAULT_PAGE = 100
MAX_PAGE = 1000


@dataclasses.dataclass(frozen=True)
class PublishSpec:
    """The header of an upload: what the client promises to send.

    ``metadata`` is ``VersionMetadata`` as proto JSON (``json_format.MessageToDict``
    with proto field names).
    """

    name: str
    metadata: dict
    size: int
    sha256: str


def shown(value: str, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length noted (error messages)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(value)} characters)"


def check_name(name: str) -> str:
    if not NAME_RE.match(name or ""):
        raise InvalidArgument(
            f"invalid optimizer name {shown(name)}: use 1-128 of [A-Za-z0-9._-], starting with a letter or digit"
        )
    return name


def check_alias(alias: str) -> str:
    if not ALIAS_RE.match(alias or ""):
        raise InvalidArgument(f"invalid alias {shown(alias)}: use 1-64 of [A-Za-z0-9._-], starting with a letter")
    return alias


def _encode_token(after) -> str:
    return base64.urlsafe_b64encode(json.dumps({"after": after}).encode()).decode()


MAX_VERSION = 2**63 - 1  # versions are SQL BIGINTs (SQLite INTEGER, PostgreSQL BIGINT)


def check_version_number(number: int) -> int:
    """A version number as the database can hold it, or ``InvalidArgument`` (never an overflow)."""
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_VERSION:
        raise InvalidArgument(f"version numbers are integers from 1 to 2^63-1, got {number}")
    return number


def _decode_token(token: str, kind: type):
    if not token:
        return kind()
    try:
        after = json.loads(base64.urlsafe_b64decode(token.encode()))["after"]
    except Exception:  # noqa: BLE001 - any garbage is the same user error
        raise InvalidArgument("invalid page_token; pass back next_page_token unchanged") from None
    if not isinstance(after, kind) or isinstance(after, bool) or (kind is int and not 0 <= after <= MAX_VERSION):
        raise InvalidArgument("invalid page_token; pass back next_page_token unchanged")
    return after


def _page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument("page_size must be >= 0")
    return min(page_size or DEFAULT_PAGE, MAX_PAGE)


class Registry:
    """All registry operations. Thread-safe; one instance per server.

    Args:
        data_dir: where blobs (and the default SQLite database) live.
        db_url: SQLAlchemy URL; default ``sqlite:///<data_dir>/registry.db``.
        max_chunk_bytes: largest accepted upload chunk.
        max_artifact_bytes: largest accepted artifact.
        watch_poll_s: how often watchers also re-read the database, so moves made
            by another server process on the same database are seen too.
        history_per_alias: alias events kept per alias for resuming watchers.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        db_url: str | None = None,
        *,
        max_chunk_bytes: int = MAX_CHUNK,
        max_artifact_bytes: int = 4 << 30,
        watch_poll_s: float = 1.0,
        history_per_alias: int = 256,
    ):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.blobs = BlobStore(self.data_dir, max_size=max_artifact_bytes)
        self.store = Store(db_url or f"sqlite:///{self.data_dir / 'registry.db'}", history_per_alias=history_per_alias)
        self.max_chunk_bytes = max_chunk_bytes
        self.watch_poll_s = watch_poll_s
        self._cond = threading.Condition()
        self._generation = 0  # bumped on every alias change / shutdown; wakes watchers
        self._closed = False
        self._listeners: list[tuple] = []  # (on_change, on_close): the server's watch hub

    # -- lifecycle ------------------------------------------------------------
    def recover(self, verify: bool = True, orphan_grace_s: float = 0.0) -> RecoveryReport:
        """Remove unfinished uploads and orphan blobs, re-verify every blob, log versions whose blob is gone.

        Run while holding the data directory's :class:`DataDirLock` and before
        serving, so no publish of this directory can be in flight; blobs younger
        than ``orphan_grace_s`` are kept anyway.
        """
        referenced = self.store.referenced_digests()  # read first: see BlobStore.orphans
        report = self.blobs.recover(verify=verify, referenced=referenced, orphan_grace_s=orphan_grace_s)
        missing = sorted(d for d in referenced if not self.blobs.exists(d))
        for digest in missing:
            log.error("registry: blob %s referenced by a version is missing or corrupt", digest)
        log.info(
            "registry: recovery removed %d temp files and %d orphan blobs, verified %d blobs, quarantined %d",
            report.removed_temp, len(report.orphans), report.verified, len(report.corrupt),
        )
        return report

    def close(self) -> None:
        """End all watch streams; later calls fail with :class:`Unavailable`."""
        with self._cond:
            self._closed = True
            self._generation += 1
            self._cond.notify_all()
        for _, on_close in list(self._listeners):
            on_close()

    @property
    def closed(self) -> bool:
        return self._closed

    def subscribe(self, on_change, on_close) -> None:
        """Call ``on_change()`` after every alias change and ``on_close()`` on :meth:`close`.

        Both are called from whatever thread made the change; they must not block.
        """
        self._listeners.append((on_change, on_close))

    def wake_watchers(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()
        for on_change, _ in list(self._listeners):
            on_change()

    # -- publish / fetch --------------------------------------------------------
    def publish(self, spec: PublishSpec, chunks: Iterable[bytes]) -> VersionRecord:
        """Store an upload and create the next version; nothing is visible unless it verifies.

        ``chunks`` may raise (a cut stream); the temp file is then removed and
        no version number is consumed.
        """
        self._check_open()
        check_name(spec.name)
        check_sha256(spec.sha256)
        if spec.size <= 0:
            raise InvalidArgument("size must be > 0: empty artifacts are not accepted")
        metadata = check_metadata(spec.metadata)
        parent = parent_version(metadata)
        if parent:  # versions are never deleted, so a parent found now still exists at commit
            if parent > MAX_VERSION:
                raise InvalidArgument(f"lineage.parent_version {parent} exceeds 2^63-1")
            try:
                self.store.get_version(spec.name, number=parent)
            except NotFound:
                raise InvalidArgument(
                    f"lineage.parent_version {parent}: optimizer {spec.name!r} has no such version") from None
        check = UploadCheck(metadata)
        with self.blobs.writer(spec.sha256, spec.size) as writer:
            for chunk in chunks:
                if len(chunk) > self.max_chunk_bytes:
                    raise ResourceExhausted(
                        f"chunk of {len(chunk)} bytes exceeds the {self.max_chunk_bytes}-byte chunk limit; "
                        "split the upload into smaller chunks"
                    )
                check.feed(chunk)  # random bytes fail here, at the first chunk
                writer.write(chunk)
            writer.verify()  # size and sha256 first: a cut stream is reported as such
            metadata = check.finish()
            writer.commit()
        version = self.store.create_version(spec.name, spec.sha256, spec.size, metadata)
        self.wake_watchers()
        return version

    def open_fetch(
        self, name: str, number: int | None = None, alias: str | None = None, offset: int = 0, chunk_size: int = 0
    ) -> tuple[VersionRecord, Iterator[bytes]]:
        """Resolve a version and return it with an iterator over its bytes from ``offset``."""
        version = self.get_version(name, number, alias)
        if offset < 0 or offset > version.size:
            raise InvalidArgument(f"offset {offset} is outside the artifact (size {version.size})")
        if not self.blobs.exists(version.sha256):
            raise DataLoss(f"artifact of {name}:{version.number} is missing on the server")
        size = min(max(chunk_size or MAX_CHUNK, MIN_CHUNK), MAX_CHUNK)
        return version, self.blobs.iter_chunks(version.sha256, offset, size)

    # -- reads ----------------------------------------------------------------
    def get_version(self, name: str, number: int | None = None, alias: str | None = None) -> VersionRecord:
        check_name(name)
        if number is not None:
            check_version_number(number)
        if alias is not None:
            check_alias(alias)
        return self.store.get_version(name, number=number, alias=alias)

    def list_optimizers(self, page_size: int = 0, page_token: str = "", prefix: str = "") -> tuple[list[OptimizerRecord], str]:
        limit = _page_size(page_size)
        rows = self.store.list_optimizers(limit + 1, _decode_token(page_token, str), prefix)
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, _encode_token(rows[-1].name) if more else ""

    def list_versions(self, name: str, page_size: int = 0, page_token: str = "") -> tuple[list[VersionRecord], str]:
        check_name(name)
        limit = _page_size(page_size)
        rows = self.store.list_versions(name, limit + 1, _decode_token(page_token, int))
        more = len(rows) > limit
        rows = rows[:limit]
        return rows, _encode_token(rows[-1].number) if more else ""

    # -- aliases ----------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int) -> AliasRecord:
        self._check_open()
        check_name(name)
        self._check_manual_alias(alias)
        check_version_number(version)
        record = self.store.set_alias(name, alias, version)
        self.wake_watchers()
        return record

    def delete_alias(self, name: str, alias: str) -> None:
        self._check_open()
        check_name(name)
        self._check_manual_alias(alias)
        self.store.delete_alias(name, alias)
        self.wake_watchers()

    def watch_start(self, name: str, alias: str, after_sequence: int = 0) -> tuple[list[AliasRecord], int]:
        """Where a watch starts: ``(events to send first, sequence to follow from)``.

        Without ``after_sequence``: the alias's current target (if set) and its event id.
        With it: nothing first, follow from it; :class:`OutOfRange` if events after it
        were trimmed. :class:`NotFound` for unknown names.
        """
        check_name(name)
        check_alias(alias)
        if after_sequence < 0 or after_sequence > MAX_VERSION:
            raise InvalidArgument(f"after_sequence must be 0..2^63-1, got {after_sequence}")
        if after_sequence:
            self.store.check_resume(name, alias, after_sequence)
            return [], after_sequence
        current = self.store.current_alias(name, alias)
        if current is None:
            return [], 0
        return ([current] if current.version is not None else []), current.sequence

    def watch(self, name: str, alias: str, stop: threading.Event, after_sequence: int = 0) -> Iterator[AliasRecord]:
        """Yield the alias's current target (if set), then every later move, in order.

        With ``after_sequence``, yield every event after it instead of the current
        target (see :meth:`watch_start`). Ends when ``stop`` is set (client went away;
        call :meth:`wake_watchers` after setting it). When the registry is closed
        (server shutdown) it raises :class:`Unavailable` naming the last sequence
        sent, so a watcher can tell a broken stream from a finished one and resume.
        This blocking form holds its thread; the gRPC server uses
        :class:`~service.registry.watch.WatchHub`, which holds none.
        """
        first, last = self.watch_start(name, alias, after_sequence)
        yield from first
        while True:
            with self._cond:
                seen = self._generation
            for event in self.store.alias_events_after(name, alias, last):
                last = event.sequence
                yield event
            with self._cond:
                while seen == self._generation and not stop.is_set() and not self._closed:
                    if not self._cond.wait(self.watch_poll_s):
                        break  # poll the database: another process may share it
                if stop.is_set():
                    return
                if self._closed:
                    raise self.shutdown_error(name, alias, last)

    @staticmethod
    def shutdown_error(name: str, alias: str, last: int) -> Unavailable:
        return Unavailable(f"registry is shutting down; watch of {name}@{alias} ended after sequence {last}, "
                           "reconnect with after_sequence to resume")

    # -- helpers ----------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("registry server is shutting down; retry against another instance")

    @staticmethod
    def _check_manual_alias(alias: str) -> None:
        check_alias(alias)
        if alias == LATEST:
            raise FailedPrecondition(
                "alias 'latest' moves automatically on publish and cannot be set or deleted by hand"
            )
