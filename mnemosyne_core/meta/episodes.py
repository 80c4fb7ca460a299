"""Driver-side bookkeeping of persistent inner problems (PES, truncated backprop).

Each pair runs an *episode*: a task and an unroll length sampled in the
generation the episode started, advanced by one truncation of K steps per
generation. The book records, per pair, the episode's start generation, its
task, its length and the next step; it turns that into tickets (:meth:`tickets`)
and applies the results (:meth:`advance`): an episode that reaches its length or
whose pair was dropped restarts next generation; a ``RESET`` result means the
evaluator lost the state and restarted the episode in this generation.

The first episode of each pair is cut to a random multiple of K (random initial
offsets) so that the population does not reset all at once.

Example:
    >>> from mnemosyne_core.meta.config import MetaConfig
    >>> from mnemosyne_core.meta.base import EpisodeSampler
    >>> cfg = MetaConfig.from_dict({"estimator": {"num_pairs": 3, "truncation": 10}})
    >>> book = EpisodeBook.fresh(3)
    >>> tickets = book.tickets(0, EpisodeSampler(cfg.tasks, 10), (0, 0), 10, first=True)
    >>> [t.start_step for t in tickets], all(t.num_steps == 10 for t in tickets)
    ([0, 0, 0], True)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mnemosyne_core.meta.base import EpisodeSampler, EstimatorBase
from mnemosyne_core.meta.noise import sub_key
from mnemosyne_core.meta.protocol import PairResult, Status, Ticket
from mnemosyne_core.tasks import TaskSpec

__all__ = ["EpisodeBook", "EpisodeEstimator"]

_TAG_OFFSET = 7


@dataclasses.dataclass
class EpisodeBook:
    episode: np.ndarray  # int64 (n,) generation the episode started
    step: np.ndarray  # int64 (n,) next inner step
    length: np.ndarray  # int64 (n,) the episode's unroll length
    spec: list[str]  # task spec JSON per pair ("" = none yet)
    restart: np.ndarray  # bool (n,) start a new episode at the next ask

    @classmethod
    def fresh(cls, n: int) -> EpisodeBook:
        z = np.zeros(n, np.int64)
        return cls(z.copy(), z.copy(), z.copy(), [""] * n, np.ones(n, bool))

    def tickets(self, generation: int, sampler: EpisodeSampler, run_key: Sequence[int], truncation: int,
                first: bool = False) -> list[Ticket]:
        out = []
        for i in range(len(self.spec)):
            if self.restart[i]:
                spec, length = sampler.for_pair(run_key, generation, i)
                if first:  # random initial offset: a shortened first episode
                    k = sub_key(run_key, generation, i, _TAG_OFFSET)
                    n_trunc = length // truncation
                    length = truncation * (1 + int(jax.random.randint(k, (), 0, max(n_trunc, 1))))
                self.episode[i], self.step[i], self.length[i] = generation, 0, length
                self.spec[i] = spec.to_json()
                self.restart[i] = False
            spec = TaskSpec.from_json(self.spec[i])
            num = int(min(truncation, self.length[i] - self.step[i]))
            out.append(Ticket(generation, i, spec, int(self.length[i]), num, int(self.step[i]),
                              int(self.episode[i]), tuple(run_key)))
        return out

    def advance(self, generation: int, tickets: Sequence[Ticket], by_pair: dict[int, PairResult]) -> list[bool]:
        """Apply results; returns per ticket whether its episode restarted at this generation."""
        restarted = []
        for t in tickets:
            r = by_pair.get(t.pair_id)
            i = t.pair_id
            if r is None or not r.status.usable:
                self.restart[i] = True
                restarted.append(False)
                continue
            is_reset = r.status is Status.RESET or t.start_step == 0
            if r.status is Status.RESET:
                self.episode[i] = generation
                self.step[i] = min(t.num_steps, t.unroll_length)
            else:
                self.step[i] = t.start_step + t.num_steps
            if self.step[i] >= self.length[i]:
                self.restart[i] = True
            restarted.append(is_reset)
        return restarted

    def state_dict(self) -> dict[str, Any]:
        return {"episode": self.episode.copy(), "step": self.step.copy(), "length": self.length.copy(),
                "spec": list(self.spec), "restart": self.restart.copy()}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> EpisodeBook:
        spec = d["spec"]
        if isinstance(spec, dict):  # msgpack restores lists as {"0": ..., "1": ...}
            spec = [spec[str(k)] for k in range(len(spec))]
        return cls(np.array(d["episode"], np.int64), np.array(d["step"], np.int64),
                   np.array(d["length"], np.int64), list(spec), np.array(d["restart"], bool))

    @property
    def truncations_left(self) -> np.ndarray:
        return np.maximum(self.length - self.step, 0)

    def __len__(self) -> int:
        return len(self.spec)


class EpisodeEstimator(EstimatorBase):
    """An estimator over persistent truncated episodes (PES, truncated backprop).

    Its state holds an :class:`EpisodeBook` under ``"book"`` and a ``"started"`` flag; ``ask`` hands
    out each pair's next truncation (the first call staggers the episodes' starting offsets).
    """

    def ask(self, state: dict[str, Any], generation: int) -> tuple[list[Ticket], dict[str, Any]]:
        tickets = state["book"].tickets(generation, self.sampler, self.run_key, self.config.estimator.truncation,
                                        first=not state["started"])
        state["started"] = True
        return tickets, state
