"""Typed messages between the meta-trainer (driver) and whoever runs inner unrolls.

The driver owns θ, the outer optimizer and the generation counter. Each
generation it hands out :class:`Ticket` s — one per antithetic *pair* (ES, PES)
or per *particle* (truncated backprop) — and gets back one :class:`PairResult`
per ticket. An :class:`Evaluator` turns ``(θ, tickets)`` into results; the
in-process :class:`~mnemosyne_core.meta.evaluator.LocalEvaluator` vmaps the
pairs that share a task shape, a Ray evaluator spreads tickets over actors that
each call :func:`~mnemosyne_core.meta.evaluator.evaluate_tickets` — the same code.

Seed-only communication
    A ticket names its perturbation, it does not carry it: ε for pair ``i`` of
    generation ``g`` is ``normal(fold_in(fold_in(run_key, g), i), |θ|)``
    (:func:`~mnemosyne_core.meta.noise.perturbation`), bit-identical in every
    process. The + half runs θ + σε, the − half θ − σε on the same task, data
    and inner initialisation (common random numbers). An ES/PES result is ids
    and two losses: :meth:`PairResult.encode` is 36 bytes. Only truncated
    backprop results carry a gradient (float32, |θ| entries).

Persistent inner state (PES, truncated backprop)
    A PES pair trains two inner problems (θ+σε and θ−σε halves) across many
    generations, one truncation of ``num_steps`` per generation. The *evaluator*
    owns that state, in an :class:`~mnemosyne_core.meta.evaluator.InnerStateStore`
    keyed by ``pair_id`` and tagged with ``(episode, start_step)``. The *driver*
    owns the bookkeeping that makes the estimate unbiased: which generation each
    pair's episode started in (``Ticket.episode``), the step it is at
    (``Ticket.start_step``) and the accumulated perturbation ξ_i (never sent).

    When an evaluator gets a ticket whose ``(pair_id, episode, start_step)`` it
    does not hold — a fresh episode (``start_step == 0``), a worker that died, a
    pair moved to another worker — it *resets deterministically*: it rebuilds the
    inner problem at step 0 from keys derived from ``(run_key, generation,
    pair_id)`` and answers ``Status.RESET`` (``start_step == 0`` answers ``OK``).
    On ``RESET`` the driver restarts that pair's episode at this generation and
    sets ξ_i = ε_i, exactly as for a planned reset, so the estimate stays unbiased;
    only the schedule of resets differs from a fault-free run. Without faults the
    schedule is a pure function of the seed, so an in-process run and a Ray run
    give the same θ. A pair whose inner loss turns NaN/Inf answers ``Status.NAN``:
    it is dropped whole, and the driver restarts its episode next generation.

Example:
    >>> r = PairResult(generation=3, pair_id=7, loss_pos=0.5, loss_neg=0.25, inner_steps=200,
    ...                status=Status.OK, worker_id=1)
    >>> blob = r.encode()
    >>> len(blob), PairResult.decode(blob) == r
    (36, True)
"""
from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mnemosyne_core.tasks.base import TaskSpec

__all__ = ["Evaluator", "PairResult", "ProtocolError", "Status", "Ticket"]

_WIRE_VERSION = 1
# version, status, flags, generation, pair_id, loss_pos, loss_neg, inner_steps, worker_id
_HEADER = struct.Struct("<BBHIIddII")
_FLAG_GRAD = 1


class ProtocolError(ValueError):
    """A message that cannot be decoded (wrong version, truncated, corrupt)."""


class Status(enum.IntEnum):
    """Outcome of one ticket."""

    OK = 0
    NAN = 1  # an inner loss became NaN/Inf: the pair is dropped whole
    ERROR = 2  # the evaluator raised on this ticket (e.g. a poisoned task): dropped
    RESET = 3  # OK, but persistent inner state was missing and was rebuilt at step 0

    @property
    def usable(self) -> bool:
        return self in (Status.OK, Status.RESET)


@dataclasses.dataclass(frozen=True)
class Ticket:
    """Work for one antithetic pair (or one backprop particle) in one generation.

    ``run_key`` is the raw ``uint32`` key data of the run key (``jax.random.key_data``),
    so the ticket is plain data. ``unroll_length`` is the episode's inner horizon;
    ``start_step`` where this ticket's ``num_steps`` begin (always 0 for plain ES);
    ``episode`` is the generation in which the pair's inner problem was (re)started
    — inner initialisation, data and augmentation keys derive from it.
    """

    generation: int
    pair_id: int
    task: TaskSpec
    unroll_length: int
    num_steps: int
    start_step: int = 0
    episode: int = 0
    run_key: tuple[int, ...] = (0, 0)

    def __post_init__(self) -> None:
        if self.generation < 0 or self.pair_id < 0:
            raise ValueError(f"generation and pair_id must be ≥ 0, got {self.generation}, {self.pair_id}")
        if self.num_steps < 1 or self.unroll_length < 1:
            raise ValueError(f"num_steps and unroll_length must be ≥ 1, got {self.num_steps}, {self.unroll_length}")
        if not 0 <= self.start_step < self.unroll_length:
            raise ValueError(f"start_step {self.start_step} outside [0, {self.unroll_length})")
        object.__setattr__(self, "run_key", tuple(int(x) for x in self.run_key))

    @property
    def group_key(self) -> tuple[str, int]:
        """Tickets with equal group keys share one compiled, vmapped unroll."""
        return (self.task.to_json(), self.num_steps)


@dataclasses.dataclass(frozen=True)
class PairResult:
    """What comes back for one ticket. ``grad`` only for truncated backprop (flat float32)."""

    generation: int
    pair_id: int
    loss_pos: float
    loss_neg: float
    inner_steps: int
    status: Status
    worker_id: int = 0
    grad: np.ndarray | None = None

    def encode(self) -> bytes:
        """Compact little-endian bytes: 36 B, plus 4 + 4·|θ| B when a gradient is attached."""
        flags = _FLAG_GRAD if self.grad is not None else 0
        head = _HEADER.pack(
            _WIRE_VERSION, int(self.status), flags, self.generation, self.pair_id,
            float(self.loss_pos), float(self.loss_neg), self.inner_steps, self.worker_id,
        )
        if self.grad is None:
            return head
        g = np.ascontiguousarray(self.grad, dtype="<f4").reshape(-1)
        return head + struct.pack("<I", g.size) + g.tobytes()

    @classmethod
    def decode(cls, blob: bytes) -> PairResult:
        if len(blob) < _HEADER.size:
            raise ProtocolError(f"PairResult needs ≥ {_HEADER.size} bytes, got {len(blob)}")
        version, status, flags, gen, pair, lp, ln, steps, worker = _HEADER.unpack_from(blob)
        if version != _WIRE_VERSION:
            raise ProtocolError(f"PairResult wire version {version}, this code reads {_WIRE_VERSION}")
        try:
            status = Status(status)
        except ValueError as exc:
            raise ProtocolError(f"unknown status code {status}") from exc
        grad = None
        rest = blob[_HEADER.size:]
        if flags & _FLAG_GRAD:
            if len(rest) < 4:
                raise ProtocolError("PairResult flagged a gradient but has no length field")
            (n,) = struct.unpack_from("<I", rest)
            if len(rest) != 4 + 4 * n:
                raise ProtocolError(f"gradient of {n} floats needs {4 + 4 * n} bytes, got {len(rest)}")
            grad = np.frombuffer(rest, dtype="<f4", offset=4).astype(np.float32)
        elif rest:
            raise ProtocolError(f"{len(rest)} trailing bytes after a PairResult")
        return cls(gen, pair, lp, ln, steps, status, worker, grad)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PairResult):
            return NotImplemented
        same = (self.generation, self.pair_id, self.inner_steps, self.status, self.worker_id) == (
            other.generation, other.pair_id, other.inner_steps, other.status, other.worker_id)
        # NaN losses of dropped pairs compare equal bit-wise.
        same &= np.array_equal([self.loss_pos, self.loss_neg], [other.loss_pos, other.loss_neg], equal_nan=True)
        if (self.grad is None) != (other.grad is None):
            return False
        return bool(same and (self.grad is None or np.array_equal(self.grad, other.grad)))

    __hash__ = None  # type: ignore[assignment]


@runtime_checkable
class Evaluator(Protocol):
    """Runs tickets against θ. Must return exactly one result per ticket (any order).

    Implementations: ``LocalEvaluator`` (in-process, vmapped) and the Ray
    evaluator in ``service/``. An evaluator may keep persistent inner state
    (see the module docstring); ``close`` releases it and any workers.
    """

    def evaluate(self, theta: Any, tickets: Sequence[Ticket]) -> list[PairResult]: ...

    def close(self) -> None: ...
