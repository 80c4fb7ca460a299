"""Antithetic evolution strategies with seed-only perturbations.

Pair ``i`` of generation ``g`` evaluates the meta-loss at θ+σε_i and θ−σε_i on the
same task, data and inner initialisation, over a whole unroll. The driver gets
two losses back and rebuilds ε_i from ``(run_key, g, i)``::

    ĝ = Σ_i (f(L⁺_i) − f(L⁻_i)) ε_i / (2 m σ)

over the ``m`` usable pairs, where ``f`` is the fitness shaping (centered ranks
over all 2m losses by default, or within each task's pairs with
``estimator.shape_within_task``; ``"none"`` gives the plain unbiased estimator of
∇ E[L(θ+σε)]). A pair with a NaN/Inf half is dropped whole.

Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from mnemosyne_core.meta.noise import run_key_data, perturbations
    >>> rk, sigma = run_key_data(0), 0.1
    >>> f = lambda x: jnp.sum(x ** 2)
    >>> theta = jnp.array([1.0, -2.0])
    >>> eps = perturbations(rk, 0, range(2000), 2)
    >>> lp = jax.vmap(f)(theta + sigma * eps); ln = jax.vmap(f)(theta - sigma * eps)
    >>> g = es_gradient(rk, 0, range(2000), lp, ln, sigma, "none", 2)
    >>> np.allclose(g, [2.0, -4.0], atol=0.3)
    True
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnemosyne_core.meta.base import (
    EstimatorBase,
    TellStats,
    match_results,
    shaped_differences,
    task_labels,
)
from mnemosyne_core.meta.learned import LearnedOptimizer
from mnemosyne_core.meta.noise import perturbations
from mnemosyne_core.meta.protocol import PairResult, Ticket

__all__ = ["ES", "es_gradient", "weighted_noise_sum"]

_CHUNK = 256  # pairs whose ε are materialised at once on the driver


def weighted_noise_sum(run_key: Sequence[int], generations: Sequence[int], pair_ids: Sequence[int],
                       weights: np.ndarray, dim: int) -> jax.Array:
    """Σ_j w_j ε(g_j, i_j), rebuilding ε in chunks so memory stays O(chunk · |θ|)."""
    total = jnp.zeros((dim,), jnp.float32)
    gens, ids = np.asarray(list(generations)), np.asarray(list(pair_ids))
    w = np.asarray(weights, np.float32)
    for g in np.unique(gens):
        sel = np.nonzero(gens == g)[0]
        for start in range(0, sel.size, _CHUNK):
            part = sel[start:start + _CHUNK]
            eps = perturbations(run_key, int(g), ids[part].tolist(), dim)
            total = total + jnp.asarray(w[part]) @ eps
    return total


def es_gradient(run_key: Sequence[int], generation: int, pair_ids: Sequence[int], loss_pos: Any,
                loss_neg: Any, sigma: float, shaping: str, dim: int,
                noise_sum: Callable[..., Any] | None = None,
                groups: Sequence[str] | None = None) -> jax.Array:
    """The antithetic ES estimate (flat, float32) from ids and losses only.

    ``groups`` (one label per pair, e.g. its task spec) shapes fitness within each
    group instead of over all pairs (:func:`~mnemosyne_core.meta.base.shaped_differences`).

    ``noise_sum`` replaces :func:`weighted_noise_sum` (same signature), e.g. with a
    distributed version that rebuilds ε on the workers (``RayEvaluator.weighted_noise_sum``).
    """
    pair_ids = list(pair_ids)
    m = len(pair_ids)
    if m == 0:
        return jnp.zeros((dim,), jnp.float32)
    w = shaped_differences(loss_pos, loss_neg, shaping, groups) / (2.0 * m * sigma)
    return (noise_sum or weighted_noise_sum)(run_key, [generation] * m, pair_ids, w, dim)


class ES(EstimatorBase):
    """Antithetic ES estimator (stateless on the driver: everything derives from the run key)."""

    # Σ w_i ε_i; the trainer sets an evaluator's distributed version on the instance when it has one.
    noise_sum: Callable[..., Any] = staticmethod(weighted_noise_sum)

    def init(self, theta: Any) -> dict[str, Any]:
        return {}

    def ask(self, state: dict[str, Any], generation: int) -> tuple[list[Ticket], dict[str, Any]]:
        tickets = []
        for i in range(self.config.estimator.num_pairs):
            spec, length = self.sampler.for_pair(self.run_key, generation, i)
            tickets.append(Ticket(generation, i, spec, length, length, 0, generation, self.run_key))
        return tickets, state

    def tell(self, state: dict[str, Any], tickets: Sequence[Ticket], results: Sequence[PairResult],
             theta: Any) -> tuple[Any, dict[str, Any], TellStats]:
        generation = tickets[0].generation if tickets else 0
        flat, unravel = LearnedOptimizer.ravel(theta)
        by_pair, stale = match_results(generation, tickets, results)
        used = sorted(i for i, r in by_pair.items() if r.status.usable)
        lp = np.array([by_pair[i].loss_pos for i in used])
        ln = np.array([by_pair[i].loss_neg for i in used])
        est = self.config.estimator
        groups = task_labels(tickets, used) if est.shape_within_task else None
        grad = es_gradient(self.run_key, generation, used, lp, ln, est.sigma, est.shaping, flat.size,
                           noise_sum=self.noise_sum, groups=groups)
        stats = TellStats.of(float(np.mean((lp + ln) / 2)) if used else float("nan"), tickets, used, by_pair, stale)
        return unravel(grad), state, stats
