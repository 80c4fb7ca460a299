"""Compact driver → worker encoding of the tickets of one call.

A :class:`~mnemosyne_core.meta.protocol.Ticket` pickled alone is ~370 bytes, mostly the task spec
and class paths. The tickets of one call share the run key and usually a handful of task specs, so
they travel as one blob: a header, the run key once, each distinct task spec's JSON once, then a
26-byte row per ticket (generation, pair id, spec index, unroll length, steps, start step, episode).

Example:
    >>> from mnemosyne_core.meta.protocol import Ticket
    >>> from mnemosyne_core.tasks import TaskSpec
    >>> spec = TaskSpec("quadratic", {"dim": 4})
    >>> ts = [Ticket(3, i, spec, 20, 10, run_key=(0, 7)) for i in range(8)]
    >>> blob = pack_tickets(ts)
    >>> unpack_tickets(blob) == ts, len(blob) < 8 * 40
    (True, True)
"""
from __future__ import annotations

import struct
from collections.abc import Sequence

from mnemosyne_core.meta.protocol import ProtocolError, Ticket
from mnemosyne_core.tasks.base import TaskSpec

__all__ = ["pack_tickets", "unpack_tickets"]

_VERSION = 1
_HEAD = struct.Struct("<BBHI")  # version, run-key words, distinct specs, tickets
_ROW = struct.Struct("<IIHIIII")  # generation, pair, spec index, unroll, steps, start, episode


def pack_tickets(tickets: Sequence[Ticket]) -> bytes:
    """One blob for tickets that share a run key (raises ``ValueError`` otherwise)."""
    if not tickets:
        return _HEAD.pack(_VERSION, 0, 0, 0)
    run_key = tickets[0].run_key
    if any(t.run_key != run_key for t in tickets):
        raise ValueError("tickets of one call must share the run key")
    specs: dict[str, int] = {}
    rows = []
    for t in tickets:
        index = specs.setdefault(t.task.to_json(), len(specs))
        rows.append(_ROW.pack(t.generation, t.pair_id, index, t.unroll_length, t.num_steps,
                              t.start_step, t.episode))
    parts = [_HEAD.pack(_VERSION, len(run_key), len(specs), len(tickets)),
             struct.pack(f"<{len(run_key)}I", *run_key)]
    for text in specs:  # insertion order = index order
        raw = text.encode()
        parts += [struct.pack("<I", len(raw)), raw]
    return b"".join(parts + rows)


def unpack_tickets(blob: bytes) -> list[Ticket]:
    """Inverse of :func:`pack_tickets`; raises ``ProtocolError`` on a malformed blob."""
    try:
        version, nkey, nspec, n = _HEAD.unpack_from(blob)
        if version != _VERSION:
            raise ProtocolError(f"ticket batch wire version {version}, this code reads {_VERSION}")
        pos = _HEAD.size
        run_key = struct.unpack_from(f"<{nkey}I", blob, pos)
        pos += 4 * nkey
        specs = []
        for _ in range(nspec):
            (length,) = struct.unpack_from("<I", blob, pos)
            pos += 4
            specs.append(TaskSpec.from_json(blob[pos:pos + length].decode()))
            pos += length
        if len(blob) != pos + n * _ROW.size:
            raise ProtocolError(f"ticket batch of {n} rows has {len(blob) - pos} bytes of rows")
        out = []
        for i in range(n):
            g, pair, s, unroll, steps, start, episode = _ROW.unpack_from(blob, pos + i * _ROW.size)
            out.append(Ticket(g, pair, specs[s], unroll, steps, start, episode, run_key))
        return out
    except (struct.error, IndexError, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(f"malformed ticket batch: {exc}") from exc
