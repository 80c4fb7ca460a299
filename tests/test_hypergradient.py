"""Per-tensor hypergradient step sizes of the ``tensor`` variant (``hypergradient=True``)."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta, mnemosyne
from mnemosyne_core.step_size import DRIFT_SCALE

HD = MnemosyneConfig(hypergradient=True, learning_rate=3e-3, hypergradient_rate=0.2, init_log_lr=-0.5,
                     min_log_lr=-3.0, max_log_lr=1.0)


def _reference(config, grads_seq, log_kappa=0.0, drift=0.0, log_lr0=0.0):
    """Adam with a per-tensor log step size that follows the cosine between the new
    gradient and the previous direction (one step late), written out in numpy."""
    b1, bv, eps = config.beta1, config.beta_v, config.eps
    names = sorted(grads_seq[0])
    m = {k: np.zeros_like(grads_seq[0][k], np.float64) for k in names}
    v = {k: np.zeros_like(grads_seq[0][k], np.float64) for k in names}
    log_lr = {k: float(np.clip(config.init_log_lr + log_lr0, config.min_log_lr, config.max_log_lr)) for k in names}
    updates, log_lrs = [], []
    for t, grads in enumerate(grads_seq, start=1):
        c1, cv = 1 / (1 - b1 ** t), 1 / (1 - bv ** t)
        step_updates = {}
        for k in names:
            g = np.asarray(grads[k], np.float64)
            m_old = m[k]
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = bv * v[k] + (1 - bv) * g * g
            inv = 1 / (np.sqrt(v[k] * cv) + eps)
            step_updates[k] = -config.learning_rate * math.exp(log_lr[k]) * m[k] * c1 * inv
            u = m_old * inv
            gg, uu = float(np.sum(g * g)), float(np.sum(u * u))
            cos = float(np.sum(g * u)) / math.sqrt(gg * uu) if gg * uu > 0 else 0.0
            inc = config.hypergradient_rate * math.exp(log_kappa) * cos + DRIFT_SCALE * drift
            log_lr[k] = float(np.clip(log_lr[k] + inc, config.min_log_lr, config.max_log_lr))
        updates.append(step_updates)
        log_lrs.append(dict(log_lr))
    return updates, log_lrs


def _grads_seq(steps, seed=0):
    # A drifting mean plus noise: cosines of both signs, not all at the bounds.
    out = []
    for t in range(steps):
        k1, k2 = jax.random.split(jax.random.key(seed * 1000 + t))
        out.append({"w": np.asarray(0.3 * (-1) ** (t // 3) + jax.random.normal(k1, (5, 7))),
                    "b": np.asarray(jax.random.normal(k2, (7,)))})
    return out


@pytest.mark.parametrize("direction_correction", [True, False])
@pytest.mark.parametrize("hd_values", [(0.0, 0.0, 0.0), (math.log(2.0), 1.5, 0.3)])
def test_matches_numpy_reference(hd_values, direction_correction):
    log_kappa, drift, log_lr0 = hd_values
    config = dataclasses.replace(HD, direction_correction=direction_correction,
                                 use_param_feature=direction_correction)
    theta = init_theta(jax.random.key(0), config)
    theta["hd"] = {"log_kappa": jnp.float32(log_kappa), "drift": jnp.float32(drift), "log_lr0": jnp.float32(log_lr0)}
    tx = mnemosyne(theta, config)
    params = {"w": jnp.zeros((5, 7)), "b": jnp.zeros(7)}
    state = tx.init(params)
    # The slow momentum only feeds the direction correction: without it the state is Adam's.
    assert sorted(state.moments) == (["m1", "m2", "v"] if direction_correction else ["m1", "v"])
    seq = _grads_seq(12)
    ref_updates, ref_log_lrs = _reference(config, seq, log_kappa, drift, log_lr0)
    update = jax.jit(tx.update)
    for grads, ref_u, ref_ll in zip(seq, ref_updates, ref_log_lrs):
        u, state = update({k: jnp.asarray(x, jnp.float32) for k, x in grads.items()}, state, params)
        for k in ("w", "b"):
            np.testing.assert_allclose(np.asarray(u[k]), ref_u[k], rtol=2e-4, atol=1e-9)
        # Leaves are flattened in sorted key order: "b", "w".
        np.testing.assert_allclose(np.asarray(state.memory.log_lr), [ref_ll["b"], ref_ll["w"]], atol=2e-5)


def test_step_size_grows_downhill_and_shrinks_when_oscillating():
    config = dataclasses.replace(HD, init_log_lr=0.0)

    def log_lr_after(grad_of_step, steps=30):
        tx = mnemosyne(init_theta(jax.random.key(0), config), config)
        params = {"x": jnp.zeros(4)}
        state, update, trace = tx.init(params), jax.jit(tx.update), []
        for t in range(steps):
            _, state = update({"x": grad_of_step(t)}, state, params)
            trace.append(float(state.memory.log_lr[0]))
        return trace

    # Every gradient agrees with the last direction (a long slope): the step size
    # climbs, by the full rate per step, to its upper bound.
    up = log_lr_after(lambda t: jnp.full(4, 1.0))
    assert up[1] == pytest.approx(config.hypergradient_rate, rel=1e-5)
    assert up[-1] == pytest.approx(config.max_log_lr)
    # The sign flips every step (overshooting a valley): it falls to the lower bound.
    down = log_lr_after(lambda t: jnp.full(4, (-1.0) ** t))
    assert down[2] < down[1] < 0.0
    assert down[-1] == pytest.approx(config.min_log_lr)
    # On a quadratic with far too large a step the run stays finite and the step shrinks.
    tx = mnemosyne(init_theta(jax.random.key(0), dataclasses.replace(config, learning_rate=1.0)),
                   dataclasses.replace(config, learning_rate=1.0))
    params = {"x": jnp.zeros(4)}
    state = tx.init(params)
    for _ in range(60):
        g = jax.grad(lambda p: jnp.sum((p["x"] - 0.01) ** 2))(params)
        u, state = jax.jit(tx.update)(g, state, params)
        params = optax.apply_updates(params, u)
    assert float(state.memory.log_lr[0]) < 0.0
    assert np.all(np.isfinite(np.asarray(params["x"])))


def test_off_by_default_and_theta_layout():
    plain = MnemosyneConfig()
    assert "hd" not in init_theta(jax.random.key(0), plain)
    theta = init_theta(jax.random.key(0), HD)
    assert sorted(theta["hd"]) == ["drift", "log_kappa", "log_lr0"]
    assert all(float(x) == 0.0 for x in theta["hd"].values())  # learned corrections start at zero
    tx = mnemosyne(init_theta(jax.random.key(0), plain), plain)
    params = {"w": jnp.ones((3, 4))}
    state = tx.init(params)
    for i in range(3):
        state = tx.update({"w": jnp.full((3, 4), (-1.0) ** i)}, state, params)[1]
    np.testing.assert_array_equal(np.asarray(state.memory.log_lr), [0.0])


def test_first_step_is_adam_at_the_initial_step_size():
    tx = mnemosyne(init_theta(jax.random.key(0), HD), HD)
    params = {"w": jnp.ones((3, 4))}
    u, _ = tx.update({"w": jnp.full((3, 4), 2.0)}, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), -HD.learning_rate * math.exp(HD.init_log_lr), rtol=1e-5)


def test_non_finite_gradient_leaves_the_step_size_alone():
    tx = mnemosyne(init_theta(jax.random.key(0), HD), HD)
    params = {"w": jnp.ones((3, 4))}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update({"w": jnp.ones((3, 4))}, state, params)
    bad = jnp.ones((3, 4)).at[1, 2].set(jnp.nan)
    u, after = tx.update({"w": bad}, state, params)
    np.testing.assert_array_equal(np.asarray(after.memory.log_lr), np.asarray(state.memory.log_lr))
    assert float(jnp.max(jnp.abs(u["w"]))) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "coordinate", "hypergradient": True}, "tensor"),
    ({"hypergradient": True, "hypergradient_rate": -0.1}, "hypergradient_rate"),
    ({"hypergradient": True, "init_log_lr": 5.0}, "init_log_lr"),
    ({"hypergradient": True, "hypergradient_down": -1.0}, "hypergradient_down"),
    ({"max_log_gain": -1.0}, "max_log_gain"),
    ({"hypergradient": True, "min_log_lr": float("nan")}, "min_log_lr"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MnemosyneConfig(**kwargs)


def test_config_without_the_new_fields_still_loads():
    # Checkpoints written before hypergradient existed have no such keys.
    d = MnemosyneConfig().to_dict()
    for key in ("hypergradient", "hypergradient_rate", "hypergradient_down", "init_log_lr", "min_log_lr",
                "max_log_lr", "max_log_gain"):
        d.pop(key)
    assert MnemosyneConfig.from_dict(d) == MnemosyneConfig()


def test_updates_do_not_depend_on_the_gradient_scale():
    # Adam's direction is scale-free, and with hypergradient=True so are all the
    # HPE/CAM token features: a rule meta-trained on small networks cannot read a
    # wide network's smaller gradients as a cue. Checked with a θ whose learned
    # parts are all active (perturbed), over several steps.
    config = dataclasses.replace(HD, use_param_feature=False)
    theta = init_theta(jax.random.key(0), config)
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    theta = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    tx = mnemosyne(theta, config)
    params = {"w": jnp.zeros((6, 9)), "b": jnp.zeros(9)}
    update = jax.jit(tx.update)
    s1 = s2 = tx.init(params)
    for t in range(6):
        g = {"w": jax.random.normal(jax.random.key(10 + t), (6, 9)), "b": jax.random.normal(jax.random.key(20 + t), (9,))}
        u1, s1 = update(g, s1, params)
        u2, s2 = update(jax.tree.map(lambda x: 1e-3 * x, g), s2, params)
        for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=1e-7)
    assert float(jnp.max(jnp.abs(s1.memory.log_lr))) > 0  # the step sizes really moved


def test_backing_off_faster_than_speeding_up():
    config = dataclasses.replace(HD, init_log_lr=0.0, hypergradient_down=3.0)
    tx = mnemosyne(init_theta(jax.random.key(0), config), config)
    params = {"x": jnp.zeros(4)}
    state, update, trace = tx.init(params), jax.jit(tx.update), []
    for g in (1.0, 1.0, -1.0):  # agree, then disagree
        _, state = update({"x": jnp.full(4, g)}, state, params)
        trace.append(float(state.memory.log_lr[0]))
    rate = config.hypergradient_rate
    assert trace[0] == 0.0 and trace[1] == pytest.approx(rate, rel=1e-5)
    # cos(g₃, m₂) = -1: the step size falls by 3κ₀.
    assert trace[2] == pytest.approx(rate - 3.0 * rate, rel=1e-4)


@pytest.mark.parametrize("bound", [0.0, 1.0])
def test_learned_gain_bound(bound):
    config = dataclasses.replace(HD, init_log_lr=0.0, max_log_gain=bound)
    theta = init_theta(jax.random.key(0), config)
    theta["head"]["b_s"] = jnp.float32(3.0)  # a learned log gain of 3
    tx = mnemosyne(theta, config)
    params = {"w": jnp.zeros((3, 4))}
    u, _ = tx.update({"w": jnp.ones((3, 4))}, tx.init(params), params)
    expected = 3.0 if bound == 0 else bound * math.tanh(3.0 / bound)
    np.testing.assert_allclose(np.asarray(u["w"]), -config.learning_rate * math.exp(expected), rtol=1e-5)


def test_without_direction_correction_theta_only_scales_adams_direction():
    config = dataclasses.replace(HD, direction_correction=False, use_param_feature=False, max_log_gain=0.7)
    theta = init_theta(jax.random.key(0), config)
    assert sorted(theta["head"]) == ["b_s", "w_s"]
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.key(3), len(leaves))
    theta = jax.tree.unflatten(treedef, [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    tx, ref = mnemosyne(theta, config), optax.adam(1.0)
    params = {"w": jnp.zeros((16, 8))}
    state, ref_state = tx.init(params), ref.init(params)
    for t in range(5):
        g = {"w": jax.random.normal(jax.random.key(30 + t), (16, 8))}
        step_size = config.learning_rate * math.exp(float(state.memory.log_lr[0]))
        u, state = tx.update(g, state)  # no params needed
        r, ref_state = ref.update(g, ref_state)
        # Same direction as Adam(1) everywhere, one step size per chunk (2 meta-tokens), each the
        # tensor's hypergradient step size times a learned gain within [e^-0.7, e^0.7].
        gain = np.asarray(u["w"] / r["w"]).reshape(-1) / step_size
        assert 1 <= np.unique(np.round(gain, 4)).size <= config.num_meta_tokens
        assert np.all(gain >= math.exp(-0.7) * (1 - 1e-4)) and np.all(gain <= math.exp(0.7) * (1 + 1e-4))
