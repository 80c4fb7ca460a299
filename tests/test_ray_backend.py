"""The Ray backend against a private local Ray cluster: equivalence with the in-process
backend, worker SIGKILL mid-generation, poisoned tickets, stale results.

The cluster is ``ray start --head --block`` in a subprocess (temporary RAY_TMPDIR,
token auth off) and is stopped by pid. The meta-training config is tiny (one
quadratic task shape, 4 pairs, 3 generations) so each actor compiles once.
"""
from __future__ import annotations

import os
import signal

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.xdist_group("ray")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ray = pytest.importorskip("ray")

from mnemosyne_core.meta.config import MetaConfig
from mnemosyne_core.meta.evaluator import learned_optimizer
from mnemosyne_core.meta.noise import run_key_data
from mnemosyne_core.meta.protocol import Status, Ticket
from mnemosyne_core.meta.trainer import MetaTrainer
from mnemosyne_core.tasks import TaskSpec
from service.ray_backend import BackendOptions, RayEvaluator
from service.ray_local import LocalRayHead
from service.ray_scheduler import SchedulePolicy

TINY = {
    "name": "ray-tiny", "seed": 3, "generations": 3, "checkpoint_every": 1,
    "estimator": {"num_pairs": 4, "truncation": 10},
    "tasks": {"specs": [{"name": "quadratic", "kwargs": {"dim": 4}}], "min_unroll": 10, "max_unroll": 10},
    "optimizer": {"config": {"learning_rate": 0.05}},
}


@pytest.fixture(scope="module")
def cluster():
    # One declared (fake) GPU and 4 TPU units: placement is checked without accelerators.
    head = LocalRayHead(num_cpus=2, num_gpus=1, resources={"TPU": 4}).start()
    mp = pytest.MonkeyPatch()
    for k, v in head.env.items():
        if k.startswith("RAY_"):
            mp.setenv(k, v)
    ray.init(address=head.address, include_dashboard=False, log_to_driver=False)
    try:
        yield head
    finally:
        ray.shutdown()
        mp.undo()
        head.stop()


@pytest.fixture(scope="module")
def config():
    return MetaConfig.from_dict(TINY)


@pytest.fixture(scope="module")
def local_theta(config, tmp_path_factory):
    """θ after the fault-free in-process run: the reference every Ray run must reproduce."""
    trainer = MetaTrainer(config, tmp_path_factory.mktemp("local"))
    trainer.run()
    return jax.device_get(trainer.theta)


def _assert_same_theta(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _run_ray(config, out, **opts):
    evaluator = RayEvaluator(config, BackendOptions(workers=2, address="auto", **opts))
    return evaluator, MetaTrainer(config, out, evaluator=evaluator)


def test_ray_backend_equals_local_backend(cluster, config, local_theta, tmp_path):
    evaluator, trainer = _run_ray(config, tmp_path)
    try:
        rows = trainer.run()
    finally:
        evaluator.close()
    _assert_same_theta(trainer.theta, local_theta)
    assert [r["workers_alive"] for r in rows] == [2, 2, 2]
    assert all(r["pairs_reissued"] == 0 and r["stale_results"] == 0 for r in rows)
    assert all(r["unique_workers"] == 2 for r in rows)  # both actors did work
    # ES results are ids and scalars: 36 bytes per pair, nothing |θ|-sized.
    assert all(r["result_bytes"] == 36 * config.estimator.num_pairs for r in rows)


def test_sigkill_worker_mid_generation_gives_fault_free_theta(cluster, config, local_theta, tmp_path):
    # Actor 1 sleeps 1.5 s at the start of every call, so the SIGKILL below always lands while
    # its call of generation 1 runs; without it a warm actor could answer the tiny quadratic
    # before the signal arrived (a CI run saw worker_deaths == 0).
    evaluator, trainer = _run_ray(config, tmp_path, stall={1: 1.5})
    victim = evaluator.worker_info()[1]["pid"]
    killed = []

    def kill_worker_one(generation):
        # Called right after generation 1's calls went out: actor 1 is busy with pairs 1 and 3.
        if generation == 1 and not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(generation)

    evaluator.scheduler.after_submit = kill_worker_one
    try:
        rows = trainer.run()
        pids_after = {w["pid"] for w in evaluator.worker_info()}
    finally:
        evaluator.close()
    assert killed == [1]
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert rows[1]["worker_deaths"] == 1
    assert rows[1]["pairs_reissued"] == 2  # pairs 1 and 3 went to actor 0
    assert all(r["pairs_used"] == config.estimator.num_pairs for r in rows)
    assert victim not in pids_after and len(pids_after) == 2  # Ray restarted actor 1
    _assert_same_theta(trainer.theta, local_theta)


def test_poisoned_pair_is_dropped_and_run_goes_on(cluster, config, tmp_path):
    evaluator, trainer = _run_ray(config, tmp_path, poison=(2,))
    try:
        rows = trainer.run()
    finally:
        evaluator.close()
    assert [r["generation"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["pairs_dropped"] == 1 and r["pairs_used"] == config.estimator.num_pairs - 1
        assert r["pairs_failed"] == 1 and r["workers_alive"] == 2
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.theta))


def test_straggler_tickets_are_duplicated_on_an_idle_worker(cluster, config):
    theta = learned_optimizer(config).init_theta(jax.random.key(0))
    spec = TaskSpec("quadratic", {"dim": 4})
    tickets = [Ticket(0, i, spec, 10, 10, run_key=run_key_data(0)) for i in range(4)]
    # Actor 1 hangs in every call; a call older than 1 s is copied to an idle actor.
    evaluator = RayEvaluator(config, BackendOptions(workers=2, address="auto", straggler_s=1.0,
                                                    stall={1: 3600.0}))
    try:
        results = evaluator.evaluate(theta, tickets)
        stats = evaluator.metrics()
    finally:
        evaluator.close()
    assert [r.pair_id for r in results] == [0, 1, 2, 3]
    assert all(r.status == Status.OK and r.worker_id == 0 for r in results)
    assert stats["pairs_reissued"] == 2 and stats["worker_deaths"] == 0


def test_stale_results_are_discarded_and_counted(cluster, config):
    theta = learned_optimizer(config).init_theta(jax.random.key(0))
    spec = TaskSpec("quadratic", {"dim": 4})

    def tickets(g):
        return [Ticket(g, i, spec, 10, 10, run_key=run_key_data(0)) for i in range(4)]

    evaluator = RayEvaluator(config, BackendOptions(workers=2, address="auto", deadline_s=0.0,
                                                    min_fraction=0.5))
    try:
        first = evaluator.evaluate(theta, tickets(0))
        s0 = evaluator.metrics()
        # Closed on the first actor's answer: its 2 pairs are in, the other 2 are dropped whole.
        assert sorted(r.status.usable for r in first) == [False, False, True, True]
        assert s0["pairs_timed_out"] == 2
        evaluator.scheduler.policy = SchedulePolicy()  # now wait for every pair
        second = evaluator.evaluate(theta, tickets(1))
        s1 = evaluator.metrics()
    finally:
        evaluator.close()
    assert all(r.generation == 1 and r.status == Status.OK for r in second)
    # The late answers of generation 0 arrived during generation 1 and were thrown away.
    assert s0["stale_results"] + s1["stale_results"] == 2
    assert s1["stale_results"] == 2 or s0["stale_results"] == 2


def test_fractional_gpu_and_tpu_placement(cluster, config):
    gpu = RayEvaluator(config, BackendOptions(workers=2, address="auto", worker_cpus=0.5, worker_gpus=0.5))
    try:
        infos = gpu.worker_info()
    finally:
        gpu.close()
    # Both half-GPU workers share the one GPU, each capped to 0.9 × 0.5 of its memory.
    assert [i["resources"].get("GPU") for i in infos] == [0.5, 0.5]
    assert {tuple(i["gpu_ids"]) for i in infos} == {(0,)}
    for info in infos:
        assert info["env"]["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
        assert info["env"]["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.450"
        assert "JAX_PLATFORMS" not in info["env"]

    tpu = RayEvaluator(config, BackendOptions(workers=2, address="auto", worker_cpus=0.5,
                                              worker_resources={"TPU": 2}))
    try:
        infos = tpu.worker_info()
    finally:
        tpu.close()
    assert [i["resources"].get("TPU") for i in infos] == [2.0, 2.0]
    cpu = RayEvaluator(config, BackendOptions(workers=1, address="auto", worker_cpus=0.5))
    try:
        [info] = cpu.worker_info()
    finally:
        cpu.close()
    assert info["env"]["JAX_PLATFORMS"] == "cpu" and "GPU" not in info["resources"]


def test_noise_sum_on_workers_equals_driver_side_sum(cluster, config):
    from mnemosyne_core.meta.es import weighted_noise_sum

    rng = np.random.default_rng(0)
    n, dim = 600, 1000  # three chunks of ≤ 256 pairs, two generations interleaved
    gens = rng.integers(4, 6, size=n)
    ids = rng.permutation(n)
    w = rng.normal(size=n).astype(np.float32)
    rk = run_key_data(7)
    evaluator = RayEvaluator(config, BackendOptions(workers=2, address="auto"))
    try:
        remote = evaluator.weighted_noise_sum(rk, gens, ids, w, dim)
    finally:
        evaluator.close()
    local = weighted_noise_sum(rk, gens, ids, w, dim)
    np.testing.assert_array_equal(np.asarray(remote), np.asarray(local))
    assert float(np.abs(np.asarray(local)).sum()) > 0


def _driver_env(head):
    env = dict(head.env)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    return env


def _checkpoint_generation(out):
    from flax import serialization

    path = out / "checkpoint.msgpack"
    if not path.exists():
        return -1
    return int(serialization.msgpack_restore(path.read_bytes())["generation"])


def test_sigkill_driver_then_resume_reaches_uninterrupted_theta(cluster, tmp_path):
    import subprocess
    import sys
    import time

    import tomli_w

    import mnemosyne_core as mn

    data = dict(TINY, name="ray-resume", generations=6)
    data["tasks"] = dict(TINY["tasks"], min_unroll=50, max_unroll=50)  # 5 chunks per generation
    cfg_path = tmp_path / "ray-resume.toml"
    cfg_path.write_bytes(tomli_w.dumps(data).encode())
    reference = MetaTrainer(MetaConfig.from_dict(data), tmp_path / "reference")
    reference.run()

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "service.cli", "meta-train", "--config", str(cfg_path), "--out", str(out),
           "--backend", "ray", "--address", cluster.address, "--workers", "2", "--no-progress"]
    driver = subprocess.Popen(cmd, cwd=REPO, env=_driver_env(cluster),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Kill the driver as soon as it has checkpointed generation 1 of 6 (event-driven, no sleeps
        # beyond the polling interval).
        while _checkpoint_generation(out) < 1:
            assert driver.poll() is None, driver.stderr.read().decode()[-3000:]
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == -signal.SIGKILL
    killed_at = _checkpoint_generation(out)
    assert 1 <= killed_at < 6 and not (out / "optimizer.msgpack").exists()

    resumed = subprocess.run(cmd + ["--resume"], check=False, cwd=REPO, env=_driver_env(cluster),
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    theta, _, meta = mn.load(out / "optimizer.msgpack")
    assert meta["generation"] == 6
    _assert_same_theta(theta, jax.device_get(reference.theta))


def test_pes_inner_state_checkpoint_and_resume_on_ray(cluster, tmp_path):
    """PES keeps each pair's inner problem inside the actor that ran it; a checkpoint must gather
    them from the actors and a resumed driver must hand them back to the right actors."""
    data = dict(TINY, name="ray-pes", generations=4)
    data["estimator"] = dict(TINY["estimator"], kind="pes")
    data["tasks"] = dict(TINY["tasks"], min_unroll=30, max_unroll=30)  # 3 truncations per episode
    config = MetaConfig.from_dict(data)
    reference = MetaTrainer(config, tmp_path / "local")
    reference.run(2)
    local_held = sorted(reference.evaluator.state_dict()["store"])
    reference.run()

    evaluator, first = _run_ray(config, tmp_path / "ray")
    try:
        first.run(2)
        held = evaluator.state_dict()["store"]
    finally:
        evaluator.close()
    # The same pairs are mid-episode as in-process (episodes start at random offsets), and they
    # came from both actors (pair i lives on actor i mod 2).
    assert sorted(held) == local_held and {i % 2 for i in held} == {0, 1}

    evaluator = RayEvaluator(config, BackendOptions(workers=2, address="auto"))
    try:
        resumed = MetaTrainer(config, tmp_path / "ray", evaluator=evaluator, resume=True)
        rows = resumed.run()
    finally:
        evaluator.close()
    assert [r["generation"] for r in rows] == [2, 3]
    assert all(r["pairs_used"] == 4 for r in rows)
    _assert_same_theta(resumed.theta, jax.device_get(reference.theta))
