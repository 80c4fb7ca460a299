"""Compact associative memory (CAM): the temporal encoder of Mnemosyne.

At optimizer step t an input ξ_t is projected to a query, a key and a value
(Eq. 2: ``q_t = W_Q ξ_t``, ``k_t = W_K ξ_t``, ``v_t = W_V ξ_t``), the key/value
pair is written into a memory that persists across steps with a learned
discount τ > 0 (Eq. 4), and the query reads the memory back (Eq. 5)::

    N_t = e^{-τ} N_{t-1} + φ(k_t) v_tᵀ        Ψ_t = e^{-τ} Ψ_{t-1} + φ(k_t)      (Eq. 4)
    out_t = N_tᵀ φ(q_t) / (φ(q_t)ᵀ Ψ_t)                                          (Eq. 5)

Update-then-read: the current step attends to itself and to all past steps,
so ``out_t = Σ_{i≤t} e^{-τ(t-i)} φ(q_t)ᵀφ(k_i) v_i / Σ_{i≤t} e^{-τ(t-i)} φ(q_t)ᵀφ(k_i)``,
a linear-cost estimate of softmax attention over the whole history with a
recency bias of -τ per step.

Stabiliser (exact, like online softmax): each feature row j keeps a log-scale
``c_j`` with ``N_j = e^{c_j} Ñ_j`` and ``Ψ_j = e^{c_j} Ψ̃_j``. The discount lowers
``c`` by τ; a key whose log-feature exceeds ``c_j`` raises it and rescales the
stored row. So ``Ψ̃_j`` stays in ``[e^{-(something small)}, t]`` and nothing
overflows for inputs of any magnitude. A per-row (rather than one per-memory)
scale guarantees that the read's denominator has a term ≥ 1 after the query
weights are max-shifted, so it cannot underflow to 0/0 either; the query-side
scale cancels in the ratio.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mnemosyne_core.favor import orthogonal_directions
    >>> omega = orthogonal_directions(jax.random.key(0), num=4, dim=3)
    >>> state = cam_init((), num_features=8, value_dim=2)
    >>> x = jnp.ones(3) * 0.1
    >>> state, out = cam_step(state, x, x, jnp.array([1.0, -1.0]), omega, tau=0.1)
    >>> out.round(3).tolist()   # one stored value: the read returns it
    [1.0, -1.0]
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mnemosyne_core.favor import log_hyperbolic_features

__all__ = [
    "EMPTY_LOG_SCALE",
    "CAMState",
    "cam_init",
    "cam_init_feature_major",
    "cam_read",
    "cam_step",
    "cam_step_feature_major",
    "cam_update",
]

# Log-scale of an empty memory: finite (so differences never give inf - inf)
# but far below any real log-feature, so the first write replaces it.
EMPTY_LOG_SCALE = -1e30


class CAMState(NamedTuple):
    """One memory per stream; leading axes are streams (batch)."""

    num: jax.Array  # Ñ, (..., r, e): e^{-c}-scaled Σ discounted φ(k) vᵀ
    den: jax.Array  # Ψ̃, (..., r): e^{-c}-scaled Σ discounted φ(k)
    log_scale: jax.Array  # c, (..., r)


def cam_init(
    batch_shape: tuple[int, ...], num_features: int, value_dim: int, dtype: jnp.dtype = jnp.float32
) -> CAMState:
    """Empty memories (N_0 = 0, Ψ_0 = 0) for ``batch_shape`` independent streams."""
    return CAMState(
        num=jnp.zeros((*batch_shape, num_features, value_dim), dtype),
        den=jnp.zeros((*batch_shape, num_features), dtype),
        log_scale=jnp.full((*batch_shape, num_features), EMPTY_LOG_SCALE, dtype),
    )


def _rescale(decayed: jax.Array, log_phi_k: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Factors ``e^{decayed - c'}`` (old rows) and ``e^{log φ(k) - c'}`` (new key), ``c' = max``.

    One of the two is exactly 1, so a single ``exp(-|difference|)`` gives both.
    """
    old_wins = decayed >= log_phi_k
    e = jnp.exp(-jnp.abs(decayed - log_phi_k))
    return jnp.where(old_wins, 1.0, e), jnp.where(old_wins, e, 1.0), jnp.maximum(decayed, log_phi_k)


def cam_update(state: CAMState, log_phi_k: jax.Array, v: jax.Array, tau: jax.Array) -> CAMState:
    """Eq. 4 in scaled form: discount by e^{-τ}, then add φ(k) vᵀ and φ(k)."""
    decayed = state.log_scale - tau
    keep, add, new_scale = _rescale(decayed, log_phi_k)
    num = keep[..., None] * state.num + add[..., None] * v[..., None, :]
    den = keep * state.den + add
    return CAMState(num, den, new_scale)


def cam_read(state: CAMState, log_phi_q: jax.Array) -> jax.Array:
    """Eq. 5: ``N_tᵀ φ(q) / φ(q)ᵀ Ψ_t``; returns zeros for an empty memory."""
    w = log_phi_q + state.log_scale
    w = w - jax.lax.stop_gradient(jnp.max(w, axis=-1, keepdims=True))
    a = jnp.exp(w)
    num = jnp.einsum("...r,...re->...e", a, state.num)
    den = jnp.sum(a * state.den, axis=-1, keepdims=True)
    safe = den > 0
    return jnp.where(safe, num / jnp.where(safe, den, 1.0), 0.0)


def cam_step(
    state: CAMState,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    omega: jax.Array,
    tau: jax.Array | float,
) -> tuple[CAMState, jax.Array]:
    """Write ``(k, v)`` (Eq. 4), then read with ``q`` (Eq. 5): update-then-read.

    ``q``, ``k``: ``(..., d)`` already projected (Eq. 2); ``v``: ``(..., e)``;
    ``omega``: ``(r/2, d)`` fixed directions; ``tau`` > 0 the discount.
    Returns the new state and the read-out ``(..., e)``.
    """
    tau = jnp.asarray(tau, jnp.float32)
    state = cam_update(state, log_hyperbolic_features(k, omega), v, tau)
    return state, cam_read(state, log_hyperbolic_features(q, omega))


# ---------------------------------------------------------------- feature-major form
# For one memory per *parameter coordinate* (the `coordinate` variant) the
# trailing (r, e) axes above turn every step into millions of tiny batched
# dots, which XLA CPU runs hundreds of times slower than elementwise code.
# Here the feature axes lead — num (r, e, *S), den (r, *S), log_scale (r, *S) —
# and the same Eqs. 4–5 are unrolled over r and e into elementwise arrays
# that fuse into a few loops.


def cam_init_feature_major(shape: tuple[int, ...], num_features: int, value_dim: int) -> CAMState:
    """Empty memories, one per element of ``shape``, feature axes leading."""
    return CAMState(
        num=jnp.zeros((num_features, value_dim, *shape), jnp.float32),
        den=jnp.zeros((num_features, *shape), jnp.float32),
        log_scale=jnp.full((num_features, *shape), EMPTY_LOG_SCALE, jnp.float32),
    )


def cam_step_feature_major(
    state: CAMState,
    log_phi_q: list[jax.Array],
    log_phi_k: list[jax.Array],
    v: list[jax.Array],
    tau: jax.Array,
) -> tuple[CAMState, list[jax.Array]]:
    """:func:`cam_step` (Eq. 4 then Eq. 5) with per-feature/per-value lists of arrays.

    ``log_phi_q``, ``log_phi_k``: ``r`` arrays of shape ``S``; ``v``: ``e`` arrays.
    Returns the new state and the ``e`` read-out arrays.
    """
    r, e = len(log_phi_k), len(v)
    nums, dens, scales = [], [], []
    for j in range(r):  # Eq. 4, row j, with the exact log-scale stabiliser
        keep, add, c = _rescale(state.log_scale[j] - tau, log_phi_k[j])
        nums.append([keep * state.num[j, i] + add * v[i] for i in range(e)])
        dens.append(keep * state.den[j] + add)
        scales.append(c)
    w = [log_phi_q[j] + scales[j] for j in range(r)]  # Eq. 5, query weights in log space
    top = w[0]
    for j in range(1, r):
        top = jnp.maximum(top, w[j])
    a = [jnp.exp(wj - top) for wj in w]
    den = sum(a[j] * dens[j] for j in range(r))
    safe = den > 0
    inv = 1.0 / jnp.where(safe, den, 1.0)
    out = [jnp.where(safe, sum(a[j] * nums[j][i] for j in range(r)) * inv, 0.0) for i in range(e)]
    new = CAMState(
        num=jnp.stack([jnp.stack(row) for row in nums]),
        den=jnp.stack(dens),
        log_scale=jnp.stack(scales),
    )
    return new, out
