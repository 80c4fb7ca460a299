"""The memory step size: HPE → CAM read out each tensor's log step-size change."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnemosyne_core as mn
from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta, mnemosyne
from mnemosyne_core.step_size import hypergradient_cosine, memory_log_lr

CONFIG = MnemosyneConfig(memory_step_size=True, direction_correction=False, use_param_feature=False,
                         progress_schedule=True, learning_rate=1e-2, memory_step_rate=0.1)
PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}


def _target(p):
    return jnp.sum((p["w"] - 0.5) ** 2) + jnp.sum((p["b"] + 0.3) ** 2)


def _run(theta, config=CONFIG, steps=30, **extra):
    tx = mnemosyne(theta, config)
    params, state = PARAMS, tx.init(PARAMS)

    @jax.jit
    def step(params, state):
        grads = jax.grad(_target)(params)
        updates, state = tx.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state, updates

    ups = []
    for _ in range(steps):
        params, state, upd = step(params, state)
        ups.append(upd)
    return params, state, ups


def test_fresh_theta_is_adam_with_a_constant_step():
    theta = init_theta(jax.random.key(3), CONFIG)
    _params, state, ups = _run(theta, total_steps=30)
    adam = optax.adam(1e-2)
    p, s = PARAMS, adam.init(PARAMS)
    for i in range(30):
        u, s = adam.update(jax.grad(_target)(p), s, p)
        p = optax.apply_updates(p, u)
        np.testing.assert_allclose(ups[i]["w"], u["w"], rtol=2e-5, atol=1e-9)
    np.testing.assert_array_equal(state.memory.log_lr, np.zeros(2, np.float32))


def test_the_read_out_moves_the_log_step_size_by_at_most_the_rate_per_step():
    theta = init_theta(jax.random.key(0), CONFIG)
    theta["ctrl"]["b"] = jnp.float32(0.5)  # every meta-token asks for a larger step
    _, state, _ups = _run(theta, steps=10)
    want = 10 * 0.1 * math.tanh(0.5)
    np.testing.assert_allclose(state.memory.log_lr, [want, want], rtol=1e-5)
    theta["ctrl"]["b"] = jnp.float32(50.0)
    _, state, _ = _run(theta, steps=10)
    np.testing.assert_allclose(state.memory.log_lr, [1.0, 1.0], rtol=1e-5)  # ≤ rate per step
    theta["ctrl"]["b"] = jnp.float32(-50.0)
    _, state, _ = _run(theta, config=CONFIG, steps=100)
    np.testing.assert_allclose(state.memory.log_lr, [CONFIG.min_log_lr] * 2, rtol=1e-6)  # kept in bounds


def test_the_memory_reads_the_hypergradient_cosine_and_its_output_reaches_the_step():
    theta = init_theta(jax.random.key(0), CONFIG)
    _, state, _ = _run(theta, steps=5)
    # A steady quadratic: successive Adam directions agree with the new gradients.
    assert np.all(np.asarray(state.memory.hg_cos) > 0.5)
    # A read-out weight on the features (not the bias) changes the step: the memory output matters.
    theta2 = init_theta(jax.random.key(0), CONFIG)
    theta2["ctrl"]["w"] = jnp.full_like(theta2["ctrl"]["w"], 0.3)
    _, s2, _ = _run(theta2, steps=5)
    assert not np.allclose(s2.memory.log_lr, state.memory.log_lr)


def test_initial_step_offset_and_ablation_of_the_memory():
    theta = init_theta(jax.random.key(0), CONFIG)
    theta["ctrl"]["log_lr0"] = jnp.float32(math.log(3.0))
    theta["ctrl"]["b"] = jnp.float32(1.0)
    _, _, ups = _run(theta, steps=1)
    np.testing.assert_allclose(ups[0]["b"], -3 * 1e-2 * np.sign(jax.grad(_target)(PARAMS)["b"]), rtol=1e-4)
    ablated = mn.ablate(theta, CONFIG, "memory")
    assert float(ablated["ctrl"]["b"]) == 0.0 and float(ablated["ctrl"]["log_lr0"]) == pytest.approx(math.log(3))
    _, state, _ = _run(ablated, steps=20)
    np.testing.assert_allclose(state.memory.log_lr, [math.log(3.0)] * 2, rtol=1e-6)  # a constant step
    assert float(mn.ablate(theta, CONFIG, "initial_step")["ctrl"]["log_lr0"]) == 0.0


def test_ablate_errors_and_parts():
    with pytest.raises(mn.AblationError, match="unknown part"):
        mn.ablate(init_theta(jax.random.key(0), CONFIG), CONFIG, "nope")
    plain = MnemosyneConfig()
    with pytest.raises(mn.AblationError, match="no learned 'schedule'"):
        mn.ablate(init_theta(jax.random.key(0), plain), plain, "schedule")
    assert mn.ablation_parts(plain) == ("memory",)
    assert mn.ablation_parts(mn.LSTMConfig()) == ()


def test_non_finite_gradients_leave_the_step_size_and_cosine_alone():
    theta = init_theta(jax.random.key(0), CONFIG)
    theta["ctrl"]["b"] = jnp.float32(1.0)
    tx = mnemosyne(theta, CONFIG)
    state = tx.init(PARAMS)
    grads = jax.grad(_target)(PARAMS)
    _, state = tx.update(grads, state, PARAMS)
    bad = {"w": grads["w"].at[0, 0].set(jnp.nan), "b": grads["b"]}
    updates, after = tx.update(bad, state, PARAMS)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    np.testing.assert_array_equal(after.memory.log_lr, state.memory.log_lr)
    np.testing.assert_array_equal(after.memory.hg_cos, state.memory.hg_cos)


def test_helpers():
    sums = jnp.array([[1.0, 4.0, 1.0], [-1.0, 1.0, 1.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(hypergradient_cosine(sums), [0.5, -1.0, 0.0])
    out = memory_log_lr(jnp.array([[0.0, 100.0], [-100.0, -100.0]]), jnp.array([0.0, -0.95]), rate=0.1,
                        bounds=(-1.0, 1.0))
    np.testing.assert_allclose(out, [0.05, -1.0], rtol=1e-6)


def _both(**kw):
    return dataclasses.replace(CONFIG, hypergradient=True, hypergradient_rate=0.15, learning_rate=1e-3, **kw)


def test_with_the_hypergradient_a_fresh_memory_is_the_hypergradient_rule_alone():
    both = _both()
    hyper = _both(memory_step_size=False)
    theta_b, theta_h = init_theta(jax.random.key(1), both), init_theta(jax.random.key(1), hyper)
    assert set(theta_b["ctrl"]) == {"w", "b"} and set(theta_b["hd"]) == {"log_kappa", "drift", "log_lr0"}
    for th in (theta_b, theta_h):  # trained-looking hypergradient and schedule, the same in both
        th["hd"]["log_kappa"], th["hd"]["drift"] = jnp.float32(-1.0), jnp.float32(0.2)
        th["sched"]["knots"] = jnp.linspace(0.0, -1.0, th["sched"]["knots"].shape[0])
    _, sb, ub = _run(theta_b, config=both, steps=25, total_steps=25)
    _, sh, uh = _run(theta_h, config=hyper, steps=25, total_steps=25)
    np.testing.assert_allclose(sb.memory.log_lr, sh.memory.log_lr, rtol=1e-5, atol=1e-7)
    assert 0.1 < float(jnp.max(jnp.abs(sb.memory.log_lr))) < 1.5  # the hypergradient moved it, within bounds
    for a, b in zip(ub, uh):
        np.testing.assert_allclose(a["w"], b["w"], rtol=1e-4, atol=1e-9)
    # The memory's read-out moves the step on top of the hypergradient's move, and ablating it
    # gives back the hypergradient rule with the same learned factors and schedule.
    theta_b["ctrl"]["b"] = jnp.float32(0.5)
    _, s_mem, _ = _run(theta_b, config=both, steps=25, total_steps=25)
    assert np.all(np.asarray(s_mem.memory.log_lr) > np.asarray(sh.memory.log_lr) + 0.3)
    _, s_abl, _ = _run(mn.ablate(theta_b, both, "memory"), config=both, steps=25, total_steps=25)
    np.testing.assert_allclose(s_abl.memory.log_lr, sh.memory.log_lr, rtol=1e-5, atol=1e-7)
    assert mn.ablation_parts(both) == ("memory", "schedule", "initial_step", "hypergradient")
    # The offset of the initial step is hd's (one number for one quantity).
    theta_b["hd"]["log_lr0"] = jnp.float32(math.log(2.0))
    _, s0, _ = _run(theta_b, config=both, steps=0)
    np.testing.assert_allclose(s0.memory.log_lr, [math.log(2.0)] * 2, rtol=1e-6)


def _random_memory(config, key=2):
    """A θ whose HPE, CAM and read-out are far from fresh, so every input they read matters."""
    theta = init_theta(jax.random.key(0), config)
    keys = iter(jax.random.split(jax.random.key(key), 64))
    for part in ("hpe", "cam", "ctrl", "head"):
        theta[part] = jax.tree.map(lambda x: x + 0.5 * jax.random.normal(next(keys), x.shape), theta[part])
    theta["ctrl"]["b"] = jnp.float32(0.0)  # no constant push: the read-out follows what it reads
    return theta


def test_a_dynamics_memory_reads_neither_the_progress_nor_the_step_size():
    # Told or not told the horizon, a memory that reads only the gradients' dynamics moves the
    # step size identically (a flat schedule, so only what the memory reads could differ);
    # reading "all", the progress changes its read-out.
    for inputs, same in (("dynamics", True), ("all", False)):
        config = _both(memory_inputs=inputs)
        theta = _random_memory(config)
        _, told, _ = _run(theta, config=config, steps=4, total_steps=15)
        _, untold, _ = _run(theta, config=config, steps=4)
        assert np.abs(np.asarray(told.memory.log_lr)).max() < 1.0  # inside the bounds: nothing clipped
        assert np.allclose(told.memory.log_lr, untold.memory.log_lr, rtol=1e-6, atol=1e-7) == same, inputs
    # Where the step size starts (a learned offset) moves it, but not what the memory reads out.
    for inputs, same in (("dynamics", True), ("all", False)):
        config = _both(memory_inputs=inputs)
        theta = _random_memory(config)
        runs = []
        for offset in (0.0, 1.5):
            theta["hd"]["log_lr0"] = jnp.float32(offset)
            theta["hd"]["log_kappa"] = jnp.float32(-30.0)  # the hypergradient still: only the memory moves it
            _, state, _ = _run(theta, config=config, steps=1)
            runs.append(np.asarray(state.memory.log_lr) - offset)
        assert np.allclose(runs[0], runs[1], rtol=1e-5, atol=1e-7) == same, inputs
        assert np.abs(runs[0]).max() > 1e-3  # the read-out did move it


def test_config_validation():
    with pytest.raises(ValueError, match="tensor"):
        MnemosyneConfig(variant="coordinate", memory_step_size=True)
    with pytest.raises(ValueError, match="memory_inputs must be one of"):
        MnemosyneConfig(memory_inputs="gradients")
    with pytest.raises(ValueError, match="tensor"):
        MnemosyneConfig(variant="coordinate", memory_inputs="dynamics")
    assert MnemosyneConfig.from_dict({}).memory_inputs == "all"  # checkpoints from before the field
    with pytest.raises(ValueError, match="memory_step_rate"):
        MnemosyneConfig(memory_step_size=True, memory_step_rate=-0.1)


@pytest.mark.parametrize("name", ["memory_step", "dynamics_memory"])
def test_candidate_is_what_its_documented_command_produces(name):
    # `meta-train --config NAME --seed 0` builds this architecture and budget; the trained θ
    # uses its memory (non-zero read-out), so ablating it changes θ.
    from mnemosyne_core.meta.config import load_config
    from mnemosyne_core.meta.evaluator import learned_optimizer
    from mnemosyne_core.pretrained import PRETRAINED_DIR

    theta, config, meta = mn.load(PRETRAINED_DIR / "candidates" / f"{name}.msgpack")
    cfg = load_config(name)
    assert config == learned_optimizer(cfg).config and config.memory_step_size
    assert meta["generation"] == cfg.generations and meta["seed"] == cfg.seed
    assert float(jnp.abs(theta["ctrl"]["w"]).max()) > 0.1
    ablated = mn.ablate(theta, config, "memory")
    assert float(jnp.abs(ablated["ctrl"]["w"]).max()) == 0.0
    from mnemosyne_core.pretrained import available

    assert name not in available()  # a candidate, not a shipped name
