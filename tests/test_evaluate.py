"""The evaluation harness and the shipped optimizers."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnemosyne_core as mn
from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta
from service import cli, evaluation
from service.evaluation import ADAM_LRS, Learned


@pytest.fixture(scope="module")
def quick_results():
    # A fresh θ is exactly Adam(α): with α = 1e-3 it must reproduce the Adam(1e-3) row,
    # which checks that every optimizer sees the same initialisations and batches.
    config = MnemosyneConfig(learning_rate=1e-3, use_loss_feature=True)
    fresh = Learned("fresh", init_theta(jax.random.key(0), config), config)
    specs = evaluation.suite_specs("quick")
    return evaluation.run_suite(specs, [fresh], steps=20, seeds=2, horizons=(1, 2), include=("adam", "sgd"))


def test_suite_results_structure_and_adam_best(quick_results):
    [task] = quick_results["tasks"].values()
    assert set(task["horizons"]) == {"1", "2"}
    row = task["horizons"]["1"]
    finals = row["final_train_loss"]
    adam = {n: v for n, v in finals.items() if n.startswith("adam(")}
    assert len(adam) == len(ADAM_LRS) == 7
    assert row["adam_best"] == min(adam, key=adam.get)
    assert row["steps_to_adam_best"][row["adam_best"]] <= 20
    assert 0.0 <= row["test_accuracy"]["fresh"] <= 1.0
    assert task["horizons"]["2"]["steps"] == 40
    json.dumps(quick_results, allow_nan=False)


def test_fresh_theta_matches_adam_with_the_same_step_size(quick_results):
    [task] = quick_results["tasks"].values()
    for h in ("1", "2"):
        f = task["horizons"][h]["final_train_loss"]
        assert f["fresh"] == pytest.approx(f["adam(1.0e-03)"], rel=2e-3)
        assert f["fresh"] != pytest.approx(f["adam(1.0e-02)"], rel=2e-3)


def test_table_and_plots(quick_results, tmp_path):
    table = evaluation.format_table(quick_results, ["fresh"])
    assert "steps→Adam-best" in table and "fresh @ 1x" in table
    paths = evaluation.plot_curves(quick_results, tmp_path)
    assert paths and all(p.stat().st_size > 1000 for p in paths)


def test_eval_cli_errors(tmp_path, capsys):
    assert cli.main(["eval", "--optimizer", str(tmp_path / "missing.msgpack"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["eval", "--optimizer", "no_such_name", "--out", str(tmp_path)]) == 2
    assert "no pretrained optimizer 'no_such_name'" in capsys.readouterr().err
    assert cli.main(["eval", "--optimizer", "default", "--suite", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown suite" in capsys.readouterr().err


def test_pretrained_default_is_a_ready_optax_transformation():
    assert "default" in mn.pretrained.__module__ or callable(mn.pretrained)
    from mnemosyne_core.pretrained import available, pretrained_theta

    assert {"default", "lstm"} <= set(available())
    theta, _config, meta = pretrained_theta("default")
    assert meta["seed"] == 0 and meta["config_name"] == "default" and meta["generation"] > 0
    tx = mn.pretrained("default")
    # It trains: a noisy quadratic, 100 steps, no tuning.
    target = jnp.linspace(-1.0, 1.0, 16)
    params = {"w": jnp.zeros(16)}
    state = tx.init(params)
    loss_fn = lambda p: jnp.sum((p["w"] - target) ** 2)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params, loss=loss)
        return optax.apply_updates(params, updates), state

    first = float(loss_fn(params))
    for _ in range(100):
        params, state = step(params, state)
    assert float(loss_fn(params)) < 0.1 * first
    assert isinstance(mn.pretrained("lstm"), optax.GradientTransformationExtraArgs)
    with pytest.raises(KeyError, match="available"):
        mn.pretrained("no_such_optimizer")
    assert np.isfinite(jax.flatten_util.ravel_pytree(theta)[0]).all()


def test_shipped_default_is_what_its_documented_command_produces():
    # `mnemosyne meta-train --config default --seed 0` must rebuild the shipped checkpoint's
    # architecture and budget: the committed config and the artifact cannot drift apart.
    from mnemosyne_core.meta.config import load_config
    from mnemosyne_core.meta.evaluator import learned_optimizer
    from mnemosyne_core.pretrained import pretrained_theta

    theta, config, meta = pretrained_theta("default")
    cfg = load_config("default")
    lo = learned_optimizer(cfg)  # what the meta-trainer builds from this config
    assert config == lo.config
    assert meta["generation"] == cfg.generations and meta["seed"] == cfg.seed
    lo_theta = lo.init_theta(jax.random.key(0))
    assert jax.tree.structure(theta) == jax.tree.structure(lo_theta)
