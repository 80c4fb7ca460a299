"""Evaluation harness: a learned optimizer against tuned hand-designed optimizers and the LSTM baseline.

For every task of a suite and every optimizer, ``seeds`` inner runs of
``max(horizons) × steps`` steps are trained (vmapped over seeds and over the
learning-rate grid, one compile per optimizer family and task); every run of a
task sees the same initialisations and batches. Read-outs at each horizon
``h × steps`` (h = 1, 2, 5 by default — the meta-training horizon and beyond):

* final training loss: mean minibatch loss over the last ``steps // 20`` steps
  before the horizon, averaged over seeds;
* test accuracy / loss of the parameters at the horizon (``task.evaluate``);
* steps to reach Adam-best's final training loss (smoothed curve, first crossing).

Adam is run at 7 log-spaced learning rates (the best per task and horizon is
"Adam-best"; 1e-3 is one of them), SGD with momentum 0.9 over a grid, plus the
tuning-free ``optax.contrib.prodigy``. ``run_suite`` returns a JSON-able dict;
``format_table`` and ``plot_curves`` render it.

Example:
    >>> SUITES["quick"][0].name
    'digits_mlp'
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnemosyne_core.tasks import TaskSpec, make_task

__all__ = ["ADAM_LRS", "SGD_LRS", "SUITES", "Learned", "format_table", "plot_curves", "run_suite", "suite_specs"]

ADAM_LRS = tuple(float(x) for x in np.logspace(-4, -1, 7))  # 1e-4 … 1e-1, includes 1e-3
SGD_LRS = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
HORIZONS = (1, 2, 5)


def _digits(hidden, act, batch=128):
    return TaskSpec("digits_mlp", {"hidden": list(hidden), "activation": act, "batch_size": batch})


SUITES: dict[str, list[TaskSpec]] = {
    "quick": [_digits([32], "relu")],
    "train": [_digits([32], "relu"), _digits([64, 64], "tanh"), _digits([48, 48, 48], "relu")],
}


def suite_specs(name: str) -> list[TaskSpec]:
    """A named suite; ``heldout`` (and any other task family name) lists the family's support."""
    if name in SUITES:
        return list(SUITES[name])
    from mnemosyne_core.tasks.families import FAMILIES

    if name in FAMILIES and hasattr(FAMILIES[name], "support"):
        return list(FAMILIES[name].support())
    raise KeyError(f"unknown suite {name!r}; known: {sorted(set(SUITES) | {'heldout'})}")


@dataclasses.dataclass(frozen=True)
class Learned:
    """A learned optimizer to evaluate: label, θ and its config (Mnemosyne or LSTM)."""

    label: str
    theta: Any
    config: Any

    def transform(self) -> optax.GradientTransformationExtraArgs:
        from mnemosyne_core.meta.learned import LearnedOptimizer

        return LearnedOptimizer.for_config(self.config).transform(self.theta)


def _curves(task: Any, make_tx: Callable[[jax.Array], Any], hparams: jax.Array, seeds: int, chunk: int,
            n_chunks: int, eval_after: Sequence[int]) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
    """Loss curves ``(len(hparams), seeds, chunk * n_chunks)`` and evaluations at chunk boundaries."""

    def init(hp, seed):
        key = jax.random.key(seed)
        params = task.init(jax.random.fold_in(key, 0))
        return params, make_tx(hp).init(params)

    def run(hp, seed, params, opt_state, t0):
        tx = make_tx(hp)
        data = jax.random.fold_in(jax.random.key(seed), 1)

        def step(carry, t):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(jax.random.fold_in(data, t)))
            updates, opt_state = tx.update(grads, opt_state, params, loss=loss)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), t0 + jnp.arange(chunk))
        return params, opt_state, losses

    grid = jax.vmap(jax.vmap(init, (None, 0)), (0, None))
    seeds_arr = jnp.arange(seeds)
    params, opt_state = jax.jit(grid)(hparams, seeds_arr)
    run_v = jax.jit(jax.vmap(jax.vmap(run, (None, 0, 0, 0, None)), (0, None, 0, 0, None)))
    evaluate = jax.jit(jax.vmap(jax.vmap(task.evaluate)))
    pieces, evals = [], {}
    for c in range(n_chunks):
        params, opt_state, losses = run_v(hparams, seeds_arr, params, opt_state, c * chunk)
        pieces.append(np.asarray(losses, np.float64))
        if c + 1 in eval_after:
            evals[c + 1] = {k: np.asarray(v, np.float64) for k, v in evaluate(params).items()}
    return np.concatenate(pieces, axis=-1), evals


def _constant(tx: Any) -> Callable[[Any], Any]:
    """A ``make_tx`` that ignores its hyper-parameter (learned optimizers carry their own)."""
    return lambda _: tx


def _smooth(curve: np.ndarray, window: int) -> np.ndarray:
    c = np.where(np.isfinite(curve), curve, np.inf)
    if window <= 1:
        return c
    kernel = np.ones(window) / window
    out = np.convolve(np.where(np.isfinite(c), c, 1e30), kernel, mode="valid")
    out = np.where(out > 1e29, np.inf, out)
    return np.concatenate([np.full(window - 1, np.inf), out])


def _final(curves: np.ndarray, horizon: int, window: int) -> float:
    """Mean over seeds of the mean loss over the ``window`` steps before ``horizon``."""
    tail = curves[..., horizon - window:horizon]
    per_seed = np.where(np.all(np.isfinite(tail), axis=-1), tail.mean(axis=-1), np.inf)
    return float(np.mean(per_seed))


def _steps_to(curve_mean: np.ndarray, target: float, window: int) -> int | None:
    hit = np.nonzero(_smooth(curve_mean, window) <= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def run_suite(specs: Sequence[TaskSpec], learned: Sequence[Learned], *, steps: int, seeds: int,
              horizons: Sequence[int] = HORIZONS, include: Sequence[str] = ("adam", "sgd", "prodigy"),
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate; returns ``{"config": …, "tasks": {task_label: {...}}}`` (JSON-able)."""
    horizons = sorted({int(h) for h in horizons})
    n_chunks = max(horizons)
    window = max(1, steps // 20)
    out: dict[str, Any] = {"config": {"steps": steps, "seeds": seeds, "horizons": horizons, "window": window,
                                      "adam_lrs": list(ADAM_LRS), "sgd_lrs": list(SGD_LRS)}, "tasks": {}}
    dummy = jnp.zeros((1,), jnp.float32)
    for spec in specs:
        label = _label(spec)
        if progress:
            progress(label)
        task = make_task(spec)
        runs: dict[str, tuple[np.ndarray, dict]] = {}
        families: dict[str, tuple[Callable, jax.Array, list[str]]] = {}
        if "adam" in include:
            families["adam"] = (lambda lr: optax.with_extra_args_support(optax.adam(lr)),
                                jnp.asarray(ADAM_LRS, jnp.float32), [f"adam({lr:.1e})" for lr in ADAM_LRS])
        if "sgd" in include:
            families["sgd"] = (lambda lr: optax.with_extra_args_support(optax.sgd(lr, momentum=0.9)),
                               jnp.asarray(SGD_LRS, jnp.float32), [f"sgd_m({lr:.0e})" for lr in SGD_LRS])
        if "prodigy" in include:
            families["prodigy"] = (lambda _: optax.with_extra_args_support(optax.contrib.prodigy(1.0)),
                                   dummy, ["prodigy"])
        for lrn in learned:
            families[lrn.label] = (_constant(lrn.transform()), dummy, [lrn.label])
        for make_tx, hps, names in families.values():
            curves, evals = _curves(task, make_tx, hps, seeds, steps, n_chunks, horizons)
            for i, name in enumerate(names):
                runs[name] = (curves[i], {h: {k: v[i] for k, v in e.items()} for h, e in evals.items()})
        out["tasks"][label] = _summarise(spec, runs, steps, horizons, window, [lr.label for lr in learned])
    return out


def _summarise(spec: TaskSpec, runs: dict, steps: int, horizons: list[int], window: int,
               learned: list[str]) -> dict[str, Any]:
    res: dict[str, Any] = {"spec": json.loads(spec.to_json()), "horizons": {}, "curves": {}}
    adam_names = [n for n in runs if n.startswith("adam(")]
    sgd_names = [n for n in runs if n.startswith("sgd_m(")]
    for h in horizons:
        hs = h * steps
        finals = {n: _final(c, hs, window) for n, (c, _) in runs.items()}
        row: dict[str, Any] = {"steps": hs, "final_train_loss": finals, "test_accuracy": {}, "test_loss": {}}
        for n, (_, ev) in runs.items():
            for metric in ("test_accuracy", "test_loss"):
                if metric in ev.get(h, {}):
                    row[metric][n] = float(np.mean(ev[h][metric]))
        if adam_names:
            best = min(adam_names, key=lambda n: finals[n])
            row["adam_best"] = best
            target = finals[best]
            row["steps_to_adam_best"] = {n: _steps_to(c.mean(axis=0)[:hs], target, window)
                                         for n, (c, _) in runs.items()}
            for n in learned:
                row.setdefault("advantage_log_ratio", {})[n] = _log_ratio(target, finals[n])
        if sgd_names:
            row["sgd_best"] = min(sgd_names, key=lambda n: finals[n])
        res["horizons"][str(h)] = row
    keep = set(learned) | {"adam(1.0e-03)", "prodigy"}
    if adam_names:
        keep.add(res["horizons"][str(horizons[0])]["adam_best"])
    if sgd_names:
        keep.add(res["horizons"][str(horizons[0])]["sgd_best"])
    for n in keep & set(runs):
        mean = runs[n][0].mean(axis=0)
        stride = max(1, mean.size // 500)
        res["curves"][n] = [float(x) if np.isfinite(x) else None for x in mean[::stride]]
    res["curve_stride"] = max(1, max(h for h in horizons) * steps // 500)
    return res


def _log_ratio(reference: float, value: float) -> float | None:
    """log(reference / value): > 0 means ``value`` is lower (better) than ``reference``."""
    if not (math.isfinite(reference) and math.isfinite(value)) or reference <= 0 or value <= 0:
        return None
    return math.log(reference / value)


def _label(spec: TaskSpec) -> str:
    kw = dict(spec.kwargs)
    parts = [spec.name]
    for key in ("hidden", "activation", "patch", "dim", "depth"):
        if key in kw:
            v = kw[key]
            parts.append("x".join(map(str, v)) if isinstance(v, list) else str(v))
    return "/".join(parts)


def format_table(results: dict[str, Any], learned: Sequence[str]) -> str:
    """A plain-text table per horizon: final training loss, test accuracy, steps to Adam-best's loss."""
    lines = []
    for label, res in results["tasks"].items():
        for h, row in res["horizons"].items():
            names = list(learned) + [row.get("adam_best"), "adam(1.0e-03)", row.get("sgd_best"), "prodigy"]
            names = [n for n in dict.fromkeys(names) if n and n in row["final_train_loss"]]
            lines.append(f"{label}  @ {row['steps']} steps ({h}x)")
            lines.append(f"  {'optimizer':<22}{'train loss':>12}{'test acc':>10}{'steps→Adam-best':>17}")
            for n in names:
                tag = f"{n} *" if n == row.get("adam_best") else n
                acc = row["test_accuracy"].get(n)
                reach = row.get("steps_to_adam_best", {}).get(n)
                lines.append(f"  {tag:<22}{row['final_train_loss'][n]:>12.4g}"
                             f"{(f'{acc:.3f}' if acc is not None else '-'):>10}{(reach or '-'):>17}")
    summary = summarise_wins(results, learned)
    if summary:
        lines.append("")
        lines.extend(summary)
    return "\n".join(lines)


def summarise_wins(results: dict[str, Any], learned: Sequence[str]) -> list[str]:
    """One line per (learned optimizer, horizon): wins vs Adam-best / Adam(1e-3), mean advantage."""
    lines = []
    tasks = results["tasks"]
    if not tasks:
        return lines
    horizons = list(next(iter(tasks.values()))["horizons"])
    for n in learned:
        for h in horizons:
            rows = [t["horizons"][h] for t in tasks.values()]
            fl = [r["final_train_loss"] for r in rows]
            beat_best = sum(f[n] <= f[r["adam_best"]] for f, r in zip(fl, rows) if "adam_best" in r)
            beat_1e3 = sum(f[n] <= f["adam(1.0e-03)"] for f in fl if "adam(1.0e-03)" in f)
            adv = [r.get("advantage_log_ratio", {}).get(n) for r in rows]
            adv = [a for a in adv if a is not None]
            mean_adv = f"{np.mean(adv):+.3f}" if adv else "n/a"
            lines.append(f"{n} @ {h}x: ≤ Adam-best on {beat_best}/{len(rows)}, ≤ Adam(1e-3) on "
                         f"{beat_1e3}/{len(rows)}, mean log(Adam-best/ours) = {mean_adv}")
    return lines


def plot_curves(results: dict[str, Any], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """One PNG per task: mean training-loss curves (log scale) with the horizons marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    steps = results["config"]["steps"]
    for label, res in results["tasks"].items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        stride = res["curve_stride"]
        for name, curve in sorted(res["curves"].items()):
            y = np.array([np.nan if v is None else v for v in curve])
            ax.plot(np.arange(y.size) * stride, y, label=name, lw=1.4 if "adam" not in name else 1.0)
        for h in results["config"]["horizons"]:
            ax.axvline(h * steps, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (minibatch, mean over seeds)")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / (label.replace("/", "_") + ".png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

