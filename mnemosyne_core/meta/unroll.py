"""Inner training under a learned optimizer, in fixed-length compiled chunks.

An inner problem is an :class:`InnerState`: the (reparameterised) parameters,
the learned optimizer's state, the absolute step, the initial loss and the
per-tensor augmentation scales. :func:`run_chunk` advances it by K steps in one
``lax.scan`` and returns the sum of the per-step meta-loss terms
``min(log(loss_t / loss_0), max_log_ratio)`` over the steps that fall before the
member's ``horizon`` (later steps are masked, so members with different unroll
lengths share one compiled function and one K per task shape compiles once).

Task augmentation: the task sees ``s ⊙ p̃`` while the optimizer trains ``p̃``,
with one log-uniform factor ``s`` per tensor drawn from the episode key, so the
rule cannot rely on one parameter scale; and the optimizer trains ``c·loss``
(so it sees ``c·loss`` and ``c·∇``) with one log-uniform factor ``c`` per episode,
so it cannot rely on one loss or gradient scale. The meta-loss is a ratio to the
(equally scaled) initial loss, so ``c`` does not change what is scored. Data for
step ``t`` comes from ``fold_in(data_key, t)``: both halves of a pair see
identical batches.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks import make_task
    >>> from mnemosyne_core.meta.learned import LearnedOptimizer
    >>> task = make_task({"name": "quadratic", "kwargs": {"dim": 4}})
    >>> lo = LearnedOptimizer.from_section("mnemosyne", {"learning_rate": 0.05})
    >>> theta = lo.init_theta(jax.random.key(0))
    >>> st = init_inner(task, lo, theta, jax.random.key(1), (1.0, 1.0))
    >>> st, out = run_chunk(task, lo, theta, st, 20, 20, 2.0)
    >>> int(st.step), bool(out.ok), float(out.log_ratio_sum) < 0
    (20, True, True)
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mnemosyne_core.meta.learned import LearnedOptimizer

__all__ = ["ChunkOut", "InnerState", "init_inner", "run_chunk", "scaled_params"]

_TINY = 1e-30


class InnerState(NamedTuple):
    params: Any  # p̃: what the optimizer trains
    opt_state: Any
    scales: Any  # per-tensor factor s: the task sees s * p̃
    step: jax.Array  # int32 absolute inner step
    loss0: jax.Array  # float32 loss at step 0 (the meta-loss normaliser)
    data_key: jax.Array  # uint32 key data; batch t = sample_batch(fold_in(data_key, t))
    # the episode's loss (and so gradient) factor c; a default so that states pickled before it load
    loss_scale: jax.Array | float = 1.0


class ChunkOut(NamedTuple):
    log_ratio_sum: jax.Array  # Σ over scored active steps of min(log(loss/loss0), cap)
    active_steps: jax.Array  # int32
    last_loss: jax.Array
    ok: jax.Array  # bool: every active loss and the parameters stayed finite
    scored_steps: jax.Array  # int32: active steps at or after ``score_from`` (all of them by default)


def scaled_params(state: InnerState) -> Any:
    return jax.tree.map(lambda p, s: p * s, state.params, state.scales)


def _log_uniform(key: jax.Array, shape: tuple[int, ...], bounds: tuple[float, float]) -> jax.Array:
    """Factors drawn log-uniformly in ``[lo, hi]`` (task augmentation: a 10x wider range counts once)."""
    lo, hi = (jnp.log(jnp.float32(x)) for x in bounds)
    return jnp.exp(lo + (hi - lo) * jax.random.uniform(key, shape, jnp.float32))


def init_inner(task: Any, lo: LearnedOptimizer, theta: Any, key: jax.Array,
               param_scale: tuple[float, float], loss_scale: tuple[float, float] = (1.0, 1.0)) -> InnerState:
    """A fresh inner problem from one key (initialisation, augmentation, data)."""
    k_init, k_scale, k_data = jax.random.split(key, 3)
    # Its own key folded from the episode key, so the draws above are those of runs before it
    # existed; with (1, 1) the factor is exactly 1 and every loss and gradient is unchanged.
    c = _log_uniform(jax.random.fold_in(key, 3), (), loss_scale)
    p0 = task.init(k_init)
    leaves, treedef = jax.tree.flatten(p0)
    s = _log_uniform(k_scale, (len(leaves),), param_scale)
    scales = treedef.unflatten([s[i].astype(leaf.dtype) for i, leaf in enumerate(leaves)])
    params = jax.tree.map(lambda p, si: p / si, p0, scales)
    loss0 = c * task.loss(p0, task.sample_batch(jax.random.fold_in(k_data, 0)))
    opt_state = lo.transform(theta).init(params)
    return InnerState(params, opt_state, scales, jnp.zeros((), jnp.int32),
                      jnp.asarray(loss0, jnp.float32), jax.random.key_data(k_data), c)


def run_chunk(task: Any, lo: LearnedOptimizer, theta: Any, state: InnerState, num_steps: int,
              horizon: jax.Array | int, max_log_ratio: float, *, total_steps: jax.Array | int | None = None,
              score_from: jax.Array | int = 0) -> tuple[InnerState, ChunkOut]:
    """Advance ``num_steps`` (static) steps under θ; steps at or past ``horizon`` change nothing.

    ``total_steps`` (the whole unroll's length, or ≤ 0 for "not told") is passed to the
    optimizer's ``update`` as the planned horizon. Only steps ``t ≥ score_from`` add to
    ``log_ratio_sum`` (the ``final`` meta-loss scores the end of the unroll).
    """
    tx = lo.transform(theta)
    opt_state = lo.swap_theta(state.opt_state, theta)
    horizon = jnp.asarray(horizon, jnp.int32)
    score_from = jnp.asarray(score_from, jnp.int32)
    told = {} if total_steps is None else {"total_steps": jnp.asarray(total_steps, jnp.int32)}
    data_key = jax.random.wrap_key_data(state.data_key)

    def inner_loss(p: Any, scales: Any, batch: Any) -> jax.Array:
        return state.loss_scale * task.loss(jax.tree.map(lambda a, s: a * s, p, scales), batch)

    def step(carry, _):
        params, opt_state, t, acc, n, scored, last, ok = carry
        batch = task.sample_batch(jax.random.fold_in(data_key, t))
        loss, grads = jax.value_and_grad(inner_loss)(params, state.scales, batch)
        updates, new_opt = tx.update(grads, opt_state, params, loss=loss, **told)
        new_params = optax.apply_updates(params, updates)
        active = t < horizon
        counted = active & (t >= score_from)
        finite = jnp.isfinite(loss)
        term = jnp.minimum(jnp.log(jnp.maximum(loss, _TINY) / jnp.maximum(state.loss0, _TINY)), max_log_ratio)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(active, a, b), new, old)
        carry = (
            keep(new_params, params),
            keep(new_opt, opt_state),
            t + active.astype(jnp.int32),
            acc + jnp.where(counted & finite, term, 0.0),
            n + active.astype(jnp.int32),
            scored + counted.astype(jnp.int32),
            jnp.where(active, loss, last),
            ok & (finite | ~active),
        )
        return carry, None

    init = (state.params, opt_state, state.step, jnp.float32(0.0), jnp.int32(0), jnp.int32(0),
            jnp.float32(jnp.nan), jnp.array(True))
    (params, opt_state, t, acc, n, scored, last, ok), _ = jax.lax.scan(step, init, None, length=num_steps)
    for leaf in jax.tree.leaves(params):
        ok = ok & jnp.all(jnp.isfinite(leaf))
    new_state = state._replace(params=params, opt_state=opt_state, step=t)
    return new_state, ChunkOut(acc, n, last, ok, scored)
