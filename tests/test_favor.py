"""Hyperbolic-cosine FAVOR+ features and non-causal FAVOR attention."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemosyne_core.favor import (
    favor_attention,
    hyperbolic_features,
    log_hyperbolic_features,
    orthogonal_directions,
    softmax_attention,
)


def test_kernel_is_unbiased_monte_carlo():
    # E_ω[φ(x)ᵀφ(y)] = exp(xᵀy): average the estimate over many independent ω draws.
    dim = 4
    x = jax.random.normal(jax.random.key(0), (dim,)) * 0.4
    y = jax.random.normal(jax.random.key(1), (dim,)) * 0.4

    def estimate(key):
        omega = jax.random.normal(key, (8, dim))  # iid directions: the unbiased baseline
        return hyperbolic_features(x, omega) @ hyperbolic_features(y, omega)

    draws = jax.vmap(estimate)(jax.random.split(jax.random.key(2), 4000))
    exact = float(jnp.exp(x @ y))
    stderr = float(jnp.std(draws)) / np.sqrt(draws.shape[0])
    assert abs(float(jnp.mean(draws)) - exact) < 4 * stderr + 1e-6
    # The same holds with orthogonal blocks (marginally Gaussian rows).
    ortho = jax.vmap(lambda k: hyperbolic_features(x, orthogonal_directions(k, 8, dim))
                     @ hyperbolic_features(y, orthogonal_directions(k, 8, dim)))(
        jax.random.split(jax.random.key(3), 4000))
    stderr_o = float(jnp.std(ortho)) / np.sqrt(ortho.shape[0])
    assert abs(float(jnp.mean(ortho)) - exact) < 4 * stderr_o + 1e-6


def test_features_are_positive_and_log_form_is_consistent():
    omega = orthogonal_directions(jax.random.key(0), 6, 3)
    z = jax.random.normal(jax.random.key(1), (5, 3))
    phi = hyperbolic_features(z, omega)
    assert phi.shape == (5, 12)
    assert bool(jnp.all(phi > 0))
    np.testing.assert_allclose(jnp.log(phi), log_hyperbolic_features(z, omega), rtol=1e-5, atol=1e-5)
    # Huge inputs: the log form stays finite where exp would overflow.
    big = log_hyperbolic_features(z * 1e3, omega)
    assert bool(jnp.all(jnp.isfinite(big)))


def test_orthogonal_blocks():
    dim = 5
    omega = orthogonal_directions(jax.random.key(4), 12, dim)  # blocks of 5, 5, 2 rows
    assert omega.shape == (12, dim)
    for start in (0, 5, 10):
        block = omega[start : start + dim]
        unit = block / jnp.linalg.norm(block, axis=-1, keepdims=True)
        gram = unit @ unit.T
        np.testing.assert_allclose(gram, jnp.eye(block.shape[0]), atol=1e-5)
    # Rows are not unit vectors: norms are chi-distributed (mean ≈ √dim).
    norms = jnp.linalg.norm(orthogonal_directions(jax.random.key(5), 2000, dim), axis=-1)
    assert abs(float(jnp.mean(norms ** 2)) - dim) < 0.5
    assert float(jnp.std(norms)) > 0.1


def test_directions_are_deterministic_in_key():
    a = orthogonal_directions(jax.random.key(7), 4, 3)
    b = orthogonal_directions(jax.random.key(7), 4, 3)
    c = orthogonal_directions(jax.random.key(8), 4, 3)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_directions_reject_bad_sizes(bad):
    with pytest.raises(ValueError):
        orthogonal_directions(jax.random.key(0), bad, 3)
    with pytest.raises(ValueError):
        orthogonal_directions(jax.random.key(0), 3, bad)


def test_width_mismatch_raises():
    with pytest.raises(ValueError, match="width"):
        log_hyperbolic_features(jnp.ones(3), jnp.ones((2, 4)))


def _attention_error(num: int, seed: int) -> float:
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (16, 4)) * 0.5
    k = jax.random.normal(keys[1], (16, 4)) * 0.5
    v = jax.random.normal(keys[2], (16, 3))
    omega = orthogonal_directions(keys[3], num, 4)
    return float(jnp.mean(jnp.abs(favor_attention(q, k, v, omega) - softmax_attention(q, k, v))))


def test_noncausal_attention_approaches_exact_as_features_grow():
    errors = [np.mean([_attention_error(num, seed) for seed in range(8)]) for num in (2, 16, 256)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.35 * errors[0]
    assert errors[2] < 0.06


def test_attention_mask_ignores_padding_keys():
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (3, 4))
    k = jax.random.normal(keys[1], (5, 4))
    v = jax.random.normal(keys[2], (5, 2))
    omega = orthogonal_directions(keys[3], 8, 4)
    mask = jnp.array([True, True, False, True, False])
    out = favor_attention(q, k, v, omega, mask)
    # Garbage in the padded keys/values must not matter.
    k2 = k.at[2].set(1e3).at[4].set(-7.0)
    v2 = v.at[2].set(jnp.nan).at[4].set(1e9)
    np.testing.assert_allclose(favor_attention(q, k2, v2, omega, mask), out, rtol=1e-6)
    np.testing.assert_allclose(out, favor_attention(q, k[mask], v[mask], omega), rtol=1e-5, atol=1e-6)
    # All keys masked: zeros, not NaN.
    empty = favor_attention(q, k, v, omega, jnp.zeros(5, bool))
    np.testing.assert_array_equal(empty, jnp.zeros((3, 2)))


def test_attention_is_scale_stable():
    # ×100 inputs: exponentials of thousands; the stabilised ratio stays finite and
    # still a convex combination of the values.
    keys = jax.random.split(jax.random.key(2), 4)
    q = jax.random.normal(keys[0], (6, 4)) * 100
    k = jax.random.normal(keys[1], (6, 4)) * 100
    v = jax.random.normal(keys[2], (6, 2))
    out = favor_attention(q, k, v, orthogonal_directions(keys[3], 8, 4))
    assert bool(jnp.all(jnp.isfinite(out)))
    assert bool(jnp.all(out <= v.max(0) + 1e-4)) and bool(jnp.all(out >= v.min(0) - 1e-4))
