"""Robotics evaluation: policy return after a fixed env-step budget, per optimizer.

Compares the shipped learned optimizers (``default``, ``robotics``), Adam's best
learning rate from a grid, Adam(1e-3) and any extra optimizer specs, over
``--seeds`` seeds per env; and, given two meta-training run folders, whether the
robotics optimizer initialised from its parent (``default_v1``: ``meta-train --config robotics
--init-from mnemosyne_core/pretrained/superseded/default_v1.msgpack``) converges faster (meta-loss per
generation) than one meta-trained from a fresh θ with the same config and budget.

    .venv/bin/python benchmarks/robotics_eval.py --out runs/robotics_eval
    .venv/bin/python benchmarks/robotics_eval.py --envs gymnax_cartpole --seeds 3 \\
        --extra fresh=runs/robotics_fresh/optimizer.msgpack \\
        --meta-runs from-default_v1=runs/robotics from-fresh=runs/robotics_fresh --out runs/eval

"Final return" is the greedy return averaged over the last three evaluation
points (8 fixed evaluation episodes each), which damps single-episode RL noise;
"convergence" is the mean return over all evaluation points of a run (speed and
stability together); "updates to threshold" is speed alone: the first evaluation
point whose return reaches the env's threshold in ``SOLVE``.
Writes OUT/results.json, OUT/table.md and one return-vs-env-steps PNG per env.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# env -> (task kwargs, policy updates): the fixed env-step budget is updates * num_envs * horizon.
BUDGETS = {
    "gymnax_cartpole": ({"num_envs": 16}, 150),
    "gymnax_acrobot": ({"num_envs": 16}, 150),
    "gymnax_pendulum": ({"num_envs": 16}, 600),
    "brax_inverted_pendulum": ({"num_envs": 8, "hidden": [16, 16]}, 60),
}
ADAM_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # brackets every env's best
EVALS = 12  # evaluation points per run
# env -> (return threshold, dense phase): "updates to reach" the threshold is the first evaluation
# point at or above it. The mean-return convergence column mixes speed with stability (a policy that
# solves a task early and then degrades scores like one that is slow); this column is speed alone.
# Acrobot (threshold −100, Gym's reward_threshold for Acrobot-v1) is solved before the main runs'
# first evaluation point (update 12), so it is timed in separate runs of its first 36 updates
# evaluated every 2; Pendulum and CartPole are timed on the main runs' evaluation points.
SOLVE = {
    "gymnax_pendulum": (-200.0, None),
    "gymnax_cartpole": (200.0, None),
    "gymnax_acrobot": (-100.0, (36, 2)),
    "brax_inverted_pendulum": (500.0, None),
}


def run_one(env: str, spec: str, seed: int, scale: float, cache: dict, cache_path: pathlib.Path,
            *, phase: tuple[int, int] | None = None):
    """Final return and history of one run; finished runs are cached in OUT/runs.jsonl so a
    re-run with more optimizers (e.g. once ``robotics`` ships) only trains the new ones.
    ``phase = (updates, every)`` runs only the first ``updates``, evaluated every ``every``."""
    from service.robotics.train import EvalPoint

    key = (f"{env}|{spec}{_content_tag(spec)}|{seed}|{scale}" + (f"|{phase[0]}|{phase[1]}" if phase else "")
           + f"|code@{_code_tag()}")
    if key not in cache:
        updates, every = phase or (None, None)
        final, history = _train(env, spec, seed, scale, updates=updates, every=every)
        cache[key] = {"final": final, "history": [vars(p) for p in history]}
        # One appended line per run: rewriting the whole cache after every run was O(n²) (623 MB
        # written for the ~1100 runs of a 20-seed table).
        with cache_path.open("a") as f:
            f.write(json.dumps({"key": key, **cache[key]}) + "\n")
    hit = cache[key]
    return hit["final"], [EvalPoint(**p) for p in hit["history"]]


def load_cache(path: pathlib.Path) -> dict:
    """The runs cached in ``path`` (one JSON object per line, as ``run_one`` appends them). A line
    cut short by a killed run is dropped from the file (so the next append starts on a line of its
    own) and that run is simply trained again."""
    cache, good = {}, []
    if not path.exists():
        return cache
    text = path.read_text()
    lines = text.splitlines()
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or "key" not in row:
            continue
        good.append(line)
        cache[row.pop("key")] = row
    if len(good) != len(lines) or (text and not text.endswith("\n")):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in good))
        tmp.replace(path)
    return cache


@functools.cache
def _code_tag() -> str:
    """A digest of the code and pinned libraries a run's numbers depend on (``mnemosyne_core``,
    ``service/robotics``, ``uv.lock``): a cached run is reused only by the same code, so a change
    to an optimizer's update or a task (or a library upgrade) cannot leave stale numbers in the
    table, while edits elsewhere (docs, the registry, this script's reporting) keep the cache."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted([*(ROOT / "mnemosyne_core").rglob("*.py"), *(ROOT / "service" / "robotics").rglob("*.py"),
                    ROOT / "uv.lock"])
    for path in files:
        if path.is_file():
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@functools.cache
def _content_tag(spec: str) -> str:
    """``"@<sha256 of θ>"`` for a learned optimizer, ``""`` for ``adam:LR``/``sgd:LR``: a cached run
    of ``robotics`` (or of a checkpoint path) is reused only while that name still holds the same θ,
    so re-shipping an optimizer cannot leave its old numbers in the table."""
    from service.robotics.optimizers import is_plain_spec

    if is_plain_spec(spec):
        return ""
    import hashlib

    import jax
    import numpy as np

    from mnemosyne_core.pretrained import load_optimizer

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(load_optimizer(spec)[0]):
        digest.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return "@" + digest.hexdigest()[:12]


def updates_to_reach(env: str, spec: str, seed: int, history, cache: dict, cache_path: pathlib.Path) -> float:
    """Policy updates until the greedy return first reaches ``SOLVE[env]``'s threshold (``inf`` if
    it never does within the run), from ``history`` or, for an env with a dense phase, from its own
    run of that phase (cached like the main runs)."""
    threshold, dense = SOLVE[env]
    if dense is not None:
        history = run_one(env, spec, seed, 1.0, cache, cache_path, phase=dense)[1]
    return next((float(p.update) for p in history if p.episode_return >= threshold), math.inf)


def median_updates(xs: list[float]) -> str:
    """Median updates to the threshold and how many runs reached it, e.g. ``"6 (20/20)"``."""
    med, reached = statistics.median(xs), sum(map(math.isfinite, xs))
    return (f"{med:.0f}" if math.isfinite(med) else "never") + f" ({reached}/{len(xs)})"


@functools.cache
def _task_and_optimizer(env: str, spec: str):
    """One task and one transform object per (env, optimizer): ``train_policy`` compiles once per
    pair of objects, so every seed of a cell reuses the first seed's program (and its memory)."""
    from mnemosyne_core.tasks import make_task
    from service.robotics.optimizers import resolve_optimizer

    return make_task({"name": env, "kwargs": BUDGETS[env][0]}), resolve_optimizer(spec)[0]


def _train(env: str, spec: str, seed: int, scale: float, *, updates: int | None = None,
           every: int | None = None):
    from service.robotics.train import train_policy

    budget = BUDGETS[env][1]
    if updates is None:
        updates = max(EVALS, int(budget * scale))
    task, tx = _task_and_optimizer(env, spec)
    result = train_policy(task, tx, steps=updates, seed=seed, eval_every=every or max(1, updates // EVALS))
    tail = [p.episode_return for p in result.history[-3:]]
    final = statistics.fmean(tail) if all(math.isfinite(r) for r in tail) else math.nan
    return final, result.history


def available(spec: str) -> str | None:
    from service.robotics.optimizers import OptimizerSpecError, resolve_optimizer

    try:
        resolve_optimizer(spec)
    except OptimizerSpecError as exc:
        return str(exc)
    return None


def mean_std(xs: list[float]) -> str:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return "diverged"
    sd = statistics.pstdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.1f} ± {sd:.1f}"


def meta_convergence(runs: dict[str, pathlib.Path]) -> dict[str, dict]:
    """Meta-loss per generation of each run (metrics.jsonl) and a summary."""
    out = {}
    for label, folder in runs.items():
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line]
        losses = [r["meta_loss"] for r in rows]
        k = max(1, min(5, len(losses) // 2))
        out[label] = {"meta_loss": losses, "first": statistics.fmean(losses[:k]),
                      "last": statistics.fmean(losses[-k:]), "generations": len(losses)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--envs", nargs="+", default=["gymnax_pendulum", "gymnax_cartpole", "gymnax_acrobot"],
                    choices=sorted(BUDGETS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every update budget (quick runs)")
    ap.add_argument("--grid", type=float, nargs="+", default=list(ADAM_GRID), help="Adam learning rates")
    ap.add_argument("--learned", nargs="*", default=["default", "robotics"], help="pretrained names/specs")
    ap.add_argument("--extra", nargs="*", default=[], metavar="LABEL=SPEC", help="more optimizers")
    ap.add_argument("--meta-runs", nargs="*", default=[], metavar="LABEL=DIR",
                    help="meta-training run folders to compare (metrics.jsonl)")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "runs" / "robotics_eval")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cache_path = args.out / "runs.jsonl"
    cache = load_cache(cache_path)

    from service.robotics.report import plot_returns

    optimizers: dict[str, str] = {f"adam:{lr:g}": f"adam:{lr:g}" for lr in args.grid}
    if 1e-3 not in args.grid:
        optimizers["adam:0.001"] = "adam:1e-3"
    skipped = {}
    for spec in [*args.learned, *args.extra]:
        label, _, target = spec.partition("=") if "=" in spec else (spec, "", spec)
        reason = available(target)
        if reason:
            skipped[label] = reason
            print(f"skipping {label}: {reason}", flush=True)
        else:
            optimizers[label] = target

    results: dict[str, dict[str, dict]] = {}
    for env in args.envs:
        results[env] = {}
        curves = {}
        for label, spec in optimizers.items():
            finals, aucs, solves, t0 = [], [], [], time.time()
            for seed in range(args.seeds):
                final, history = run_one(env, spec, seed, args.scale, cache, cache_path)
                finals.append(final)
                # Mean return over all evaluation points: higher = converged sooner.
                aucs.append(statistics.fmean(p.episode_return for p in history[1:]))
                solves.append(updates_to_reach(env, spec, seed, history, cache, cache_path))
                if seed == 0:
                    curves[label] = history
            env_steps = history[-1].env_steps
            results[env][label] = {"finals": finals, "env_steps": env_steps, "aucs": aucs,
                                   "updates_to_threshold": solves}
            print(f"{env:24s} {label:12s} {mean_std(finals):>18s}  ({env_steps} env steps, "
                  f"{time.time() - t0:.0f} s)", flush=True)
        plot_returns(args.out / f"{env}.png", curves, f"{env}: return vs env steps (seed 0)")

    # Adam best-of-grid per env, by mean final return over seeds.
    extra_labels = [e.partition("=")[0] for e in args.extra]
    table = ["| env | env steps | default | robotics | Adam best (lr) | Adam 1e-3 |" +
             "".join(f" {label} |" for label in extra_labels)]
    table.append("|" + "---|" * (6 + len(args.extra)))
    for env, rows in results.items():
        grid = {k: v for k, v in rows.items() if k.startswith("adam:") and float(k[5:]) in args.grid}

        def score(k, grid=grid):
            xs = [x for x in grid[k]["finals"] if math.isfinite(x)]
            return statistics.fmean(xs) if xs else -math.inf

        best = max(grid, key=score)
        rows["adam_best"] = {"label": best, **grid[best]}

        def cell(label, rows=rows):
            return mean_std(rows[label]["finals"]) if label in rows else "n/a"

        extra_cells = "".join(f" {cell(label)} |" for label in extra_labels)
        table.append(f"| {env} | {rows[best]['env_steps']} | {cell('default')} | {cell('robotics')} | "
                     f"{mean_std(grid[best]['finals'])} ({best[5:]}) | {cell('adam:0.001')} |{extra_cells}")

    table.append("\nConvergence speed — mean greedy return over all evaluation points (same budget):\n")
    table.append("| env | default | robotics | Adam best | Adam 1e-3 |" + "".join(f" {x} |" for x in extra_labels))
    table.append("|" + "---|" * (5 + len(extra_labels)))
    def columns(rows):
        return ["default", "robotics", rows["adam_best"]["label"], "adam:0.001", *extra_labels]

    for env, rows in results.items():
        labels = columns(rows)
        table.append(f"| {env} |" + "".join(
            f" {mean_std(rows[x]['aucs'])} |" if x in rows else " n/a |" for x in labels))

    table.append("\nSpeed alone — policy updates until the greedy return first reaches the threshold, "
                 "median over seeds (runs that reached it):\n")
    table.append("| env | threshold | default | robotics | Adam best | Adam 1e-3 |" +
                 "".join(f" {x} |" for x in extra_labels))
    table.append("|" + "---|" * (6 + len(extra_labels)))
    for env, rows in results.items():
        labels = columns(rows)
        table.append(f"| {env} | {SOLVE[env][0]:g} |" + "".join(
            f" {median_updates(rows[x]['updates_to_threshold'])} |" if x in rows else " n/a |" for x in labels))

    meta = meta_convergence({k: pathlib.Path(v) for k, v in (m.split("=", 1) for m in args.meta_runs)})
    for label, m in meta.items():
        table.append(f"\nmeta-training {label}: meta-loss first {m['first']:.3f} → last {m['last']:.3f} "
                     f"over {m['generations']} generations")
    # Runs with the same config and seed sample the same tasks in each generation, so their
    # meta-losses compare generation by generation (the level itself swings with the task mix).
    labels = list(meta)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            pairs = list(zip(meta[a]["meta_loss"], meta[b]["meta_loss"]))
            lower = sum(x < y for x, y in pairs)
            table.append(f"meta-loss of {a} below {b} in {lower} of {len(pairs)} generations")
    text = "\n".join(table)
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(
        {"results": results, "skipped": skipped, "meta": meta, "seeds": args.seeds, "scale": args.scale},
        indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
