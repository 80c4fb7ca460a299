"""Ray backend scaling, all in one run: worker throughput, driver cost per pair, bytes per pair.

1. **Inner steps/s with 1 vs 2 ``InnerLoopWorker`` actors** (``--worker-cpus 1``; each actor pinned
   to its own core, as one CPU per worker means on a dedicated node) on the ``quick`` config's
   task, after a warm-up generation that compiles. Also the same without pinning, for reference.
2. **Driver aggregation time per pair** at |θ| = 10⁴ and 10⁵: decode the 36-byte results, shape
   fitness and rebuild Σ w_i ε_i from seeds (``mnemosyne_core.meta.es.es_gradient``) — everything
   the driver does per pair besides waiting; and the same with ε rebuilt on the workers
   (``RayEvaluator.weighted_noise_sum``), where the driver only adds one vector per 256 pairs.
3. **Bytes per pair**: the encoded ES/PES result (worker → driver), the pickled ticket
   (driver → worker) and θ's broadcast per generation amortised over the pairs.

Writes ``benchmarks/results/ray_scaling.json`` and prints a table. Runs its own embedded Ray
(temporary RAY_TMPDIR, token auth off, no dashboard) and shuts it down.

    .venv/bin/python benchmarks/ray_scaling.py            # ~3–5 minutes on 2 cores
    .venv/bin/python benchmarks/ray_scaling.py --pairs 16 --generations 4
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import platform
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tickets(config, generation: int, pairs: int, steps: int):
    import jax

    from mnemosyne_core.meta.noise import run_key_data
    from mnemosyne_core.meta.protocol import Ticket
    from mnemosyne_core.tasks.families import FAMILIES

    # One task shape for every pair: the benchmark measures execution, not compilation.
    spec = FAMILIES[config.tasks.family].sample(jax.random.key(0))
    return [Ticket(generation, i, spec, steps, steps, run_key=run_key_data(config.seed)) for i in range(pairs)]


def throughput(config, workers: int, pin: bool, pairs: int, steps: int, generations: int) -> dict:
    """Inner steps per second of ``workers`` actors on the same tickets, after one warm-up generation."""
    import jax
    import psutil

    from mnemosyne_core.meta.evaluator import learned_optimizer
    from service.ray_backend import BackendOptions, RayEvaluator

    theta = learned_optimizer(config).init_theta(jax.random.key(0))
    ev = RayEvaluator(config, BackendOptions(workers=workers, worker_cpus=1, pin_cpus=pin))
    try:
        info = ev.worker_info()
        ev.evaluate(theta, _tickets(config, 0, pairs, steps))  # compile on every actor
        procs = [psutil.Process(w["pid"]) for w in info]
        rates, result_bytes, steps_total = [], 0, 0
        cpu0 = sum(sum(p.cpu_times()[:2]) for p in procs)
        for g in range(1, generations + 1):
            tickets = _tickets(config, g, pairs, steps)
            t0 = time.perf_counter()
            results = ev.evaluate(theta, tickets)
            dt = time.perf_counter() - t0
            assert all(r.status.usable for r in results), [r.status for r in results]
            steps_total += sum(r.inner_steps for r in results)
            rates.append(sum(r.inner_steps for r in results) / dt)
            result_bytes += ev.metrics()["result_bytes"]
        cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu0
    finally:
        ev.close()
    # Steps per CPU-second of the actors: unaffected by other load on a shared machine, so
    # equal values for 1 and 2 workers mean the work itself scales; the wall-clock rate
    # shows what this machine actually delivered.
    return {"workers": workers, "pinned": pin, "cpus": [w["cpus"] for w in info],
            "inner_steps_per_s": statistics.median(rates), "all": rates,
            "inner_steps_per_worker_cpu_s": steps_total / cpu,
            "result_bytes_per_pair": result_bytes / (pairs * generations)}


def aggregation(dim: int, pairs: int, repeats: int) -> dict:
    """Driver seconds per pair: decode results + shaping + Σ w ε rebuilt from seeds."""
    import numpy as np

    from mnemosyne_core.meta.base import shape_fitness  # noqa: F401  (es_gradient shapes)
    from mnemosyne_core.meta.es import es_gradient
    from mnemosyne_core.meta.noise import run_key_data
    from mnemosyne_core.meta.protocol import PairResult, Status

    rng = np.random.default_rng(0)
    rk = run_key_data(0)
    blobs = [PairResult(1, i, float(a), float(b), 100, Status.OK).encode()
             for i, (a, b) in enumerate(rng.normal(size=(pairs, 2)))]

    def once(generation: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        results = [PairResult.decode(b) for b in blobs]
        ids = [r.pair_id for r in results]
        g = es_gradient(rk, generation, ids, [r.loss_pos for r in results], [r.loss_neg for r in results],
                        0.02, "centered_rank", dim)
        g.block_until_ready()
        return time.perf_counter() - t0, time.process_time() - c0

    once(0)  # compile for this (chunk, dim)
    times = [once(g) for g in range(1, repeats + 1)]
    # Wall time is what the driver waits; CPU time (all XLA threads) is what it would take on an
    # otherwise idle core, the better figure on a shared machine.
    return {"dim": dim, "pairs": pairs, "us_per_pair": 1e6 * statistics.median(t for t, _ in times) / pairs,
            "cpu_us_per_pair": 1e6 * statistics.median(c for _, c in times) / pairs,
            "all_us_per_pair": [1e6 * t / pairs for t, _ in times]}


def aggregation_on_workers(config, dim: int, pairs: int, repeats: int, workers: int = 2) -> dict:
    """The same aggregation with ε rebuilt on the actors (``RayEvaluator.weighted_noise_sum``):
    the driver decodes, shapes, and adds one |θ| vector per chunk of 256 pairs."""
    import numpy as np

    from mnemosyne_core.meta.base import shape_fitness
    from mnemosyne_core.meta.noise import run_key_data
    from mnemosyne_core.meta.protocol import PairResult, Status
    from service.ray_backend import BackendOptions, RayEvaluator

    rng = np.random.default_rng(0)
    rk = run_key_data(0)
    blobs = [PairResult(1, i, float(a), float(b), 100, Status.OK).encode()
             for i, (a, b) in enumerate(rng.normal(size=(pairs, 2)))]
    ev = RayEvaluator(config, BackendOptions(workers=workers, worker_cpus=1))

    def once(generation: int) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        results = [PairResult.decode(b) for b in blobs]
        both = shape_fitness(np.array([r.loss_pos for r in results] + [r.loss_neg for r in results]),
                             "centered_rank")
        w = (both[:pairs] - both[pairs:]) / (2.0 * pairs * 0.02)
        g = ev.weighted_noise_sum(rk, [generation] * pairs, [r.pair_id for r in results], w, dim)
        g.block_until_ready()
        return time.perf_counter() - t0, time.process_time() - c0

    try:
        ev.worker_info()
        once(0)
        times = [once(g) for g in range(1, repeats + 1)]
    finally:
        ev.close()
    return {"dim": dim, "pairs": pairs, "workers": workers,
            "driver_cpu_us_per_pair": 1e6 * statistics.median(c for _, c in times) / pairs,
            "wall_us_per_pair": 1e6 * statistics.median(t for t, _ in times) / pairs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="quick")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60, help="inner steps per pair and half")
    ap.add_argument("--generations", type=int, default=3, help="timed generations per setting")
    ap.add_argument("--agg-pairs", type=int, default=256)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ray_scaling.json"))
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".cache" / "jax"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    os.environ["RAY_TMPDIR"] = tmp

    import jax
    import ray

    from mnemosyne_core.meta.config import load_config
    from mnemosyne_core.meta.evaluator import learned_optimizer
    from mnemosyne_core.meta.protocol import PairResult, Status

    # Start Ray before JAX spins up its thread pools (Ray forks helper processes).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    config = load_config(args.config)
    dim = int(learned_optimizer(config).ravel(learned_optimizer(config).init_theta(jax.random.key(0)))[0].size)
    report: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                "jax": jax.__version__, "ray": ray.__version__,
                                "load_avg_at_start": os.getloadavg()},
                    "config": args.config, "theta_dim": dim, "pairs": args.pairs, "steps": args.steps}
    try:
        runs = {}
        for pin in (True, False):
            for workers in (1, 2):
                runs[(workers, pin)] = throughput(config, workers, pin, args.pairs, args.steps, args.generations)
                print(f"  workers={workers} pinned={pin}: "
                      f"{runs[(workers, pin)]['inner_steps_per_s']:.0f} inner steps/s", flush=True)
        report["aggregation_on_workers"] = [aggregation_on_workers(config, d, args.agg_pairs * 4, 3)
                                            for d in (10_000, 100_000)]
    finally:
        ray.shutdown()
    report["throughput"] = [dict(v) for v in runs.values()]
    report["speedup_2_vs_1_pinned"] = runs[(2, True)]["inner_steps_per_s"] / runs[(1, True)]["inner_steps_per_s"]
    report["speedup_2_vs_1_cpu_normalised"] = (2 * runs[(2, True)]["inner_steps_per_worker_cpu_s"]
                                               / runs[(1, True)]["inner_steps_per_worker_cpu_s"])
    report["speedup_2_vs_1_unpinned"] = (runs[(2, False)]["inner_steps_per_s"]
                                         / runs[(1, False)]["inner_steps_per_s"])

    report["aggregation"] = [aggregation(d, args.agg_pairs, 5) for d in (10_000, 100_000)]
    ticket = _tickets(config, 0, 1, args.steps)[0]
    report["bytes_per_pair"] = {
        "result_es_pes": len(PairResult(0, 0, 0.1, 0.2, 120, Status.OK).encode()),
        "result_measured_in_run": runs[(2, True)]["result_bytes_per_pair"],
        "ticket_pickled": len(pickle.dumps(ticket, protocol=5)),
        "theta_broadcast_per_pair": 4 * dim / args.pairs,
    }
    report["machine"]["load_avg_at_end"] = os.getloadavg()

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    agg = {a["dim"]: a["us_per_pair"] for a in report["aggregation"]}
    aggc = {a["dim"]: a["cpu_us_per_pair"] for a in report["aggregation"]}
    eff = {w: runs[(w, True)]["inner_steps_per_worker_cpu_s"] for w in (1, 2)}
    b = report["bytes_per_pair"]
    print(f"inner steps/s, 1 → 2 workers (pinned, 1 CPU each): {runs[(1, True)]['inner_steps_per_s']:.0f} → "
          f"{runs[(2, True)]['inner_steps_per_s']:.0f}  ratio {report['speedup_2_vs_1_pinned']:.2f}× (target ≥ 1.6×)")
    print(f"inner steps/s, 1 → 2 workers (unpinned):          {runs[(1, False)]['inner_steps_per_s']:.0f} → "
          f"{runs[(2, False)]['inner_steps_per_s']:.0f}  ratio {report['speedup_2_vs_1_unpinned']:.2f}×")
    print(f"inner steps per worker CPU-second (pinned): 1 worker {eff[1]:.0f}, 2 workers {eff[2]:.0f} "
          f"→ CPU-normalised 2-worker speed-up {2 * eff[2] / eff[1]:.2f}×")
    print(f"driver aggregation per pair, wall (CPU): |θ|=1e4 {agg[10_000]:.1f} ({aggc[10_000]:.1f}) µs "
          f"(target ≤ 50), |θ|=1e5 {agg[100_000]:.1f} ({aggc[100_000]:.1f}) µs")
    for a in report["aggregation_on_workers"]:
        print(f"  ε rebuilt on {a['workers']} workers, {a['pairs']} pairs, |θ|={a['dim']:.0e}: driver CPU "
              f"{a['driver_cpu_us_per_pair']:.1f} µs/pair, wall {a['wall_us_per_pair']:.1f} µs/pair")
    print(f"load average (1 min) at start/end: {report['machine']['load_avg_at_start'][0]:.1f}/"
          f"{report['machine']['load_avg_at_end'][0]:.1f} on {os.cpu_count()} CPUs")
    print(f"bytes per pair: result {b['result_es_pes']} B (target ≤ 64; measured {b['result_measured_in_run']:.0f}),"
          f" ticket {b['ticket_pickled']} B, θ broadcast {b['theta_broadcast_per_pair']:.0f} B")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
