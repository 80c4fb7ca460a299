"""Truncated backprop: the worker's gradient is the true gradient of its truncation's meta-loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mnemosyne_core.meta.backprop import TruncatedBackprop
from mnemosyne_core.meta.config import MetaConfig
from mnemosyne_core.meta.evaluator import evaluate_tickets, learned_optimizer
from mnemosyne_core.meta.learned import LearnedOptimizer
from mnemosyne_core.meta.noise import run_key_data
from mnemosyne_core.meta.protocol import PairResult, Status
from mnemosyne_core.meta.trainer import MetaTrainer

RK = run_key_data(9)


def _cfg(clip=1e6, pairs=2):
    return MetaConfig.from_dict({
        "optimizer": {"config": {"learning_rate": 0.05}},
        "estimator": {"kind": "backprop", "num_pairs": pairs, "truncation": 8, "grad_clip": clip},
        "outer": {"learning_rate": 0.003},
        "tasks": {"specs": [{"name": "quadratic", "kwargs": {"dim": 5, "condition": 20.0}}],
                  "min_unroll": 16, "max_unroll": 16}})


def test_backprop_gradient_matches_finite_differences():
    cfg = _cfg()
    est = TruncatedBackprop(cfg, RK)
    theta = learned_optimizer(cfg).init_theta(jax.random.key(1))
    state = est.init(theta)
    state["started"] = True
    tickets, state = est.ask(state, 0)
    [r] = evaluate_tickets(theta, tickets[:1], cfg)
    assert r.status is Status.OK and r.grad is not None and r.loss_pos == r.loss_neg
    flat, unravel = LearnedOptimizer.ravel(theta)
    v = np.array(jax.random.normal(jax.random.key(3), flat.shape))
    v = v / np.linalg.norm(v)
    h = 1e-2

    def meta(x):
        [res] = evaluate_tickets(unravel(jnp.asarray(x, jnp.float32)), tickets[:1], cfg)
        return res.loss_pos

    fd = (meta(flat + h * v) - meta(flat - h * v)) / (2 * h)
    directional = float(r.grad @ v)
    assert abs(directional - fd) < 0.1 * abs(fd) + 1e-3, (directional, fd)


def test_backprop_clips_each_particle_and_averages():
    cfg = _cfg(clip=1e-3)
    est = TruncatedBackprop(cfg, RK)
    theta = learned_optimizer(cfg).init_theta(jax.random.key(1))
    state = est.init(theta)
    tickets, state = est.ask(state, 0)
    results = evaluate_tickets(theta, tickets, cfg)
    norms = [np.linalg.norm(r.grad) for r in results]
    assert all(n <= 1e-3 * (1 + 1e-5) for n in norms) and max(norms) > 0
    bad = PairResult(0, 1, np.nan, np.nan, 8, Status.NAN)
    grad, _, stats = est.tell(state, tickets, [results[0], bad], theta)
    flat_grad, _ = LearnedOptimizer.ravel(grad)
    assert np.allclose(flat_grad, results[0].grad) and stats.pairs_dropped == 1


def test_backprop_meta_training_runs_and_stays_finite(tmp_path):
    cfg = _cfg(clip=10.0).replace(generations=3)
    trainer = MetaTrainer(cfg, tmp_path)
    rows = trainer.run()
    assert [r["pairs_used"] for r in rows] == [2, 2, 2]
    assert all(r["update_applied"] for r in rows)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(trainer.theta))
