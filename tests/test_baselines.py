"""The LSTM learned-optimizer baseline: preprocessing, config, θ, and that a fresh θ trains."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnemosyne_core.baselines import (
    LSTMConfig,
    init_lstm_theta,
    lstm_optimizer,
    preprocess_gradient,
    validate_lstm_theta,
)
from mnemosyne_core.tasks import TaskSpec, make_task


def test_preprocessing_matches_the_classic_definition():
    p = 10.0
    g = jnp.array([3.0, -0.5, 1e-3, -2e-5, 4e-5, -1e-6, 0.0], jnp.float32)
    mag, sgn = preprocess_gradient(g, p)
    for i, gi in enumerate(np.asarray(g, np.float64)):
        if abs(gi) >= math.exp(-p):
            assert mag[i] == pytest.approx(math.log(abs(gi)) / p, rel=1e-5)
            assert sgn[i] == np.sign(gi)
        else:
            assert mag[i] == -1.0
            assert sgn[i] == pytest.approx(math.exp(p) * gi, rel=1e-5, abs=1e-12)
    # The small-|g| branch is continuous in sign-feature magnitude at the threshold ...
    eps = math.exp(-p)
    below, above = preprocess_gradient(jnp.array([eps * 0.999, eps * 1.001]), p)[1]
    assert float(below) == pytest.approx(0.999, rel=1e-3) and float(above) == 1.0
    # ... and differentiable at 0 without NaNs (the log branch is masked before the log).
    grad = jax.grad(lambda x: sum(jnp.sum(f) for f in preprocess_gradient(x, p)))(jnp.zeros(3))
    assert bool(jnp.all(jnp.isfinite(grad)))


def test_config_round_trip_and_validation():
    config = LSTMConfig(hidden_size=8, num_layers=3, output_scale=0.05)
    assert LSTMConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown LSTMConfig fields"):
        LSTMConfig.from_dict({"hidden": 20})
    for bad in ({"hidden_size": 0}, {"num_layers": 1.5}, {"beta1": 1.0}, {"learning_rate": -1.0},
                {"eps": float("nan")}, {"output_scale": float("inf")}):
        with pytest.raises(ValueError):
            LSTMConfig(**bad)


def test_theta_shapes_and_validation():
    config = LSTMConfig()
    theta = init_lstm_theta(jax.random.key(0), config)
    assert theta["lstm_0"]["wx"].shape == (4, 80) and theta["lstm_1"]["wx"].shape == (20, 80)
    assert theta["lstm_1"]["wh"].shape == (20, 80) and theta["out"]["w"].shape == (20,)
    assert float(theta["log_lr"]) == pytest.approx(math.log(1e-3))
    validate_lstm_theta(theta, config)
    bad = jax.tree.map(lambda x: x, theta)
    bad["lstm_0"]["wx"] = jnp.zeros((5, 80))
    with pytest.raises(ValueError, match=r"lstm_0.*wx"):
        lstm_optimizer(bad, config)
    with pytest.raises(ValueError, match="missing"):
        lstm_optimizer({k: v for k, v in theta.items() if k != "skip"}, config)
    with pytest.raises(ValueError):
        lstm_optimizer(theta, LSTMConfig(hidden_size=16))
    with pytest.raises(TypeError):
        lstm_optimizer(theta, {"hidden_size": 20})


def test_state_is_the_classic_coordinatewise_memory():
    config = LSTMConfig()
    tx = lstm_optimizer(init_lstm_theta(jax.random.key(0), config), config)
    params = {"a": jnp.zeros((3, 5)), "b": jnp.zeros(7)}
    state = tx.init(params)
    assert [h.shape for h in state.hidden] == [(2, 2, 15, 20), (2, 2, 7, 20)]
    per_param = sum(x.size for x in jax.tree.leaves((state.m, state.v, state.hidden))) / 22
    assert per_param == 2 + 2 * 2 * 20


def test_fresh_theta_starts_like_adam_and_theta_matters():
    config = LSTMConfig()
    theta = init_lstm_theta(jax.random.key(0), config)
    params = {"w": jnp.zeros(6)}
    g = {"w": jnp.array([1.0, -2.0, 1e-3, -1e-4, 5.0, 0.3])}
    tx = lstm_optimizer(theta, config)
    u, _ = tx.update(g, tx.init(params), params)
    # Adam's first step is -lr·sign(g); the small LSTM read-out perturbs it by a few percent.
    np.testing.assert_allclose(u["w"], -1e-3 * jnp.sign(g["w"]), rtol=0.1)
    # Without the skip term only the LSTM acts: the read-out is a real, θ-dependent function.
    lstm_only = dict(theta, skip=jnp.zeros(()))
    tx2 = lstm_optimizer(lstm_only, config)
    u2, _ = tx2.update(g, tx2.init(params), params)
    assert bool(jnp.all(u2["w"] != 0.0)) and float(jnp.max(jnp.abs(u2["w"]))) < 1e-3
    other = dict(init_lstm_theta(jax.random.key(1), config), skip=jnp.zeros(()))
    tx3 = lstm_optimizer(other, config)
    u3, _ = tx3.update(g, tx3.init(params), params)
    assert not np.allclose(u2["w"], u3["w"])


def _train(task, tx, steps):
    params = task.init(jax.random.key(0))

    def step(carry, key):
        p, s = carry
        g = jax.grad(task.loss)(p, task.sample_batch(key))
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), jax.random.split(jax.random.key(1), steps)))(params)
    return task.evaluate(params)


@pytest.mark.parametrize("spec, steps", [(TaskSpec("digits_mlp", {"hidden": [32], "batch_size": 64}), 150),
                                         # lr 1e-3 moves ≤ 1e-3 per step: the quadratic needs more steps.
                                         (TaskSpec("quadratic", {"dim": 8, "condition": 10.0}), 1500)],
                         ids=["digits_mlp", "quadratic"])
def test_fresh_lstm_trains_like_adam(spec, steps):
    task = make_task(spec)
    config = LSTMConfig()
    initial = float(task.evaluate(task.init(jax.random.key(0)))["test_loss"])
    lstm = _train(task, lstm_optimizer(init_lstm_theta(jax.random.key(3), config), config), steps)
    adam = _train(task, optax.adam(1e-3), steps)
    assert float(lstm["test_loss"]) < 0.7 * initial
    # Same skip term as Adam plus a small learned correction: close to Adam, not far worse.
    assert float(lstm["test_loss"]) < 1.2 * float(adam["test_loss"]) + 1e-3
    if "test_accuracy" in lstm:
        assert float(lstm["test_accuracy"]) > 0.8


@pytest.mark.parametrize("module", ["baselines", "optimizers", "checkpoint", "initializers", "schedule", "step_size",
                                    "tensor_context", "head", "coordinate"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"mnemosyne_core.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
