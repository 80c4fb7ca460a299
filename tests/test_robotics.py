"""Robotics tasks, the policy training loop and `mnemosyne robotics train-policy`.

Kept small (few envs, short horizons): gymnax envs for the training checks and
exactly one brax (spring) env.
"""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

pytest.importorskip("gymnax")

from mnemosyne_core.tasks import TASKS, make_task
from mnemosyne_core.tasks.robotics import FAMILIES, LOSS_FLOOR
from mnemosyne_core.tasks.robotics_envs import UnknownEnvError, make_env
from mnemosyne_core.tasks.robotics_policy import Trajectory, first_episode_return, gae
from service import cli
from service.robotics.optimizers import OptimizerSpecError, resolve_optimizer
from service.robotics.train import train_policy

SMALL = {"num_envs": 8, "horizon": 64, "eval_envs": 4}

# env -> (task kwargs, Adam learning rate, updates); each shows clear progress in this budget.
GYMNAX_RUNS = {
    "gymnax_cartpole": (SMALL, 3e-3, 80),
    "gymnax_acrobot": (SMALL, 3e-3, 80),
    "gymnax_pendulum": ({"num_envs": 8, "eval_envs": 4, "horizon": 16, "bootstrap": False}, 3e-3, 100),
}


def _best_gain(result) -> float:
    returns = [p.episode_return for p in result.history]
    assert all(math.isfinite(r) for r in returns), returns
    return max(returns[1:]) - returns[0]


# --- the pieces ---------------------------------------------------------------------------

def test_all_robotics_tasks_registered():
    make_task({"name": "gymnax_cartpole", "kwargs": {"num_envs": 2, "horizon": 4}})  # loads module
    for name in ("gymnax_pendulum", "gymnax_cartpole", "gymnax_acrobot", "brax_inverted_pendulum",
                 "brax_reacher"):
        assert name in TASKS


def test_gae_bootstraps_only_on_truncation():
    ones = jnp.ones((3, 1))
    value, final_value = jnp.zeros((3, 1)), jnp.full((3, 1), 5.0)
    at_1 = jnp.array([[False], [True], [False]])
    no = jnp.zeros((3, 1), bool)
    # gamma = 0.5, lambda = 1; step 1 ends the episode, step 2 is the window end (bootstrapped).
    adv_term, _ = gae(ones, at_1, no, value, final_value, 0.5, 1.0)
    adv_trunc, target = gae(ones, no, at_1, value, final_value, 0.5, 1.0)
    np.testing.assert_allclose(adv_term[:, 0], [3.5 + 0.5 * 1.0, 1.0, 3.5])
    np.testing.assert_allclose(adv_trunc[:, 0], [3.5 + 0.5 * 3.5, 3.5, 3.5])
    np.testing.assert_allclose(target, adv_trunc)  # value is zero


def test_first_episode_return_masks_after_done():
    zeros = jnp.zeros((4, 2))
    reward = jnp.array([[1.0, 1.0], [2.0, 2.0], [4.0, 4.0], [8.0, 8.0]])
    terminated = jnp.array([[False, False], [True, False], [False, False], [False, False]])
    truncated = jnp.array([[False, False], [False, False], [False, True], [False, False]])
    traj = Trajectory(reward, terminated, truncated, zeros, zeros, zeros[..., None], zeros[..., None])
    np.testing.assert_allclose(first_episode_return(traj), [3.0, 7.0])


def test_env_adapter_splits_time_limit_from_termination():
    env = make_env("gymnax_pendulum", max_steps=5)
    _, state = env.reset(jax.random.key(0))

    def body(state, key):
        step = env.step(key, state, jnp.zeros(1))
        return step.state, (step.terminated, step.truncated)

    _, (terminated, truncated) = jax.lax.scan(body, state, jax.random.split(jax.random.key(1), 12))
    assert not bool(terminated.any())  # pendulum never terminates
    assert np.flatnonzero(np.asarray(truncated)).tolist() == [4, 9]  # auto-reset restarts the clock


def test_task_is_deterministic_in_its_keys():
    spec = {"name": "gymnax_cartpole", "kwargs": {"num_envs": 4, "horizon": 16}}
    a, b = make_task(spec), make_task(spec)
    np.testing.assert_array_equal(a.norm.mean, b.norm.mean)  # fixed observation statistics
    params = a.init(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, params, b.init(jax.random.key(0)))
    g1 = jax.grad(a.loss)(params, a.sample_batch(jax.random.key(1)))
    g2 = jax.grad(b.loss)(params, b.sample_batch(jax.random.key(1)))
    g3 = jax.grad(a.loss)(params, a.sample_batch(jax.random.key(2)))
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    assert not np.allclose(g1["pi"][0]["w"], g3["pi"][0]["w"])


def test_loss_value_is_positive_regret_and_gradient_is_nonzero():
    task = make_task({"name": "gymnax_acrobot", "kwargs": {"num_envs": 4, "horizon": 16}})
    params = task.init(jax.random.key(0))
    loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(jax.random.key(1)))
    # A random acrobot policy never reaches the goal in 16 steps: regret = reward_scale * 1.
    np.testing.assert_allclose(float(loss), 0.1 + LOSS_FLOOR, rtol=1e-5)
    assert float(optax.global_norm(grads)) > 0


def test_family_samples_valid_specs_deterministically():
    family = FAMILIES["robotics_gymnax"]
    specs = [family.sample(jax.random.key(i)) for i in range(6)]
    assert specs == [family.sample(jax.random.key(i)) for i in range(6)]
    assert {s.name for s in specs} <= set(family.envs)
    json.loads(specs[0].to_json())


def test_unknown_env_lists_valid_ones():
    with pytest.raises(UnknownEnvError, match="valid envs: brax_inverted_pendulum"):
        make_env("Pendulum-v9")


# --- training improves the policy -------------------------------------------------------

@pytest.mark.parametrize("env", sorted(GYMNAX_RUNS))
def test_gymnax_policy_improves_with_adam(env):
    kwargs, lr, steps = GYMNAX_RUNS[env]
    task = make_task({"name": env, "kwargs": kwargs})
    result = train_policy(task, optax.adam(lr), steps=steps, seed=0, eval_every=steps // 4)
    assert not result.diverged
    # Each env's scale: cartpole +50 steps alive, acrobot reaches the goal, pendulum −200 cost.
    assert _best_gain(result) > {"gymnax_cartpole": 50, "gymnax_acrobot": 150, "gymnax_pendulum": 200}[env]


def test_train_policy_reuses_its_compiled_step_across_seeds():
    from service.robotics import train

    # A benchmark trains hundreds of seeds in one process: each call used to compile (and keep)
    # its own program. Same task and transform objects → the second seed compiles nothing.
    task = make_task({"name": "gymnax_cartpole", "kwargs": {"num_envs": 2, "horizon": 8, "eval_envs": 2}})
    tx, _ = resolve_optimizer("adam:1e-2")
    first = train_policy(task, tx, steps=4, seed=0, eval_every=2)
    compiled = (train._chunk._cache_size(), train._evaluate._cache_size())
    second = train_policy(task, tx, steps=4, seed=1, eval_every=2)
    assert (train._chunk._cache_size(), train._evaluate._cache_size()) == compiled
    # ...and still trains each seed from its own key.
    assert [p.train_loss for p in first.history[1:]] != [p.train_loss for p in second.history[1:]]
    # A plain GradientTransformation (no extra-args support) is wrapped once, not once per call.
    plain = optax.GradientTransformation(*optax.sgd(1e-2))
    train_policy(task, plain, steps=4, seed=0, eval_every=2)
    compiled = train._chunk._cache_size()
    train_policy(task, plain, steps=4, seed=1, eval_every=2)
    assert train._chunk._cache_size() == compiled


@pytest.mark.parametrize("env", ["gymnax_cartpole", "gymnax_acrobot"])
def test_gymnax_policy_improves_with_mnemosyne(env):
    from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta, mnemosyne

    # A fresh θ (Adam-like start); the shipped `default`/`robotics` θ are benchmarked separately.
    config = MnemosyneConfig()
    tx = mnemosyne(init_theta(jax.random.key(0), config), config)
    kwargs, _, steps = GYMNAX_RUNS[env]
    result = train_policy(make_task({"name": env, "kwargs": kwargs}), tx, steps=steps, seed=0,
                          eval_every=steps // 4)
    assert _best_gain(result) > {"gymnax_cartpole": 50, "gymnax_acrobot": 150}[env]


def test_shipped_robotics_optimizer_trains_a_policy():
    tx, info = resolve_optimizer("robotics")  # mnemosyne_core/pretrained/robotics.msgpack
    assert info["kind"] == "mnemosyne" and info["metadata"]["config_name"] == "robotics"
    # Initialised from default_v1 when it was still a shipped name (the file's historical lineage);
    # default_v1 is now superseded, at mnemosyne_core/pretrained/superseded/default_v1.msgpack.
    assert info["metadata"]["parent"]["source"] == "pretrained:default_v1"
    kwargs, _, steps = GYMNAX_RUNS["gymnax_acrobot"]
    result = train_policy(make_task({"name": "gymnax_acrobot", "kwargs": kwargs}), tx, steps=steps,
                          seed=0, eval_every=steps // 4)
    assert _best_gain(result) > 150  # reaches the goal, as Adam's check asks


def test_shipped_robotics_descends_from_the_superseded_default_v1():
    # `meta-train --config robotics --init-from mnemosyne_core/pretrained/superseded/default_v1.msgpack`
    # takes the architecture from the parent; configs/robotics.toml must name the same one, or its
    # fresh-θ run (the initialisation comparison) would meta-train a different optimizer.
    from mnemosyne_core.meta.config import MetaConfig, load_config
    from mnemosyne_core.meta.evaluator import learned_optimizer
    from mnemosyne_core.pretrained import (
        SUPERSEDED_DIR,
        available,
        load_optimizer,
        pretrained_theta,
    )

    theta, config, meta = pretrained_theta("robotics")
    assert "default_v1" not in available()  # superseded: reachable by path and through the lineage only
    assert meta["parent"]["source"] == "pretrained:default_v1"  # recorded when it was a shipped name
    p_theta, p_config, p_meta = load_optimizer(str(SUPERSEDED_DIR / "default_v1.msgpack"))
    assert config == p_config and p_meta["config_name"] == "default"
    assert {k: meta["parent"][k] for k in ("code_version", "generation", "seed")} == \
        {k: p_meta[k] for k in ("code_version", "generation", "seed")}
    assert jax.tree.structure(theta) == jax.tree.structure(p_theta)
    cfg = load_config("robotics")
    assert learned_optimizer(cfg).config == p_config
    assert meta["generation"] == cfg.generations and meta["seed"] == cfg.seed
    # The shipped θ was meta-trained with the committed config (estimator, meta-loss, tasks,
    # outer loop), not an earlier one; the optimizer section is stored resolved (checked above).
    # Parsed, so that a key added later with its default (e.g. outer.trainable) compares equal.
    stored = MetaConfig.from_dict(meta["config"])
    assert stored.replace(optimizer=cfg.optimizer) == cfg
    # Fine-tuning moved θ away from its parent.
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(theta), jax.tree.leaves(p_theta))) > 1e-3


@pytest.mark.slow
def test_brax_inverted_pendulum_spring_improves():
    task = make_task({"name": "brax_inverted_pendulum",
                      "kwargs": {"num_envs": 8, "eval_envs": 4, "hidden": [16, 16]}})
    result = train_policy(task, optax.adam(3e-3), steps=40, seed=0, eval_every=20)
    assert _best_gain(result) > 10  # reward 1 per step the pole stays up


# --- optimizer specs and the CLI ---------------------------------------------------------

def test_optimizer_specs():
    _, info = resolve_optimizer("adam:1e-3")
    assert info == {"spec": "adam:1e-3", "kind": "adam", "learning_rate": 1e-3}
    for bad, match in [("adam:fast", "bad learning rate"), ("adam:-1", "must be > 0"),
                       ("nadam", "unknown optimizer"), ("/no/such/ckpt.msgpack", "does not exist"),
                       ("runs/no-such-run", "does not exist"),
                       # A TLS registry URI goes to the registry client (nothing listens on port 1),
                       # not to the file system.
                       ("grpcs://127.0.0.1:1/robotics", "cannot load optimizer .*UNAVAILABLE")]:
        with pytest.raises(OptimizerSpecError, match=match):
            resolve_optimizer(bad)
    # Every optimizer the package ships is a valid spec (the LSTM baseline was meta-trained with the
    # `default` config), and so is a superseded one's path (robotics' parent default_v1).
    from mnemosyne_core.pretrained import SUPERSEDED_DIR, available

    assert {resolve_optimizer(name)[1]["metadata"]["config_name"] for name in available()} == {"default", "robotics"}
    for path in sorted(SUPERSEDED_DIR.glob("*.msgpack")):
        assert resolve_optimizer(str(path))[1]["kind"] == "mnemosyne", path


def test_shipped_name_is_not_hidden_by_a_directory(tmp_path, monkeypatch):
    # e.g. a run folder called "robotics" in the working directory
    monkeypatch.chdir(tmp_path)
    (tmp_path / "robotics").mkdir()
    _, info = resolve_optimizer("robotics")
    assert info["metadata"]["source"] == "pretrained:robotics"


def _run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_bad_env_is_one_line_error(tmp_path, capsys):
    code, _, err = _run_cli(["robotics", "train-policy", "--env", "Walker-v0", "--out", str(tmp_path)],
                            capsys)
    assert code == 2
    assert err.count("\n") == 1 and "valid envs:" in err and "gymnax_cartpole" in err


def test_cli_unloadable_optimizer_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "broken.msgpack"
    bad.write_bytes(b"not a checkpoint")
    code, _, err = _run_cli(["robotics", "train-policy", "--env", "gymnax_cartpole", "--optimizer",
                             str(bad), "--out", str(tmp_path / "run")], capsys)
    assert code == 3
    assert err.count("\n") == 1 and "broken.msgpack" in err
    assert not (tmp_path / "run").exists()


def test_cli_train_policy_with_checkpoint_writes_summary_plot_and_policy(tmp_path, capsys):
    from mnemosyne_core import checkpoint
    from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta

    config = MnemosyneConfig(learning_rate=3e-3)
    ckpt = tmp_path / "fresh.msgpack"
    checkpoint.save(ckpt, init_theta(jax.random.key(0), config), config, metadata={"note": "fresh"})
    out = tmp_path / "run"
    code, stdout, _ = _run_cli(
        ["robotics", "train-policy", "--env", "CartPole-v1", "--optimizer", str(ckpt), "--steps", "6",
         "--seed", "1", "--eval-every", "3", "--no-progress", "--out", str(out),
         "--task-kwargs", json.dumps({"num_envs": 4, "horizon": 16, "eval_envs": 2})], capsys)
    assert code == 0, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"] == "gymnax_cartpole" and summary["optimizer"]["kind"] == "mnemosyne"
    assert summary["optimizer"]["metadata"]["note"] == "fresh"
    assert summary["env_steps"] == 6 * 4 * 16
    assert [p["env_steps"] for p in summary["returns"]] == [0, 192, 384]
    assert summary["final_return"] == summary["returns"][-1]["return"] > 0
    assert (out / "returns.png").read_bytes()[:4] == b"\x89PNG"

    from service.robotics.report import load_policy

    task = make_task({"name": "gymnax_cartpole", "kwargs": {"num_envs": 4, "horizon": 16, "eval_envs": 2}})
    restored = load_policy(out / "policy", task.init(jax.random.key(0)))
    assert float(task.evaluate(restored)["return"]) == pytest.approx(summary["final_return"])


# --- meta-fine-tuning a published optimizer on robotics tasks (`meta-train --init-from`) ----

_TINY_ROBOTICS = """\
generations = 2
checkpoint_every = 1
publish_every = 1
[estimator]
num_pairs = 2
truncation = 4
meta_loss = "heldout"
[tasks]
specs = [{ name = "gymnax_cartpole", kwargs = { hidden = [8, 8], num_envs = 2, horizon = 8, eval_envs = 2, eval_steps = 40 } }]
min_unroll = 4
max_unroll = 8
"""


def test_cli_meta_fine_tunes_a_registry_optimizer_on_robotics_and_publishes(tmp_path, capsys):
    pytest.importorskip("grpc")
    from mnemosyne_core import checkpoint
    from mnemosyne_core.pretrained import SUPERSEDED_DIR
    from mnemosyne_registry import RegistryClient
    from service.demo import start_registry, stop

    cfg_path = tmp_path / "tiny_robotics.toml"
    cfg_path.write_text(_TINY_ROBOTICS)
    parent_theta, parent_config, _ = checkpoint.load(SUPERSEDED_DIR / "default_v1.msgpack")
    proc, uri = start_registry(tmp_path / "registry", tmp_path / "registry.log")
    try:
        client = RegistryClient(uri.removeprefix("grpc://"))
        client.publish(SUPERSEDED_DIR / "default_v1.msgpack", "parent")  # a published optimizer
        out = tmp_path / "run"
        code, _, err = _run_cli(["meta-train", "--config", str(cfg_path), "--out", str(out), "--no-progress",
                                "--init-from", f"{uri}/parent", "--publish", f"{uri}/robotics-ft"], capsys)
        assert code == 0, err
        theta, config, meta = checkpoint.load(out / "optimizer.msgpack")
        # The architecture and the starting θ came from the registry version, not the config file.
        assert config == parent_config and meta["parent"]["source"] == f"{uri}/parent"
        assert jax.tree.structure(theta) == jax.tree.structure(parent_theta)
        moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                    zip(jax.tree.leaves(theta), jax.tree.leaves(parent_theta)))
        assert 0 < moved < 1.0  # two small outer steps from the parent, not a fresh θ
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(math.isfinite(r["meta_loss"]) and r["pairs_used"] == 2 for r in rows)
        published = client.get_version("robotics-ft")
        assert published.number == 2 and published.metadata.tags["parent_source"] == f"{uri}/parent"
        client.close()
    finally:
        stop(proc)


def test_cli_meta_train_bad_init_from_is_one_line_error(tmp_path, capsys):
    cfg_path = tmp_path / "tiny_robotics.toml"
    cfg_path.write_text(_TINY_ROBOTICS)
    for spec, match in [(str(tmp_path / "missing.msgpack"), "missing.msgpack"),
                        ("no_such_optimizer", "no_such_optimizer")]:
        code, _, err = _run_cli(["meta-train", "--config", str(cfg_path), "--out", str(tmp_path / "run"),
                                 "--init-from", spec], capsys)
        assert code == 2 and err.count("\n") == 1 and "--init-from" in err and match in err
        assert not (tmp_path / "run" / "optimizer.msgpack").exists()
