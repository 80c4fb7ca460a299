"""Registry metadata in a relational database through SQLAlchemy.

SQLite (WAL mode) is the default, ``sqlite:///DATA/registry.db``; any
SQLAlchemy URL works, PostgreSQL (``postgresql+psycopg://…``) is tested in CI.

Gapless version numbers under concurrent publishers: every write to an
optimizer first locks its row in ``optimizers`` (``SELECT … FOR UPDATE`` on
PostgreSQL; ``BEGIN IMMEDIATE`` on SQLite, which takes the database write
lock), reads ``latest_version``, and inserts ``latest_version + 1`` in the
same transaction. The number is allocated only after the blob is verified,
so a failed upload never consumes one. Alias moves are appended to
``alias_events`` under the same lock, which makes event ids per optimizer
increase in commit order — what :meth:`Store.alias_events_after` relies on.
Each alias keeps its newest ``history_per_alias`` events (default 256); the
write that appends an event trims older ones in the same transaction and
records the last id removed, so :meth:`Store.check_resume` can tell a watcher
that asks for a trimmed event to re-read the alias instead.

>>> store = Store("sqlite://")
>>> store.create_version("demo", "ab" * 32, 5, {}).number
1
>>> store.create_version("demo", "cd" * 32, 7, {}).number
2
>>> store.get_version("demo", alias="latest").number
2
"""
from __future__ import annotations

import collections
import dataclasses
import json
import threading

import sqlalchemy as sa
from sqlalchemy import event

from .errors import NotFound, OutOfRange
from .schema import (
    LATEST,
    AliasRecord,
    OptimizerRecord,
    VersionRecord,
    alias_events_t,
    alias_history_t,
    aliases_t,
    metadata_obj,
    now_ms,
    optimizers_t,
    record_from_row,
    versions_t,
)


def _make_engine(url: str) -> sa.Engine:
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)
    # Enough pooled connections for every server worker thread: a request never
    # waits on the pool, only (briefly, under WAL) on SQLite's single writer lock.
    engine = sa.create_engine(
        url, connect_args={"check_same_thread": False, "timeout": 60},
        **({} if url in ("sqlite://", "sqlite:///:memory:") else {"pool_size": 8, "max_overflow": 64}),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        # Let SQLAlchemy's "begin" hook below emit BEGIN itself (pysqlite's own
        # transaction handling would defer it and can't take the write lock early).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        # Writers take the write lock up front so read-then-insert is serialized;
        # readers use a deferred BEGIN and never block each other under WAL.
        immediate = conn.get_execution_options().get("registry_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class LRUCache:
    """A small thread-safe LRU map for immutable records.

    >>> c = LRUCache(1); _ = c.put("a", 1); _ = c.put("b", 2)
    >>> c.get("a"), c.get("b")
    (None, 2)
    """

    def __init__(self, size: int):
        self._size = size
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put(self, key, value):
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._size:
                self._data.popitem(last=False)
        return value


class Store:
    """The registry's tables and the transactions that keep them consistent."""

    def __init__(self, url: str, cache_size: int = 4096, history_per_alias: int = 256):
        if history_per_alias < 1:
            raise ValueError("history_per_alias must be >= 1")
        self.url = url
        self.history_per_alias = history_per_alias
        self.engine = _make_engine(url)
        self._cache = LRUCache(cache_size)
        metadata_obj.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # -- transactions ---------------------------------------------------------
    def _write(self):
        conn = self.engine.connect().execution_options(registry_write=True)
        return _Txn(conn)

    def _read(self):
        return _Txn(self.engine.connect())

    def _lock_optimizer(self, conn, name: str, create: bool):
        if create:
            conn.execute(
                _insert_ignore(conn, optimizers_t).values(name=name, latest_version=0, updated_ms=now_ms())
            )
        row = conn.execute(
            sa.select(optimizers_t).where(optimizers_t.c.name == name).with_for_update()
        ).one_or_none()
        if row is None:
            raise NotFound(f"unknown optimizer {name!r}")
        return row

    # -- writes ---------------------------------------------------------------
    def create_version(self, name: str, sha256: str, size: int, metadata: dict) -> VersionRecord:
        """Append version ``latest + 1`` of ``name`` and move ``latest`` to it, atomically."""
        with self._write() as conn:
            row = self._lock_optimizer(conn, name, create=True)
            number = row.latest_version + 1
            ts = now_ms()
            conn.execute(
                versions_t.insert().values(
                    name=name, number=number, sha256=sha256, size=size, created_ms=ts,
                    metadata_json=json.dumps(metadata, sort_keys=True),
                )
            )
            conn.execute(
                optimizers_t.update().where(optimizers_t.c.name == name).values(latest_version=number, updated_ms=ts)
            )
            self._put_alias(conn, name, LATEST, number, ts)
        return VersionRecord(name, number, sha256, size, ts, metadata, (LATEST,))

    def set_alias(self, name: str, alias: str, version: int) -> AliasRecord:
        with self._write() as conn:
            self._lock_optimizer(conn, name, create=False)
            exists = conn.execute(
                sa.select(versions_t.c.number).where(versions_t.c.name == name, versions_t.c.number == version)
            ).one_or_none()
            if exists is None:
                raise NotFound(f"optimizer {name!r} has no version {version}")
            ts = now_ms()
            seq = self._put_alias(conn, name, alias, version, ts)
        return AliasRecord(name, alias, version, ts, seq)

    def delete_alias(self, name: str, alias: str) -> None:
        with self._write() as conn:
            self._lock_optimizer(conn, name, create=False)
            result = conn.execute(
                aliases_t.delete().where(aliases_t.c.name == name, aliases_t.c.alias == alias)
            )
            if result.rowcount == 0:
                raise NotFound(f"optimizer {name!r} has no alias {alias!r}")
            conn.execute(alias_events_t.insert().values(name=name, alias=alias, version=None, unix_ms=now_ms()))
            self._trim_history(conn, name, alias)

    def _put_alias(self, conn, name: str, alias: str, version: int, ts: int) -> int:
        updated = conn.execute(
            aliases_t.update()
            .where(aliases_t.c.name == name, aliases_t.c.alias == alias)
            .values(version=version, updated_ms=ts)
        )
        if updated.rowcount == 0:
            conn.execute(aliases_t.insert().values(name=name, alias=alias, version=version, updated_ms=ts))
        result = conn.execute(alias_events_t.insert().values(name=name, alias=alias, version=version, unix_ms=ts))
        self._trim_history(conn, name, alias)
        return int(result.inserted_primary_key[0])

    def _trim_history(self, conn, name: str, alias: str) -> None:
        """Keep the newest ``history_per_alias`` events of ``name@alias`` (under the optimizer's lock)."""
        events = alias_events_t.c
        cutoff = conn.execute(
            sa.select(events.id).where(events.name == name, events.alias == alias)
            .order_by(events.id.desc()).offset(self.history_per_alias).limit(1)
        ).scalar_one_or_none()
        if cutoff is None:
            return
        conn.execute(alias_events_t.delete().where(events.name == name, events.alias == alias, events.id <= cutoff))
        updated = conn.execute(
            alias_history_t.update()
            .where(alias_history_t.c.name == name, alias_history_t.c.alias == alias)
            .values(trimmed_through=cutoff)
        )
        if updated.rowcount == 0:
            conn.execute(alias_history_t.insert().values(name=name, alias=alias, trimmed_through=cutoff))

    # -- reads ----------------------------------------------------------------
    def get_version(self, name: str, number: int | None = None, alias: str | None = None) -> VersionRecord:
        """One version with the aliases pointing at it; one query when the version is cached.

        Versions are immutable, so their rows are cached in-process; aliases are
        mutable and always read from the database.
        """
        with self._read() as conn:
            alias_rows = conn.execute(
                sa.select(aliases_t.c.alias, aliases_t.c.version).where(aliases_t.c.name == name)
            ).all()
            if number is None:
                alias = alias or LATEST
                number = next((v for a, v in alias_rows if a == alias), None)
                if number is None:
                    self._require_optimizer(conn, name)
                    raise NotFound(f"optimizer {name!r} has no alias {alias!r}")
            record = self._cache.get((name, number))
            if record is None:
                row = conn.execute(
                    sa.select(versions_t).where(versions_t.c.name == name, versions_t.c.number == number)
                ).one_or_none()
                if row is None:
                    self._require_optimizer(conn, name)
                    raise NotFound(f"optimizer {name!r} has no version {number}")
                record = self._cache.put((name, number), record_from_row(row, ()))
        return dataclasses.replace(record, aliases=tuple(sorted(a for a, v in alias_rows if v == number)))

    def list_versions(self, name: str, limit: int, after: int = 0) -> list[VersionRecord]:
        with self._read() as conn:
            self._require_optimizer(conn, name)
            rows = conn.execute(
                sa.select(versions_t)
                .where(versions_t.c.name == name, versions_t.c.number > after)
                .order_by(versions_t.c.number)
                .limit(limit)
            ).all()
            aliases: dict[int, list[str]] = {}
            for a, v in conn.execute(
                sa.select(aliases_t.c.alias, aliases_t.c.version).where(aliases_t.c.name == name).order_by(aliases_t.c.alias)
            ):
                aliases.setdefault(v, []).append(a)
        return [record_from_row(r, tuple(aliases.get(r.number, ()))) for r in rows]

    def list_optimizers(self, limit: int, after: str = "", prefix: str = "") -> list[OptimizerRecord]:
        with self._read() as conn:
            query = sa.select(optimizers_t).where(optimizers_t.c.name > after, optimizers_t.c.latest_version > 0)
            if prefix:
                # Names are case-sensitive: compare the first len(prefix) characters exactly.
                # (LIKE, which startswith() emits, ignores ASCII case on SQLite, and its
                # wildcards would need escaping; substr() means the same on both databases.)
                query = query.where(sa.func.substr(optimizers_t.c.name, 1, len(prefix)) == prefix)
            rows = conn.execute(query.order_by(optimizers_t.c.name).limit(limit)).all()
            names = [r.name for r in rows]
            aliases: dict[str, dict[str, int]] = {n: {} for n in names}
            if names:
                for n, a, v in conn.execute(
                    sa.select(aliases_t.c.name, aliases_t.c.alias, aliases_t.c.version).where(aliases_t.c.name.in_(names))
                ):
                    aliases[n][a] = v
        return [OptimizerRecord(r.name, r.latest_version, r.updated_ms, aliases[r.name]) for r in rows]

    def current_alias(self, name: str, alias: str) -> AliasRecord | None:
        """The alias's state with the id of the last event that set it, or None."""
        with self._read() as conn:
            self._require_optimizer(conn, name)
            last = conn.execute(
                sa.select(alias_events_t)
                .where(alias_events_t.c.name == name, alias_events_t.c.alias == alias)
                .order_by(alias_events_t.c.id.desc())
                .limit(1)
            ).one_or_none()
        if last is None:
            return None
        return AliasRecord(name, alias, last.version, last.unix_ms, last.id)

    def alias_events_after(self, name: str, alias: str, sequence: int) -> list[AliasRecord]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(alias_events_t)
                .where(alias_events_t.c.name == name, alias_events_t.c.alias == alias, alias_events_t.c.id > sequence)
                .order_by(alias_events_t.c.id)
            ).all()
        return [AliasRecord(r.name, r.alias, r.version, r.unix_ms, r.id) for r in rows]

    def check_resume(self, name: str, alias: str, after: int) -> None:
        """Raise :class:`OutOfRange` if events of ``name@alias`` after ``after`` were trimmed away."""
        with self._read() as conn:
            self._require_optimizer(conn, name)
            trimmed = conn.execute(
                sa.select(alias_history_t.c.trimmed_through)
                .where(alias_history_t.c.name == name, alias_history_t.c.alias == alias)
            ).scalar_one_or_none()
        if trimmed is not None and after < trimmed:
            raise OutOfRange(
                f"cannot resume the watch of {name}@{alias} after sequence {after}: the server keeps the last "
                f"{self.history_per_alias} events of each alias and has dropped those up to {trimmed}; "
                "re-read the alias and watch again without after_sequence")

    def alias_events_since(self, cursors: dict[tuple[str, str], int]) -> list[AliasRecord]:
        """Events of several aliases at once, each after its own cursor, in id order (one query)."""
        if not cursors:
            return []
        names = sorted({name for name, _ in cursors})
        with self._read() as conn:
            rows = conn.execute(
                sa.select(alias_events_t)
                .where(alias_events_t.c.id > min(cursors.values()), alias_events_t.c.name.in_(names))
                .order_by(alias_events_t.c.id)
            ).all()
        return [AliasRecord(r.name, r.alias, r.version, r.unix_ms, r.id) for r in rows
                if r.id > cursors.get((r.name, r.alias), r.id)]

    def referenced_digests(self) -> set[str]:
        with self._read() as conn:
            return set(conn.execute(sa.select(versions_t.c.sha256).distinct()).scalars())

    @staticmethod
    def _require_optimizer(conn, name: str) -> None:
        found = conn.execute(
            sa.select(optimizers_t.c.latest_version).where(optimizers_t.c.name == name)
        ).scalar_one_or_none()
        if not found:  # None (never seen) or 0 (first publish still in flight)
            raise NotFound(f"unknown optimizer {name!r}")


class _Txn:
    """``with`` block = one transaction on a pooled connection (commit or roll back, then release)."""

    def __init__(self, conn: sa.Connection):
        self._conn = conn

    def __enter__(self) -> sa.Connection:
        self._conn.begin()
        return self._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._conn.commit()
            else:
                self._conn.rollback()
        finally:
            self._conn.close()


def _insert_ignore(conn, table: sa.Table):
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - other backends are not supported
        raise NotImplementedError(f"unsupported database {conn.dialect.name!r}")
    return insert(table).on_conflict_do_nothing()
