"""Hyperbolic-cosine FAVOR+ positive random features and non-causal FAVOR attention.

Performers replace the softmax kernel ``exp(xᵀy)`` by an inner product of
positive random features. We use the hyperbolic ("SM-hyp+") map of the
Performer paper, which the Mnemosyne paper uses for both CAM and HPE::

    φ(z) = r^{-1/2} · exp(-‖z‖²/2) · [exp(ω_iᵀz)]_{i≤r/2} ⧺ [exp(-ω_iᵀz)]_{i≤r/2}

with ``E_ω[φ(x)ᵀφ(y)] = exp(xᵀy)`` for ``ω ~ N(0, I)``. Every feature is
positive, so attention denominators are positive.

Everything here works in **log space**: :func:`log_hyperbolic_features`
returns ``log φ(z)``. Exponentiating only after subtracting a maximum keeps
inputs of any scale finite; callers (CAM, attention) track those maxima so the
result stays exact.

The random directions ω are *not* learned: :func:`orthogonal_directions`
draws them once from a key (orthogonal blocks with chi-distributed row norms,
which lowers the estimator's variance) and they stay fixed for the lifetime of
an optimizer.

Example:
    >>> import jax, jax.numpy as jnp
    >>> omega = orthogonal_directions(jax.random.key(0), num=8, dim=4)
    >>> phi = hyperbolic_features(jnp.ones(4) * 0.1, omega)
    >>> phi.shape, bool((phi > 0).all())
    ((16,), True)
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "favor_attention",
    "hyperbolic_features",
    "log_hyperbolic_features",
    "orthogonal_directions",
    "softmax_attention",
]


def orthogonal_directions(key: jax.Array, num: int, dim: int) -> jax.Array:
    """``num`` random directions in R^dim, shape ``(num, dim)``, float32.

    Rows come in blocks of ``dim`` mutually orthogonal vectors (QR of a
    Gaussian matrix); each row is rescaled to the norm of an independent
    Gaussian vector, so marginally every row is still ``N(0, I_dim)`` and the
    estimator stays unbiased (Performer's orthogonal random features).

    Raises:
        ValueError: if ``num`` or ``dim`` is not a positive integer.
    """
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}")
    num_blocks = -(-num // dim)
    block_key, norm_key = jax.random.split(key)
    gaussians = jax.random.normal(block_key, (num_blocks, dim, dim), jnp.float32)
    q, r = jnp.linalg.qr(gaussians)
    # Fix QR's sign ambiguity so the blocks are Haar-distributed.
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
    rows = jnp.swapaxes(q, -1, -2).reshape(num_blocks * dim, dim)[:num]
    norms = jnp.linalg.norm(jax.random.normal(norm_key, (num, dim), jnp.float32), axis=-1)
    return rows * norms[:, None]


def log_hyperbolic_features(z: jax.Array, omega: jax.Array) -> jax.Array:
    """``log φ(z)`` for the hyperbolic positive features; shape ``(..., 2·num)``.

    ``z`` has shape ``(..., dim)``, ``omega`` ``(num, dim)``; the feature count
    is ``r = 2·num``. Never overflows: it is a quadratic in ``z``.
    """
    if z.shape[-1] != omega.shape[-1]:
        raise ValueError(
            f"input width {z.shape[-1]} does not match the directions' width {omega.shape[-1]}"
        )
    r = 2 * omega.shape[0]
    proj = z @ omega.T
    base = -0.5 * jnp.sum(z * z, axis=-1, keepdims=True) - 0.5 * math.log(r)
    return base + jnp.concatenate([proj, -proj], axis=-1)


def hyperbolic_features(z: jax.Array, omega: jax.Array) -> jax.Array:
    """``φ(z)`` itself (positive); may under/overflow for large ``z`` — prefer the log form."""
    return jnp.exp(log_hyperbolic_features(z, omega))


def favor_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    omega: jax.Array,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Bidirectional (non-causal) FAVOR+ attention over the second-to-last axis.

    ``out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / φ(q_i)ᵀ (Σ_j φ(k_j))``, which estimates
    softmax attention with kernel ``exp(q_iᵀk_j)`` (no 1/√d temperature: scale
    ``q`` and ``k`` yourself). Shapes: ``q (..., L, d)``, ``k (..., L', d)``,
    ``v (..., L', e)``, ``mask (..., L')`` (True = real key). Cost is linear in
    ``L + L'``.

    Stabilisation is exact: each feature row j of the key sums is divided by
    ``exp(c_j)``, ``c_j = max over keys of log φ_j(k)``, and the query weights
    are multiplied back by ``exp(c_j)`` before a per-query maximum is removed —
    the two scales cancel in the ratio. Because some ``j`` then has weight 1 on
    a key sum ≥ 1, the denominator cannot underflow to zero. Rows whose keys
    are all masked out return zeros.
    """
    lq = log_hyperbolic_features(q, omega)
    lk = log_hyperbolic_features(k, omega)
    if mask is not None:
        lk = jnp.where(mask[..., None], lk, -jnp.inf)
        v = jnp.where(mask[..., None], v, 0.0)  # 0·NaN would still poison the sums
    c = jnp.max(lk, axis=-2, keepdims=True)  # (..., 1, r)
    c = jnp.where(jnp.isfinite(c), c, 0.0)  # all keys masked: any finite value works
    pk = jnp.exp(lk - c)  # (..., L', r), zero for masked keys
    kv = jnp.einsum("...lr,...le->...re", pk, v)
    ksum = jnp.sum(pk, axis=-2)  # (..., r)
    wq = lq + c  # log weight of feature row j for each query
    wq = wq - jax.lax.stop_gradient(jnp.max(wq, axis=-1, keepdims=True))
    a = jnp.exp(wq)
    num = jnp.einsum("...lr,...re->...le", a, kv)
    den = jnp.einsum("...lr,...r->...l", a, ksum)[..., None]
    safe = den > 0
    return jnp.where(safe, num / jnp.where(safe, den, 1.0), 0.0)


def softmax_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Exact attention with kernel ``exp(qᵀk)`` (the quantity FAVOR+ estimates)."""
    logits = jnp.einsum("...ld,...md->...lm", q, k)
    if mask is not None:
        logits = jnp.where(mask[..., None, :], logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1) @ v
