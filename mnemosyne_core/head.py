"""Per-tensor update rules of the two Mnemosyne variants (θ layout + one step).

``tensor`` (default, scalable)
    gradient statistics pooled per token → HPE (:mod:`mnemosyne_core.hpe`) → ``b``
    meta-tokens per tensor → CAM per meta-token (:mod:`mnemosyne_core.cam`) → the
    read-out and meta-token give a per-chunk context (broadcast back to the
    chunk's coordinates) and a per-chunk log step size ``s`` → a tiny shared
    per-coordinate MLP head on (Adam direction, slow-momentum direction,
    g/√v̂, parameter) gives the direction ``d``; update ∝ ``d·exp(β·s)``.
    The head is unrolled into elementwise multiply-adds over the feature
    arrays (no ``stack(...) @ W``: on XLA CPU that form is 30–57× slower, see
    ENV.md), uses ReLU, and needs no transcendental beyond Adam's √ (the
    ``exp`` is per chunk). All tensors' HPE/CAM work is batched into one set
    of small kernels.

``coordinate`` (paper-faithful)
    every scalar parameter is its own CAM stream (θ shared); its input is the
    classic preprocessed gradient and momentum; unrolled elementwise too
    (feature-major memory, :func:`~mnemosyne_core.cam.cam_step_feature_major`).

Both heads add a *zero-initialised* correction to the Adam direction
``m̂/(√v̂+ε)`` and a zero-initialised log-magnitude, so a fresh θ is exactly
Adam; meta-training only has to improve on a sound optimizer.

Example:
    >>> import jax, jax.numpy as jnp
    >>> theta = init_tensor_theta(jax.random.key(0), num_pool=4, num_coord=4, width=8,
    ...                           value_width=4, hpe_hidden=16, head_hidden=4, extra_ctx=0,
    ...                           init_discount=0.1)
    >>> sorted(theta)
    ['cam', 'head', 'hpe']
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mnemosyne_core.cam import CAMState, cam_init, cam_step, cam_step_feature_major
from mnemosyne_core.hpe import (
    ChunkLayout,
    encode,
    from_chunks,
    init_hpe,
    pool_tokens,
    to_chunks,
)

__all__ = [
    "TensorMemory",
    "coordinate_cam",
    "hypergradient_cosine",
    "hypergradient_log_lr",
    "hypergradient_sums",
    "init_coordinate_theta",
    "init_tensor_memory",
    "init_tensor_theta",
    "inverse_softplus",
    "memory_log_lr",
    "pool_leaf",
    "preprocess",
    "progress_features",
    "progress_log_schedule",
    "tensor_context",
    "tensor_head",
]


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y (> 0): how the positive discount τ is parameterised."""
    return float(y + math.log(-math.expm1(-y)))


def _dense(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def _cam_params(key: jax.Array, width_in: int, width: int, value_width: int, init_discount: float) -> dict:
    kq, kk, kv = jax.random.split(key, 3)
    return {
        "q": _dense(kq, width_in, width),  # Eq. 2: W_Q
        "k": _dense(kk, width_in, width),  # Eq. 2: W_K
        "v": _dense(kv, width_in, value_width),  # Eq. 2: W_V
        "tau_raw": jnp.asarray(inverse_softplus(init_discount), jnp.float32),
    }


def _zero_head_out(hidden: int) -> dict[str, jax.Array]:
    # The learned correction starts at exactly zero: fresh θ == Adam.
    return {
        "w_d": jnp.zeros((hidden,), jnp.float32),
        "w_s": jnp.zeros((hidden,), jnp.float32),
        "b_s": jnp.zeros((), jnp.float32),
    }


def init_tensor_theta(
    key: jax.Array,
    *,
    num_pool: int,
    num_coord: int,
    width: int,
    value_width: int,
    hpe_hidden: int,
    head_hidden: int,
    extra_ctx: int,
    init_discount: float,
    hypergradient: bool = False,
    direction_correction: bool = True,
    schedule_knots: int = 0,
    memory_step_size: bool = False,
) -> dict:
    """θ of the ``tensor`` variant: HPE, CAM projections + τ, per-coordinate head.

    With ``hypergradient``, θ also holds ``hd``: the log of the meta-learned
    factor on the hypergradient rate κ₀ and a per-step drift of the log step
    size (a learned schedule term) and an offset of its initial value, all zero
    at initialisation. Without ``direction_correction`` the head keeps only the
    per-chunk log step size (``w_s``, ``b_s``): HPE/CAM set how far each chunk
    moves and the direction is Adam's. ``schedule_knots`` > 0 adds ``sched.knots``: the
    learned log step-size schedule over the training progress (zeros: no schedule).
    ``memory_step_size`` adds ``ctrl``: the read-out of the per-tensor log step-size change from
    HPE/CAM (``w``, ``b``) and the offset of the initial log step size (``log_lr0``), all zero: a
    fresh θ keeps a constant step size.
    """
    k_hpe, k_cam, k_ctx, k_w1 = jax.random.split(key, 4)
    ctx_in = value_width + width + extra_ctx
    ctx = _dense(k_ctx, ctx_in, head_hidden)
    head = {
        "ctx_w": ctx["w"],
        "ctx_b": ctx["b"],
        "w1": jax.random.normal(k_w1, (num_coord, head_hidden), jnp.float32) / math.sqrt(num_coord),
        # Zero-initialised outputs (fresh θ == Adam): per-coordinate direction
        # correction, and a per-chunk log step size read from HPE/CAM.
        "w_d": jnp.zeros((head_hidden,), jnp.float32),
        "w_s": jnp.zeros((ctx_in,), jnp.float32),
        "b_s": jnp.zeros((), jnp.float32),
    }
    if not direction_correction:
        head = {"w_s": head["w_s"], "b_s": head["b_s"]}
    theta = {
        "hpe": init_hpe(k_hpe, num_pool, width, hpe_hidden),
        "cam": _cam_params(k_cam, width, width, value_width, init_discount),
        "head": head,
    }
    if hypergradient:
        theta["hd"] = {name: jnp.zeros((), jnp.float32) for name in ("log_kappa", "drift", "log_lr0")}
    if memory_step_size:
        theta["ctrl"] = {"w": jnp.zeros((ctx_in,), jnp.float32), "b": jnp.zeros((), jnp.float32),
                         "log_lr0": jnp.zeros((), jnp.float32)}
    if schedule_knots:
        theta["sched"] = {"knots": jnp.zeros((schedule_knots,), jnp.float32)}
    return theta


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


def ceiling_progress(count: jax.Array, total_steps: jax.Array | None, start: int) -> jax.Array:
    """How far the step ceiling has fallen, in [0, 1]: (t − S)/(T − S) clipped, for S = ``start``.

    0 when the horizon T is not told (None or ≤ 0). A told T ≤ S means the run is already past the
    horizon once it reaches S: the ceiling is at its floor one step after S.
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


def progress_log_schedule(knots: jax.Array, progress: jax.Array, *, bounds: tuple[float, float]) -> jax.Array:
    """The learned log step-size multiplier at progress ``progress = (p·known, known)``.

    Piecewise linear in p through ``knots`` (equally spaced on [0, 1]), clipped to ``bounds``;
    0 when the horizon is not known. A tuned cosine schedule is one such curve; meta-training
    chooses the knots (their values are in natural-log units of the step size).
    """
    grid = jnp.linspace(0.0, 1.0, knots.shape[0])
    value = jnp.clip(jnp.interp(progress[0], grid, knots), bounds[0], bounds[1])
    return progress[1] * value


def init_coordinate_theta(
    key: jax.Array, *, num_inputs: int, width: int, value_width: int, head_hidden: int, init_discount: float
) -> dict:
    """θ of the ``coordinate`` variant: CAM projections + τ and the head."""
    k_cam, k_h = jax.random.split(key)
    hidden = _dense(k_h, value_width + num_inputs, head_hidden)
    return {
        "cam": _cam_params(k_cam, num_inputs, width, value_width, init_discount),
        "head": {"w_h": hidden["w"], "b_h": hidden["b"], **_zero_head_out(head_hidden)},
    }


def _project(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


class TensorMemory(NamedTuple):
    """Sublinear per-tensor state of the ``tensor`` variant (all tensors stacked).

    ``cam``: one CAM stream per meta-token of every tensor, ``(L·b, r, e)``.
    ``token_moments``: ``(L, b, T, 3)`` token means of m1, m2 and v. Pooling is
    linear, so the EMA of the pooled gradient *is* the pooled momentum: keeping
    it per token spares a reduction pass over the per-coordinate moments.
    """

    cam: CAMState
    token_moments: jax.Array
    log_lr: jax.Array  # (L,) per-tensor log step size relative to α (hypergradient or memory; else 0)
    hg_cos: jax.Array  # (L,) cos(g_t, u_{t-1}) of the last step: the memory's step-size signal (else 0)


def init_tensor_memory(
    num_leaves: int, num_chunks: int, tokens_per_chunk: int, num_features: int, value_width: int,
    log_lr: jax.Array | float = 0.0,
) -> TensorMemory:
    return TensorMemory(
        cam=cam_init((num_leaves * num_chunks,), num_features, value_width),
        token_moments=jnp.zeros((num_leaves, num_chunks, tokens_per_chunk, 3), jnp.float32),
        log_lr=jnp.full((num_leaves,), log_lr, jnp.float32),
        hg_cos=jnp.zeros((num_leaves,), jnp.float32),
    )


# Per-step drift of the log step size per unit of θ["hd"]["drift"]: ES perturbs θ
# by σ ≈ 0.02, which must move a 200-step schedule visibly (0.02·0.01·200 = 4 %).
DRIFT_SCALE = 0.01


def hypergradient_log_lr(hd: dict, log_lr: jax.Array, sums: jax.Array, *, rate: float | jax.Array,
                         bounds: tuple[float, float], down: float = 1.0) -> jax.Array:
    """Next per-tensor log step size from this step's ``sums (L, 3)`` = (g·u, g·g, u·u).

    u is the previous step's direction m̂ₜ₋₁/√v̂ (before this step's update), so
    g·u = −∂L/∂log αₜ₋₁ up to the positive step size: hypergradient descent on
    log α (Baydin et al., 2018), normalised to a cosine so that the rate is
    scale-free. A first step (u = 0) has cosine 0. ``down`` multiplies the rate
    when the cosine is negative: backing off faster than speeding up (as Rprop
    does) damps a loss spike before it compounds.
    """
    cos = hypergradient_cosine(sums)
    cos = jnp.where(cos < 0, down * cos, cos)
    step = rate * jnp.exp(hd["log_kappa"]) * cos + DRIFT_SCALE * hd["drift"]
    return jnp.clip(log_lr + step, bounds[0], bounds[1])


def hypergradient_cosine(sums: jax.Array) -> jax.Array:
    """cos(g_t, u_{t-1}) per tensor from ``sums (L, 3)`` = (g·u, g·g, u·u); 0 where either is 0.

    Positive while successive steps agree (the step could be larger), negative when the new
    gradient undoes the last step (it was too large): the sign of −∂L/∂log α (Baydin et al., 2018).
    """
    dot, gg, uu = sums[:, 0], sums[:, 1], sums[:, 2]
    cos = dot * jax.lax.rsqrt(jnp.maximum(gg * uu, 1e-30))
    return jnp.where(gg * uu > 0, jnp.clip(cos, -1.0, 1.0), 0.0)


def memory_log_lr(ctrl_out: jax.Array, log_lr: jax.Array, *, rate: float,
                  bounds: tuple[float, float]) -> jax.Array:
    """Next per-tensor log step size from the memory's read-out ``ctrl_out (L, b)``.

    Each meta-token proposes a change ``rate·tanh(out)`` (bounded per step, so no single read can
    throw the step size far); the tensor moves by their mean, inside ``bounds``.
    """
    step = rate * jnp.mean(jnp.tanh(ctrl_out), axis=-1)
    return jnp.clip(log_lr + step, bounds[0], bounds[1])


def pool_leaf(g: jax.Array, layout: ChunkLayout) -> tuple[jax.Array, jax.Array]:
    """Pooling level 1 for one tensor: token means of g and g².

    Only cheap expressions of the gradient, so each is a single read-only
    reduction pass; everything nonlinear happens on the small token arrays.
    (Pooling the parameters too cost a measurable extra pass per step; the
    parameter value reaches the update through the per-coordinate head.)
    """
    return pool_tokens([g, g * g], layout)


def _token_features(means: jax.Array, moments: jax.Array, corr: tuple, eps: float,
                    log_lr: jax.Array | None = None, extra: jax.Array | None = None,
                    hg_cos: jax.Array | None = None) -> jax.Array:
    """Token statistics (tiny arrays: the nonlinearities are free here).

    The first three are invariant to the gradient's scale. The fourth is the
    tensor's hypergradient log step size when there is one (also scale-free);
    otherwise the log gradient scale — a feature that lets a rule meta-trained
    on small networks mistake a wide network's smaller gradients for a cue to
    take larger steps, which is why the hypergradient variant drops it.
    """
    c1, c2, cv = corr
    g, gsq = means[..., 0], means[..., 1]
    rms = jnp.sqrt(jnp.maximum(moments[..., 2] * cv, 0.0)) + eps
    if log_lr is None:
        fourth = 0.1 * jnp.log(rms)  # gradient scale (log; /10 keeps it O(1))
    else:
        fourth = jnp.broadcast_to(log_lr[:, None, None], rms.shape)
    feats = [
        moments[..., 0] * c1 / rms,  # token mean of m̂1, in units of the RMS gradient
        moments[..., 1] * c2 / rms,  # same for the slow momentum
        g * jax.lax.rsqrt(gsq + 1e-30),  # gradient coherence inside the token, in [-1, 1]
        fourth,
    ]
    if hg_cos is not None:  # the tensor's last hypergradient cosine (memory step size)
        feats.append(jnp.broadcast_to(hg_cos[:, None, None], rms.shape))
    if extra is not None:  # global features (the training progress), the same for every token
        feats.extend(jnp.broadcast_to(extra[i], rms.shape) for i in range(extra.shape[0]))
    return jnp.stack(feats, axis=-1)


def tensor_context(
    theta: dict,
    means: jax.Array,
    mask: jax.Array,
    memory: TensorMemory,
    omega_hpe: jax.Array,
    omega_cam: jax.Array,
    *,
    betas: tuple[float, float, float],
    bias_corrections: tuple[jax.Array, jax.Array, jax.Array],
    eps: float,
    magnitude_scale: float = 1.0,
    global_ctx: jax.Array | None = None,
    scale_free: bool = False,
    max_log_gain: float = 0.0,
    token_extra: jax.Array | None = None,
    memory_step: bool = False,
) -> tuple[jax.Array, jax.Array, TensorMemory, jax.Array, jax.Array | None]:
    """HPE → CAM → per-chunk head context and step-size gain for all tensors at once.

    ``means (L, b, T, K)`` from :func:`pool_leaf` stacked over the L tensors;
    ``mask (L, b, T)``. Batching the tensors keeps the number of small kernels
    independent of the number of parameter leaves. Returns the context
    ``(L, b, H)`` (added to the head's first layer), the new memory and a flag
    that is False if any gradient entry was non-finite (a non-finite entry
    makes its token's sums non-finite, so this check costs nothing extra).
    ``token_extra`` (K',) global features appended to every token before HPE.
    With ``memory_step`` the tokens also carry the last hypergradient cosine, and the fifth value
    is the read-out ``(L, b)`` of ``theta["ctrl"]`` that :func:`memory_log_lr` turns into the next
    log step size (else None).
    """
    num_leaves, b, t, _ = means.shape
    finite = jnp.all(jnp.isfinite(means))
    b1, b2, bv = betas
    g, gsq = means[..., 0], means[..., 1]
    old = memory.token_moments
    moments = jnp.stack(
        [b1 * old[..., 0] + (1 - b1) * g, b2 * old[..., 1] + (1 - b2) * g, bv * old[..., 2] + (1 - bv) * gsq],
        axis=-1,
    )
    tokens = _token_features(means, moments, bias_corrections, eps, memory.log_lr if scale_free else None,
                             token_extra, memory.hg_cos if memory_step else None)
    # Spatial encoder: chunked bidirectional Performer + pooling → b meta-tokens per tensor.
    meta = encode(theta["hpe"], tokens.reshape(num_leaves * b, t, -1), mask.reshape(num_leaves * b, t), omega_hpe)
    # Temporal encoder: one CAM stream per meta-token (Eqs. 2, 4, 5).
    cam = theta["cam"]
    scale = meta.shape[-1] ** -0.25
    q = _project(cam["q"], meta) * scale
    k = _project(cam["k"], meta) * scale
    v = _project(cam["v"], meta)
    cam_state, read = cam_step(memory.cam, q, k, v, omega_cam, jax.nn.softplus(cam["tau_raw"]))
    ctx_in = [read, meta]
    if global_ctx is not None:
        ctx_in.append(jnp.broadcast_to(global_ctx, (meta.shape[0], global_ctx.shape[-1])))
    head = theta["head"]
    features = jnp.concatenate(ctx_in, axis=-1)
    if "ctx_w" in head:
        ctx = features @ head["ctx_w"] + head["ctx_b"]
    else:  # no direction correction: nothing per coordinate reads a context
        ctx = jnp.zeros((features.shape[0], 0), features.dtype)
    log_gain = magnitude_scale * (features @ head["w_s"] + head["b_s"])
    if max_log_gain > 0:
        # A soft bound (slope 1 at 0, so a fresh θ is unchanged): a learned gain
        # meta-trained on short unrolls cannot compound into divergence later.
        log_gain = max_log_gain * jnp.tanh(log_gain / max_log_gain)
    gain = jnp.exp(log_gain)
    gain = gain.reshape(num_leaves, b) * jnp.exp(memory.log_lr)[:, None]
    ctrl_out = None
    if memory_step:
        ctrl_out = (features @ theta["ctrl"]["w"] + theta["ctrl"]["b"]).reshape(num_leaves, b)
    new_memory = memory._replace(cam=cam_state, token_moments=moments)
    return ctx.reshape(num_leaves, b, -1), gain, new_memory, finite, ctrl_out


def tensor_head(
    head: dict,
    ctx: jax.Array,
    gain: jax.Array,
    g: jax.Array,
    m1: jax.Array,
    m2: jax.Array | None,
    v: jax.Array,
    param: jax.Array | None,
    layout: ChunkLayout,
    *,
    bias_corrections: tuple[jax.Array, jax.Array, jax.Array],
    eps: float,
) -> jax.Array:
    """Per-coordinate MLP of one tensor → direction ``d·exp(β·s)`` (same shape as ``g``).

    Runs on the ``(b, T·P)`` chunk view so each chunk's context ``ctx (b, H)``
    and gain ``exp(β·s)`` ``(b,)`` broadcast along rows, and is unrolled into
    elementwise multiply-adds (one fused loop; no ``stack(...) @ W``; ReLU; no
    transcendental beyond Adam's square root). With the zero-initialised output
    weights, ``d`` is Adam's ``m̂/(√v̂+ε)`` and the gain is 1.
    """
    shape = g.shape
    c1, c2, cv = bias_corrections

    def view(a: jax.Array) -> jax.Array:
        return to_chunks(a, layout)

    inv = 1.0 / (jnp.sqrt(view(v) * cv) + eps)
    adam_dir = view(m1) * (c1 * inv)
    d = adam_dir
    if "w1" in head:  # the learned direction correction (absent with direction_correction=False)
        coord = [adam_dir, view(m2) * (c2 * inv), view(g) * inv]
        if param is not None:
            coord.append(view(param))
        w1, w_d = head["w1"], head["w_d"]
        for j in range(w1.shape[1]):
            pre = ctx[:, j : j + 1]
            for i, f in enumerate(coord):
                pre = pre + w1[i, j] * f
            d = d + w_d[j] * jnp.maximum(pre, 0.0)
    return from_chunks(d * gain[:, None], layout, shape)


def hypergradient_sums(g: jax.Array, m1_old: jax.Array, v: jax.Array, gg: jax.Array, *,
                       cv: jax.Array, eps: float) -> jax.Array:
    """``(g·u, g·g, u·u)`` over one tensor, u = m1_old/(√v̂+ε), for :func:`hypergradient_log_lr`.

    ``m1_old`` is the first moment before this step, ``v`` the second after it; ``gg`` = Σg² is
    passed in because the pooled token means already hold it (a second full-size g·g would give g²
    two consumers, and XLA would write it out). Each of the other two sums is its own reduction over
    the tensor's own shape that recomputes what it needs from g, m1_old and v (cheap next to a
    memory pass): a shared full-size intermediate (the head's ``1/(√v̂+ε)``, or u) has several
    consumers, and XLA then writes it out and reads it back. u·u uses (√v̂+ε)² ≈ v̂ + ε² (equal
    wherever √v̂ ≫ ε; it only normalises a cosine).
    """
    # v̂ = cv·v with the scalar cv taken outside each sum, so that neither sum shares a
    # full-size subexpression (cv·v, √(cv·v)) with the other or with the direction.
    root = jnp.sqrt(cv)
    gu = jnp.sum(g * m1_old / (jnp.sqrt(v) + eps / root)) / root
    uu = jnp.sum(m1_old * m1_old / (v + eps * eps / cv)) / cv
    return jnp.stack([gu, gg, uu])


def preprocess(x: jax.Array, p: float) -> tuple[jax.Array, jax.Array]:
    """Classic learned-optimizer input scaling (Andrychowicz et al.), two channels.

    ``(log|x|/p, sign x)`` if ``|x| ≥ e^{-p}``, else ``(-1, e^{p} x)``: scale-free
    for large inputs, linear near zero.
    """
    big = jnp.abs(x) >= math.exp(-p)
    log_abs = jnp.log(jnp.maximum(jnp.abs(x), math.exp(-p))) / p
    return jnp.where(big, log_abs, -1.0), jnp.where(big, jnp.sign(x), math.exp(p) * x)


def _lin(w: jax.Array, b: jax.Array, xs: list[jax.Array], col: int) -> jax.Array:
    """Column ``col`` of ``stack(xs) @ w + b``, unrolled: elementwise multiply-adds."""
    out = b[col]
    for i, x in enumerate(xs):
        out = out + w[i, col] * x
    return out


def _log_features(z: list[jax.Array], omega: jax.Array) -> list[jax.Array]:
    """:func:`~mnemosyne_core.favor.log_hyperbolic_features`, unrolled over the tiny widths."""
    num, dim = omega.shape
    base = -0.5 * sum(za * za for za in z) - 0.5 * math.log(2 * num)
    proj = [sum(omega[j, a] * z[a] for a in range(dim)) for j in range(num)]
    return [base + p for p in proj] + [base - p for p in proj]


def coordinate_cam(
    theta: dict,
    inputs: list[jax.Array],
    adam_dir: jax.Array,
    memory: CAMState,
    omega: jax.Array,
    *,
    magnitude_scale: float,
) -> tuple[jax.Array, CAMState]:
    """One ``coordinate``-variant step: every coordinate is its own CAM stream.

    ``inputs``: per-coordinate feature arrays (the preprocessed gradient and
    momentum); ``memory``: feature-major CAM state
    (:func:`~mnemosyne_core.cam.cam_init_feature_major`). Everything is unrolled
    over the tiny widths into elementwise arrays (Eqs. 2, 4, 5).
    """
    cam = theta["cam"]
    width = cam["q"]["w"].shape[-1]
    scale = width ** -0.25
    q = [_lin(cam["q"]["w"], cam["q"]["b"], inputs, a) * scale for a in range(width)]  # Eq. 2
    k = [_lin(cam["k"]["w"], cam["k"]["b"], inputs, a) * scale for a in range(width)]
    v = [_lin(cam["v"]["w"], cam["v"]["b"], inputs, i) for i in range(cam["v"]["w"].shape[-1])]
    tau = jax.nn.softplus(cam["tau_raw"])
    memory, read = cam_step_feature_major(memory, _log_features(q, omega), _log_features(k, omega), v, tau)
    head = theta["head"]
    h_in = read + list(inputs)
    d, s = adam_dir, head["b_s"]
    for j in range(head["w_h"].shape[-1]):
        h = jnp.maximum(_lin(head["w_h"], head["b_h"], h_in, j), 0.0)
        d = d + head["w_d"][j] * h
        s = s + head["w_s"][j] * h
    return d * jnp.exp(magnitude_scale * s), memory
