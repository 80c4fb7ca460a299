"""Persistent evolution strategies (Vicol et al., 2021) over truncated unrolls.

Each antithetic pair keeps two inner problems alive across generations (one per
half) and advances them one truncation of K steps per generation under
θ ± σε_i^g, with a fresh ε every truncation. The driver keeps per pair the sum
of all perturbations since the episode started, ξ_i = Σ_{g'} ε_i^{g'} (reset to
ε_i^g when the episode restarts), and estimates::

    ĝ = Σ_i (f(L⁺_i) − f(L⁻_i)) ξ_i / (2 m σ)

which, with ``shaping = "none"``, is unbiased for the gradient of the smoothed
meta-loss of the *whole* episode even though every truncation only sees K steps
(plain truncated ES is biased toward short horizons). ξ never leaves the driver
and is checkpointed; workers still return only two losses per pair.

Example:
    >>> import numpy as np
    >>> from mnemosyne_core.meta.config import MetaConfig
    >>> cfg = MetaConfig.from_dict({"estimator": {"kind": "pes", "num_pairs": 2, "truncation": 10}})
    >>> pes = PES(cfg, (0, 0))
    >>> state = pes.init({"w": np.zeros(3, np.float32)})
    >>> state["xi"].shape
    (2, 3)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mnemosyne_core.meta.base import (
    TellStats,
    match_results,
    shaped_differences,
    task_labels,
)
from mnemosyne_core.meta.episodes import EpisodeBook, EpisodeEstimator
from mnemosyne_core.meta.learned import LearnedOptimizer
from mnemosyne_core.meta.noise import perturbations
from mnemosyne_core.meta.protocol import PairResult, Ticket

__all__ = ["PES"]


class PES(EpisodeEstimator):
    """Antithetic PES; state = episode book + accumulators ξ (n_pairs × |θ|, float32)."""

    def init(self, theta: Any) -> dict[str, Any]:
        n = self.config.estimator.num_pairs
        dim = int(LearnedOptimizer.ravel(theta)[0].size)
        return {"book": EpisodeBook.fresh(n), "xi": np.zeros((n, dim), np.float32), "started": False}

    def tell(self, state: dict[str, Any], tickets: Sequence[Ticket], results: Sequence[PairResult],
             theta: Any) -> tuple[Any, dict[str, Any], TellStats]:
        generation = tickets[0].generation if tickets else 0
        flat, unravel = LearnedOptimizer.ravel(theta)
        by_pair, stale = match_results(generation, tickets, results)
        restarted = state["book"].advance(generation, tickets, by_pair)
        xi = state["xi"]
        ids = [t.pair_id for t in tickets]
        eps = np.asarray(perturbations(self.run_key, generation, ids, flat.size))
        used = []
        for j, t in enumerate(tickets):
            r = by_pair.get(t.pair_id)
            if r is None or not r.status.usable:
                xi[t.pair_id] = 0.0
                continue
            xi[t.pair_id] = eps[j] if restarted[j] else xi[t.pair_id] + eps[j]
            used.append(t.pair_id)
        lp = np.array([by_pair[i].loss_pos for i in used])
        ln = np.array([by_pair[i].loss_neg for i in used])
        est = self.config.estimator
        grad = np.zeros(flat.size, np.float32)
        if used:
            groups = task_labels(tickets, used) if est.shape_within_task else None
            m = len(used)
            w = (shaped_differences(lp, ln, est.shaping, groups) / (2.0 * m * est.sigma)).astype(np.float32)
            grad = w @ xi[used]
        stats = TellStats.of(float(np.mean((lp + ln) / 2)) if used else float("nan"), tickets, used, by_pair, stale)
        return unravel(grad), state, stats
