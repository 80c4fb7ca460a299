"""The training-progress input (``total_steps=``), the learned schedule and direction mode (``scheduled``)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mnemosyne_core as mn
from mnemosyne_core.meta.config import ConfigError, EstimatorConfig
from mnemosyne_core.meta.learned import LearnedOptimizer
from mnemosyne_core.meta.unroll import init_inner, run_chunk
from mnemosyne_core.mnemosyne import (
    MnemosyneConfig,
    init_theta,
    mnemosyne,
    scale_by_mnemosyne,
    scheduled,
)
from mnemosyne_core.schedule import progress_features, progress_log_schedule
from mnemosyne_core.tasks import TaskSpec, make_task

BASE = {"variant": "tensor", "hypergradient": True, "direction_correction": False, "use_param_feature": False,
        "num_features": 4, "width": 4, "value_width": 2, "tokens_per_chunk": 4, "hpe_hidden": 8,
        "learning_rate": 5e-3}
CONFIG = MnemosyneConfig(progress_schedule=True, **BASE)
KNOTS = jnp.array([0.5, -1.0, -2.0, -4.0, -6.0], jnp.float32)


def _params():
    return {"w": jnp.linspace(-1.0, 1.0, 60).reshape(12, 5), "b": jnp.zeros(5)}


def _grads(scale=1.0):
    return {"w": scale * jnp.cos(jnp.arange(60.0)).reshape(12, 5), "b": scale * jnp.ones(5)}


def _with_knots(theta, knots):
    theta = jax.tree.map(lambda x: x, theta)
    theta["sched"] = {"knots": knots}
    return theta


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_progress_features_absent_present_and_clamped():
    np.testing.assert_array_equal(progress_features(jnp.int32(5), None), [0.0, 0.0])
    np.testing.assert_array_equal(progress_features(jnp.int32(5), 0), [0.0, 0.0])  # ≤ 0 = not told
    np.testing.assert_allclose(progress_features(jnp.int32(25), 100), [0.25, 1.0])
    np.testing.assert_allclose(progress_features(jnp.int32(300), 100), [1.0, 1.0])  # past T: end of schedule


def test_schedule_interpolates_knots_and_is_off_without_horizon():
    for p, want in [(0.0, 0.5), (0.125, -0.25), (0.5, -2.0), (0.9, -5.2), (1.0, -6.0)]:
        got = progress_log_schedule(KNOTS, jnp.array([p, 1.0]), bounds=(-7.0, 1.0))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert float(progress_log_schedule(KNOTS, jnp.zeros(2), bounds=(-7.0, 1.0))) == 0.0
    clipped = progress_log_schedule(jnp.full(5, -20.0), jnp.array([0.5, 1.0]), bounds=(-7.0, 1.0))
    assert float(clipped) == -7.0


def test_fresh_theta_ignores_the_horizon_and_matches_the_config_without_progress():
    params, grads = _params(), _grads()
    theta = init_theta(jax.random.key(0), CONFIG)
    assert np.all(np.asarray(theta["sched"]["knots"]) == 0)
    tx = mnemosyne(theta, CONFIG)
    plain_config = MnemosyneConfig(**BASE)
    plain = mnemosyne(init_theta(jax.random.key(0), plain_config), plain_config)
    s_told, s_untold, s_plain = tx.init(params), tx.init(params), plain.init(params)
    for _ in range(4):
        u_told, s_told = tx.update(grads, s_told, params, total_steps=10)
        u_untold, s_untold = tx.update(grads, s_untold, params)
        u_plain, s_plain = plain.update(grads, s_plain, params)
        for a, b, c in zip(_leaves(u_told), _leaves(u_untold), _leaves(u_plain)):
            np.testing.assert_allclose(a, b, rtol=1e-6)
            np.testing.assert_allclose(a, c, rtol=1e-6)


def test_learned_schedule_scales_the_step_by_exp_of_the_knots_at_t_over_T():
    params, grads = _params(), _grads()
    theta = _with_knots(init_theta(jax.random.key(0), CONFIG), KNOTS)
    tx = mnemosyne(theta, CONFIG)
    state = tx.init(params)
    total = 40
    grid = np.linspace(0, 1, 5)
    for t in range(0, 60, 7):
        state_t = state._replace(count=jnp.int32(t))
        told, _ = tx.update(grads, state_t, params, total_steps=total)
        untold, _ = tx.update(grads, state_t, params)
        want = np.exp(np.interp(min(t / total, 1.0), grid, np.asarray(KNOTS)))
        ratio = np.asarray(told["b"]) / np.asarray(untold["b"])
        np.testing.assert_allclose(ratio, want, rtol=2e-5)
    # Not told (None or 0): the learned schedule is off.
    a, _ = tx.update(grads, state, params, total_steps=0)
    b, _ = tx.update(grads, state, params)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)


# Every step-size factor at its own bound: the hypergradient step size at max_log_lr, the schedule
# knots at schedule_max_log, the learned gain's bias past its tanh bound (→ +max_log_gain). Their
# product α·e^(2.3+1+0.5) is what the ceiling caps; Adam's first step is ±1 per coordinate.
AT_BOUNDS = {"init_log_lr": 2.3, "max_log_lr": 2.3, "max_log_gain": 0.5, "schedule_max_log": 1.0}


def _theta_at_bounds(config):
    theta = _with_knots(init_theta(jax.random.key(0), config), jnp.full(5, 1.0))
    theta["head"]["b_s"] = jnp.float32(50.0)
    return theta


def _first_update(theta, config, **extra):
    tx = mnemosyne(theta, config)
    params = _params()
    return tx.update(_grads(), tx.init(params), params, **extra)[0]


def test_max_log_step_caps_the_product_of_hypergradient_gain_and_schedule():
    free = MnemosyneConfig(progress_schedule=True, **BASE, **AT_BOUNDS)
    theta = _theta_at_bounds(free)
    for config, want in [(free, 2.3 + 1.0 + 0.5), (dataclasses.replace(free, max_log_step=1.5), 1.5)]:
        told = _first_update(theta, config, total_steps=100)
        np.testing.assert_allclose(np.abs(np.asarray(told["b"])), BASE["learning_rate"] * np.exp(want), rtol=1e-4)
    # Below the ceiling the cap changes nothing (a fresh θ: factor 1 < e^1.5).
    fresh = init_theta(jax.random.key(0), CONFIG)
    a = _first_update(fresh, CONFIG, total_steps=9)
    b = _first_update(fresh, dataclasses.replace(CONFIG, max_log_step=1.5), total_steps=9)
    for x, y in zip(_leaves(a), _leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_step_ceiling_falls_over_the_progress_when_told_and_stays_when_not():
    # All factors above the ceiling: the step is the ceiling itself,
    # α·e^(max_log_step − decay·t/T) told, α·e^max_log_step untold.
    params, grads = _params(), _grads()
    config = MnemosyneConfig(progress_schedule=True, max_log_step=2.0, step_ceiling_decay=1.5, **BASE, **AT_BOUNDS)
    theta = _theta_at_bounds(config)
    tx = mnemosyne(theta, config)
    state = tx.init(params)
    for t in (0, 30, 60, 100, 150):
        state_t = state._replace(count=jnp.int32(t))
        told, _ = tx.update(grads, state_t, params, total_steps=120)
        untold, _ = tx.update(grads, state_t, params)
        ratio = np.asarray(told["b"]) / np.asarray(untold["b"])
        np.testing.assert_allclose(ratio, np.exp(-1.5 * min(t / 120, 1.0)), rtol=1e-5)
    first = _first_update(theta, config)
    np.testing.assert_allclose(np.abs(np.asarray(first["b"])), BASE["learning_rate"] * np.exp(2.0), rtol=1e-4)


def test_step_ceiling_from_leaves_short_runs_untouched_and_guards_longer_ones():
    # S = 50: before step 50 the step is exactly the uncapped one; from 50 on the ceiling falls
    # over (t − S)/(T − S) told, a told T ≤ S is already past it, and untold the guard never acts
    # (nor in direction mode: the user's schedule owns the step size there).
    params, grads = _params(), _grads()
    free = MnemosyneConfig(progress_schedule=True, **BASE, **AT_BOUNDS)  # product e^(2.3 + 1 + 0.5) told
    guarded = dataclasses.replace(free, max_log_step=2.0, step_ceiling_decay=1.5, step_ceiling_from=50)
    theta = _theta_at_bounds(free)
    tx_free, tx_guard = mnemosyne(theta, free), mnemosyne(theta, guarded)
    state = tx_free.init(params)
    for t, total, want_told, want_untold in [
        (0, 150, 3.8, 2.8), (49, 150, 3.8, 2.8),  # before S: no ceiling at all
        (50, 150, 2.0, 2.8), (100, 150, 2.0 - 0.75, 2.8), (150, 150, 0.5, 2.8), (400, 150, 0.5, 2.8),
        (51, 40, 0.5, 2.8),  # told T = 40 ≤ S: past the horizon, the ceiling is at its floor
    ]:
        state_t = state._replace(count=jnp.int32(t))
        for kwargs, want, full in [({"total_steps": total}, want_told, 3.8), ({}, want_untold, 2.8)]:
            ref, _ = tx_free.update(grads, state_t, params, **kwargs)
            got, _ = tx_guard.update(grads, state_t, params, **kwargs)
            if want == full:
                for x, y in zip(_leaves(ref), _leaves(got)):
                    np.testing.assert_array_equal(x, y)
            else:
                ratio = np.asarray(got["b"]) / np.asarray(ref["b"])
                np.testing.assert_allclose(ratio, np.exp(want - full), rtol=1e-5)
    # Direction mode past S: exactly the unguarded direction.
    sched_free, sched_guard = scheduled(theta, free, 1e-3), scheduled(theta, guarded, 1e-3)
    inner, *rest = sched_free.init(params)  # chain: (the learned rule's state, the schedule's)
    state_t = (inner._replace(count=jnp.int32(120)), *rest)
    for x, y in zip(_leaves(sched_free.update(grads, state_t, params, total_steps=150)[0]),
                    _leaves(sched_guard.update(grads, state_t, params, total_steps=150)[0])):
        np.testing.assert_array_equal(x, y)


def test_hypergradient_horizon_slows_the_step_size_walk_only_on_longer_told_horizons():
    # H = 100: told T ≤ H, untold and in direction mode the log step size moves exactly as with
    # the option off; told T = 400 it moves √(100/400) = ½ as far per step.
    params = _params()
    free = CONFIG
    clocked = dataclasses.replace(free, hypergradient_horizon=100)
    theta = init_theta(jax.random.key(0), free)
    tx_free, tx_clock = mnemosyne(theta, free), mnemosyne(theta, clocked)

    def walk(tx, **kwargs):  # two steps whose gradients disagree, then the log step size's move
        state = tx.init(params)
        _, state = tx.update(_grads(), state, params, **kwargs)
        before = np.asarray(state.memory.log_lr)
        _, state = tx.update(_grads(-0.5), state, params, **kwargs)
        return np.asarray(state.memory.log_lr) - before

    ref = walk(tx_free, total_steps=400)
    assert np.all(ref < 0)  # the gradients disagree: the hypergradient backs off
    np.testing.assert_allclose(walk(tx_clock, total_steps=400), 0.5 * ref, rtol=1e-5)
    np.testing.assert_allclose(walk(tx_clock, total_steps=1600), 0.25 * walk(tx_free, total_steps=1600),
                               rtol=1e-5)
    for kwargs in ({"total_steps": 100}, {"total_steps": 60}, {}):
        np.testing.assert_array_equal(walk(tx_clock, **kwargs), walk(tx_free, **kwargs))
    # Direction mode: the user's schedule is told the horizon, the rule keeps the trained rate.
    sched_free, sched_clock = scheduled(theta, free, 1e-3), scheduled(theta, clocked, 1e-3)
    s_free, s_clock = sched_free.init(params), sched_clock.init(params)
    for g in (_grads(), _grads(-0.5), _grads()):
        u_free, s_free = sched_free.update(g, s_free, params, total_steps=400)
        u_clock, s_clock = sched_clock.update(g, s_clock, params, total_steps=400)
        for x, y in zip(_leaves(u_free), _leaves(u_clock)):
            np.testing.assert_array_equal(x, y)


def test_total_steps_is_traced_no_recompile_for_another_horizon():
    params, grads = _params(), _grads()
    theta = _with_knots(init_theta(jax.random.key(0), CONFIG), KNOTS)
    tx = mnemosyne(theta, CONFIG)
    step = jax.jit(lambda g, s, p, T: tx.update(g, s, p, total_steps=T))
    state = tx.init(params)
    u1, _ = step(grads, state._replace(count=jnp.int32(10)), params, jnp.int32(20))
    size = step._cache_size()
    u2, _ = step(grads, state._replace(count=jnp.int32(10)), params, jnp.int32(400))
    assert step._cache_size() == size
    assert not np.allclose(np.asarray(u1["b"]), np.asarray(u2["b"]))  # p = 0.5 vs 0.025


def test_scheduled_is_the_direction_times_the_users_schedule():
    params, grads = _params(), _grads()
    theta = _with_knots(init_theta(jax.random.key(1), CONFIG), KNOTS)
    schedule = optax.cosine_decay_schedule(3e-3, 30)
    tx = scheduled(theta, CONFIG, schedule)
    ref = scale_by_mnemosyne(theta, CONFIG)  # told no horizon: its learned schedule is off too
    s, s_ref = tx.init(params), ref.init(params)
    for t in range(5):
        u, s = tx.update(grads, s, params, total_steps=30)  # total_steps is ignored in direction mode
        d, s_ref = ref.update(grads, s_ref, params)
        for a, b in zip(_leaves(u), _leaves(d)):
            np.testing.assert_allclose(a, -float(schedule(t)) * b, rtol=1e-5, atol=1e-12)
    constant = scheduled(theta, CONFIG, 2e-3)
    u, _ = constant.update(grads, constant.init(params), params)
    d, _ = ref.update(grads, ref.init(params), params)
    np.testing.assert_allclose(np.asarray(u["b"]), -2e-3 * np.asarray(d["b"]), rtol=1e-6)


def test_pretrained_schedule_mode_and_its_errors():
    params, grads = _params(), _grads()
    tx = mn.pretrained("default", schedule=optax.constant_schedule(1e-3))
    u, _ = tx.update(grads, tx.init(params), params, total_steps=100)
    theta, config, _ = mn.pretrained_theta("default")
    d, _ = scale_by_mnemosyne(theta, config).update(grads, scale_by_mnemosyne(theta, config).init(params), params)
    np.testing.assert_allclose(np.asarray(u["b"]), -1e-3 * np.asarray(d["b"]), rtol=1e-5)
    with pytest.raises(ValueError, match="direction mode needs a Mnemosyne"):
        mn.pretrained("lstm", schedule=1e-3)


def test_config_validation():
    with pytest.raises(ValueError, match="tensor"):
        MnemosyneConfig(variant="coordinate", progress_schedule=True)
    with pytest.raises(ValueError, match="schedule_knots"):
        MnemosyneConfig(progress_schedule=True, schedule_knots=1)
    with pytest.raises(ValueError, match="schedule_min_log"):
        MnemosyneConfig(schedule_min_log=0.5)
    with pytest.raises(ValueError, match="max_log_step"):
        MnemosyneConfig(max_log_step=-1.0)
    with pytest.raises(ValueError, match="step_ceiling_decay"):
        MnemosyneConfig(step_ceiling_decay=float("nan"))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="step_ceiling_from"):
            MnemosyneConfig(progress_schedule=True, max_log_step=2.0, step_ceiling_from=bad)
    with pytest.raises(ValueError, match="max_log_step > 0"):
        MnemosyneConfig(step_ceiling_from=400)  # delaying a ceiling that is off is a mistake
    with pytest.raises(ValueError, match="progress_schedule"):
        MnemosyneConfig(max_log_step=2.0, step_ceiling_from=400)  # acts only when told T
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="hypergradient_horizon"):
            MnemosyneConfig(progress_schedule=True, hypergradient=True, hypergradient_horizon=bad)
    with pytest.raises(ValueError, match="progress_schedule"):
        MnemosyneConfig(hypergradient=True, hypergradient_horizon=400)  # acts only when told T
    with pytest.raises(ValueError, match="hypergradient=True"):
        MnemosyneConfig(progress_schedule=True, hypergradient_horizon=400)  # no walk to slow
    old = MnemosyneConfig.from_dict({"variant": "tensor"})  # older checkpoints: no ceiling, no clock
    assert (old.max_log_step, old.step_ceiling_from, old.hypergradient_horizon) == (0.0, 0, 0)
    with pytest.raises(ConfigError, match="tell_horizon"):
        EstimatorConfig(tell_horizon="yes")
    assert EstimatorConfig(meta_loss="final").meta_loss == "final"


def test_run_chunk_tells_the_horizon_and_scores_from_a_step():
    task = make_task(TaskSpec("quadratic", {"dim": 8}))
    lo = LearnedOptimizer.for_config(CONFIG)
    theta = _with_knots(lo.init_theta(jax.random.key(0)), jnp.array([0.0, -3.0, -6.0, -6.0, -6.0]))
    state = init_inner(task, lo, theta, jax.random.key(3), (1.0, 1.0))
    told, out_told = run_chunk(task, lo, theta, state, 20, 20, 2.0, total_steps=20)
    untold, _ = run_chunk(task, lo, theta, state, 20, 20, 2.0)
    zero, _ = run_chunk(task, lo, theta, state, 20, 20, 2.0, total_steps=0)
    moved_told = float(jnp.sum(jnp.abs(told.params["x"] - state.params["x"])))
    moved_untold = float(jnp.sum(jnp.abs(untold.params["x"] - state.params["x"])))
    assert moved_told < 0.5 * moved_untold  # the decaying schedule took much smaller steps
    np.testing.assert_array_equal(np.asarray(zero.params["x"]), np.asarray(untold.params["x"]))
    assert int(out_told.scored_steps) == 20 and int(out_told.active_steps) == 20
    # score_from: only the last steps add to the meta-loss sum; active steps still count all.
    _, late = run_chunk(task, lo, theta, state, 20, 20, 2.0, total_steps=20, score_from=15)
    assert int(late.scored_steps) == 5 and int(late.active_steps) == 20
    assert float(late.log_ratio_sum) != pytest.approx(float(out_told.log_ratio_sum))
    assert float(late.log_ratio_sum) / 5 < float(out_told.log_ratio_sum) / 20  # the end is lower than the mean


def test_learned_optimizer_entry_passes_the_contract_kwargs():
    entry = mn.OPTIMIZERS["mnemosyne_tensor_sched"]
    theta = entry.init_theta(jax.random.key(0))
    tx = entry.build(theta)
    params, grads = _params(), _grads()
    u, s = tx.update(grads, tx.init(params), params, loss=jnp.float32(1.0), total_steps=10, unknown=3)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(u))
    assert int(s.count) == 1 and dataclasses.is_dataclass(entry.make_config())


def test_untold_fraction_runs_that_share_of_unrolls_without_the_horizon():
    from mnemosyne_core.meta.config import MetaConfig
    from mnemosyne_core.meta.evaluator import (
        evaluate_tickets,
        is_told,
        learned_optimizer,
    )
    from mnemosyne_core.meta.noise import run_key_data
    from mnemosyne_core.meta.protocol import Ticket

    spec = TaskSpec("quadratic", {"dim": 8})
    tickets = [Ticket(0, i, spec, 20, 20, run_key=run_key_data(0)) for i in range(4)]
    # The choice is a function of (episode, pair): the same in every truncation and generation.
    later = Ticket(5, 3, spec, 20, 10, start_step=10, episode=0, run_key=run_key_data(0))
    assert is_told(later, 0.3) == is_told(tickets[3], 0.3)
    many = [Ticket(0, i, spec, 20, 20, episode=e) for e in range(10) for i in range(100)]
    assert abs(np.mean([not is_told(t, 0.3) for t in many]) - 0.3) < 0.03
    assert all(is_told(t, 0.0) for t in many) and not any(is_told(t, 1.0) for t in many)

    def losses(**est):
        config = MetaConfig.from_dict({
            "name": "untold", "seed": 0, "generations": 1,
            "optimizer": {"config": {**BASE, "progress_schedule": True}},
            "estimator": {"num_pairs": 4, "truncation": 20, **est},
            "tasks": {"specs": [{"name": "quadratic", "kwargs": {"dim": 8}}], "min_unroll": 20, "max_unroll": 20}})
        theta = _with_knots(learned_optimizer(config).init_theta(jax.random.key(0)),
                            jnp.array([0.0, -3.0, -6.0, -6.0, -6.0]))
        return [r.loss_pos for r in evaluate_tickets(theta, tickets, config)]

    untold = losses(tell_horizon=False)
    assert losses(tell_horizon=True, untold_fraction=1.0) == untold  # T = 0 is "not told", exactly
    told = losses(tell_horizon=True)
    assert all(a != b for a, b in zip(told, untold))
    mixed = losses(tell_horizon=True, untold_fraction=0.5)
    assert all(m in (a, b) for m, a, b in zip(mixed, told, untold)) and mixed not in (told, untold)
    with pytest.raises(ConfigError, match="needs tell_horizon"):
        EstimatorConfig(untold_fraction=0.3)
    with pytest.raises(ConfigError, match=r"in \[0, 1\]"):
        EstimatorConfig(tell_horizon=True, untold_fraction=1.5)
