"""What all gradient estimators share: the ask/tell interface, fitness shaping, episode sampling.

An estimator is driver-side and pure bookkeeping, like evosax's strategies:
``ask(state, generation)`` returns the generation's tickets, ``tell(state,
tickets, results, theta)`` returns a θ-shaped gradient estimate of the
meta-loss (to be *minimised* by the outer optimizer), the next state and
statistics. Static configuration lives in the frozen :class:`MetaConfig`;
estimator state is a dict of numpy arrays and plain values (checkpointable).

Example:
    >>> import numpy as np
    >>> shape_fitness(np.array([3.0, 1.0, 2.0, 10.0]), "centered_rank").tolist()
    [0.16666666666666663, -0.5, -0.16666666666666669, 0.5]
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mnemosyne_core.meta.config import MetaConfig, TaskConfig
from mnemosyne_core.meta.noise import TAG_TASK, sub_key
from mnemosyne_core.meta.protocol import PairResult, Ticket
from mnemosyne_core.tasks import TaskSpec

__all__ = ["EpisodeSampler", "Estimator", "EstimatorBase", "TellStats", "match_results", "shape_fitness",
           "shaped_differences", "task_labels"]


@dataclasses.dataclass
class TellStats:
    meta_loss: float
    pairs_used: int
    pairs_dropped: int
    inner_steps: int
    stale_results: int = 0
    # Mean meta-loss of the usable pairs per task (by spec name, or spec JSON where names repeat):
    # in a mixed family the overall mean hides one task getting worse while another improves.
    meta_loss_by_task: dict[str, float] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A flat metrics row: ``meta_loss/<task>`` keys beside the totals."""
        row = dataclasses.asdict(self)
        row.update({f"meta_loss/{k}": v for k, v in row.pop("meta_loss_by_task").items()})
        return row

    @classmethod
    def of(cls, meta_loss: float, tickets: Sequence[Ticket], used: Sequence[int],
           by_pair: dict[int, PairResult], stale: int) -> TellStats:
        """Counts for one generation: ``used`` pairs out of ``tickets``, inner steps of every answer."""
        spec_of = {t.pair_id: t.task for t in tickets}
        names = {spec.name for spec in spec_of.values()}
        repeated = len(names) < len({spec.to_json() for spec in spec_of.values()})
        per_task: dict[str, list[float]] = {}
        for i in used:
            label = spec_of[i].to_json() if repeated else spec_of[i].name
            per_task.setdefault(label, []).append((by_pair[i].loss_pos + by_pair[i].loss_neg) / 2)
        return cls(
            meta_loss=meta_loss,
            pairs_used=len(used),
            pairs_dropped=len(tickets) - len(used),
            inner_steps=int(sum(r.inner_steps for r in by_pair.values())),
            stale_results=stale,
            meta_loss_by_task={k: float(np.mean(v)) for k, v in sorted(per_task.items())},
        )


class EstimatorBase:
    """What every estimator holds: the meta-config, the run key and the per-pair task sampler."""

    def __init__(self, config: MetaConfig, run_key: Sequence[int], sampler: EpisodeSampler | None = None):
        self.config = config
        self.run_key = tuple(int(x) for x in run_key)
        self.sampler = sampler or EpisodeSampler(config.tasks, config.estimator.truncation)


class Estimator(Protocol):
    config: MetaConfig

    def init(self, theta: Any) -> dict[str, Any]: ...

    def ask(self, state: dict[str, Any], generation: int) -> tuple[list[Ticket], dict[str, Any]]: ...

    def tell(self, state: dict[str, Any], tickets: Sequence[Ticket], results: Sequence[PairResult],
             theta: Any) -> tuple[Any, dict[str, Any], TellStats]: ...


def shape_fitness(values: np.ndarray, kind: str) -> np.ndarray:
    """Centered ranks in [-0.5, 0.5] (ties broken by order), z-scores, or the raw values."""
    values = np.asarray(values, np.float64)
    if kind == "none" or values.size == 0:
        return values
    if kind == "zscore":
        return (values - values.mean()) / (values.std() + 1e-12)
    if kind == "centered_rank":
        if values.size == 1:
            return np.zeros_like(values)
        ranks = np.empty(values.size, np.float64)
        ranks[np.argsort(values, kind="stable")] = np.arange(values.size)
        return ranks / (values.size - 1) - 0.5
    raise ValueError(f"unknown fitness shaping {kind!r}")


def shaped_differences(loss_pos: Any, loss_neg: Any, kind: str, groups: Sequence[str] | None = None) -> np.ndarray:
    """``f(L⁺_i) − f(L⁻_i)`` per pair, shaping over all 2m losses or within each group.

    ``groups`` labels each pair (e.g. its task spec). Ranks or z-scores across
    different tasks compare incomparable numbers: one task's meta-losses may sit
    inside another's wider spread, so its pairs get small rank differences however
    clearly their two halves differ. Shaping within each group gives every task's
    pairs the same [-0.5, 0.5] range, so a pair's weight says how it did among pairs
    of its own task.

    Example:
        >>> shaped_differences([0.0, 10.0], [1.0, 11.0], "centered_rank").round(3).tolist()
        [-0.333, -0.333]
        >>> shaped_differences([0.0, 10.0], [1.0, 11.0], "centered_rank", ["a", "b"]).tolist()
        [-1.0, -1.0]
    """
    lp, ln = np.asarray(loss_pos, np.float64), np.asarray(loss_neg, np.float64)
    m = lp.size
    if groups is None:
        both = shape_fitness(np.concatenate([lp, ln]), kind)
        return both[:m] - both[m:]
    if len(groups) != m:
        raise ValueError(f"{len(groups)} group labels for {m} pairs")
    out = np.zeros(m, np.float64)
    labels = np.asarray(list(groups), dtype=object)
    for g in dict.fromkeys(groups):  # first-seen order: deterministic
        idx = np.flatnonzero(labels == g)
        both = shape_fitness(np.concatenate([lp[idx], ln[idx]]), kind)
        out[idx] = both[:idx.size] - both[idx.size:]
    return out


def task_labels(tickets: Sequence[Ticket], pair_ids: Sequence[int]) -> list[str]:
    """The task spec (as JSON) of each of ``pair_ids``: the groups of ``shape_within_task``."""
    spec_of = {t.pair_id: t.task.to_json() for t in tickets}
    return [spec_of[i] for i in pair_ids]


def match_results(generation: int, tickets: Sequence[Ticket], results: Sequence[PairResult]
                  ) -> tuple[dict[int, PairResult], int]:
    """Results of this generation by pair id; stale (older generation) or unknown ones are counted."""
    wanted = {t.pair_id for t in tickets}
    out: dict[int, PairResult] = {}
    stale = 0
    for r in results:
        if r.generation != generation or r.pair_id not in wanted:
            stale += 1
            continue
        out[r.pair_id] = r
    return out, stale


class EpisodeSampler:
    """Samples ``(task spec, unroll length)`` for a pair's new episode from a key.

    Lengths are log-uniform in ``[min_unroll, max_unroll]`` (or the spec's own
    ``unroll`` range) rounded up to a multiple of the truncation K (the unroll-length
    curriculum).
    """

    def __init__(self, tasks: TaskConfig, truncation: int):
        self.tasks = tasks
        self.truncation = truncation
        default = (tasks.min_unroll, tasks.max_unroll)
        self._specs = [TaskSpec(d["name"], d.get("kwargs", {})) for d in tasks.spec_dicts]
        self._ranges = [tuple(d["unroll"]) if "unroll" in d else default for d in tasks.spec_dicts]
        self._family = None
        if tasks.family:
            from mnemosyne_core.tasks.families import FAMILIES

            if tasks.family not in FAMILIES:
                raise ValueError(f"unknown task family {tasks.family!r}; known: {sorted(FAMILIES)}")
            self._family = FAMILIES[tasks.family]

    def __call__(self, key: jax.Array) -> tuple[TaskSpec, int]:
        k_task, k_len = jax.random.split(key)
        if self._family is not None:
            spec, (lo, hi) = self._family.sample(k_task), (self.tasks.min_unroll, self.tasks.max_unroll)
        else:
            i = int(jax.random.randint(k_task, (), 0, len(self._specs)))
            spec, (lo, hi) = self._specs[i], self._ranges[i]
        lo, hi = math.log(lo), math.log(hi)
        u = float(jax.random.uniform(k_len, (), jnp.float32))
        length = round(math.exp(lo + (hi - lo) * u))
        k = self.truncation
        return spec, max(k, math.ceil(length / k) * k)

    def for_pair(self, run_key: Sequence[int], generation: int, pair_id: int) -> tuple[TaskSpec, int]:
        return self(sub_key(run_key, generation, pair_id, TAG_TASK))
