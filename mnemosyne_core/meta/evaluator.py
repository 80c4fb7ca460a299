"""Running tickets: :func:`evaluate_tickets` (what every worker calls) and the in-process evaluator.

For each task spec among the tickets, the pairs are stacked into one population
(member ``2j`` = θ+σε_j, ``2j+1`` = θ−σε_j; one member per ticket for truncated
backprop) and advanced together by a ``jit(vmap(run_chunk))`` compiled once per
(task spec, K). ε is regenerated from the ticket ids (:mod:`.noise`).

Persistent inner state (PES, backprop) lives in an :class:`InnerStateStore`
keyed by ``pair_id`` and tagged ``(episode, next_step)``; see
:mod:`.protocol` for the reset rule that keeps estimates unbiased when state is
lost. A Ray actor keeps one store and calls ``evaluate_tickets(θ, tickets,
config, store=self.store, worker_id=...)``; the result is identical to the
in-process one for the same tickets and store contents.

Example:
    >>> import jax
    >>> from mnemosyne_core.meta.config import MetaConfig
    >>> from mnemosyne_core.meta.protocol import Ticket
    >>> from mnemosyne_core.tasks import TaskSpec
    >>> from mnemosyne_core.meta.noise import run_key_data
    >>> cfg = MetaConfig.from_dict({"estimator": {"num_pairs": 2, "truncation": 10},
    ...                             "optimizer": {"config": {"learning_rate": 0.05}}})
    >>> theta = learned_optimizer(cfg).init_theta(jax.random.key(0))
    >>> t = Ticket(0, 0, TaskSpec("quadratic", {"dim": 4}), 20, 20, run_key=run_key_data(0))
    >>> [r] = evaluate_tickets(theta, [t], cfg)
    >>> r.status.name, r.inner_steps, r.loss_pos < 0
    ('OK', 40, True)
"""
from __future__ import annotations

import functools
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnemosyne_core.meta.config import MetaConfig
from mnemosyne_core.meta.learned import LearnedOptimizer
from mnemosyne_core.meta.noise import TAG_INNER, perturbations, sub_key
from mnemosyne_core.meta.protocol import PairResult, Status, Ticket
from mnemosyne_core.meta.unroll import InnerState, init_inner, run_chunk, scaled_params
from mnemosyne_core.tasks import make_task

__all__ = ["InnerStateStore", "LocalEvaluator", "evaluate_tickets", "inner_key", "learned_optimizer", "population"]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=16)
def learned_optimizer(config: MetaConfig) -> LearnedOptimizer:
    return LearnedOptimizer.from_section(config.optimizer.kind, config.optimizer.config_dict)


@functools.lru_cache(maxsize=64)
def _task(spec_json: str) -> Any:
    import json

    return make_task(json.loads(spec_json))


def inner_key(run_key: Sequence[int], episode: int, pair_id: int) -> jax.Array:
    """Key of a pair's inner problem in an episode (init, augmentation, data)."""
    return sub_key(run_key, episode, pair_id, TAG_INNER)


class InnerStateStore:
    """Persistent inner problems: ``pair_id -> (episode, next_step, stacked state)``."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[int, int, Any]] = {}

    def get(self, ticket: Ticket) -> Any | None:
        item = self._items.get(ticket.pair_id)
        if item is None or item[:2] != (ticket.episode, ticket.start_step):
            return None
        return item[2]

    def put(self, pair_id: int, episode: int, next_step: int, state: Any) -> None:
        self._items[pair_id] = (episode, next_step, state)

    def drop(self, pair_id: int) -> None:
        self._items.pop(pair_id, None)

    def __len__(self) -> int:
        return len(self._items)

    def state_dict(self) -> dict[int, tuple[int, int, Any]]:
        """Host copies (numpy), for checkpoints that must resume bit-for-bit."""
        return {k: (e, s, jax.device_get(st)) for k, (e, s, st) in self._items.items()}

    def load_state_dict(self, items: dict[int, tuple[int, int, Any]]) -> None:
        self._items = {int(k): (int(e), int(s), _with_loss_scale(jax.tree.map(jnp.asarray, st)))
                       for k, (e, s, st) in items.items()}


def _with_loss_scale(st: Any) -> Any:
    """A state pickled before ``loss_scale`` existed has the field's scalar default: give it the
    batch shape of the other per-member scalars, so that it maps like them."""
    if isinstance(st, InnerState) and jnp.shape(st.loss_scale) != jnp.shape(st.loss0):
        return st._replace(loss_scale=jnp.broadcast_to(jnp.asarray(st.loss_scale, jnp.float32), jnp.shape(st.loss0)))
    return st


def is_told(ticket: Ticket, untold_fraction: float) -> bool:
    """Whether this ticket's unroll is told its horizon (``estimator.untold_fraction``).

    A fixed function of (episode, pair): every truncation of one unroll, and both members of an
    antithetic pair, agree; over pairs the untold share is ``untold_fraction``.
    """
    if untold_fraction <= 0.0:
        return True
    u = ((ticket.episode * 1_000_003 + ticket.pair_id) * 0.6180339887498949) % 1.0  # golden-ratio spread
    return u >= untold_fraction


@functools.lru_cache(maxsize=64)
def _compiled(spec_json: str, config: MetaConfig, unravel_key: Any, backprop: bool):
    task = _task(spec_json)
    lo = learned_optimizer(config)
    est = config.estimator
    unravel = _UNRAVEL[unravel_key]

    def one(theta_flat, state, horizon, total, score_from):
        new_state, out = run_chunk(task, lo, unravel(theta_flat), state, est.truncation, horizon,
                                   est.max_log_ratio, total_steps=total if est.tell_horizon else None,
                                   score_from=score_from)
        return out.log_ratio_sum / jnp.maximum(out.scored_steps, 1), (new_state, out)

    if backprop:
        step = jax.jit(jax.vmap(jax.value_and_grad(one, has_aux=True)))
    else:
        step = jax.jit(jax.vmap(one))
    init = jax.jit(jax.vmap(lambda k, th: init_inner(task, lo, unravel(th), k, config.tasks.param_scale,
                                                                config.tasks.loss_scale),
                            in_axes=(0, None)))
    heldout = jax.jit(jax.vmap(lambda st: task.evaluate(scaled_params(st))["test_loss"]))
    return step, init, heldout


_UNRAVEL: dict[Any, Any] = {}


def _unravel_key(theta: Any, unravel: Any) -> Any:
    leaves, treedef = jax.tree.flatten(theta)
    key = (str(treedef), tuple((tuple(np.shape(x)), str(np.asarray(x).dtype)) for x in leaves))
    _UNRAVEL.setdefault(key, unravel)
    return key


def population(flat: jax.Array, tickets: Sequence[Ticket], sigma: float, *, antithetic: bool = True,
               scale: jax.Array | None = None) -> jax.Array:
    """θ of every member, ``(len(tickets) * m, |θ|)``: rows ``2j, 2j+1`` = θ + σε_j, θ − σε_j.

    ε_j is regenerated from ``(run_key, generation, pair_id)`` of ticket j; the two
    halves get exactly opposite perturbations. Without ``antithetic``: one row θ per ticket.
    ``scale`` (per coordinate: ``outer.scale``'s factor, 0 where ``outer.trainable`` freezes)
    multiplies ε, so frozen coordinates are not perturbed and scaled ones by σ·s.
    """
    n = len(tickets)
    if not antithetic:
        return jnp.broadcast_to(flat, (n, flat.size))
    eps = jnp.stack([perturbations(t.run_key, t.generation, [t.pair_id], flat.size)[0] for t in tickets])
    delta = sigma * eps if scale is None else sigma * eps * scale
    return jnp.stack([flat + delta, flat - delta], axis=1).reshape(2 * n, flat.size)


def evaluate_tickets(theta: Any, tickets: Sequence[Ticket], config: MetaConfig, *,
                     store: InnerStateStore | None = None, worker_id: int = 0) -> list[PairResult]:
    """One result per ticket. Exceptions inside one task group become ``Status.ERROR`` results."""
    lo = learned_optimizer(config)
    flat, unravel = lo.ravel(theta)
    ukey = _unravel_key(theta, unravel)
    scale = lo.coordinate_scale(theta, config.outer.trainable, config.outer.scale)
    groups: dict[str, list[Ticket]] = defaultdict(list)
    for t in tickets:
        groups[t.task.to_json()].append(t)
    results: list[PairResult] = []
    b = config.estimator.batch_pairs
    for spec_json, group in groups.items():
        for start in range(0, len(group), b):
            block = group[start:start + b]
            real = len(block)
            block = block + [block[-1]] * (b - real)  # pad: every call has the same shapes
            try:
                results.extend(_run_group(flat, ukey, spec_json, block, real, config, store, worker_id, scale))
            except Exception as exc:  # noqa: BLE001 - a poisoned task must not take the generation down
                log.warning("task %s failed: %s: %s", spec_json, type(exc).__name__, exc)
                for t in block[:real]:
                    if store is not None:
                        store.drop(t.pair_id)
                    results.append(PairResult(t.generation, t.pair_id, math.nan, math.nan, 0, Status.ERROR,
                                              worker_id))
    return results


def _run_group(flat: jax.Array, ukey: Any, spec_json: str, group: list[Ticket], real: int, config: MetaConfig,
               store: InnerStateStore | None, worker_id: int, scale: jax.Array | None = None) -> list[PairResult]:
    """Run one padded block; only the first ``real`` tickets are answered (and stored)."""
    est = config.estimator
    backprop = est.kind == "backprop"
    m = 1 if backprop else 2  # members per ticket
    step, init, heldout = _compiled(spec_json, config, ukey, backprop)
    n = len(group)

    thetas = population(flat, group, est.sigma, antithetic=not backprop, scale=scale)

    # Inner states: from the store when it holds this (episode, step), else a deterministic reset.
    statuses, episodes, states, fresh = [], [], [None] * n, []
    for j, t in enumerate(group):
        held = store.get(t) if store is not None else None
        if held is not None:
            statuses.append(Status.OK)
            episodes.append(t.episode)
            states[j] = held
        else:
            statuses.append(Status.OK if t.start_step == 0 else Status.RESET)
            episodes.append(t.episode if t.start_step == 0 else t.generation)
            fresh.append(j)
    if fresh:  # initialise the whole block (fixed shapes), keep the ones needed
        keys = jnp.stack([jax.random.key_data(inner_key(t.run_key, e, t.pair_id)) for t, e in zip(group, episodes)])
        new = init(jax.random.wrap_key_data(keys), flat)
        for j in fresh:
            states[j] = jax.tree.map(lambda x, j=j: jnp.broadcast_to(x[j], (m,) + x.shape[1:]), new)
    state = jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *states)

    starts = np.array([0 if s is Status.RESET else t.start_step for t, s in zip(group, statuses)])
    lengths = np.array([t.unroll_length for t in group])
    ends = np.minimum(starts + np.array([t.num_steps for t in group]), lengths)
    horizon = jnp.asarray(np.repeat(ends, m), jnp.int32)
    told = np.array([is_told(t, est.untold_fraction) for t in group])
    unroll_total = jnp.asarray(np.repeat(np.where(told, lengths, 0), m), jnp.int32)  # T told (0: not told)
    # ``final``: only the last 10 % of each unroll is scored (what a user's final loss is).
    first_scored = lengths - np.maximum(1, lengths // 10) if est.meta_loss == "final" else np.zeros_like(lengths)
    score_from = jnp.asarray(np.repeat(first_scored, m), jnp.int32)
    scored = jnp.zeros((n * m,), jnp.int32)
    total = jnp.zeros((n * m,), jnp.float32)
    count = jnp.zeros((n * m,), jnp.int32)
    ok = jnp.ones((n * m,), bool)
    grad = None
    chunks = max(1, math.ceil(int((ends - starts).max()) / est.truncation))
    if backprop and chunks > 1:
        raise ValueError(f"truncated backprop tickets must have num_steps ≤ truncation ({est.truncation})")

    def heldout_log_ratio(st):
        return jnp.log(jnp.maximum(heldout(st), 1e-30) / jnp.maximum(st.loss0, 1e-30))

    curve_sum = jnp.zeros((n * m,), jnp.float32)  # heldout_mean: Σ over chunks this member ran in
    curve_count = jnp.zeros((n * m,), jnp.int32)
    for _ in range(chunks):
        if backprop:
            (_, (state, out)), grad = step(thetas, state, horizon, unroll_total, score_from)
        else:
            _, (state, out) = step(thetas, state, horizon, unroll_total, score_from)
        total, count, ok = total + out.log_ratio_sum, count + out.active_steps, ok & out.ok
        scored = scored + out.scored_steps
        if est.meta_loss == "heldout_mean":
            ran = out.active_steps > 0  # a member whose unroll already ended is not counted again
            curve_sum = curve_sum + jnp.where(ran, heldout_log_ratio(state), 0.0)
            curve_count = curve_count + ran.astype(jnp.int32)
    meta = total / jnp.maximum(scored, 1)
    if est.meta_loss == "heldout":
        meta = heldout_log_ratio(state)
    elif est.meta_loss == "heldout_mean":
        meta = curve_sum / jnp.maximum(curve_count, 1)
    ok = ok & jnp.isfinite(meta)
    if backprop:
        ok = ok & jnp.all(jnp.isfinite(grad), axis=-1)
        norms = jnp.linalg.norm(grad, axis=-1, keepdims=True)
        grad = grad * jnp.minimum(1.0, est.grad_clip / jnp.maximum(norms, 1e-12))
        if scale is not None:  # ∂L/∂φ = s·∂L/∂θ (φ = θ/s): every estimator hands the trainer ∂L/∂φ
            grad = grad * scale
        grad = np.asarray(grad, np.float32)

    meta_np = np.asarray(meta, np.float64).reshape(n, m)
    ok_np = np.asarray(ok).reshape(n, m).all(axis=1)
    count_np = np.asarray(count).reshape(n, m).sum(axis=1)
    out_results = []
    for j, t in enumerate(group[:real]):
        status = statuses[j] if ok_np[j] else Status.NAN
        lp, ln = meta_np[j, 0], meta_np[j, m - 1]
        if status is Status.NAN:
            lp = ln = math.nan
        if store is not None:
            if status.usable and ends[j] < t.unroll_length:
                store.put(t.pair_id, episodes[j], int(ends[j]),
                          jax.tree.map(lambda x, j=j: x.reshape((n, m) + x.shape[1:])[j], state))
            else:
                store.drop(t.pair_id)
        g = grad[j] if (backprop and status.usable) else None
        out_results.append(PairResult(t.generation, t.pair_id, float(lp), float(ln), int(count_np[j]), status,
                                      worker_id, g))
    return out_results


class LocalEvaluator:
    """In-process evaluator: one :class:`InnerStateStore`, all pairs vmapped per task shape."""

    def __init__(self, config: MetaConfig, worker_id: int = 0):
        self.config = config
        self.worker_id = worker_id
        self.store = InnerStateStore()

    def evaluate(self, theta: Any, tickets: Sequence[Ticket]) -> list[PairResult]:
        return evaluate_tickets(theta, tickets, self.config, store=self.store, worker_id=self.worker_id)

    def state_dict(self) -> dict[str, Any]:
        return {"store": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state.get("store", {}))

    def close(self) -> None:
        self.store = InnerStateStore()
