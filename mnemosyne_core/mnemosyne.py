"""The Mnemosyne learned optimizer as an optax transformation.

``mnemosyne(theta, config)`` returns an ``optax.GradientTransformationExtraArgs``.
θ (the meta-learned weights) is *data*: it lives in the optimizer state, so a
state built from another θ of the same config runs through the same compiled
train step (no recompilation) and uses that θ — like ``optax.inject_hyperparams``.

The random FAVOR+ directions ω are not part of θ: they are derived from
``config.feature_seed``, fixed for the optimizer's lifetime and never perturbed
by evolution strategies.

Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> config = MnemosyneConfig()
    >>> theta = init_theta(jax.random.key(0), config)
    >>> tx = mnemosyne(theta, config)
    >>> params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> round(float(updates["b"][0]), 6)   # a fresh θ takes Adam's first step: -lr·sign(g)
    -0.001
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnemosyne_core.cam import CAMState, cam_init_feature_major
from mnemosyne_core.config import MnemosyneConfig
from mnemosyne_core.coordinate import coordinate_cam, init_coordinate_theta, preprocess
from mnemosyne_core.favor import orthogonal_directions
from mnemosyne_core.head import tensor_head
from mnemosyne_core.hpe import ChunkLayout, chunk_layout
from mnemosyne_core.schedule import (
    ceiling_progress,
    hypergradient_clock,
    progress_features,
    progress_log_schedule,
)
from mnemosyne_core.step_size import (
    hypergradient_cosine,
    hypergradient_log_lr,
    hypergradient_sums,
    memory_log_lr,
)
from mnemosyne_core.tensor_context import (
    TensorMemory,
    init_tensor_memory,
    init_tensor_theta,
    pool_leaf,
    tensor_context,
)

__all__ = [
    "MnemosyneConfig",
    "MnemosyneState",
    "feature_directions",
    "init_theta",
    "mnemosyne",
    "scale_by_mnemosyne",
    "scheduled",
    "validate_theta",
]

class MnemosyneState(NamedTuple):
    """Optimizer state (a NamedTuple; its structure never changes between steps).

    ``tensor``: only ``moments`` (m1, m2, v: 3 floats per parameter; m1, v
    without the direction correction) scales with the parameters; ``memory`` is
    a :class:`~mnemosyne_core.tensor_context.TensorMemory` whose size depends on the
    number of tensors, not their sizes.
    ``coordinate``: ``moments`` (m1, v) plus one CAM memory per coordinate,
    ``r·(e+2)`` floats each.
    """

    count: jax.Array  # int32: applied (finite) steps, drives bias correction
    skipped: jax.Array  # int32: steps skipped because of non-finite gradients
    theta: Any  # the meta-learned weights in use
    moments: dict[str, Any]  # name -> pytree like params (float32)
    memory: TensorMemory | tuple[CAMState, ...]  # tensor: stacked per-tensor memory; coordinate: per leaf
    loss0: jax.Array  # float32: first loss seen (NaN until then); for use_loss_feature


# ---------------------------------------------------------------- θ and ω


def _num_coord_features(config: MnemosyneConfig) -> int:
    return 4 if config.use_param_feature else 3  # adam dir, slow-momentum dir, g/√v, (param)


def _num_token_features(config: MnemosyneConfig) -> int:
    # see tensor_context._token_features (+ the last hypergradient cosine, + progress)
    return 4 + (1 if config.memory_step_size else 0) + (2 if config.progress_schedule else 0)


def _num_global_features(config: MnemosyneConfig) -> int:
    # log(loss / first loss) and the progress pair (p·known, known) feed the gain head
    return (1 if config.use_loss_feature else 0) + (2 if config.progress_schedule else 0)


def init_theta(key: jax.Array, config: MnemosyneConfig) -> dict:
    """Fresh θ (pytree of float32 arrays); the learned corrections start at zero (= Adam)."""
    if not isinstance(config, MnemosyneConfig):
        raise TypeError(f"config must be a MnemosyneConfig, got {type(config).__name__}")
    if config.variant == "tensor":
        return init_tensor_theta(
            key,
            num_pool=_num_token_features(config),
            num_coord=_num_coord_features(config),
            width=config.width,
            value_width=config.value_width,
            hpe_hidden=config.hpe_hidden,
            head_hidden=config.head_hidden,
            extra_ctx=_num_global_features(config),
            init_discount=config.init_discount,
            hypergradient=config.hypergradient,
            direction_correction=config.direction_correction,
            schedule_knots=config.schedule_knots if config.progress_schedule else 0,
            memory_step_size=config.memory_step_size,
        )
    return init_coordinate_theta(
        key,
        num_inputs=4 + (1 if config.use_loss_feature else 0),
        width=config.coord_width,
        value_width=config.coord_value_width,
        head_hidden=config.coord_head_hidden,
        init_discount=config.init_discount,
    )


@functools.lru_cache(maxsize=64)
def _expected_theta_shapes(config: MnemosyneConfig) -> Any:
    return jax.eval_shape(lambda: init_theta(jax.random.key(0), config))


def validate_theta(theta: Any, config: MnemosyneConfig) -> None:
    """Raise ``ValueError`` naming the first leaf whose structure, shape or dtype is wrong."""
    expected = _expected_theta_shapes(config)
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    try:
        got_leaves, got_def = jax.tree_util.tree_flatten_with_path(theta)
    except Exception as exc:  # pragma: no cover - exotic non-pytrees
        raise ValueError(f"theta is not a pytree: {exc}") from exc
    if got_def != exp_def:
        exp_paths = {jax.tree_util.keystr(p) for p, _ in exp_leaves}
        got_paths = {jax.tree_util.keystr(p) for p, _ in got_leaves}
        raise ValueError(
            f"theta does not match the {config.variant!r} config's structure: "
            f"missing {sorted(exp_paths - got_paths)}, unexpected {sorted(got_paths - exp_paths)}"
            + ("" if exp_paths != got_paths else f" (expected tree {exp_def}, got {got_def})")
        )
    for (path, e), (_, g) in zip(exp_leaves, got_leaves):
        dtype = g.dtype if hasattr(g, "dtype") else np.asarray(g).dtype
        shape = np.shape(g)
        if tuple(shape) != tuple(e.shape) or dtype != e.dtype:
            raise ValueError(
                f"theta leaf {jax.tree_util.keystr(path)}: expected shape {tuple(e.shape)} "
                f"dtype {e.dtype}, got shape {tuple(shape)} dtype {dtype}"
            )


@functools.lru_cache(maxsize=64)
def _directions_np(config: MnemosyneConfig) -> tuple[np.ndarray, np.ndarray]:
    with jax.ensure_compile_time_eval():
        k_hpe, k_cam = jax.random.split(jax.random.key(config.feature_seed))
        if config.variant == "tensor":
            r, dim = config.num_features, config.width
        else:
            r, dim = config.coord_num_features, config.coord_width
        return (np.asarray(orthogonal_directions(k_hpe, r // 2, dim)),
                np.asarray(orthogonal_directions(k_cam, r // 2, dim)))


def feature_directions(config: MnemosyneConfig) -> dict[str, jax.Array]:
    """The fixed FAVOR+ directions ω (``"hpe"`` and ``"cam"``), a function of ``feature_seed`` only."""
    hpe, cam = _directions_np(config)
    return {"hpe": jnp.asarray(hpe), "cam": jnp.asarray(cam)}


# ---------------------------------------------------------------- transform


def _moment_names(config: MnemosyneConfig) -> tuple[str, ...]:
    # The slow momentum m2 only feeds the per-coordinate direction correction; without it
    # (the shipped ``default``) keeping it would cost a float per parameter and a read and a
    # write of it every step for nothing: the state is then Adam's (m1, v).
    if config.variant == "tensor" and config.direction_correction:
        return ("m1", "m2", "v")
    return ("m1", "v")


def _empty_tokens(config: MnemosyneConfig) -> tuple[jax.Array, jax.Array]:
    # A zero-size parameter: all-padding tokens (masked out, zero sums).
    shape = (config.num_meta_tokens, config.tokens_per_chunk)
    return jnp.zeros((*shape, 2), jnp.float32), jnp.zeros(shape, bool)


def _layout(config: MnemosyneConfig, leaf: jax.Array) -> ChunkLayout:
    return chunk_layout(max(1, int(np.prod(jnp.shape(leaf), dtype=np.int64))), config.num_meta_tokens,
                        config.tokens_per_chunk)


def _build(theta: Any, config: MnemosyneConfig, scale: float,
           learned_schedule: bool = True) -> optax.GradientTransformationExtraArgs:
    if not isinstance(config, MnemosyneConfig):
        raise TypeError(f"config must be a MnemosyneConfig, got {type(config).__name__}")
    validate_theta(theta, config)
    theta = jax.tree.map(jnp.asarray, theta)
    omega_np = _directions_np(config)
    needs_params = config.variant == "tensor" and config.use_param_feature and config.direction_correction

    def init_fn(params: Any) -> MnemosyneState:
        leaves = jax.tree.leaves(params)
        moments = {name: jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
                   for name in _moment_names(config)}
        if config.variant == "tensor":
            log_lr0 = 0.0
            if config.hypergradient or config.memory_step_size:
                offset = theta["hd" if config.hypergradient else "ctrl"]["log_lr0"]
                log_lr0 = jnp.clip(config.init_log_lr + offset, config.min_log_lr, config.max_log_lr)
            memory = init_tensor_memory(len(leaves), config.num_meta_tokens, config.tokens_per_chunk,
                                        config.num_features, config.value_width, log_lr0)
        else:
            memory = tuple(cam_init_feature_major(tuple(jnp.shape(leaf)), config.coord_num_features,
                                                  config.coord_value_width) for leaf in leaves)
        return MnemosyneState(
            count=jnp.zeros((), jnp.int32),
            skipped=jnp.zeros((), jnp.int32),
            theta=theta,
            moments=moments,
            memory=memory,
            loss0=jnp.full((), jnp.nan, jnp.float32),
        )

    def update_fn(grads: Any, state: MnemosyneState, params: Any = None, *, loss: Any = None,
                  total_steps: Any = None, **extra: Any):
        del extra  # unknown keyword arguments are ignored (optax contract)
        if needs_params and params is None:
            raise ValueError(
                "mnemosyne(variant='tensor', use_param_feature=True).update needs params: "
                "call tx.update(grads, state, params)"
            )
        if config.use_loss_feature and loss is None:
            raise ValueError("this Mnemosyne config has use_loss_feature=True: pass update(..., loss=loss_value)")
        validate_theta(state.theta, config)
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(g_leaves)
        built_for = (state.memory.token_moments.shape[0] if config.variant == "tensor" else len(state.memory))
        if built_for != len(g_leaves):
            raise ValueError(f"state was built for {built_for} parameter leaves, grads have {len(g_leaves)}")
        moments = {k: treedef.flatten_up_to(v) for k, v in state.moments.items()}

        # A single non-finite gradient entry skips the whole step (updates 0,
        # state kept). For `tensor` the check is free: the HPE pooling sums over
        # every coordinate of m and v are non-finite iff some gradient is.
        # Selects are scalar-predicated, so they fuse into the elementwise loops.
        ok = jnp.array(True)
        if config.variant != "tensor":
            for g in g_leaves:
                ok = ok & jnp.all(jnp.isfinite(g))
        global_ctx = None
        loss0 = state.loss0
        if config.use_loss_feature:
            loss = jnp.asarray(loss, jnp.float32)
            loss_ok = jnp.isfinite(loss)
            ok = ok & loss_ok
            first = jnp.where(jnp.isnan(loss0) & loss_ok, loss, loss0)
            ratio = jnp.maximum(loss, 1e-30) / jnp.maximum(first, 1e-30)
            global_ctx = jnp.log(jnp.where(loss_ok, ratio, 1.0))[None]
        progress = None
        if config.progress_schedule:
            # Under a user's schedule (``scheduled``) the learned schedule and the progress
            # inputs are off: the user's schedule is told the horizon, not the rule.
            told_total = total_steps if learned_schedule else None
            progress = progress_features(state.count, told_total)
        # What HPE → CAM and the gain head read of the progress: nothing when they may see only
        # the gradients' dynamics (the learned schedule below still follows `progress`).
        seen_progress = progress
        if progress is not None and config.memory_inputs == "dynamics":
            seen_progress = jnp.zeros_like(progress)
        if seen_progress is not None:
            global_ctx = seen_progress if global_ctx is None else jnp.concatenate([global_ctx, seen_progress])

        # Bias corrections as scalar reciprocals: per-coordinate multiplies, not divides.
        t = (state.count + 1).astype(jnp.float32)
        c1, c2, cv = (1 / (1 - beta ** t) for beta in (config.beta1, config.beta2, config.beta_v))
        theta_s = state.theta
        omega_hpe, omega_cam = (jnp.asarray(o) for o in omega_np)

        def keep(new: Any, old: Any) -> Any:
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        b1, b2, bv = config.beta1, config.beta2, config.beta_v
        corr = (c1, c2, cv)
        g32s = [g.astype(jnp.float32) for g in g_leaves]
        directions = []
        if config.variant == "tensor":
            # Phase 1 (read-only reductions) → phase 2 (tiny HPE/CAM on all
            # tensors at once; gives `ok`) → phase 3 (one fused elementwise
            # loop per state array + one for the head).
            layouts = [_layout(config, g) for g in g_leaves]
            params32 = [p.astype(jnp.float32) if needs_params else None for p in p_leaves]
            pooled = [pool_leaf(g, lay) if g.size else _empty_tokens(config) for g, lay in zip(g32s, layouts)]
            means = jnp.stack([m for m, _ in pooled]) if pooled else None
            if pooled:
                ctx, gain, memory, finite, ctrl_out = tensor_context(
                    theta_s, means, jnp.stack([k for _, k in pooled]), state.memory, omega_hpe, omega_cam,
                    betas=(b1, b2, bv), bias_corrections=corr, eps=config.eps,
                    magnitude_scale=config.magnitude_scale, global_ctx=global_ctx,
                    scale_free=config.hypergradient or config.memory_step_size,
                    max_log_gain=config.max_log_gain, token_extra=seen_progress,
                    memory_step=config.memory_step_size, see_step=config.memory_inputs == "all",
                )
                if progress is not None:
                    gain = gain * jnp.exp(progress_log_schedule(
                        theta_s["sched"]["knots"], progress,
                        bounds=(config.schedule_min_log, config.schedule_max_log)))
                if config.max_log_step > 0:
                    # One ceiling on the product of the step-size factors: each is bounded on
                    # its own, but a learned warm-up on top of a hypergradient step size at its
                    # ceiling made 2000-step runs collapse to chance (docs/benchmarks.md, 5×).
                    # From step_ceiling_from S on (a guard for runs longer than meta-training's
                    # unrolls: a run of ≤ S steps is untouched), falling over (t − S)/(T − S). It is
                    # the tail of the learned schedule, so it acts only where that does (told T): in
                    # direction mode the user's schedule owns the step size.
                    start = config.step_ceiling_from
                    ceiling = jnp.float32(config.max_log_step)
                    if progress is not None and config.step_ceiling_decay > 0:
                        fall = (progress[0] * progress[1] if start == 0 else
                                ceiling_progress(state.count, told_total, start))
                        ceiling = ceiling - config.step_ceiling_decay * fall
                    capped = jnp.minimum(gain, jnp.exp(ceiling))
                    if start > 0:  # validated: progress_schedule is on, so progress is not None
                        capped = jnp.where((state.count >= start) & (progress[1] > 0), capped, gain)
                    gain = capped
                ok = ok & finite
                new_memory = keep(memory, state.memory)
            else:
                new_memory = state.memory
            new_moments = {name: [] for name in moments}
            hd_sums = []
            for i, g in enumerate(g32s):
                m1 = keep(b1 * moments["m1"][i] + (1 - b1) * g, moments["m1"][i])
                v = keep(bv * moments["v"][i] + (1 - bv) * g * g, moments["v"][i])
                new_moments["m1"].append(m1)
                new_moments["v"].append(v)
                m2 = None
                if "m2" in moments:
                    m2 = keep(b2 * moments["m2"][i] + (1 - b2) * g, moments["m2"][i])
                    new_moments["m2"].append(m2)
                if not g.size:
                    directions.append(jnp.zeros_like(g))
                    hd_sums.append(jnp.zeros((3,), jnp.float32))
                    continue
                directions.append(tensor_head(
                    theta_s["head"], ctx[i], gain[i], g, m1, m2, v, params32[i], layouts[i],
                    bias_corrections=corr, eps=config.eps,
                ))
                if config.hypergradient or config.memory_step_size:
                    gg = jnp.sum(means[i, ..., 1] * layouts[i].token_counts())  # Σ mean·count = Σg²
                    hd_sums.append(hypergradient_sums(g, moments["m1"][i], v, gg, cv=cv, eps=config.eps))
            if (config.hypergradient or config.memory_step_size) and pooled:
                # The step size this step used was set by the previous steps' sums;
                # this step's sums set the next one (one step late, no second pass).
                log_lr, bounds = state.memory.log_lr, (config.min_log_lr, config.max_log_lr)
                sums = jnp.stack(hd_sums)
                if config.hypergradient:
                    rate = config.hypergradient_rate
                    if config.hypergradient_horizon > 0:
                        # Told a horizon longer than meta-training's unrolls, slow the random walk
                        # of log α (the greedy hypergradient's drift down under gradient noise
                        # starved 2000-step runs of loss-floor tasks: docs/benchmarks.md). Told
                        # only: untold runs and direction mode keep the trained rate.
                        rate = rate * hypergradient_clock(told_total, config.hypergradient_horizon)
                    log_lr = hypergradient_log_lr(theta_s["hd"], log_lr, sums, rate=rate, bounds=bounds,
                                                  down=config.hypergradient_down)
                if config.memory_step_size:
                    # The memory's read-out moves the step size (after the hypergradient's move when
                    # both are on); this step's cosine (g_t against the last direction) is what the
                    # memory reads next step.
                    log_lr = memory_log_lr(ctrl_out, log_lr, rate=config.memory_step_rate, bounds=bounds)
                    new_memory = new_memory._replace(
                        hg_cos=jnp.where(ok, hypergradient_cosine(sums), state.memory.hg_cos))
                new_memory = new_memory._replace(log_lr=jnp.where(ok, log_lr, state.memory.log_lr))
        else:
            new_moments = {"m1": [], "v": []}
            memories = []
            for i, g in enumerate(g32s):
                m1 = b1 * moments["m1"][i] + (1 - b1) * g
                v = bv * moments["v"][i] + (1 - bv) * g * g
                inv = 1.0 / (jnp.sqrt(v * cv) + config.eps)
                pg = preprocess(g, config.preprocess_p)
                pm = preprocess(m1 * c1, config.preprocess_p)
                inputs = [pg[0], pg[1], pm[0], pm[1]]
                if global_ctx is not None:
                    inputs.append(jnp.broadcast_to(global_ctx[0], g.shape))
                direction, mem = coordinate_cam(
                    theta_s, inputs, m1 * (c1 * inv), state.memory[i], omega_cam,
                    magnitude_scale=config.magnitude_scale,
                )
                new_moments["m1"].append(keep(m1, moments["m1"][i]))
                new_moments["v"].append(keep(v, moments["v"][i]))
                memories.append(keep(mem, state.memory[i]))
                directions.append(direction)
            new_memory = tuple(memories)

        updates = []
        for i, g in enumerate(g_leaves):
            out_dtype = p_leaves[i].dtype if p_leaves[i] is not None else g.dtype
            updates.append(jnp.where(ok, scale * directions[i], 0.0).astype(out_dtype))
        count = state.count + ok.astype(jnp.int32)
        if config.use_loss_feature:
            loss0 = jnp.where(ok, first, state.loss0)
        new_state = MnemosyneState(
            count=count,
            skipped=state.skipped + (~ok).astype(jnp.int32),
            theta=state.theta,
            moments={k: treedef.unflatten(v) for k, v in new_moments.items()},
            memory=new_memory,
            loss0=loss0,
        )
        return treedef.unflatten(updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mnemosyne(theta: Any, config: MnemosyneConfig) -> optax.GradientTransformationExtraArgs:
    """The full optimizer: ``update = -α · d · exp(β·s)`` with α = ``config.learning_rate``.

    Raises ``ValueError`` if θ does not match ``config``.
    """
    return _build(theta, config, -config.learning_rate)


def scale_by_mnemosyne(theta: Any, config: MnemosyneConfig) -> optax.GradientTransformationExtraArgs:
    """Direction only (``+d·exp(β·s)``, like ``optax.scale_by_adam``), learned schedule included.

    To run the learned rule under your own learning-rate schedule use :func:`scheduled`.
    """
    return _build(theta, config, 1.0)


def scheduled(theta: Any, config: MnemosyneConfig,
              schedule: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    """The learned rule under a user's learning rate or schedule (direction mode, as Celo2 is used).

    ``update = -schedule(t) · d · exp(β·s)``: the schedule takes the place of α; the learned
    per-tensor/per-chunk step sizes stay (they are relative to α), the learned progress schedule
    is off and ``total_steps`` is ignored (the user's schedule already knows the horizon).
    Compare it with Adam under the same schedule shape.

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> config = MnemosyneConfig()
        >>> theta = init_theta(jax.random.key(0), config)
        >>> tx = scheduled(theta, config, optax.cosine_decay_schedule(1e-3, 100))
        >>> params = {"w": jnp.ones(3)}
        >>> updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
        >>> round(float(updates["w"][0]), 6)   # a fresh θ at step 0: -schedule(0)·sign(g)
        -0.001
    """
    return optax.chain(_build(theta, config, 1.0, learned_schedule=False), optax.scale_by_learning_rate(schedule))
