"""Truncated backpropagation: ``jax.value_and_grad`` of the meta-loss through K inner steps.

Each particle (one ticket) continues its own persistent inner problem by one
truncation under the unperturbed θ; the evaluator differentiates the
truncation's mean log loss ratio w.r.t. θ (the incoming inner state is treated
as a constant — that is the truncation bias PES removes), clips each particle's
gradient to ``estimator.grad_clip`` in L2 norm, and sends it back (the only
estimator whose results carry |θ| floats). The driver averages the usable ones;
particles with a non-finite loss or gradient are dropped and counted.

Example:
    >>> import numpy as np
    >>> from mnemosyne_core.meta.config import MetaConfig
    >>> cfg = MetaConfig.from_dict({"estimator": {"kind": "backprop", "num_pairs": 2, "truncation": 10}})
    >>> TruncatedBackprop(cfg, (0, 0)).init({"w": np.zeros(3, np.float32)})["started"]
    False
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mnemosyne_core.meta.base import TellStats, match_results
from mnemosyne_core.meta.episodes import EpisodeBook, EpisodeEstimator
from mnemosyne_core.meta.learned import LearnedOptimizer
from mnemosyne_core.meta.protocol import PairResult, Ticket

__all__ = ["TruncatedBackprop"]


class TruncatedBackprop(EpisodeEstimator):
    """Gradient meta-training over persistent truncations; state = the episode book."""

    def init(self, theta: Any) -> dict[str, Any]:
        return {"book": EpisodeBook.fresh(self.config.estimator.num_pairs), "started": False}

    def tell(self, state: dict[str, Any], tickets: Sequence[Ticket], results: Sequence[PairResult],
             theta: Any) -> tuple[Any, dict[str, Any], TellStats]:
        generation = tickets[0].generation if tickets else 0
        flat, unravel = LearnedOptimizer.ravel(theta)
        by_pair, stale = match_results(generation, tickets, results)
        state["book"].advance(generation, tickets, by_pair)
        used = [t.pair_id for t in tickets
                if t.pair_id in by_pair and by_pair[t.pair_id].status.usable and by_pair[t.pair_id].grad is not None]
        grad = np.zeros(flat.size, np.float32)
        for i in used:
            g = by_pair[i].grad
            if g.shape != (flat.size,):
                raise ValueError(f"pair {i}: gradient has shape {g.shape}, θ has {flat.size} entries")
            grad += g / len(used)
        losses = np.array([by_pair[i].loss_pos for i in used])
        stats = TellStats.of(float(losses.mean()) if used else float("nan"), tickets, used, by_pair, stale)
        return unravel(grad), state, stats
