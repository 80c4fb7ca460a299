"""Compact associative memory: Eqs. 4–5 equal the explicit discounted attention sum."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import enable_x64
from jax.scipy.special import logsumexp

from mnemosyne_core.cam import cam_init, cam_step
from mnemosyne_core.favor import (
    hyperbolic_features,
    log_hyperbolic_features,
    orthogonal_directions,
)

TAU = 0.25  # exactly representable, so float32 τ inside CAM equals the float64 reference's


def _sequence(seed: int, steps: int, dim: int, value_dim: int, scale: float, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (steps, dim), dtype) * scale
    k = jax.random.normal(keys[1], (steps, dim), dtype) * scale
    v = jax.random.normal(keys[2], (steps, value_dim), dtype)
    return q, k, v


def _run_cam(q, k, v, omega, tau=TAU):
    """Step the memory through the sequence (update-then-read at every step)."""

    def step(state, qkv):
        return cam_step(state, *qkv, omega, tau)

    state = cam_init((), omega.shape[0] * 2, v.shape[-1], v.dtype)
    return jax.lax.scan(step, state, (q, k, v))[1]


def _log_weights(q, k, omega, tau):
    """log of e^{-τ(t-i)} φ(q_t)ᵀφ(k_i) for i ≤ t (-inf above the diagonal), in log space."""
    lq, lk = log_hyperbolic_features(q, omega), log_hyperbolic_features(k, omega)
    steps = q.shape[0]
    lag = jnp.arange(steps)[:, None] - jnp.arange(steps)[None, :]
    kernel = logsumexp(lq[:, None, :] + lk[None, :, :], axis=-1)
    return jnp.where(lag >= 0, kernel - tau * lag, -jnp.inf)


def _explicit_features(q, k, v, omega, tau=TAU):
    """O(t²) reference: Σ_i e^{-τ(t-i)} φ(q_t)ᵀφ(k_i) v_i / Σ_i e^{-τ(t-i)} φ(q_t)ᵀφ(k_i)."""
    fq, fk = hyperbolic_features(q, omega), hyperbolic_features(k, omega)
    steps = q.shape[0]
    lag = jnp.arange(steps)[:, None] - jnp.arange(steps)[None, :]
    w = jnp.where(lag >= 0, jnp.exp(-tau * lag) * (fq @ fk.T), 0.0)
    return (w @ v) / jnp.sum(w, axis=-1, keepdims=True)


def _explicit_log_space(q, k, v, omega, tau=TAU):
    """The same sum, computed stably: softmax over i of -τ(t-i) + logsumexp_j(log φ_j(q_t) + log φ_j(k_i))."""
    return jax.nn.softmax(_log_weights(q, k, omega, tau), axis=-1) @ v


def test_readout_equals_explicit_discounted_attention_float64():
    with enable_x64():
        q, k, v = _sequence(0, steps=12, dim=4, value_dim=3, scale=0.7, dtype=jnp.float64)
        omega = orthogonal_directions(jax.random.key(1), 8, 4).astype(jnp.float64)
        np.testing.assert_allclose(_run_cam(q, k, v, omega), _explicit_features(q, k, v, omega), rtol=1e-10, atol=1e-12)


def test_readout_equals_explicit_discounted_attention_float32():
    q, k, v = _sequence(2, steps=10, dim=4, value_dim=2, scale=0.7)
    omega = orthogonal_directions(jax.random.key(3), 8, 4)
    np.testing.assert_allclose(_run_cam(q, k, v, omega), _explicit_features(q, k, v, omega), rtol=2e-5, atol=2e-6)


def test_discount_changes_the_readout():
    # τ must matter: a larger discount weights recent steps more.
    q, k, v = _sequence(4, steps=8, dim=3, value_dim=1, scale=0.5)
    omega = orthogonal_directions(jax.random.key(5), 4, 3)
    low, high = _run_cam(q, k, v, omega, 0.01), _run_cam(q, k, v, omega, 3.0)
    assert float(jnp.max(jnp.abs(low[1:] - high[1:]))) > 1e-3
    np.testing.assert_allclose(high, _explicit_features(q, k, v, omega, 3.0), rtol=2e-5, atol=2e-6)


def test_streams_are_independent():
    # A batch of memories behaves like separate memories (shared θ/ω, no mixing).
    q, k, v = _sequence(6, steps=5, dim=3, value_dim=2, scale=0.5)
    q2, k2, v2 = _sequence(7, steps=5, dim=3, value_dim=2, scale=0.5)
    omega = orthogonal_directions(jax.random.key(8), 4, 3)
    state = cam_init((2,), 8, 2)
    outs = []
    for t in range(5):  # eager on purpose: a different code path from the scanned runs
        state, out = cam_step(state, jnp.stack([q[t], q2[t]]), jnp.stack([k[t], k2[t]]),
                              jnp.stack([v[t], v2[t]]), omega, TAU)
        outs.append(out)
    outs = jnp.stack(outs)
    np.testing.assert_allclose(outs[:, 0], _run_cam(q, k, v, omega), rtol=1e-6)
    np.testing.assert_allclose(outs[:, 1], _run_cam(q2, k2, v2, omega), rtol=1e-6)


def _exact_softmax_discounted(q, k, v, tau=TAU):
    steps = q.shape[0]
    lag = jnp.arange(steps)[:, None] - jnp.arange(steps)[None, :]
    logw = jnp.where(lag >= 0, q @ k.T - tau * lag, -jnp.inf)
    return jax.nn.softmax(logw, axis=-1) @ v


def test_favor_error_against_softmax_falls_with_features():
    def mean_error(num: int) -> float:
        errs = []
        for seed in range(6):
            q, k, v = _sequence(seed, steps=10, dim=4, value_dim=2, scale=0.5)
            omega = orthogonal_directions(jax.random.key(100 + seed), num, 4)
            errs.append(float(jnp.mean(jnp.abs(_run_cam(q, k, v, omega) - _exact_softmax_discounted(q, k, v)))))
        return float(np.mean(errs))

    errors = [mean_error(num) for num in (2, 16, 128)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0], errors


def test_large_inputs_stay_finite_and_match_log_space_reference():
    q, k, v = _sequence(9, steps=10, dim=4, value_dim=3, scale=0.7)
    omega = orthogonal_directions(jax.random.key(10), 8, 4)
    q100, k100 = q * 100, k * 100
    # Naive features overflow/underflow at this scale…
    assert not bool(jnp.all(jnp.isfinite(_explicit_features(q100, k100, v, omega))))
    out = _run_cam(q100, k100, v, omega)
    assert bool(jnp.all(jnp.isfinite(out)))
    # …the stabilised memory still matches the stable reference. float32 log-features
    # of magnitude ~1e4 carry ~1e-3 absolute rounding, hence the tolerance here; the
    # float64 run below is exact.
    np.testing.assert_allclose(out, _explicit_log_space(q100, k100, v, omega), atol=2e-2)
    with enable_x64():
        q64, k64, v64 = (a.astype(jnp.float64) for a in (q100, k100, v))
        om64 = omega.astype(jnp.float64)
        np.testing.assert_allclose(_run_cam(q64, k64, v64, om64), _explicit_log_space(q64, k64, v64, om64),
                                   rtol=1e-8, atol=1e-10)


def test_feature_major_form_equals_cam_step():
    # The unrolled per-coordinate memory (coordinate variant) is the same Eqs. 4–5.
    from mnemosyne_core.cam import cam_init_feature_major, cam_step_feature_major

    streams, steps, dim, e = 5, 6, 3, 2
    keys = jax.random.split(jax.random.key(11), 4)
    q = jax.random.normal(keys[0], (steps, streams, dim)) * 2
    k = jax.random.normal(keys[1], (steps, streams, dim)) * 2
    v = jax.random.normal(keys[2], (steps, streams, e))
    omega = orthogonal_directions(keys[3], 4, dim)
    ref, fm = cam_init((streams,), 8, e), cam_init_feature_major((streams,), 8, e)
    for t in range(steps):
        ref, out_ref = cam_step(ref, q[t], k[t], v[t], omega, TAU)
        lq = list(jnp.moveaxis(log_hyperbolic_features(q[t], omega), -1, 0))
        lk = list(jnp.moveaxis(log_hyperbolic_features(k[t], omega), -1, 0))
        fm, out = cam_step_feature_major(fm, lq, lk, list(v[t].T), jnp.asarray(TAU))
        np.testing.assert_allclose(jnp.stack(out, -1), out_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.moveaxis(fm.den, 0, -1), ref.den, rtol=1e-5, atol=1e-6)
