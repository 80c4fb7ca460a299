"""The registry's tables and the plain records handlers work with.

Five tables: ``optimizers`` (one row per name; its ``latest_version`` is the
counter that keeps version numbers gapless), ``versions`` (immutable),
``aliases`` (mutable pointers), ``alias_events`` (the log of alias moves that
watchers follow by id, trimmed to the newest events of each alias) and
``alias_history`` (per alias, the last event id trimmed away: a watcher
resuming from before it has missed events).

>>> sorted(metadata_obj.tables)
['alias_events', 'alias_history', 'aliases', 'optimizers', 'versions']
"""
from __future__ import annotations

import dataclasses
import json
import time

import sqlalchemy as sa

LATEST = "latest"

metadata_obj = sa.MetaData()
optimizers_t = sa.Table(
    "optimizers",
    metadata_obj,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("latest_version", sa.Integer, nullable=False, default=0),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)
versions_t = sa.Table(
    "versions",
    metadata_obj,
    sa.Column("name", sa.String(128), sa.ForeignKey("optimizers.name"), primary_key=True),
    sa.Column("number", sa.Integer, primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created_ms", sa.BigInteger, nullable=False),
    sa.Column("metadata_json", sa.Text, nullable=False),
)
aliases_t = sa.Table(
    "aliases",
    metadata_obj,
    sa.Column("name", sa.String(128), sa.ForeignKey("optimizers.name"), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("updated_ms", sa.BigInteger, nullable=False),
)
alias_events_t = sa.Table(
    "alias_events",
    metadata_obj,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("alias", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer, nullable=True),  # NULL = deleted
    sa.Column("unix_ms", sa.BigInteger, nullable=False),
    sa.Index("ix_alias_events_name_alias_id", "name", "alias", "id"),
)
alias_history_t = sa.Table(
    "alias_history",
    metadata_obj,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("alias", sa.String(64), primary_key=True),
    sa.Column("trimmed_through", sa.BigInteger, nullable=False),  # events with id <= this are gone
)


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclasses.dataclass(frozen=True)
class VersionRecord:
    name: str
    number: int
    sha256: str
    size: int
    created_ms: int
    metadata: dict
    aliases: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class OptimizerRecord:
    name: str
    latest_version: int
    updated_ms: int
    aliases: dict[str, int]


@dataclasses.dataclass(frozen=True)
class AliasRecord:
    name: str
    alias: str
    version: int | None  # None = deleted (events only)
    updated_ms: int
    sequence: int = 0


def record_from_row(row, aliases: tuple[str, ...]) -> VersionRecord:
    return VersionRecord(row.name, row.number, row.sha256, row.size, row.created_ms, json.loads(row.metadata_json), aliases)
