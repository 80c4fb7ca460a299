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

__all__ = ["CAMState", "cam_init", "cam_step", "cam_update", "cam_read", "EMPTY_LOG_SCALE"]

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


def cam_update(state: CAMState, log_phi_k: jax.Array, v: jax.Array, tau: jax.Array) -> CAMState:
    """Eq. 4 in scaled form: discount by e^{-τ}, then add φ(k) vᵀ and φ(k)."""
    decayed = state.log_scale - tau
    new_scale = jnp.maximum(decayed, log_phi_k)
    keep = jnp.exp(decayed - new_scale)  # ≤ 1: rescale the stored rows
    add = jnp.exp(log_phi_k - new_scale)  # ≤ 1: the new key's features
    num = keep[..., None] * state.num + add[..., None] * v[..., None, :]
    den = keep * state.den + add
    return CAMState(num, den, new_scale)


def cam_read(state: CAMState, log_phi_q: jax.Array) -> jax.Array:
    """Eq. 5: ``N_tᵀ φ(q) / φ(q)ᵀ Ψ_t``; returns zeros for an empty memory."""
    w = log_phi_q + state.log_scale
    w = w - jax.lax.stop_gradient(jnp.max(w, axis=-1, keepdims=True))
    a = jnp.exp(w)
    num = jnp.sum(a[..., None] * state.num, axis=-2)  # tiny r, e: fused, not a dot
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
