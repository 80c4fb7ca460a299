"""PES: unbiased across truncations on a toy with a known meta-gradient; persistent state and resets."""
from __future__ import annotations

import jax
import numpy as np

from mnemosyne_core.meta.config import MetaConfig
from mnemosyne_core.meta.evaluator import LocalEvaluator
from mnemosyne_core.meta.noise import perturbations, run_key_data
from mnemosyne_core.meta.pes import PES
from mnemosyne_core.meta.protocol import PairResult, Status

RK = run_key_data(5)
A = 0.6  # inner dynamics s ← A·s + θ
C = np.array([1.0, -0.5])


class LinearDynamicsEvaluator:
    """Each pair carries two states (θ+σε and θ−σε halves) across truncations of one step.

    Truncation k's loss is ‖s_{k+1} − c‖² with s_{k+1} = Σ_j A^{k-j} θ_j, so with every θ_j = θ
    the true meta-gradient of truncation k is 2 b_k (b_k θ − c), b_k = Σ_{j≤k} A^j —
    most of it flows through earlier truncations, which plain truncated ES ignores.
    """

    def __init__(self, sigma: float):
        self.sigma = sigma
        self.states: dict[int, tuple[int, int, np.ndarray, np.ndarray]] = {}

    def evaluate(self, theta, tickets):
        ids = [t.pair_id for t in tickets]
        eps = np.asarray(perturbations(RK, tickets[0].generation, ids, 2), np.float64)
        out = []
        for t, e in zip(tickets, eps):
            held = self.states.get(t.pair_id)
            status = Status.OK
            if held is None or held[:2] != (t.episode, t.start_step):
                sp = sn = np.zeros(2)
                status = Status.OK if t.start_step == 0 else Status.RESET
            else:
                sp, sn = held[2], held[3]
            th = np.asarray(theta["w"], np.float64)
            sp, sn = A * sp + th + self.sigma * e, A * sn + th - self.sigma * e
            self.states[t.pair_id] = (t.episode, t.start_step + 1, sp, sn)
            out.append(PairResult(t.generation, t.pair_id, float(np.sum((sp - C) ** 2)),
                                  float(np.sum((sn - C) ** 2)), 1, status))
        return out

    def close(self):
        self.states.clear()


def _config(n):
    return MetaConfig.from_dict({"estimator": {"kind": "pes", "num_pairs": n, "sigma": 0.05, "shaping": "none",
                                               "truncation": 1},
                                 "tasks": {"specs": [{"name": "quadratic"}], "min_unroll": 5, "max_unroll": 5}})


def test_pes_is_unbiased_across_truncations_where_truncated_es_is_not():
    n = 6000
    theta = {"w": np.array([0.3, 0.2], np.float32)}
    pes = PES(_config(n), RK)
    state = pes.init(theta)
    state["started"] = True  # all episodes start together: every pair is at truncation k
    ev = LinearDynamicsEvaluator(0.05)
    th = theta["w"].astype(np.float64)
    for k in range(4):
        tickets, state = pes.ask(state, k)
        assert all(t.start_step == k for t in tickets)
        results = ev.evaluate(theta, tickets)
        grad, state, stats = pes.tell(state, tickets, results, theta)
        b = sum(A ** j for j in range(k + 1))
        true = 2 * b * (b * th - C)
        truncated = 2 * (b * th - C)  # what ignoring earlier truncations would estimate
        err = np.linalg.norm(np.asarray(grad["w"]) - true)
        assert err < 0.15 * np.linalg.norm(true), (k, grad["w"], true)
        if k >= 2:
            assert err < 0.5 * np.linalg.norm(truncated - true)
        assert stats.pairs_used == n


def test_reset_and_dropped_pairs_restart_their_accumulators():
    theta = {"w": np.zeros(2, np.float32)}
    pes = PES(_config(3), RK)
    state = pes.init(theta)
    state["started"] = True
    for g in range(2):
        tickets, state = pes.ask(state, g)
        results = [PairResult(g, i, 1.0, 0.0, 1, Status.OK) for i in range(3)]
        _, state, _ = pes.tell(state, tickets, results, theta)
    eps = [np.asarray(perturbations(RK, g, range(3), 2)) for g in range(3)]
    assert np.allclose(state["xi"], eps[0] + eps[1])
    tickets, state = pes.ask(state, 2)
    results = [PairResult(2, 0, 1.0, 0.0, 1, Status.OK), PairResult(2, 1, 1.0, 0.0, 1, Status.RESET),
               PairResult(2, 2, np.nan, np.nan, 1, Status.NAN)]
    _, state, stats = pes.tell(state, tickets, results, theta)
    assert np.allclose(state["xi"][0], eps[0][0] + eps[1][0] + eps[2][0])
    assert np.allclose(state["xi"][1], eps[2][1])  # the evaluator restarted it: ξ = this ε only
    assert np.all(state["xi"][2] == 0) and state["book"].restart[2]
    assert state["book"].episode[1] == 2 and stats.pairs_dropped == 1
    tickets, state = pes.ask(state, 3)
    assert tickets[2].start_step == 0 and tickets[2].episode == 3 and tickets[1].episode == 2


def test_local_evaluator_keeps_inner_state_and_resets_deterministically():
    cfg = MetaConfig.from_dict({
        "optimizer": {"config": {"learning_rate": 0.05}},
        "estimator": {"kind": "pes", "num_pairs": 2, "truncation": 5, "shaping": "none"},
        "tasks": {"specs": [{"name": "quadratic", "kwargs": {"dim": 4}}], "min_unroll": 20, "max_unroll": 20}})
    pes = PES(cfg, RK)
    from mnemosyne_core.meta.evaluator import learned_optimizer

    theta = learned_optimizer(cfg).init_theta(jax.random.key(0))
    state = pes.init(theta)
    state["started"] = True
    ev = LocalEvaluator(cfg)
    t0, state = pes.ask(state, 0)
    r0 = ev.evaluate(theta, t0)
    _, state, _ = pes.tell(state, t0, r0, theta)
    t1, state = pes.ask(state, 1)
    assert [t.start_step for t in t1] == [5, 5]
    kept = ev.evaluate(theta, t1)
    assert [r.status for r in kept] == [Status.OK, Status.OK]
    assert len(ev.store) == 2
    # A worker that lost the state (a fresh evaluator) answers RESET and restarts from step 0:
    # its losses are those of the first truncation of an episode started in generation 1.
    lost = LocalEvaluator(cfg).evaluate(theta, t1)
    assert [r.status for r in lost] == [Status.RESET, Status.RESET]
    assert all(a.loss_pos != b.loss_pos for a, b in zip(kept, lost))
    again = LocalEvaluator(cfg).evaluate(theta, t1)
    assert lost == again  # deterministic reset


def test_shape_within_task_ranks_each_tasks_pairs_among_themselves():
    from mnemosyne_core.meta.base import shaped_differences

    def config(within):
        return MetaConfig.from_dict({
            "estimator": {"kind": "pes", "num_pairs": 8, "sigma": 0.05, "truncation": 1,
                          "shape_within_task": within},
            "tasks": {"specs": [{"name": "quadratic", "kwargs": {"dim": 2}},
                                {"name": "quadratic", "kwargs": {"dim": 3}}], "min_unroll": 5, "max_unroll": 5}})

    theta = {"w": np.zeros(2, np.float32)}
    grads = {}
    for within in (False, True):
        pes = PES(config(within), RK)
        state = pes.init(theta)
        tickets, state = pes.ask(state, 0)
        dims = [t.task.kwargs["dim"] for t in tickets]
        assert set(dims) == {2, 3}  # both tasks drawn, so the grouping matters
        # dim-2 pairs spread over [0, 70]; dim-3 pairs sit inside that spread, + always better.
        lp = np.array([10.0 * i if d == 2 else 35.0 + 0.01 * i for i, d in enumerate(dims)])
        ln = lp + np.where(np.array(dims) == 2, 5.0, 0.001)
        results = [PairResult(0, t.pair_id, lp[j], ln[j], 1, Status.OK) for j, t in enumerate(tickets)]
        grads[within], _, _ = pes.tell(state, tickets, results, theta)
        eps = np.asarray(perturbations(RK, 0, [t.pair_id for t in tickets], 2))
        groups = [t.task.to_json() for t in tickets] if within else None
        want = shaped_differences(lp, ln, "centered_rank", groups) / (2 * 8 * 0.05) @ eps
        np.testing.assert_allclose(np.asarray(grads[within]["w"]), want, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(grads[True]["w"]), np.asarray(grads[False]["w"]))
