"""The policy training loop: ``steps`` updates by an optax optimizer, evaluated
every ``eval_every`` updates.

Updates run in jitted ``lax.scan`` chunks (one dispatch per evaluation point);
the loss value is passed to the optimizer as ``loss=`` (learned optimizers may
use it, plain optax ignores it). Everything follows from ``seed``.

Example:
    >>> import optax
    >>> from mnemosyne_core.tasks import make_task
    >>> task = make_task({"name": "gymnax_cartpole", "kwargs": {"num_envs": 4, "horizon": 16}})
    >>> result = train_policy(task, optax.adam(1e-3), steps=4, seed=0, eval_every=2)
    >>> [p.update for p in result.history], [p.env_steps for p in result.history]
    ([0, 2, 4], [0, 128, 256])
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class EvalPoint:
    update: int
    env_steps: int
    episode_return: float
    train_loss: float  # mean reported loss over the chunk (NaN at update 0)


@dataclasses.dataclass
class TrainResult:
    params: Any
    history: list[EvalPoint]
    diverged: bool = False

    @property
    def final_return(self) -> float:
        return self.history[-1].episode_return


# Module-level jits with the task and the transform as static arguments: calls with the same
# ``task`` and ``tx`` objects reuse one compiled program. A jit built inside ``train_policy`` was
# compiled (or loaded from the persistent cache) again on every call and its executable kept, about
# 20 MiB per call on the robotics tasks: a benchmark of a few hundred runs in one process ran out of
# memory for LLVM's code buffers.
@functools.partial(jax.jit, static_argnums=0)
def _evaluate(task: Any, params: Any) -> dict:
    return task.evaluate(params)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk(task: Any, tx: optax.GradientTransformationExtraArgs, params: Any, opt_state: Any, keys: jax.Array):
    """``len(keys)`` policy updates; the mean loss and whether the parameters are still finite."""

    def one_update(carry, key):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(key))
        updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(one_update, (params, opt_state), keys)
    finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
    return params, opt_state, jnp.mean(losses), finite


@functools.lru_cache(maxsize=64)
def _with_extra_args(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    # Wrapping a plain transform builds new closures, i.e. a new static argument for ``_chunk``;
    # one wrapper per transform keeps its compiled step reusable across calls.
    return optax.with_extra_args_support(tx)


def train_policy(
    task: Any,
    tx: optax.GradientTransformation,
    *,
    steps: int,
    seed: int,
    eval_every: int = 25,
    on_eval: Callable[[EvalPoint], None] | None = None,
) -> TrainResult:
    """Train ``task``'s policy for ``steps`` updates; evaluate at 0 and every ``eval_every``.

    Stops early (``diverged=True``) when the loss or the parameters stop being finite. Calls with
    the same ``task`` and ``tx`` objects (e.g. one per seed) reuse one compiled program.
    """
    if steps < 0 or eval_every < 1:
        raise ValueError(f"need steps ≥ 0 and eval_every ≥ 1, got {steps}, {eval_every}")
    tx = _with_extra_args(tx)
    k_init, k_train = jax.random.split(jax.random.key(seed))
    params = task.init(k_init)
    opt_state = tx.init(params)
    per_batch = int(task.env_steps_per_batch)

    def record(update: int, loss: float) -> EvalPoint:
        point = EvalPoint(update, update * per_batch, float(_evaluate(task, params)["return"]), loss)
        history.append(point)
        if on_eval is not None:
            on_eval(point)
        return point

    history: list[EvalPoint] = []
    record(0, math.nan)
    done, diverged = 0, False
    while done < steps:
        n = min(eval_every, steps - done)
        keys = jax.random.split(jax.random.fold_in(k_train, done), n)
        new_params, new_state, loss, finite = _chunk(task, tx, params, opt_state, keys)
        done += n
        if not (bool(finite) and math.isfinite(float(loss))):
            diverged = True  # keep the last finite policy; report the failure
            history.append(EvalPoint(done, done * per_batch, math.nan, float(loss)))
            if on_eval is not None:
                on_eval(history[-1])
            break
        params, opt_state = new_params, new_state
        record(done, float(loss))
    return TrainResult(params, history, diverged)
