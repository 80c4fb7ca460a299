"""The meta-trainer end to end: learning, bit-exact resume, dropped pairs, the CLI."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemosyne_core.meta.config import MetaConfig, load_config
from mnemosyne_core.meta.trainer import MetaTrainer, validation_loss
from mnemosyne_core.tasks import TASKS, register_task
from service import cli

NAN_TASK = "test_meta_train_nan_task_7f3c"


class _PoisonableTask:
    """A 4-d quadratic; with ``poison`` its loss is NaN, with ``explode`` it cannot be built."""

    def __init__(self, poison: bool = False, explode: bool = False):
        if explode:
            raise RuntimeError("this task refuses to be built")
        self.name = NAN_TASK
        self.poison = poison

    def init(self, key):
        return {"x": jax.random.normal(key, (4,))}

    def sample_batch(self, key):
        return 0.01 * jax.random.normal(key, (4,))

    def loss(self, params, batch):
        base = jnp.sum((params["x"] - 1.0) ** 2) + batch @ params["x"]
        return base + (jnp.nan if self.poison else 0.0)

    def evaluate(self, params):
        return {"test_loss": jnp.sum((params["x"] - 1.0) ** 2)}


if NAN_TASK not in TASKS:
    register_task(NAN_TASK)(_PoisonableTask)


def _tiny(kind: str = "es", **tasks) -> MetaConfig:
    return MetaConfig.from_dict({
        "generations": 4, "checkpoint_every": 2,
        "optimizer": {"config": {"learning_rate": 0.05}},
        "estimator": {"kind": kind, "num_pairs": 3, "truncation": 5, "shaping": "none" if kind == "pes" else
                      "centered_rank"},
        "outer": {"learning_rate": 0.01},
        "tasks": {"specs": tasks.pop("specs", [{"name": "quadratic", "kwargs": {"dim": 6, "condition": 10.0}}]),
                  "min_unroll": 5, "max_unroll": 15, **tasks},
    })


def _leaves(theta):
    return [np.asarray(x) for x in jax.tree.leaves(theta)]


@pytest.mark.parametrize("kind", ["es", "pes"])
def test_resume_equals_uninterrupted(tmp_path, kind):
    cfg = _tiny(kind)
    full = MetaTrainer(cfg, tmp_path / "full")
    full_rows = full.run()
    part = MetaTrainer(cfg, tmp_path / "part")
    part.run(2)
    del part  # "killed" after its checkpoint at generation 2
    resumed = MetaTrainer(cfg, tmp_path / "part", resume=True)
    assert resumed.generation == 2
    resumed.run()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(_leaves(full.theta), _leaves(resumed.theta)))
    rows = [json.loads(line) for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1, 2, 3]
    assert [r["meta_loss"] for r in rows] == [r["meta_loss"] for r in full_rows]
    # And θ did move: the comparison above is not between two untouched initialisations.
    fresh = MetaTrainer(cfg, tmp_path / "fresh")
    assert any(a.tobytes() != b.tobytes() for a, b in zip(_leaves(fresh.theta), _leaves(full.theta)))


def test_resume_refuses_a_different_config(tmp_path):
    MetaTrainer(_tiny(), tmp_path).run(2)
    from mnemosyne_core.meta.trainer import ResumeError

    other = _tiny().replace(outer=_tiny().outer.__class__(learning_rate=0.5))
    with pytest.raises(ResumeError, match="different config"):
        MetaTrainer(other, tmp_path, resume=True)
    with pytest.raises(ResumeError, match="--resume"):
        MetaTrainer(_tiny(), tmp_path)


def test_nan_and_failing_tasks_are_dropped_and_counted(tmp_path):
    specs = [{"name": NAN_TASK, "kwargs": {"poison": True}}, {"name": NAN_TASK, "kwargs": {}},
             {"name": NAN_TASK, "kwargs": {"explode": True}}]
    cfg = _tiny(specs=specs).replace(estimator=_tiny().estimator.__class__(num_pairs=8, truncation=5))
    trainer = MetaTrainer(cfg, tmp_path)
    planned_bad = 0
    for g in range(3):
        tickets, _ = trainer.estimator.ask({}, g)
        planned_bad += sum(1 for t in tickets if t.task.kwargs)
    rows = trainer.run(3)
    assert sum(r["pairs_dropped"] for r in rows) == planned_bad > 0
    assert sum(r["pairs_used"] for r in rows) == 24 - planned_bad > 0
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(trainer.theta))


def test_quick_config_lowers_the_meta_loss(tmp_path):
    cfg = load_config("quick").replace(generations=8)
    trainer = MetaTrainer(cfg, tmp_path)
    before = validation_loss(cfg, trainer.theta, num_pairs=4)
    rows = trainer.run()
    after = validation_loss(cfg, trainer.theta, num_pairs=4)
    assert len(rows) == 8 and all(r["pairs_used"] == cfg.estimator.num_pairs for r in rows)
    assert after < before - 0.01, (before, after)


def test_cli_meta_train_writes_outputs_and_resumes(tmp_path, capsys):
    cfg_path = tmp_path / "tiny.toml"
    cfg_path.write_text(
        'generations = 2\ncheckpoint_every = 1\n[optimizer]\nkind = "lstm"\n[estimator]\nnum_pairs = 2\n'
        'truncation = 5\n[tasks]\nspecs = [{name = "quadratic", kwargs = {dim = 4}}]\nmin_unroll = 5\n'
        'max_unroll = 10\n')
    out = tmp_path / "run"
    # --resume-if-present starts fresh on an empty folder and resumes once a checkpoint exists.
    assert cli.main(["meta-train", "--config", str(cfg_path), "--out", str(out), "--no-progress",
                     "--resume-if-present"]) == 0
    assert cli.main(["meta-train", "--config", str(cfg_path), "--out", str(out), "--no-progress",
                     "--resume-if-present", "--generations", "3"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in rows] == [0, 1, 2]
    for key in ("meta_loss", "pairs_used", "pairs_dropped", "seconds", "inner_steps_per_s"):
        assert key in rows[0]
    assert all(r["meta_loss/quadratic"] == pytest.approx(r["meta_loss"]) for r in rows)  # the only task
    assert list((out / "tb").iterdir())
    from mnemosyne_core import checkpoint

    _theta, config, meta = checkpoint.load(out / "optimizer.msgpack")
    assert type(config).__name__ == "LSTMConfig"
    assert meta["generation"] == 3 and meta["seed"] == 0 and meta["config"]["estimator"]["num_pairs"] == 2
    assert meta["jax_version"] == jax.__version__ and meta["code_version"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["meta-train", "--config", "no_such_config", "--out", str(tmp_path)]) == 2
    assert "no config 'no_such_config'" in capsys.readouterr().err
    assert cli.main(["meta-train", "--config", "quick", "--out", str(tmp_path / "x"), "--resume"]) == 2
    assert "no checkpoint.msgpack" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text('[estimator]\nkind = "magic"\n')
    assert cli.main(["meta-train", "--config", str(bad), "--out", str(tmp_path / "y")]) == 2
    assert "estimator.kind" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["es", "pes", "backprop"])
def test_outer_trainable_meta_trains_only_the_named_parts(tmp_path, kind):
    """``outer.trainable = ["head.b_s", "head.w_s"]``: every other leaf of θ stays bit-for-bit, and ES
    perturbs only the named coordinates (its noise is not spent on frozen ones)."""
    base = _tiny(kind)
    cfg = base.replace(outer=base.outer.__class__(learning_rate=0.05, trainable=("head.b_s", "head.w_s")))
    assert MetaConfig.from_dict(cfg.to_dict()) == cfg
    trainer = MetaTrainer(cfg, tmp_path / "masked")
    start = trainer.theta
    trainer.run(3)
    paths = {jax.tree_util.keystr(p): (np.asarray(a), np.asarray(b)) for (p, a), b in zip(
        jax.tree_util.tree_flatten_with_path(start)[0], jax.tree.leaves(trainer.theta))}
    trained = {k for k, (a, b) in paths.items() if a.tobytes() != b.tobytes()}
    assert trained and trained <= {"['head']['b_s']", "['head']['w_s']"}, trained
    # Without the restriction the same run changes the rest of θ too (so the check above can fail).
    full = MetaTrainer(base.replace(outer=base.outer.__class__(learning_rate=0.05)), tmp_path / "full")
    full.run(3)
    moved = [a.tobytes() != b.tobytes() for a, b in zip(_leaves(start), _leaves(full.theta))]
    assert sum(moved) > 2
    if kind != "backprop":
        from mnemosyne_core.meta.evaluator import population
        from mnemosyne_core.meta.learned import LearnedOptimizer

        flat, _ = LearnedOptimizer.ravel(start)
        mask = LearnedOptimizer.coordinate_scale(start, cfg.outer.trainable)
        tickets, _ = trainer.estimator.ask(trainer.estimator.init(start), 0)
        rows = np.asarray(population(flat, tickets, 0.02, scale=mask)) - np.asarray(flat)
        assert int(mask.sum()) == 1 + start["head"]["w_s"].size
        assert np.all(rows[:, np.asarray(mask) == 0] == 0) and np.all(rows[:, np.asarray(mask) == 1] != 0)


class _LinearMetaLoss:
    """An evaluator whose meta-loss is c·θ of each ES member, built by the real ``population``: the
    ES estimate's expectation is then known in closed form (c in θ units, s·c in φ = θ/s units)."""

    def __init__(self, config, c):
        self.config, self.c = config, np.asarray(c, np.float64)

    def evaluate(self, theta, tickets):
        from mnemosyne_core.meta.evaluator import population
        from mnemosyne_core.meta.learned import LearnedOptimizer
        from mnemosyne_core.meta.protocol import PairResult, Status

        flat, _ = LearnedOptimizer.ravel(theta)
        mask = LearnedOptimizer.coordinate_scale(theta, self.config.outer.trainable, self.config.outer.scale)
        losses = np.asarray(population(flat, tickets, self.config.estimator.sigma, scale=mask), np.float64) @ self.c
        return [PairResult(t.generation, t.pair_id, losses[2 * j], losses[2 * j + 1], 1, Status.OK)
                for j, t in enumerate(tickets)]


def _scaled(base, **outer):
    return base.replace(outer=base.outer.__class__(**{"optimizer": "sgd", "learning_rate": 1e-3, "clip": 1e9,
                                                      **outer}))


def test_outer_scale_is_meta_training_in_units_of_s(tmp_path):
    """``outer.scale = {"head.b_s": 10}`` meta-trains b_s as φ = b_s/10: ES perturbs it by σ·10 and the outer
    step moves it 10× as far, so on a linear meta-loss c·θ the expected SGD step is −lr·s²·c there and
    −lr·c elsewhere (a missing or doubled factor gives 10× or 1000×, not 100×)."""
    import dataclasses

    base = _tiny()
    base = base.replace(estimator=dataclasses.replace(base.estimator, num_pairs=1000, shaping="none"))
    cfg = _scaled(base, scale={"head.b_s": 10.0})
    trainer = MetaTrainer(cfg, tmp_path / "lin", evaluator=_LinearMetaLoss(cfg, 0))
    start = trainer.theta
    names = [jax.tree_util.keystr(p, simple=True, separator=".")
             for p, x in jax.tree_util.tree_flatten_with_path(start)[0] for _ in range(np.size(x))]
    c = np.zeros(len(names))
    c[names.index("head.b_s")] = c[names.index("cam.tau_raw")] = 1.0
    trainer.evaluator.c = c
    trainer.step()
    step_bs = float(start["head"]["b_s"] - trainer.theta["head"]["b_s"]) / 1e-3
    step_tau = float(start["cam"]["tau_raw"] - trainer.theta["cam"]["tau_raw"]) / 1e-3
    assert 80 < step_bs < 120, step_bs  # s² = 100 (Monte-Carlo sd ≈ 4.5 with 1000 pairs)
    assert 0 < step_tau < 2.5, step_tau  # unscaled: 1 (sd ≈ 0.3)


def test_outer_scale_backprop_step_is_s_squared_times_larger(tmp_path):
    """Backprop's gradient is ∂L/∂θ; in φ = θ/s units it is s·∂L/∂θ and the φ step is s times larger in θ:
    with SGD, the scaled leaf moves exactly s² as far as without a scale, the rest exactly as far."""
    base = _tiny("backprop")
    plain = MetaTrainer(_scaled(base), tmp_path / "plain")
    scaled = MetaTrainer(_scaled(base, scale={"head": {"w_s": 4.0}}), tmp_path / "scaled")
    assert scaled.config.outer.scale == (("head.w_s", 4.0),)  # a nested TOML table is a dotted path
    start = plain.theta
    plain.step()
    scaled.step()
    for path, a, b, s in zip(jax.tree_util.tree_flatten_with_path(start)[0], _leaves(plain.theta),
                             _leaves(scaled.theta), jax.tree.leaves(scaled.scales)):
        x0 = np.asarray(path[1])
        assert s == (4.0 if jax.tree_util.keystr(path[0]) == "['head']['w_s']" else 1.0)
        np.testing.assert_allclose(b - x0, s * s * (a - x0), rtol=1e-4, atol=1e-9)
    moved = np.asarray(plain.theta["head"]["w_s"]) - np.asarray(start["head"]["w_s"])
    assert np.abs(moved).max() > 0  # the comparison above is not 0 = 16·0


def test_outer_scale_bad_values_are_clear_errors(tmp_path):
    from mnemosyne_core.meta.config import ConfigError

    for bad in ({"head.b_s": 0.0}, {"head.b_s": -1}, {"head.b_s": "big"}, {"head.b_s": float("inf")}, ["head"]):
        with pytest.raises(ConfigError, match="outer.scale"):
            MetaConfig.from_dict({"outer": {"scale": bad}})
    with pytest.raises(ConfigError, match=r"outer.scale entry 'head.bs' names no part of θ"):
        MetaTrainer(_scaled(_tiny(), scale={"head.bs": 2.0}), tmp_path / "a")
    assert not (tmp_path / "a").exists()
    cfg = _scaled(_tiny(), scale={"head": 2.0, "head.b_s": 5.0}, trainable=("head", "cam"))
    assert MetaConfig.from_dict(cfg.to_dict()) == cfg
    scales = MetaTrainer(cfg, tmp_path / "b").scales  # longest prefix wins; frozen leaves are 0
    assert scales["head"]["b_s"] == 5.0 and scales["head"]["w_s"] == 2.0 and scales["cam"]["tau_raw"] == 1.0
    assert all(s == 0.0 for s in jax.tree.leaves(scales["hpe"]))


def test_outer_trainable_typo_is_a_clear_error(tmp_path, capsys):
    from mnemosyne_core.meta.config import ConfigError

    cfg = _tiny().replace(outer=_tiny().outer.__class__(trainable=("head.w_z",)))
    with pytest.raises(ConfigError, match=r"'head.w_z' names no part of θ.*cam, head, hpe"):
        MetaTrainer(cfg, tmp_path / "a")
    with pytest.raises(ConfigError, match="outer.trainable must be a list"):
        MetaConfig.from_dict({"outer": {"trainable": "head"}})
    bad = tmp_path / "bad.toml"
    bad.write_text('[outer]\ntrainable = ["hed"]\n[tasks]\nspecs = [{name = "quadratic"}]\n')
    assert cli.main(["meta-train", "--config", str(bad), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'hed' names no part of θ" in err
    assert not (tmp_path / "b").exists()  # nothing written for a config that cannot run


def test_heldout_mean_is_the_mean_of_the_heldout_ratio_after_each_chunk():
    """``meta_loss = "heldout_mean"`` over a 15-step unroll (K = 5) equals the mean of ``heldout``
    over 5-, 10- and 15-step unrolls of the same inner problem (same keys, same ε)."""
    import dataclasses

    from mnemosyne_core.meta.evaluator import evaluate_tickets, learned_optimizer
    from mnemosyne_core.meta.noise import run_key_data
    from mnemosyne_core.meta.protocol import Ticket
    from mnemosyne_core.tasks import TaskSpec

    base = _tiny()
    theta = learned_optimizer(base).init_theta(jax.random.key(1))
    spec, rk = TaskSpec("quadratic", {"dim": 6, "condition": 10.0}), run_key_data(5)

    def losses(meta_loss, length):
        cfg = base.replace(estimator=dataclasses.replace(base.estimator, meta_loss=meta_loss))
        (r,) = evaluate_tickets(theta, [Ticket(0, 3, spec, length, length, 0, 0, rk)], cfg)
        assert r.status.usable
        return np.array([r.loss_pos, r.loss_neg])

    ends = np.stack([losses("heldout", n) for n in (5, 10, 15)])
    curve = losses("heldout_mean", 15)
    np.testing.assert_allclose(curve, ends.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(curve, ends[-1], atol=1e-3)  # the early chunks do count
    with pytest.raises(Exception, match="needs whole unrolls"):
        MetaConfig.from_dict({"estimator": {"kind": "pes", "meta_loss": "heldout_mean"}})


def test_publish_to_registry_with_lineage_and_best_alias(tmp_path):
    pytest.importorskip("grpc")
    from mnemosyne_registry import RegistryClient
    from service.demo import start_registry, stop

    proc, uri = start_registry(tmp_path / "registry", tmp_path / "registry.log")
    try:
        cfg_path = tmp_path / "pub.toml"
        cfg_path.write_text(
            'generations = 3\ncheckpoint_every = 1\npublish_every = 1\n[optimizer.config]\nlearning_rate = 0.05\n'
            '[estimator]\nnum_pairs = 2\ntruncation = 5\n[tasks]\n'
            'specs = [{name = "quadratic", kwargs = {dim = 6, condition = 10.0}}]\nmin_unroll = 5\nmax_unroll = 15\n')
        assert cli.main(["meta-train", "--config", str(cfg_path), "--out", str(tmp_path / "run"), "--no-progress",
                         "--publish", f"{uri}/tiny"]) == 0
        client = RegistryClient(uri.removeprefix("grpc://"))
        latest = client.get_version("tiny")
        assert latest.number == 3  # after generations 1 and 2, and at the end
        assert latest.metadata.lineage.generation == 3 and latest.metadata.lineage.parent_version == 2
        assert json.loads(latest.metadata.lineage.config_json)["estimator"]["num_pairs"] == 2
        assert latest.metadata.lineage.jax_version == jax.__version__
        best = client.get_version("tiny", "best")
        assert 1 <= best.number <= 3
        client.close()
    finally:
        stop(proc)
