"""The evaluation harness and the shipped optimizers."""
from __future__ import annotations

import json
import math

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


def test_fresh_column_is_the_same_run_with_a_fresh_theta(quick_results):
    # The learned θ here *is* a fresh θ (key 0): its [fresh] column must match it seed for seed.
    [task] = quick_results["tasks"].values()
    for h in ("1", "2"):
        seeds = task["horizons"][h]["final_train_loss_seeds"]
        assert seeds["fresh"] == pytest.approx(seeds["fresh[fresh]"], rel=1e-6)
        assert seeds["fresh+cos"] == pytest.approx(seeds["fresh[fresh]+cos"], rel=1e-6)
    assert quick_results["config"]["learned"]["fresh"] == ["fresh", "fresh[fresh]", "fresh[-memory]", "fresh+cos",
                                                           "fresh[fresh]+cos"]


def _manual_final(task, make_tx, steps: int, seed: int, **extra) -> float:
    """Mean training loss over the last 10 % of ``steps`` of one run, written out independently."""
    key = jax.random.key(seed)
    params = task.init(jax.random.fold_in(key, 0))
    tx = make_tx()
    state = tx.init(params)
    data = jax.random.fold_in(key, 1)

    @jax.jit
    def step(params, state, t):
        loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(jax.random.fold_in(data, t)))
        updates, state = tx.update(grads, state, params, loss=loss, **extra)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for t in range(steps):
        params, state, loss = step(params, state, t)
        losses.append(float(loss))
    window = max(1, steps // 10)
    return float(np.mean(losses[-window:]))


def test_cosine_adam_is_told_its_own_horizon(quick_results):
    [task_res] = quick_results["tasks"].values()
    task = mn.make_task(evaluation.suite_specs("quick")[0])
    for h, steps in (("1", 20), ("2", 40)):
        got = task_res["horizons"][h]["final_train_loss_seeds"]["adam_cos(1.0e-02)"]
        want = [_manual_final(task, lambda s=steps: optax.adam(optax.cosine_decay_schedule(1e-2, s)), steps, seed)
                for seed in (0, 1)]
        assert got == pytest.approx(want, rel=1e-4)
    best = task_res["horizons"]["1"]["adam_cos_best"]
    cos = {n: v for n, v in task_res["horizons"]["1"]["final_train_loss"].items() if n.startswith("adam_cos(")}
    assert len(cos) == 7 and best == min(cos, key=cos.get)


@pytest.fixture(scope="module")
def progress_results():
    # A progress-schedule config whose θ decays hard at the end: told the horizon it must differ
    # from the untold run, while its fresh θ ignores the horizon.
    config = MnemosyneConfig(learning_rate=1e-2, hypergradient=True, direction_correction=False,
                             use_param_feature=False, progress_schedule=True)
    theta = init_theta(jax.random.key(0), config)
    theta["sched"] = {"knots": jnp.array([0.0, 0.0, -1.0, -3.0, -6.0])}
    learned = Learned("ours", theta, config)
    specs = evaluation.suite_specs("quick") + [mn.TaskSpec("digits_mlp", {"hidden": [16], "batch_size": 64})]
    return evaluation.run_suite(specs, [learned], steps=20, seeds=2, horizons=(1,), include=("adam",)), learned


def test_told_and_schedule_columns(progress_results):
    results, learned = progress_results
    cols = results["config"]["learned"]["ours"]
    parts = ["memory", "schedule", "initial_step", "hypergradient"]
    assert cols == ["ours", "ours[fresh]", *(f"ours[-{p}]" for p in parts if p != "schedule"),
                    "ours+T", "ours[fresh]+T", *(f"ours[-{p}]+T" for p in parts), "ours+cos", "ours[fresh]+cos"]
    task_res = next(iter(results["tasks"].values()))
    seeds = task_res["horizons"]["1"]["final_train_loss_seeds"]
    assert seeds["ours[fresh]+T"] == pytest.approx(seeds["ours[fresh]"], rel=1e-6)  # fresh θ ignores T
    assert seeds["ours+T"] != pytest.approx(seeds["ours"], rel=1e-3)
    task = mn.make_task(evaluation.suite_specs("quick")[0])
    told = _manual_final(task, learned.transform, 20, 0, total_steps=20)
    assert seeds["ours+T"][0] == pytest.approx(told, rel=1e-4)
    sched = _manual_final(task, lambda: mn.scheduled(learned.theta, learned.config,
                                                     optax.cosine_decay_schedule(1e-2, 20)), 20, 1)
    assert seeds["ours+cos"][1] == pytest.approx(sched, rel=1e-4)


def test_ablation_columns_run_the_ablated_theta(progress_results):
    # θ here is a fresh θ plus a learned schedule: without its schedule it is its fresh θ, and
    # without its (never trained, zero) memory read-outs it is itself — seed for seed.
    results, _learned = progress_results
    for task_res in results["tasks"].values():
        seeds = task_res["horizons"]["1"]["final_train_loss_seeds"]
        assert seeds["ours[-schedule]+T"] == pytest.approx(seeds["ours[fresh]+T"], rel=1e-6)
        assert seeds["ours[-memory]+T"] == pytest.approx(seeds["ours+T"], rel=1e-6)
        assert seeds["ours[-schedule]+T"] != pytest.approx(seeds["ours+T"], rel=1e-3)
    entry = next(e for e in results["summary"] if e["optimizer"] == "ours+T")
    assert set(entry["vs_ablated"]) == {"memory", "schedule", "initial_step", "hypergradient"}
    rows = [t["horizons"]["1"] for t in results["tasks"].values()]
    logs = [math.log(r["final_train_loss"]["ours+T"] / r["final_train_loss"]["ours[-schedule]+T"]) for r in rows]
    assert entry["vs_ablated"]["schedule"]["geomean"] == pytest.approx(math.exp(np.mean(logs)), rel=1e-6)
    assert entry["vs_ablated"]["schedule"]["wins"] == sum(x < 0 for x in logs)
    assert entry["vs_ablated"]["memory"]["wins"] == 0  # identical runs: never strictly lower
    assert "vs_ablated" not in next(e for e in results["summary"] if e["optimizer"] == "ours[-memory]+T")
    assert "without its schedule" in evaluation.format_table(results)
    # Untold the learned schedule does not act: no column that would repeat the trained one.
    untold = next(e for e in results["summary"] if e["optimizer"] == "ours")
    assert set(untold["vs_ablated"]) == {"memory", "initial_step", "hypergradient"}
    assert "ours[-schedule]" not in results["config"]["learned"]["ours"]


def test_summary_lines_are_computed_from_the_task_rows(progress_results):
    results, _ = progress_results
    rows = [t["horizons"]["1"] for t in results["tasks"].values()]
    entry = next(e for e in results["summary"] if e["optimizer"] == "ours+T" and e["horizon"] == 1)
    finals = [r["final_train_loss"] for r in rows]
    assert entry["tasks"] == 2
    assert entry["wins_vs_adam_best"] == sum(f["ours+T"] <= f[r["adam_best"]] for f, r in zip(finals, rows))
    assert entry["wins_vs_adam_cos_best"] == sum(f["ours+T"] <= f[r["adam_cos_best"]] for f, r in zip(finals, rows))
    assert entry["wins_vs_fresh"] == sum(f["ours+T"] < f["ours[fresh]+T"] for f in finals)
    logs = [np.log(f["ours+T"] / f[r["adam_cos_best"]]) for f, r in zip(finals, rows)]
    assert entry["vs_cos"]["geomean"] == pytest.approx(float(np.exp(np.mean(logs))), rel=1e-9)
    assert entry["vs_cos"]["se_tasks"] == pytest.approx(float(np.std(logs, ddof=1) / np.sqrt(2)), rel=1e-9)
    fresh_logs = [np.log(f["ours+T"] / f["ours[fresh]+T"]) for f in finals]
    assert entry["vs_fresh"]["geomean"] == pytest.approx(float(np.exp(np.mean(fresh_logs))), rel=1e-9)
    lines = evaluation.format_summary(results["summary"])
    assert any(line.startswith("ours+T @ 1x:") and f"< fresh θ on {entry['wins_vs_fresh']}/2" in line
               for line in lines)


def test_cosine_schedule_matches_optax_with_a_concrete_horizon():
    ours = jax.jit(lambda c, t: evaluation.cosine_schedule(3e-3, t)(c))
    for total in (7, 400):
        ref = optax.cosine_decay_schedule(3e-3, total)
        for count in (0, 1, total // 2, total - 1, total, total + 5):
            assert float(ours(count, total)) == pytest.approx(float(ref(count)), rel=1e-5, abs=1e-12)


def _row(finals, seeds, adam_best="adam(1.0e-02)", cos_best="adam_cos(1.0e-02)"):
    return {"final_train_loss": finals, "final_train_loss_seeds": seeds, "adam_best": adam_best,
            "adam_cos_best": cos_best}


def test_summary_is_computed_from_the_per_task_values():
    # Three tasks, two seeds; the expected numbers are worked out by hand from these values.
    seeds = [
        {"L": [1.0, 3.0], "L[fresh]": [4.0, 4.0], "adam(1.0e-02)": [2.0, 2.0], "adam_cos(1.0e-02)": [1.0, 1.0],
         "adam(1.0e-03)": [5.0, 5.0]},
        {"L": [0.5, 0.5], "L[fresh]": [0.25, 0.25], "adam(1.0e-02)": [1.0, 1.0], "adam_cos(1.0e-02)": [2.0, 2.0],
         "adam(1.0e-03)": [0.5, 0.5]},
        {"L": [None, 1.0], "L[fresh]": [1.0, 1.0], "adam(1.0e-02)": [1.0, 1.0], "adam_cos(1.0e-02)": [1.0, 1.0],
         "adam(1.0e-03)": [9.0, 9.0]},
    ]
    finals = [{n: (None if None in v else float(np.mean(v))) for n, v in s.items()} for s in seeds]
    results = {"config": {"learned": {"L": ["L", "L[fresh]"]}},
               "tasks": {f"t{i}": {"horizons": {"1": _row(f, s)}} for i, (f, s) in enumerate(zip(finals, seeds))}}
    by_col = {e["optimizer"]: e for e in evaluation.summarise(results)}
    e = by_col["L"]
    assert (e["tasks"], e["horizon"]) == (3, 1)
    # L = 2.0, 0.5, diverged vs Adam-best 2, 1, 1 / cosine-best 1, 2, 1 / Adam(1e-3) 5, 0.5, 9 / fresh 4, 0.25, 1
    assert e["wins_vs_adam_best"] == 2 and e["wins_vs_adam_cos_best"] == 1 and e["wins_vs_adam_1e-3"] == 2
    assert e["wins_vs_fresh"] == 1
    assert e["vs_cos"]["geomean"] is None and e["vs_cos"]["diverged"] == 1  # a diverged task is not dropped
    fresh = by_col["L[fresh]"]
    assert "wins_vs_fresh" not in fresh
    logs = [math.log(4.0 / 1.0), math.log(0.25 / 2.0), 0.0]
    assert fresh["vs_cos"]["geomean"] == pytest.approx(math.exp(np.mean(logs)))
    assert fresh["vs_cos"]["se_tasks"] == pytest.approx(np.std(logs, ddof=1) / math.sqrt(3))
    assert fresh["wins_vs_adam_cos_best"] == 2 and fresh["wins_vs_adam_1e-3"] == 3
    # Without the diverged task: L / fresh per task 0.5, 2; per seed 0.25, 0.75, 2, 2.
    del results["tasks"]["t2"]
    e = {x["optimizer"]: x for x in evaluation.summarise(results)}["L"]
    assert e["vs_fresh"]["geomean"] == pytest.approx(1.0)
    seed_logs = np.log([0.25, 0.75, 2.0, 2.0])
    assert e["vs_fresh"]["se_task_seeds"] == pytest.approx(np.std(seed_logs, ddof=1) / 2.0)
    assert e["vs_cos"]["geomean"] == pytest.approx(math.sqrt(2.0 * 0.25))
    line, clear = evaluation.format_summary([e])
    assert line.startswith("L @ 1x: ≤ Adam-best on 2/2, ≤ cosine-best on 1/2") and "< fresh θ on 1/2" in line
    # Beyond noise: t0's seeds vs Adam-best are log(1/2), log(3/2) (mean -0.144, s.e. 0.549: noise);
    # t1's are log(0.5) twice (s.e. 0: lower). vs fresh: t0 log(1/4), log(3/4): noise; t1 log 2 twice: higher.
    assert e["clear_vs_adam_best"] == {"better": 1, "worse": 0, "noise": 1}
    assert e["clear_vs_fresh"] == {"better": 0, "worse": 1, "noise": 1}
    assert e["clear_vs_adam_cos_best"] == {"better": 1, "worse": 0, "noise": 1}
    assert "vs fresh θ 0 lower, 1 higher, 1 within noise" in clear


def test_learned_modes_follow_the_config():
    assert Learned("x", None, MnemosyneConfig()).modes() == ("plain", "cos")
    assert Learned("x", None, MnemosyneConfig(progress_schedule=True)).modes() == ("plain", "told", "cos")
    assert Learned("x", None, mn.LSTMConfig()).modes() == ("plain",)
    with pytest.raises(ValueError, match="distinct"):
        evaluation.run_suite([], [Learned("adam", None, mn.LSTMConfig())], steps=20, seeds=1)


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


@pytest.mark.parametrize("name", ["default"])
def test_shipped_default_is_what_its_documented_command_produces(name):
    # `mnemosyne meta-train --config NAME --seed 0` must rebuild the shipped checkpoint's
    # architecture and budget: the committed config and the artifact cannot drift apart.
    from mnemosyne_core.meta.config import load_config
    from mnemosyne_core.meta.evaluator import learned_optimizer
    from mnemosyne_core.pretrained import pretrained_theta

    theta, config, meta = pretrained_theta(name)
    assert meta["config_name"] == name
    cfg = load_config(name)
    lo = learned_optimizer(cfg)  # what the meta-trainer builds from this config
    assert config == lo.config
    assert meta["generation"] == cfg.generations and meta["seed"] == cfg.seed
    lo_theta = lo.init_theta(jax.random.key(0))
    assert jax.tree.structure(theta) == jax.tree.structure(lo_theta)


def test_shipped_long_run_guard_never_acts_within_the_meta_training_horizon():
    # `default`'s step ceiling and hypergradient clock (the long-run guard) start where its longest
    # meta-training unroll ends: ES never saw them act, and a run of ≤ 400 steps runs exactly the
    # rule that was trained.
    from mnemosyne_core.meta.config import load_config
    from mnemosyne_core.pretrained import pretrained_theta

    _, config, _ = pretrained_theta("default")
    tasks = load_config("default").tasks
    longest = max([tasks.max_unroll] + [max(s.get("unroll", [0])) for s in tasks.spec_dicts])
    assert config.max_log_step > 0 and config.step_ceiling_decay > 0
    assert config.step_ceiling_from >= longest
    assert config.hypergradient_horizon >= longest  # nor does the hypergradient clock
