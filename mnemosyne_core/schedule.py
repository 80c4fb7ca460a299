"""Training progress p = t/T and the learned log step-size schedule over it (``tensor``).

When the caller tells the horizon (``update(..., total_steps=T)``) the optimizer knows how far
training has come. :func:`progress_features` turns step t and T into ``(p·known, known)``: the
pair joins the HPE token features and the per-chunk gain head's inputs (config
``progress_schedule``), and :func:`progress_log_schedule` reads a learned curve over p that
multiplies every step (θ ``sched.knots``). Untold (T None or ≤ 0) both features are 0 and the
schedule is off, so a rule that reads them runs as if they did not exist.

Two guards for runs longer than meta-training's unrolls also read the told horizon:
:func:`ceiling_progress` (how far the step ceiling ``max_log_step`` has fallen once past
``step_ceiling_from``) and :func:`hypergradient_clock` (the factor on the hypergradient rate,
``hypergradient_horizon``). None of this is in the paper (DESIGN.md section 3, ours).

Example:
    >>> import jax.numpy as jnp
    >>> p = progress_features(jnp.asarray(50), 200)
    >>> p.tolist()                       # a quarter of the way, horizon known
    [0.25, 1.0]
    >>> knots = jnp.array([0.0, -1.0, -2.0])   # log step size at p = 0, 0.5, 1
    >>> float(progress_log_schedule(knots, p, bounds=(-7.0, 1.0)))
    -0.5
    >>> float(progress_log_schedule(knots, progress_features(jnp.asarray(50), None), bounds=(-7.0, 1.0)))
    0.0
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ceiling_progress", "hypergradient_clock", "progress_features", "progress_log_schedule"]


def progress_features(count: jax.Array, total_steps: jax.Array | None) -> jax.Array:
    """``(p·known, known)`` with p = min(t/T, 1): the training progress when the horizon T is told.

    ``total_steps`` None or ≤ 0 means "not told": both features are 0, so a rule that reads
    them behaves as if they did not exist. Past the horizon p stays 1 (the end of the schedule).
    """
    if total_steps is None:
        return jnp.zeros((2,), jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    known = total > 0
    p = jnp.clip(count.astype(jnp.float32) / jnp.where(known, total, 1.0), 0.0, 1.0)
    return jnp.stack([jnp.where(known, p, 0.0), known.astype(jnp.float32)])


def progress_log_schedule(knots: jax.Array, progress: jax.Array, *, bounds: tuple[float, float]) -> jax.Array:
    """The learned log step-size multiplier at progress ``progress = (p·known, known)``.

    Piecewise linear in p through ``knots`` (equally spaced on [0, 1]), clipped to ``bounds``;
    0 when the horizon is not known. A tuned cosine schedule is one such curve; meta-training
    chooses the knots (their values are in natural-log units of the step size).
    """
    grid = jnp.linspace(0.0, 1.0, knots.shape[0])
    value = jnp.clip(jnp.interp(progress[0], grid, knots), bounds[0], bounds[1])
    return progress[1] * value


def ceiling_progress(count: jax.Array, total_steps: jax.Array | None, start: int) -> jax.Array:
    """How far the step ceiling has fallen, in [0, 1]: (t − S)/(T − S) clipped, for S = ``start``.

    0 when the horizon T is not told (None or ≤ 0). A told T ≤ S means the run is already past the
    horizon once it reaches S: the ceiling is at its floor one step after S.

    >>> float(ceiling_progress(jnp.asarray(300), 500, 100)), float(ceiling_progress(jnp.asarray(300), None, 100))
    (0.5, 0.0)
    """
    if total_steps is None:
        return jnp.zeros((), jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    span = jnp.maximum(total - start, 1.0)
    q = jnp.clip((count.astype(jnp.float32) - start) / span, 0.0, 1.0)
    return jnp.where(total > 0, q, 0.0)


def hypergradient_clock(total_steps: jax.Array | None, horizon: int) -> jax.Array:
    """The factor √min(1, H/T) on the hypergradient rate for a told horizon T and H = ``horizon``.

    The rule was meta-trained on runs of at most H steps. Under gradient noise its log step size
    is a random walk (with the greedy hypergradient's downward bias) whose spread grows as
    rate·√steps: over a told T > H steps, the rate times √(H/T) keeps that spread what
    meta-training saw, while a persistent signal (a loss spike, steadily agreeing gradients)
    still moves it √(T/H) times further over the longer run. (Scaling by H/T instead, the
    progress clock, slowed the back-off the digits MLPs need in the learned warm-up and blew
    them up at 5×: docs/benchmarks.md, "The hypergradient clock".) 1 when not told (None or
    ≤ 0) or T ≤ H.

    >>> float(hypergradient_clock(1600, 400)), float(hypergradient_clock(300, 400))
    (0.5, 1.0)
    """
    if total_steps is None:
        return jnp.ones((), jnp.float32)
    total = jnp.asarray(total_steps, jnp.float32)
    return jnp.where(total > horizon, jnp.sqrt(horizon / jnp.maximum(total, 1.0)), 1.0)
