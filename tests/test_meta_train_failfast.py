"""Meta-training fails fast and loudly (issue 32): bad configs are refused before generation 0,
a run that learns nothing stops, and an untrained or non-finite optimizer is never written.

The registry rows of the issue's table are in tests/test_publish_retry.py.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemosyne_core import checkpoint
from mnemosyne_core.meta.config import (
    ConfigError,
    MetaConfig,
    TaskConfig,
    _freeze,
    check_tasks,
    load_config,
)
from mnemosyne_core.meta.protocol import PairResult, Status
from mnemosyne_core.meta.trainer import MetaTrainer, MetaTrainingStalled, NonFiniteError
from mnemosyne_core.tasks import TASKS, register_task
from service import cli

NAN_TASK = "test_failfast_nan_task_91d2"
BROKEN_TASK = "test_failfast_broken_task_91d2"


class _NaNTask:
    """Builds and traces like a 3-d quadratic, but its loss is NaN: every pair fails at run time."""

    def __init__(self, dim: int = 3):
        self.name, self.dim = NAN_TASK, dim

    def init(self, key):
        return {"x": jax.random.normal(key, (self.dim,))}

    def sample_batch(self, key):
        return jax.random.normal(key, (self.dim,))

    def loss(self, params, batch):
        return jnp.sum(params["x"] ** 2) * jnp.nan + 0.0 * batch.sum()

    def evaluate(self, params):
        return {"test_loss": jnp.sum(params["x"] ** 2) * jnp.nan}


class _BrokenTask(_NaNTask):
    """Cannot be built (what a config can only find out when the task runs, without the check)."""

    def __init__(self, dim: int = 3):
        raise RuntimeError(f"cannot build with dim={dim}: the data is gone")


for _name, _cls in ((NAN_TASK, _NaNTask), (BROKEN_TASK, _BrokenTask)):
    if _name not in TASKS:
        register_task(_name)(_cls)

TOML = """generations = {generations}
checkpoint_every = 1
stop_after_failed_generations = 2
[optimizer.config]
learning_rate = 0.05
[estimator]
num_pairs = 2
truncation = 5
[tasks]
specs = [{specs}]
min_unroll = 5
max_unroll = 10
"""
QUAD = '{name = "quadratic", kwargs = {dim = 4}}'


def _write(tmp_path, specs=QUAD, generations=3, name="c.toml", extra=""):
    path = tmp_path / name
    path.write_text(extra + TOML.format(generations=generations, specs=specs))
    return path


def _meta_train(capsys, *argv):
    code = cli.main(["meta-train", "--no-progress", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _tiny(specs=None, **top):
    return MetaConfig.from_dict({
        "generations": 4, "checkpoint_every": 1, **top,
        "optimizer": {"config": {"learning_rate": 0.05}},
        "estimator": {"num_pairs": 2, "truncation": 5},
        "tasks": {"specs": specs or [{"name": "quadratic", "kwargs": {"dim": 4}}], "min_unroll": 5,
                  "max_unroll": 10},
    })


# --- row 1 and row 2: an unknown task, impossible kwargs -----------------------------------------------
@pytest.mark.parametrize(("spec", "expected"), [
    ('{name = "nosuch"}', ["tasks.specs[0] 'nosuch'", "unknown task 'nosuch'", "known tasks:", "quadratic",
                           "digits_mlp"]),
    ('{name = "digits_mlp", kwargs = {hidden = [-5]}}', ["tasks.specs[0] 'digits_mlp'", '"hidden": [-5]',
                                                         "hidden width must be a positive int, got -5"]),
    (f'{QUAD}, {{name = "quadratic", kwargs = {{dim = 4, bogus = 1}}}}',
     ["tasks.specs[1] 'quadratic'", "bogus"]),
])
def test_bad_task_spec_is_refused_before_generation_0(tmp_path, capsys, spec, expected):
    cfg = _write(tmp_path, specs=spec)
    out = tmp_path / "run"
    code, stdout, err = _meta_train(capsys, "--config", cfg, "--out", out)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"mnemosyne: error: {cfg}: "), err
    for text in expected:
        assert text in err, (text, err)
    assert not out.exists()  # nothing written: no folder, no metrics, no optimizer
    assert "wrote" not in stdout


def test_bad_task_spec_is_refused_even_with_publish(tmp_path, capsys):
    """Row 5: an unknown task and --publish is refused at start, before the registry is even asked."""
    cfg = _write(tmp_path, specs='{name = "nosuch"}')
    code, _, err = _meta_train(capsys, "--config", cfg, "--out", tmp_path / "run",
                               "--publish", "grpc://127.0.0.1:9/never-asked")
    assert code == 2 and err.count("\n") == 1 and "unknown task 'nosuch'" in err
    assert "Traceback" not in err and "JSON" not in err and not (tmp_path / "run").exists()


def test_check_tasks_builds_every_spec_and_family_member():
    assert check_tasks(TaskConfig(family="quadratic")) == 3  # the family's whole support
    assert check_tasks(TaskConfig(specs=(_freeze({"name": "quadratic", "kwargs": {"dim": 4}}),
                                         _freeze({"name": "quadratic", "kwargs": {"dim": 4}})))) == 1
    with pytest.raises(ConfigError, match=r"tasks.family: unknown task family 'nosuch'; known: .*quadratic"):
        check_tasks(TaskConfig(family="nosuch"))
    with pytest.raises(ConfigError, match=rf"tasks.specs\[0\] '{BROKEN_TASK}'.*RuntimeError: cannot build with dim=3"):
        check_tasks(TaskConfig(specs=(_freeze({"name": BROKEN_TASK}),)))
    # A NaN loss builds and traces: only running finds it (the stop rule below handles that).
    assert check_tasks(TaskConfig(specs=(_freeze({"name": NAN_TASK}),))) == 1


# --- row 3: field types and ranges, naming the file and the field --------------------------------------
def test_generations_string_names_file_and_field(tmp_path, capsys):
    cfg = tmp_path / "typo.toml"
    cfg.write_text('generations = "x"\n[tasks]\nspecs = [{name = "quadratic"}]\n')
    code, _, err = _meta_train(capsys, "--config", cfg, "--out", tmp_path / "run")
    assert code == 2
    assert err == f"mnemosyne: error: {cfg}: generations must be an integer ≥ 0, got 'x'\n"
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"typo.toml: generations must be an integer"):
        load_config(cfg)


@pytest.mark.parametrize(("data", "message"), [
    ({"generations": -1}, "generations must be an integer ≥ 0, got -1"),
    ({"generations": 2.5}, "generations must be an integer ≥ 0, got 2.5"),
    ({"generations": True}, "generations must be an integer ≥ 0, got True"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an integer ≥ 1, got 0"),
    ({"publish_every": "4"}, "publish_every must be an integer ≥ 0, got '4'"),
    ({"stop_after_failed_generations": 0}, "stop_after_failed_generations must be an integer ≥ 1, got 0"),
    ({"seed": "zero"}, "seed must be an integer, got 'zero'"),
    ({"estimator": {"num_pairs": 0}}, "estimator.num_pairs must be an integer ≥ 1, got 0"),
    ({"estimator": {"num_pairs": "8"}}, "estimator.num_pairs must be an integer ≥ 1, got '8'"),
    ({"estimator": {"sigma": "big"}}, "estimator.sigma must be a finite number > 0, got 'big'"),
    ({"estimator": {"sigma": -0.1}}, "estimator.sigma must be a number > 0, got -0.1"),
    ({"estimator": {"truncation": 0}}, "estimator.truncation must be an integer ≥ 1, got 0"),
    ({"outer": {"learning_rate": "fast"}}, "outer.learning_rate must be a finite number > 0, got 'fast'"),
    ({"outer": {"b1": 1.5}}, "outer.b1 must be a number in [0, 1), got 1.5"),
    ({"tasks": {"specs": [{"name": "quadratic"}], "min_unroll": "5"}}, "tasks.min_unroll must be an integer ≥ 1"),
    ({"tasks": {"specs": [{"name": "quadratic"}], "param_scale": ["a", 1]}}, "tasks.param_scale must be [lo, hi]"),
    ({"tasks": {"specs": [{"name": "quadratic"}], "loss_scale": [1]}}, "tasks.loss_scale must be [lo, hi]"),
    ({"tasks": {"specs": [{"name": "quadratic"}], "loss_scale": [10, 0.1]}}, "tasks.loss_scale must be 0 < lo ≤ hi"),
    ({"tasks": {"specs": [{"name": "quadratic", "kwargs": 5}]}}, "tasks.specs[0] 'quadratic': kwargs must be a table"),
    ({"tasks": {"specs": [{"name": 3}]}}, "tasks.specs[0].name must be a task name"),
    ({"estimator": 3}, "[estimator] must be a table"),
])
def test_each_field_is_checked_for_type_and_range(data, message):
    with pytest.raises(ConfigError) as info:
        MetaConfig.from_dict(data)
    assert message in str(info.value), str(info.value)


def test_shipped_configs_still_load_and_check():
    for name in ("quick", "default"):
        cfg = load_config(name)
        assert cfg.stop_after_failed_generations == 3
        assert check_tasks(cfg.tasks) >= 1


# --- deliverable 2: a run that learns nothing stops ------------------------------------------------------
def test_cli_run_whose_pairs_all_fail_stops_and_writes_no_optimizer(tmp_path, capsys):
    """Every pair NaN from the first generation on: nothing has ever worked, so the run of 50
    generations stops after generation 0, exit 1, naming the task; no optimizer.msgpack, and no
    checkpoint of a generation that learned nothing."""
    cfg = _write(tmp_path, specs=f'{{name = "{NAN_TASK}"}}', generations=50)
    out = tmp_path / "run"
    code, stdout, err = _meta_train(capsys, "--config", cfg, "--out", out)
    assert code == 1
    assert err.count("\n") == 1, err
    assert "every pair of generation 0 failed" in err and NAN_TASK in err and "NaN" in err
    assert "no optimizer written" in err
    assert not (out / "optimizer.msgpack").exists() and "wrote" not in stdout
    assert not (out / "checkpoint.msgpack").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs_used"] for r in rows] == [0]  # it stopped after 1 generation, not 50


def test_generation_whose_every_pair_raises_stops_at_once_naming_the_exception(tmp_path):
    """The library trainer (no up-front check): a task that cannot be built fails every pair with
    Status.ERROR, and the first such generation stops the run with the task's own exception."""
    trainer = MetaTrainer(_tiny([{"name": BROKEN_TASK}], stop_after_failed_generations=5), tmp_path)
    with pytest.raises(MetaTrainingStalled) as info:
        trainer.run()
    text = str(info.value)
    assert "every pair of generation 0 failed" in text
    assert BROKEN_TASK in text and "RuntimeError: cannot build with dim=3: the data is gone" in text
    assert trainer.generation == 1 and not (tmp_path / "checkpoint.msgpack").exists()


class _FailFrom:
    """Wraps an evaluator: real results until generation ``g``, then every pair NaN."""

    def __init__(self, inner, g):
        self.inner, self.g = inner, g

    def evaluate(self, theta, tickets):
        if tickets and tickets[0].generation >= self.g:
            return [PairResult(t.generation, t.pair_id, np.nan, np.nan, 0, Status.NAN) for t in tickets]
        return self.inner.evaluate(theta, tickets)

    def close(self):
        pass


def test_stop_keeps_the_last_good_checkpoint(tmp_path):
    from mnemosyne_core.meta.evaluator import LocalEvaluator

    cfg = _tiny(generations=20, stop_after_failed_generations=3)
    trainer = MetaTrainer(cfg, tmp_path, evaluator=_FailFrom(LocalEvaluator(cfg), 2))
    with pytest.raises(MetaTrainingStalled, match="no pair succeeded in 3 consecutive generations"):
        trainer.run()
    assert trainer.generation == 5  # 2 good generations, then 3 failed ones
    saved = MetaTrainer(cfg, tmp_path, resume=True)
    assert saved.generation == 2  # the checkpoint of the last generation that learned
    for a, b in zip(jax.tree.leaves(saved.theta), jax.tree.leaves(trainer.theta)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # θ of the failed generations never moved
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["pairs_used"] > 0 for r in rows] == [True, True, False, False, False]


def test_stop_keeps_the_last_good_checkpoint_via_the_cli(tmp_path, capsys, monkeypatch):
    """The CLI after good generations: exit 1, the checkpoint of generation 2 stays, no optimizer
    is written (and none would be published: the final export is never reached)."""
    from mnemosyne_core.meta import evaluator as ev

    monkeypatch.setattr(MetaTrainer, "__init__", _with_evaluator(MetaTrainer.__init__, ev.LocalEvaluator, 2))
    cfg = _write(tmp_path, generations=30)
    out = tmp_path / "run"
    code, stdout, err = _meta_train(capsys, "--config", cfg, "--out", out)
    assert code == 1 and err.count("\n") == 1
    assert "no pair succeeded in 2 consecutive generations" in err and f"last checkpoint kept: {out}" in err
    assert not (out / "optimizer.msgpack").exists() and "wrote" not in stdout
    assert MetaTrainer(load_config(cfg), out, resume=True).generation == 2


def _with_evaluator(init, local, g):
    def patched(self, config, out_dir, **kw):
        kw["evaluator"] = _FailFrom(local(config), g)
        init(self, config, out_dir, **kw)
    return patched


def test_one_failed_generation_does_not_stop_a_run_that_recovers(tmp_path):
    from mnemosyne_core.meta.evaluator import LocalEvaluator

    class _OneBad(_FailFrom):
        def evaluate(self, theta, tickets):
            if tickets and tickets[0].generation == 1:
                return super().evaluate(theta, tickets)
            return self.inner.evaluate(theta, tickets)

    cfg = _tiny(generations=4, stop_after_failed_generations=2)
    rows = MetaTrainer(cfg, tmp_path, evaluator=_OneBad(LocalEvaluator(cfg), 1)).run()
    assert [r["pairs_used"] for r in rows] == [2, 0, 2, 2]


# --- never save a non-finite θ or score -----------------------------------------------------------------
def test_non_finite_theta_is_never_exported_and_nan_score_is_left_out(tmp_path):
    trainer = MetaTrainer(_tiny(generations=0), tmp_path)
    path = trainer.export(run_score=float("nan"))
    _, _, meta = checkpoint.load(path)
    assert "run_score" not in meta  # JSON has no NaN: the score is left out, not written
    trainer.export(tmp_path / "scored.msgpack", run_score=0.25)
    assert checkpoint.load(tmp_path / "scored.msgpack")[2]["run_score"] == 0.25
    leaves, treedef = jax.tree.flatten(trainer.theta)
    leaves[0] = jnp.full_like(leaves[0], jnp.nan)
    trainer.theta = jax.tree.unflatten(treedef, leaves)
    with pytest.raises(NonFiniteError, match="not finite"):
        trainer.export(tmp_path / "bad.msgpack")
    assert not (tmp_path / "bad.msgpack").exists()


# --- deliverable 4: no traceback for an unreachable service ---------------------------------------------
def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("argv", [
    ["eval", "--optimizer", "grpc://127.0.0.1:{port}/opt@best", "--suite", "quick", "--out", "{tmp}/e"],
    ["meta-train", "--config", "{cfg}", "--out", "{tmp}/m", "--no-progress", "--init-from",
     "grpc://127.0.0.1:{port}/opt@best"],
])
def test_unreachable_registry_is_one_line_and_exit_1(tmp_path, capsys, argv):
    pytest.importorskip("grpc")
    cfg = _write(tmp_path)
    port = _closed_port()
    args = [a.format(port=port, tmp=tmp_path, cfg=cfg) for a in argv]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "UNAVAILABLE" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_robotics_unreachable_registry_is_one_line_and_exit_1(tmp_path, capsys):
    pytest.importorskip("gymnax")
    pytest.importorskip("grpc")
    code = cli.main(["robotics", "train-policy", "--env", "gymnax_cartpole", "--optimizer",
                     f"grpc://127.0.0.1:{_closed_port()}/opt", "--out", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "UNAVAILABLE" in err
    assert not (tmp_path / "r").exists()


def test_unexpected_exception_is_one_line_exit_1(monkeypatch, capsys, tmp_path):
    """The CLI's last resort: any other exception is one line and exit 1 (MNEMOSYNE_TRACEBACK=1 re-raises)."""
    from service.commands import meta_train

    def boom(args):
        raise OSError(28, "No space left on device")

    monkeypatch.delenv("MNEMOSYNE_TRACEBACK", raising=False)
    monkeypatch.setattr(meta_train, "_load_config", boom)
    argv = ["meta-train", "--config", "quick", "--out", str(tmp_path / "x"), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "MNEMOSYNE_TRACEBACK=1" in err
    monkeypatch.setenv("MNEMOSYNE_TRACEBACK", "1")
    with pytest.raises(OSError, match="No space left"):
        cli.main(argv)
