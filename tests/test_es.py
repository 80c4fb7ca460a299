"""Antithetic ES: gradient correctness, seed-only ε, fitness shaping, the wire format."""
from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemosyne_core.meta.base import shape_fitness, shaped_differences
from mnemosyne_core.meta.config import MetaConfig
from mnemosyne_core.meta.es import ES, es_gradient
from mnemosyne_core.meta.evaluator import population
from mnemosyne_core.meta.noise import (
    pair_key,
    perturbation,
    perturbations,
    run_key_data,
)
from mnemosyne_core.meta.protocol import PairResult, ProtocolError, Status, Ticket
from mnemosyne_core.tasks import TaskSpec

RK = run_key_data(123)


def _quadratic():
    a = jnp.diag(jnp.array([1.0, 3.0, 0.5, 2.0]))
    c = jnp.array([0.3, -1.0, 2.0, 0.0])
    return lambda x: 0.5 * (x - c) @ a @ (x - c) + 0.1 * jnp.sum(x ** 3)


def _cfg(**est):
    return MetaConfig.from_dict({"estimator": {"num_pairs": est.pop("num_pairs", 4), **est}})


def test_es_gradient_matches_jax_grad_on_a_quadratic():
    f = _quadratic()
    theta = jnp.array([1.0, 0.5, -0.5, 0.2])
    sigma, n = 0.05, 6000
    # Losses computed from ε drawn straight from the pair keys (not through the estimator's helper).
    base = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(RK, jnp.uint32)), 4)
    eps = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), (4,)))(jnp.arange(n))
    lp, ln = jax.vmap(f)(theta + sigma * eps), jax.vmap(f)(theta - sigma * eps)
    est = es_gradient(RK, 4, range(n), np.asarray(lp), np.asarray(ln), sigma, "none", 4)
    true = jax.grad(f)(theta)
    assert np.allclose(est, true, atol=0.08 * float(jnp.linalg.norm(true)) + 0.02), (est, true)
    # The check is sharp enough to fail: a wrong sign or a different generation's ε is far off.
    wrong = es_gradient(RK, 5, range(n), np.asarray(lp), np.asarray(ln), sigma, "none", 4)
    assert not np.allclose(wrong, true, atol=0.08 * float(jnp.linalg.norm(true)) + 0.02)


def test_es_tell_rank_shaped_direction_agrees_with_gradient():
    f = _quadratic()
    theta = {"w": jnp.array([1.0, 0.5, -0.5, 0.2])}
    n = 2000
    es = ES(_cfg(num_pairs=n, sigma=0.05), RK)
    tickets = [Ticket(7, i, TaskSpec("quadratic"), 10, 10, 0, 7, RK) for i in range(n)]
    eps = perturbations(RK, 7, range(n), 4)
    lp = np.asarray(jax.vmap(f)(theta["w"] + 0.05 * eps))
    ln = np.asarray(jax.vmap(f)(theta["w"] - 0.05 * eps))
    results = [PairResult(7, i, lp[i], ln[i], 20, Status.OK) for i in range(n)]
    grad, _, stats = es.tell({}, tickets, results, theta)
    true = jax.grad(lambda w: f(w))(theta["w"])
    cos = float(grad["w"] @ true / (jnp.linalg.norm(grad["w"]) * jnp.linalg.norm(true)))
    assert cos > 0.95
    assert stats.pairs_used == n and stats.pairs_dropped == 0


def test_dropped_pairs_are_dropped_whole_and_counted():
    theta = {"w": jnp.zeros(3)}
    es = ES(_cfg(num_pairs=3, shaping="none"), RK)
    tickets = [Ticket(0, i, TaskSpec("quadratic"), 10, 10, 0, 0, RK) for i in range(3)]
    results = [PairResult(0, 0, 1.0, 0.0, 20, Status.OK), PairResult(0, 1, np.nan, np.nan, 3, Status.NAN),
               PairResult(0, 2, 0.0, 0.0, 0, Status.ERROR), PairResult(99, 0, 5.0, 5.0, 20, Status.OK)]
    grad, _, stats = es.tell({}, tickets, results, theta)
    assert (stats.pairs_used, stats.pairs_dropped, stats.stale_results) == (1, 2, 1)
    # Only pair 0 contributes: (1 - 0) ε_0 / (2 σ).
    expected = perturbation(RK, 0, 0, 3) / (2 * es.config.estimator.sigma)
    assert np.allclose(grad["w"], expected, rtol=1e-6)


def test_antithetic_halves_get_exactly_opposite_perturbations():
    tickets = [Ticket(3, i, TaskSpec("quadratic"), 10, 10, 0, 3, RK) for i in range(5)]
    pop = np.asarray(population(jnp.zeros(17), tickets, 0.02))
    plus, minus = pop[0::2], pop[1::2]
    assert np.array_equal(plus, -minus)  # bit-exact, not approximately
    assert not np.array_equal(plus[0], plus[1])  # different pairs, different ε


def test_epsilon_is_bit_identical_across_jit_vmap_and_processes():
    direct = np.asarray(jax.random.normal(pair_key(RK, 11, 42), (257,), jnp.float32))
    batched = np.asarray(perturbations(RK, 11, [3, 42, 9], 257))[1]
    single = np.asarray(perturbation(RK, 11, 42, 257))
    jitted = np.asarray(jax.jit(lambda: jax.random.normal(pair_key(RK, 11, 42), (257,)))())
    assert direct.tobytes() == batched.tobytes() == single.tobytes() == jitted.tobytes()
    code = (
        "import numpy as np\n"
        "from mnemosyne_core.meta.noise import perturbation\n"
        f"print(np.asarray(perturbation({RK!r}, 11, 42, 257)).tobytes().hex())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == direct.tobytes().hex()


def test_ask_is_a_pure_function_of_seed_and_generation():
    cfg = MetaConfig.from_dict({"estimator": {"num_pairs": 6, "truncation": 10},
                                "tasks": {"family": "digits_mlp_small", "min_unroll": 10, "max_unroll": 200}})
    a, _ = ES(cfg, RK).ask({}, 5)
    b, _ = ES(cfg, RK).ask({}, 5)
    c, _ = ES(cfg, RK).ask({}, 6)
    assert a == b and a != c
    lengths = {t.unroll_length for t in a + c}
    assert all(10 <= n <= 200 and n % 10 == 0 for n in lengths) and len(lengths) > 1


def test_a_spec_can_set_its_own_unroll_range():
    """``unroll = [min, max]`` on one spec: its episodes draw lengths there, the others keep the global
    range, and the draws of a config without it are unchanged (same keys, same lengths)."""
    from mnemosyne_core.meta.config import ConfigError

    specs = [{"name": "quadratic", "kwargs": {"dim": 3}}, {"name": "quadratic", "kwargs": {"dim": 5}}]
    tasks = {"min_unroll": 20, "max_unroll": 60}
    plain = MetaConfig.from_dict({"estimator": {"num_pairs": 64, "truncation": 10}, "tasks": {"specs": specs, **tasks}})
    long = MetaConfig.from_dict({"estimator": {"num_pairs": 64, "truncation": 10}, "tasks": {
        "specs": [specs[0], {**specs[1], "unroll": [300, 600]}], **tasks}})
    assert MetaConfig.from_dict(long.to_dict()) == long and "unroll" not in plain.tasks.spec_dicts[1]
    a, _ = ES(plain, RK).ask({}, 3)
    b, _ = ES(long, RK).ask({}, 3)
    assert [t.task for t in a] == [t.task for t in b]
    for ta, tb in zip(a, b):
        if tb.task.kwargs["dim"] == 3:
            assert tb.unroll_length == ta.unroll_length and 20 <= ta.unroll_length <= 60
        else:
            assert 300 <= tb.unroll_length <= 600 and tb.unroll_length % 10 == 0
    assert {t.task.kwargs["dim"] for t in b} == {3, 5}
    for bad in ([600, 300], [0, 5], "long", [1.5, 3]):
        with pytest.raises(ConfigError, match="unroll must be"):
            MetaConfig.from_dict({"tasks": {"specs": [{"name": "quadratic", "unroll": bad}]}})
    with pytest.raises(ConfigError, match="each tasks.specs entry"):
        MetaConfig.from_dict({"tasks": {"specs": [{"name": "quadratic", "unrol": [1, 2]}]}})


@pytest.mark.parametrize("kind", ["centered_rank", "zscore", "none"])
def test_fitness_shaping_is_monotone(kind):
    x = np.array([0.3, -2.0, 5.0, 1.0, 0.31])
    y = shape_fitness(x, kind)
    assert np.array_equal(np.argsort(x), np.argsort(y))
    if kind == "centered_rank":
        assert y.min() == -0.5 and y.max() == 0.5 and abs(y.sum()) < 1e-12
    if kind == "zscore":
        assert abs(y.mean()) < 1e-12 and abs(y.std() - 1) < 1e-9


def test_result_wire_format_is_compact_and_round_trips():
    r = PairResult(2**31, 77, -1.2345678901234, np.nan, 400, Status.NAN, worker_id=3)
    blob = r.encode()
    assert len(blob) <= 64
    assert PairResult.decode(blob) == r
    g = PairResult(1, 2, 0.5, 0.5, 10, Status.OK, grad=np.arange(5, dtype=np.float32))
    assert PairResult.decode(g.encode()) == g and len(g.encode()) == len(blob) + 4 + 20
    with pytest.raises(ProtocolError):
        PairResult.decode(blob[:-1])
    with pytest.raises(ProtocolError):
        PairResult.decode(b"\x09" + blob[1:])


def test_tell_uses_a_swapped_in_noise_sum():
    """The trainer plugs an evaluator's distributed Σ w_i ε_i into ES; tell must route through it."""
    from mnemosyne_core.meta.es import weighted_noise_sum

    f = _quadratic()
    theta = {"w": jnp.array([1.0, 0.5, -0.5, 0.2])}
    n = 16
    tickets = [Ticket(3, i, TaskSpec("quadratic"), 10, 10, 0, 3, RK) for i in range(n)]
    eps = perturbations(RK, 3, range(n), 4)
    lp = np.asarray(jax.vmap(f)(theta["w"] + 0.05 * eps))
    ln = np.asarray(jax.vmap(f)(theta["w"] - 0.05 * eps))
    results = [PairResult(3, i, lp[i], ln[i], 20, Status.OK) for i in range(n)]
    calls = []

    def recording_sum(run_key, generations, pair_ids, weights, dim):
        calls.append((list(generations), list(pair_ids), dim))
        return weighted_noise_sum(run_key, generations, pair_ids, weights, dim)

    plain, _, _ = ES(_cfg(num_pairs=n, sigma=0.05), RK).tell({}, tickets, results, theta)
    es = ES(_cfg(num_pairs=n, sigma=0.05), RK)
    es.noise_sum = recording_sum
    routed, _, _ = es.tell({}, tickets, results, theta)
    assert calls == [([3] * n, list(range(n)), 4)]
    np.testing.assert_array_equal(np.asarray(routed["w"]), np.asarray(plain["w"]))


def test_shape_within_task_ranks_each_tasks_pairs_among_themselves():
    """Task B's meta-losses sit inside task A's wide spread: ranked together, B's pairs get
    rank differences of 1 however consistently + beats −; ranked within their task, B's pairs
    are weighted exactly as if B had been the only task (up to the 1/m of the mean)."""
    a, b = TaskSpec("quadratic", {"dim": 4}), TaskSpec("quadratic", {"dim": 8})
    lp = np.array([0.0, 100.0, 200.0, 300.0, 150.000, 150.001, 150.002, 150.003])
    ln = np.array([40.0, 140.0, 240.0, 340.0, 150.0005, 150.0015, 150.0025, 150.0035])
    n = lp.size
    tickets = [Ticket(0, i, a if i < 4 else b, 10, 10, 0, 0, RK) for i in range(n)]
    results = [PairResult(0, i, lp[i], ln[i], 20, Status.OK) for i in range(n)]
    theta = {"w": jnp.zeros(3)}

    def weights(within, ts=tickets, rs=results):
        seen = []
        es = ES(_cfg(num_pairs=len(ts), sigma=0.5, shape_within_task=within), RK)
        es.noise_sum = lambda rk, gens, ids, w, dim: (seen.append(np.asarray(w)), jnp.zeros(dim))[1]
        es.tell({}, ts, rs, theta)
        return seen[0]

    b_alone = weights(False, tickets[4:], results[4:])  # 4 pairs of B only
    mixed = weights(False)
    within = weights(True)
    np.testing.assert_allclose(within[4:] * n, b_alone * 4)
    assert np.all(np.abs(mixed[4:] * n) < np.abs(b_alone * 4) / 2)  # cross-task ranks shrink B's pairs
    assert np.all(within < 0)  # + is the better half in every pair of both tasks
    np.testing.assert_allclose(within[:4], shaped_differences(lp[:4], ln[:4], "centered_rank") / (2 * n * 0.5))


def test_shape_within_task_must_be_a_boolean():
    from mnemosyne_core.meta.config import ConfigError
    with pytest.raises(ConfigError, match="shape_within_task must be true or false, got 'yes'"):
        _cfg(shape_within_task="yes")


def test_shaped_differences_rejects_mislabelled_pairs():
    with pytest.raises(ValueError, match="3 group labels for 2 pairs"):
        shaped_differences([0.0, 1.0], [1.0, 0.0], "centered_rank", ["a", "b", "c"])


def test_tell_reports_the_meta_loss_of_each_task():
    """Dropped pairs do not count; repeated spec names fall back to the spec JSON as the label."""
    q, m = TaskSpec("quadratic", {"dim": 4}), TaskSpec("digits_mlp")
    tickets = [Ticket(0, i, q if i % 2 == 0 else m, 10, 10, 0, 0, RK) for i in range(5)]
    lp, ln = [1.0, 5.0, 3.0, np.nan, 2.0], [2.0, 7.0, 4.0, 0.0, 3.0]
    results = [PairResult(0, i, lp[i], ln[i], 20, Status.OK if i != 3 else Status.NAN) for i in range(5)]
    _, _, stats = ES(_cfg(num_pairs=5), RK).tell({}, tickets, results, {"w": jnp.zeros(2)})
    row = stats.as_dict()
    assert row["meta_loss/quadratic"] == pytest.approx((1.5 + 3.5 + 2.5) / 3)
    assert row["meta_loss/digits_mlp"] == pytest.approx(6.0)  # pair 3 (NaN half) dropped
    assert row["meta_loss"] == pytest.approx((1.5 + 6.0 + 3.5 + 2.5) / 4)
    twin = [Ticket(0, i, q if i == 0 else TaskSpec("quadratic", {"dim": 8}), 10, 10, 0, 0, RK) for i in range(2)]
    _, _, stats = ES(_cfg(num_pairs=2), RK).tell({}, twin, results[:2], {"w": jnp.zeros(2)})
    assert sorted(stats.meta_loss_by_task) == sorted(t.task.to_json() for t in twin)
