"""The Mnemosyne optax transformation: Adam-like init, θ hot-swap, validation, variants."""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnemosyne_core.mnemosyne import (
    MnemosyneConfig,
    MnemosyneState,
    feature_directions,
    init_theta,
    mnemosyne,
    scale_by_mnemosyne,
    validate_theta,
)
from mnemosyne_core.tasks import TaskSpec, make_task

TINY = {"num_features": 4, "width": 4, "value_width": 2, "tokens_per_chunk": 4, "hpe_hidden": 8}


def _train(task, tx, steps: int, key) -> np.ndarray:
    init_key, data_key = jax.random.split(key)
    params = task.init(init_key)
    batch_keys = jax.random.split(data_key, steps)

    def step(carry, batch_key):
        p, s = carry
        loss, g = jax.value_and_grad(task.loss)(p, task.sample_batch(batch_key))
        u, s = tx.update(g, s, p, loss=loss)
        return (optax.apply_updates(p, u), s), loss

    _, losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), batch_keys))(params)
    return np.asarray(losses)


def test_fresh_tensor_theta_trains_digits_like_adam():
    task = make_task(TaskSpec("digits_mlp", {"hidden": [64], "activation": "relu", "batch_size": 128}))
    config = MnemosyneConfig()
    key = jax.random.key(0)
    mn = _train(task, mnemosyne(init_theta(jax.random.key(1), config), config), 300, key)
    adam = _train(task, optax.adam(1e-3), 300, key)
    final_mn, final_adam = mn[-20:].mean(), adam[-20:].mean()
    assert np.all(np.isfinite(mn))
    assert final_mn < 0.2 * mn[:5].mean()  # it really trains
    assert final_mn < 1.5 * final_adam and final_adam < 1.5 * final_mn


def test_fresh_theta_matches_adam_update_for_update():
    # Zero-initialised corrections: the first steps equal optax.adam's exactly (up to float).
    config = MnemosyneConfig(learning_rate=3e-3)
    tx, ref = mnemosyne(init_theta(jax.random.key(0), config), config), optax.adam(3e-3)
    params = {"w": jax.random.normal(jax.random.key(1), (5, 6)), "s": jnp.asarray(0.3)}
    s1, s2 = tx.init(params), ref.init(params)
    for i in range(4):
        g = jax.tree.map(lambda p, i=i: jax.random.normal(jax.random.key(10 + i), p.shape), params)
        u1, s1 = tx.update(g, s1, params)
        u2, s2 = ref.update(g, s2, params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-9), u1, u2)


def _perturb(theta, scale, seed):
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("variant", ["tensor", "coordinate"])
def test_theta_swap_uses_new_theta_without_recompiling(variant):
    config = MnemosyneConfig(variant=variant, **TINY)
    theta_a = init_theta(jax.random.key(0), config)
    theta_b = _perturb(theta_a, 0.5, 1)
    tx = mnemosyne(theta_a, config)
    params = {"w": jax.random.normal(jax.random.key(2), (6, 5)), "b": jnp.zeros(5)}
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(1)  # runs once per trace, not per call
        return tx.update(g, s, p)

    state_a = tx.init(params)
    state_b = state_a._replace(theta=theta_b)
    ua, _ = step(grads, state_a, params)
    ua2, _ = step(grads, state_a, params)
    ub, new_b = step(grads, state_b, params)
    assert len(traces) == 1
    # Same θ → same update; the swapped θ is really used (a different update),
    # and it matches a transformation built directly from θ_b.
    jax.tree.map(np.testing.assert_array_equal, ua, ua2)
    assert any(float(jnp.max(jnp.abs(x - y))) > 1e-7 for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)))
    direct, _ = jax.jit(mnemosyne(theta_b, config).update)(grads, mnemosyne(theta_b, config).init(params), params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9), ub, direct)
    jax.tree.map(np.testing.assert_array_equal, new_b.theta, theta_b)


def test_state_contains_theta_and_three_floats_per_parameter():
    config = MnemosyneConfig()
    theta = init_theta(jax.random.key(0), config)
    params = {"w": jnp.ones((64, 32)), "b": jnp.ones(32)}
    state = mnemosyne(theta, config).init(params)
    assert isinstance(state, MnemosyneState)
    jax.tree.map(np.testing.assert_array_equal, state.theta, theta)
    n = sum(x.size for x in jax.tree.leaves(params))
    per_param = sum(x.size for x in jax.tree.leaves(state.moments))
    assert per_param == 3 * n
    sublinear = sum(x.size for x in jax.tree.leaves(state.memory))
    big = {"w": jnp.ones((640, 32)), "b": jnp.ones(32)}
    assert sum(x.size for x in jax.tree.leaves(mnemosyne(theta, config).init(big).memory)) == sublinear


def test_feature_directions_are_fixed_by_seed_and_not_in_theta():
    config = MnemosyneConfig()
    a, b = feature_directions(config), feature_directions(MnemosyneConfig())
    c = feature_directions(dataclasses.replace(config, feature_seed=1))
    np.testing.assert_array_equal(a["cam"], b["cam"])
    assert not np.allclose(a["cam"], c["cam"])
    for leaf in jax.tree.leaves(init_theta(jax.random.key(0), config)):
        for omega in a.values():
            assert leaf.shape != omega.shape or not np.allclose(leaf, omega)


def test_validate_theta_errors():
    config = MnemosyneConfig()
    theta = init_theta(jax.random.key(0), config)
    validate_theta(theta, config)  # fine
    bad = jax.tree.map(lambda x: x, theta)
    bad["head"]["w1"] = jnp.zeros((9, 4))
    with pytest.raises(ValueError, match=r"\['head'\]\['w1'\].*expected shape \(4, 4\).*got shape \(9, 4\)"):
        validate_theta(bad, config)
    with pytest.raises(ValueError, match=r"\['head'\]\['w1'\]"):
        mnemosyne(bad, config)
    missing = {k: v for k, v in theta.items() if k != "cam"}
    with pytest.raises(ValueError, match="missing"):
        validate_theta(missing, config)
    with pytest.raises(ValueError, match="structure"):
        validate_theta(theta, MnemosyneConfig(variant="coordinate"))  # θ of another config
    with pytest.raises(ValueError, match="dtype"):
        validate_theta(jax.tree.map(lambda x: x.astype(jnp.float16), theta), config)


def test_config_round_trip_and_validation():
    config = MnemosyneConfig(variant="coordinate", learning_rate=3e-4, num_features=8, use_loss_feature=True)
    d = json.loads(json.dumps(config.to_dict()))
    assert MnemosyneConfig.from_dict(d) == config
    assert MnemosyneConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="unknown"):
        MnemosyneConfig.from_dict({**d, "bogus": 1})
    for bad in ({"variant": "lstm"}, {"num_features": 5}, {"width": 0}, {"beta1": 1.0},
                {"learning_rate": -1.0}, {"eps": 0.0}, {"num_meta_tokens": True}, {"width": 2.5}):
        with pytest.raises(ValueError):
            MnemosyneConfig(**bad)


def test_missing_required_inputs_raise():
    config = MnemosyneConfig(**TINY)
    tx = mnemosyne(init_theta(jax.random.key(0), config), config)
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, tx.init(params))
    loss_config = MnemosyneConfig(use_loss_feature=True, **TINY)
    tx = mnemosyne(init_theta(jax.random.key(0), loss_config), loss_config)
    with pytest.raises(ValueError, match="loss"):
        tx.update(params, tx.init(params), params)
    updates, _ = tx.update(params, tx.init(params), params, loss=jnp.asarray(2.0), unknown_kwarg=1)
    assert bool(jnp.all(jnp.isfinite(updates["w"])))


@pytest.mark.parametrize("variant", ["tensor", "coordinate"])
def test_non_finite_gradient_skips_step(variant):
    config = MnemosyneConfig(variant=variant, **TINY)
    tx = mnemosyne(_perturb(init_theta(jax.random.key(0), config), 0.3, 5), config)
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
    update = jax.jit(tx.update)
    _, state = update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        grads = {"w": jnp.ones((4, 3)).at[1, 2].set(bad), "b": jnp.ones(3)}
        updates, new_state = update(grads, state, params)
        jax.tree.map(lambda u: np.testing.assert_array_equal(u, jnp.zeros_like(u)), updates)
        jax.tree.map(np.testing.assert_array_equal, new_state._replace(skipped=0), state._replace(skipped=0))
        assert int(new_state.skipped) == int(state.skipped) + 1
    # And the next finite step proceeds normally.
    updates, after = update(jax.tree.map(jnp.ones_like, params), new_state, params)
    assert int(after.count) == 2 and all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("variant", ["tensor", "coordinate"])
def test_bfloat16_and_wrappers(variant):
    config = MnemosyneConfig(variant=variant, **TINY)
    theta = init_theta(jax.random.key(0), config)
    params = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    for tx in (mnemosyne(theta, config),
               optax.chain(optax.clip_by_global_norm(1.0), mnemosyne(theta, config)),
               optax.MultiSteps(mnemosyne(theta, config), every_k_schedule=2),
               optax.chain(scale_by_mnemosyne(theta, config), optax.scale_by_learning_rate(1e-2))):
        state = tx.init(params)
        for _ in range(2):
            updates, state = jax.jit(tx.update)(grads, state, params)
        for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
            assert u.dtype == p.dtype
            assert bool(jnp.all(u < 0))  # positive gradient → negative step


def test_scale_by_mnemosyne_is_the_direction():
    config = MnemosyneConfig(**TINY)
    theta = _perturb(init_theta(jax.random.key(0), config), 0.3, 7)
    params = {"w": jax.random.normal(jax.random.key(1), (3, 5))}
    grads = {"w": jax.random.normal(jax.random.key(2), (3, 5))}
    full, _ = mnemosyne(theta, config).update(grads, mnemosyne(theta, config).init(params), params)
    direction, _ = scale_by_mnemosyne(theta, config).update(grads, scale_by_mnemosyne(theta, config).init(params),
                                                             params)
    np.testing.assert_allclose(full["w"], -config.learning_rate * direction["w"], rtol=1e-6)


def test_coordinate_variant_decreases_a_quadratic():
    config = MnemosyneConfig(variant="coordinate", learning_rate=0.05)
    tx = mnemosyne(_perturb(init_theta(jax.random.key(0), config), 0.1, 3), config)
    scales = jnp.array([1.0, 3.0, 10.0, 0.3])

    def loss(p):
        return jnp.sum(scales * (p["x"] - 1.0) ** 2)

    params = {"x": jnp.zeros(4)}
    state = tx.init(params)
    update = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p))
    start = float(loss(params))
    for _ in range(150):
        updates, state = update(params, state)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.05 * start
    # Its state really is per coordinate: r·(e+2) floats of CAM memory per parameter.
    r, e = config.coord_num_features, config.coord_value_width
    assert sum(x.size for x in jax.tree.leaves(state.memory)) == 4 * r * (e + 2)


def test_learned_parts_change_the_update():
    # With non-zero output weights the HPE/CAM context reaches the update: different
    # memories (histories) give different steps for the same gradient.
    config = MnemosyneConfig(**TINY)
    theta = init_theta(jax.random.key(0), config)
    theta["head"] = dict(theta["head"], w_d=jnp.full_like(theta["head"]["w_d"], 0.5),
                         w_s=jnp.full_like(theta["head"]["w_s"], 0.2))
    tx = mnemosyne(theta, config)
    params = {"w": jax.random.normal(jax.random.key(1), (8, 8))}
    g = {"w": jax.random.normal(jax.random.key(2), (8, 8))}
    update = jax.jit(tx.update)
    s0 = tx.init(params)
    _, s_hist = update({"w": -3.0 * g["w"]}, s0, params)
    u_fresh, _ = update(g, s0, params)
    ctx_changed = s_hist._replace(moments=s0.moments, count=s0.count)  # same moments, other memory
    u_mem, _ = update(g, ctx_changed, params)
    assert float(jnp.max(jnp.abs(u_fresh["w"] - u_mem["w"]))) > 1e-7


@pytest.mark.parametrize("variant", ["tensor", "coordinate"])
def test_scalars_empty_and_odd_shapes(variant):
    config = MnemosyneConfig(variant=variant, **TINY)
    tx = mnemosyne(init_theta(jax.random.key(0), config), config)
    params = {"empty": jnp.zeros((0, 3)), "scalar": jnp.asarray(2.0), "odd": jnp.ones((7,)),
              "conv": jnp.ones((3, 3, 2, 5))}
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
        assert u.shape == p.shape and bool(jnp.all(jnp.isfinite(u)))
        np.testing.assert_allclose(u, jnp.full(p.shape, -config.learning_rate), rtol=1e-4)  # Adam's first step
    assert int(state.count) == 1


def test_states_pickled_before_the_head_split_still_load():
    """``TensorMemory`` moved from ``head`` to ``tensor_context``; the meta-trainer's
    ``evaluator_state.pkl`` (persistent inner states) written before records it as
    ``mnemosyne_core.head.TensorMemory``, and a ``--resume`` must still read it."""
    import pickle

    from mnemosyne_core.tensor_context import TensorMemory, init_tensor_memory

    memory = jax.device_get(init_tensor_memory(2, 2, 4, num_features=4, value_width=2, log_lr=-0.5))
    new = pickle.dumps(memory, protocol=2)  # protocol 2 names the class as text: "module\nname\n"
    old = new.replace(b"mnemosyne_core.tensor_context\nTensorMemory", b"mnemosyne_core.head\nTensorMemory")
    assert old != new
    restored = pickle.loads(old)
    assert isinstance(restored, TensorMemory)
    np.testing.assert_array_equal(restored.log_lr, memory.log_lr)
