"""The ``tensor`` variant's memory: pooled gradient tokens → HPE → CAM → per-chunk context.

Per step, for all L parameter tensors at once (one set of small kernels, whatever L is):

1. pooling level 1 (:func:`pool_leaf`): token means of g and g² — the only pass over the
   gradient here; the token moments (EMAs of the pooled g and g²) live in :class:`TensorMemory`;
2. token features (scale-free statistics, the tensor's log step size, the last hypergradient
   cosine, the progress) → HPE (:mod:`mnemosyne_core.hpe`) → ``b`` meta-tokens ξ_t per tensor;
3. one CAM stream per meta-token (:mod:`mnemosyne_core.cam`; DESIGN.md section 2)::

       q_t = W_Q ξ_t,  k_t = W_K ξ_t,  v_t = W_V ξ_t                         (Eq. 2)
       N_t = e^{−τ} N_{t−1} + φ(k_t) v_tᵀ,  Ψ_t = e^{−τ} Ψ_{t−1} + φ(k_t)     (Eq. 4)
       r_t = N_tᵀ φ(q_t) / (φ(q_t)ᵀ Ψ_t)                                      (Eq. 5)

4. read-outs of ``[r_t, ξ_t, global features]`` (ours): the context of the per-coordinate
   head (:mod:`mnemosyne_core.head`), the per-chunk log gain ``s`` (θ ``head.w_s``, ``head.b_s``)
   and, with ``memory_step_size``, the proposal ``o_j`` for the tensor's next log step size
   (θ ``ctrl``, turned into a step by :func:`~mnemosyne_core.step_size.memory_log_lr`).

:func:`init_tensor_theta` lays out the whole ``tensor`` θ (HPE, CAM, head, and the optional
``hd``, ``ctrl``, ``sched``); every learned read-out starts at zero, so a fresh θ is Adam.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mnemosyne_core.favor import orthogonal_directions
    >>> from mnemosyne_core.hpe import chunk_layout
    >>> theta = init_tensor_theta(jax.random.key(0), num_pool=4, num_coord=4, width=8,
    ...                           value_width=4, hpe_hidden=16, head_hidden=4, extra_ctx=0,
    ...                           init_discount=0.1)
    >>> sorted(theta)
    ['cam', 'head', 'hpe']
    >>> layout = chunk_layout(12, num_chunks=2, tokens_per_chunk=2)
    >>> means, mask = pool_leaf(jnp.linspace(-1.0, 1.0, 12), layout)
    >>> memory = init_tensor_memory(1, 2, 2, num_features=8, value_width=4)
    >>> omega = orthogonal_directions(jax.random.key(1), 4, 8)
    >>> ctx, gain, memory, finite, _ = tensor_context(
    ...     theta, means[None], mask[None], memory, omega, omega, betas=(0.9, 0.99, 0.999),
    ...     bias_corrections=(10.0, 100.0, 1000.0), eps=1e-8)
    >>> ctx.shape, gain.tolist(), bool(finite)   # fresh θ: gain 1 for both chunks
    ((1, 2, 4), [[1.0, 1.0]], True)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mnemosyne_core.cam import CAMState, cam_init, cam_step
from mnemosyne_core.hpe import ChunkLayout, encode, init_hpe, pool_tokens
from mnemosyne_core.initializers import dense, init_cam_projections

__all__ = ["TensorMemory", "init_tensor_memory", "init_tensor_theta", "pool_leaf", "tensor_context"]


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
    ctx_in = value_width + width + extra_ctx  # [CAM read-out (Eq. 5), meta-token, global features]
    ctx = dense(k_ctx, ctx_in, head_hidden)
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
        "cam": init_cam_projections(k_cam, width, width, value_width, init_discount),
        "head": head,
    }
    if hypergradient:  # read by step_size.hypergradient_log_lr
        theta["hd"] = {name: jnp.zeros((), jnp.float32) for name in ("log_kappa", "drift", "log_lr0")}
    if memory_step_size:  # read out by tensor_context; step_size.memory_log_lr turns it into a step
        theta["ctrl"] = {"w": jnp.zeros((ctx_in,), jnp.float32), "b": jnp.zeros((), jnp.float32)}
        if not hypergradient:  # with both rules the offset of the initial step is hd's
            theta["ctrl"]["log_lr0"] = jnp.zeros((), jnp.float32)
    if schedule_knots:  # read by schedule.progress_log_schedule
        theta["sched"] = {"knots": jnp.zeros((schedule_knots,), jnp.float32)}
    return theta


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
    """An empty memory (N_0 = 0, Ψ_0 = 0 in Eq. 4) for ``num_leaves`` tensors at log step size ``log_lr``."""
    return TensorMemory(
        cam=cam_init((num_leaves * num_chunks,), num_features, value_width),
        token_moments=jnp.zeros((num_leaves, num_chunks, tokens_per_chunk, 3), jnp.float32),
        log_lr=jnp.full((num_leaves,), log_lr, jnp.float32),
        hg_cos=jnp.zeros((num_leaves,), jnp.float32),
    )


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


def _project(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


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
    see_step: bool = True,
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
    is the read-out ``(L, b)`` of ``theta["ctrl"]`` that :func:`~mnemosyne_core.step_size.memory_log_lr`
    turns into the next log step size (else None). ``see_step=False`` sets the tokens' fourth
    feature (the log step size, or the log gradient scale) to 0: the memory then reads only the
    scale-free dynamics.
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
    step_feature = memory.log_lr if scale_free else None
    if not see_step:
        step_feature = jnp.zeros((num_leaves,), means.dtype)
    tokens = _token_features(means, moments, bias_corrections, eps, step_feature,
                             token_extra, memory.hg_cos if memory_step else None)
    # Spatial encoder: chunked bidirectional Performer + pooling → b meta-tokens ξ_t per tensor.
    meta = encode(theta["hpe"], tokens.reshape(num_leaves * b, t, -1), mask.reshape(num_leaves * b, t), omega_hpe)
    # Temporal encoder: one CAM stream per meta-token, L·b streams in one batch.
    cam = theta["cam"]
    # N^{-1/4} on both q and k: φ(q)ᵀφ(k) then estimates exp(qᵀk/√N), softmax attention's temperature.
    scale = meta.shape[-1] ** -0.25
    q = _project(cam["q"], meta) * scale  # Eq. 2: q_t = W_Q ξ_t
    k = _project(cam["k"], meta) * scale  # Eq. 2: k_t = W_K ξ_t
    v = _project(cam["v"], meta)  # Eq. 2: v_t = W_V ξ_t
    # Eq. 4 (write k_t, v_t with discount e^{−τ}, τ = softplus(tau_raw) > 0), then
    # Eq. 5 (read with q_t): update-then-read, so step t attends to itself and all past steps.
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
