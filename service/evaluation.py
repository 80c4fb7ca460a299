"""Evaluation harness: learned optimizers against their own fresh θ and tuned hand-designed optimizers.

For every task of a suite and every optimizer, ``seeds`` inner runs are trained
(vmapped over seeds and over the hyper-parameter grid, one compile per
optimizer family and task); every run of a task sees the same initialisations
and batches. Read-outs at each horizon ``T = h × steps`` (h = 1, 2, 5 by
default — the meta-training horizon and beyond):

* final training loss: mean minibatch loss over the last 10 % of the steps
  before the horizon (``max(1, T // 10)`` steps), per seed and averaged over
  seeds (``final_train_loss_seeds`` / ``final_train_loss``);
* test accuracy / loss of the parameters at the horizon (``task.evaluate``);
* steps to reach Adam-best's final training loss (smoothed curve, first crossing).

The columns:

* ``adam(lr)``: Adam at 7 log-spaced constant learning rates (the best per task
  and horizon is "Adam-best"; 1e-3 is one of them); one run of ``max(h) × steps``
  steps, read out at every horizon;
* ``adam_cos(lr)``: Adam with ``optax.cosine_decay_schedule(lr, T)`` over the same
  grid — it is told the horizon, so every horizon has its own run of T steps
  (the best per task and horizon is "cosine-best");
* ``sgd_m(lr)`` (momentum 0.9) over a grid, and the tuning-free ``optax.contrib.prodigy``;
* for every learned optimizer ``L``: ``L`` as today (one long run); ``L[fresh]``,
  the same config with a never meta-trained θ
  (``LearnedOptimizer.for_config(config).init_theta(jax.random.key(0))``), and
  ``L[-part]`` for each learned part (:func:`mnemosyne_core.ablation_parts`: the
  memory, the schedule, …) with that part put back to the fresh θ's
  (:func:`mnemosyne_core.ablate`), all vmapped with θ in the same compiled program; for Mnemosyne configs that read the
  training progress (``progress_schedule``) ``L+T`` / ``L[fresh]+T``, told the
  horizon (``update(..., total_steps=T)``, a run per horizon); for Mnemosyne
  configs ``L+cos`` / ``L[fresh]+cos``, the learned direction under
  ``optax.cosine_decay_schedule(config.learning_rate, T)`` (``mn.scheduled``, a
  run per horizon, untuned peak).

:func:`summarise` gives, per learned column and horizon, the wins against
Adam-best, cosine-best, Adam(1e-3), the fresh θ and each ablation, and the geometric-mean
final-loss ratios to cosine-best, to the fresh θ and to each ablation with standard errors.
``run_suite`` returns a JSON-able dict; ``format_table`` and ``plot_curves``
render it.

Example:
    >>> SUITES["quick"][0].name
    'digits_mlp'
    >>> variant("default", fresh=True, mode="cos")
    'default[fresh]+cos'
    >>> variant("default", ablated="memory", mode="told")
    'default[-memory]+T'
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

__all__ = ["ADAM_LRS", "SGD_LRS", "SUITES", "Learned", "cosine_schedule", "format_table", "plot_curves",
           "run_suite", "suite_specs", "summarise", "variant"]

ADAM_LRS = tuple(float(x) for x in np.logspace(-4, -1, 7))  # 1e-4 … 1e-1, includes 1e-3
SGD_LRS = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
HORIZONS = (1, 2, 5)
TAIL_FRACTION = 0.1  # the score: mean training loss over the last 10 % of the steps before a horizon
MODES = {"plain": "", "told": "+T", "cos": "+cos"}


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


def variant(label: str, *, fresh: bool = False, mode: str = "plain", ablated: str | None = None) -> str:
    """The column name of a learned optimizer's variant: ``label[fresh]+T``, ``label[-memory]`` etc."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    if fresh and ablated:
        raise ValueError("a column is the fresh θ or an ablation, not both")
    return label + ("[fresh]" if fresh else f"[-{ablated}]" if ablated else "") + MODES[mode]


def cosine_schedule(peak: Any, total_steps: Any) -> Callable[[Any], Any]:
    """``optax.cosine_decay_schedule(peak, T)`` with T a traced value.

    optax checks ``decay_steps > 0`` in Python, so it needs a concrete T; this is its
    schedule over the progress t/T (optax's decay over one unit of time, read at t/T), which
    lets one compiled program serve every horizon. Equal to optax's up to float rounding.
    """
    unit = optax.cosine_decay_schedule(peak, 1)
    return lambda count: unit(jnp.asarray(count, jnp.float32) / jnp.asarray(total_steps, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Learned:
    """A learned optimizer to evaluate: label, θ and its config (Mnemosyne or LSTM)."""

    label: str
    theta: Any
    config: Any

    @property
    def optimizer(self) -> Any:
        from mnemosyne_core.meta.learned import LearnedOptimizer

        return LearnedOptimizer.for_config(self.config)

    def transform(self) -> optax.GradientTransformationExtraArgs:
        return self.optimizer.transform(self.theta)

    def fresh_theta(self) -> Any:
        """A never meta-trained θ of the same config (the ablation's reference)."""
        return self.optimizer.init_theta(jax.random.key(0))

    def parts(self, mode: str = "plain") -> tuple[str, ...]:
        """The learned parts that get an ablation column in ``mode``
        (:func:`mnemosyne_core.ablation_parts`; none in direction mode, which keeps trained and fresh,
        and no ``schedule`` untold, where the learned schedule does not act: that column would be
        the trained one again)."""
        from mnemosyne_core.ablation import ablation_parts

        if mode == "cos":
            return ()
        return tuple(p for p in ablation_parts(self.config) if mode == "told" or p != "schedule")

    def thetas(self, mode: str) -> list[Any]:
        """θ of each column of ``mode``, in :meth:`columns` order: trained, fresh, each ablation."""
        from mnemosyne_core.ablation import ablate

        return [self.theta, self.fresh_theta(), *(ablate(self.theta, self.config, p) for p in self.parts(mode))]

    def columns(self, mode: str) -> list[str]:
        parts = self.parts(mode)
        return [variant(self.label, mode=mode), variant(self.label, fresh=True, mode=mode),
                *(variant(self.label, mode=mode, ablated=p) for p in parts)]

    def modes(self) -> tuple[str, ...]:
        """The columns this optimizer gets: ``plain``; ``told`` if it reads ``total_steps``;
        ``cos`` (direction mode under a cosine schedule) for Mnemosyne configs."""
        from mnemosyne_core.mnemosyne import MnemosyneConfig

        if not isinstance(self.config, MnemosyneConfig):
            return ("plain",)
        return ("plain", "told", "cos") if self.config.progress_schedule else ("plain", "cos")


@dataclasses.dataclass(frozen=True)
class _Family:
    """Optimizers sharing one compiled program: ``make_tx(hp, total_steps)`` over ``hparams``'s rows.

    ``per_horizon``: the optimizer is told the horizon, so each horizon gets its own run of
    ``total_steps = h × steps`` steps; ``told``: ``update`` gets ``total_steps=`` too.
    """

    names: tuple[str, ...]
    make_tx: Callable[[Any, jax.Array], Any]
    hparams: Any
    per_horizon: bool = False
    told: bool = False


def _stack(*trees: Any) -> Any:
    try:
        return jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *trees)
    except ValueError as exc:
        raise ValueError(f"θ does not have its config's structure (compare it with a fresh θ): {exc}") from exc


def _families(include: Sequence[str], learned: Sequence[Learned]) -> list[_Family]:
    fams = []
    unused = jnp.zeros((1,), jnp.float32)
    if "adam" in include:
        lrs = jnp.asarray(ADAM_LRS, jnp.float32)
        fams.append(_Family(tuple(f"adam({lr:.1e})" for lr in ADAM_LRS),
                            lambda lr, _: optax.with_extra_args_support(optax.adam(lr)), lrs))
        fams.append(_Family(tuple(f"adam_cos({lr:.1e})" for lr in ADAM_LRS),
                            lambda lr, total: optax.with_extra_args_support(optax.adam(cosine_schedule(lr, total))),
                            lrs, per_horizon=True))
    if "sgd" in include:
        fams.append(_Family(tuple(f"sgd_m({lr:.0e})" for lr in SGD_LRS),
                            lambda lr, _: optax.with_extra_args_support(optax.sgd(lr, momentum=0.9)),
                            jnp.asarray(SGD_LRS, jnp.float32)))
    if "prodigy" in include:
        fams.append(_Family(("prodigy",), lambda _, __: optax.with_extra_args_support(optax.contrib.prodigy(1.0)),
                            unused))
    for lrn in learned:
        opt = lrn.optimizer
        for mode in lrn.modes():
            # one program for the trained, the fresh and the ablated θ
            thetas, names = _stack(*lrn.thetas(mode)), tuple(lrn.columns(mode))
            if mode == "cos":
                from mnemosyne_core.mnemosyne import scheduled

                peak, config = lrn.config.learning_rate, lrn.config
                fams.append(_Family(names, lambda th, total, c=config, a=peak: scheduled(
                    th, c, cosine_schedule(a, total)), thetas, per_horizon=True))
            else:
                fams.append(_Family(names, lambda th, _, o=opt: o.transform(th), thetas,
                                    per_horizon=mode == "told", told=mode == "told"))
    return fams


class _Runner:
    """The compiled programs of one family on one task: init, a chunk of steps, evaluation."""

    def __init__(self, task: Any, fam: _Family, chunk: int):
        self.fam, self.chunk = fam, chunk

        def init(hp, seed, total):
            key = jax.random.key(seed)
            params = task.init(jax.random.fold_in(key, 0))
            return params, fam.make_tx(hp, total).init(params)

        def run(hp, seed, params, opt_state, t0, total):
            tx = fam.make_tx(hp, total)
            data = jax.random.fold_in(jax.random.key(seed), 1)
            extra = {"total_steps": total} if fam.told else {}

            def step(carry, t):
                params, opt_state = carry
                loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(jax.random.fold_in(data, t)))
                updates, opt_state = tx.update(grads, opt_state, params, loss=loss, **extra)
                return (optax.apply_updates(params, updates), opt_state), loss

            (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), t0 + jnp.arange(chunk))
            return params, opt_state, losses

        self._init = jax.jit(jax.vmap(jax.vmap(init, (None, 0, None)), (0, None, None)))
        self._run = jax.jit(jax.vmap(jax.vmap(run, (None, 0, 0, 0, None, None)), (0, None, 0, 0, None, None)))
        self._evaluate = jax.jit(jax.vmap(jax.vmap(task.evaluate)))

    def curves(self, seeds: int, n_chunks: int, eval_after: Sequence[int]
               ) -> tuple[np.ndarray, dict[int, dict[str, np.ndarray]]]:
        """Loss curves ``(len(names), seeds, chunk * n_chunks)`` and evaluations after chunks ``eval_after``.

        ``total_steps`` (what a told or scheduled optimizer is given) is ``chunk * n_chunks``.
        """
        seeds_arr = jnp.arange(seeds)
        total = jnp.asarray(self.chunk * n_chunks, jnp.int32)
        params, opt_state = self._init(self.fam.hparams, seeds_arr, total)
        pieces, evals = [], {}
        for c in range(n_chunks):
            params, opt_state, losses = self._run(self.fam.hparams, seeds_arr, params, opt_state,
                                                  jnp.asarray(c * self.chunk, jnp.int32), total)
            pieces.append(np.asarray(losses, np.float64))
            if c + 1 in eval_after:
                evals[c + 1] = {k: np.asarray(v, np.float64) for k, v in self._evaluate(params).items()}
        return np.concatenate(pieces, axis=-1), evals


def _smooth(curve: np.ndarray, window: int) -> np.ndarray:
    c = np.where(np.isfinite(curve), curve, np.inf)
    if window <= 1:
        return c
    kernel = np.ones(window) / window
    out = np.convolve(np.where(np.isfinite(c), c, 1e30), kernel, mode="valid")
    out = np.where(out > 1e29, np.inf, out)
    return np.concatenate([np.full(window - 1, np.inf), out])


def _tail_means(curves: np.ndarray, horizon: int, window: int) -> np.ndarray:
    """Per seed, the mean loss over the ``window`` steps before ``horizon`` (inf if any is not finite)."""
    tail = curves[..., horizon - window:horizon]
    return np.where(np.all(np.isfinite(tail), axis=-1), tail.mean(axis=-1), np.inf)


def _num(x: float) -> float | None:
    """JSON-able: a finite float, or None for a diverged (inf/NaN) value."""
    return float(x) if math.isfinite(x) else None


def _val(x: float | None) -> float:
    return math.inf if x is None else float(x)


def _steps_to(curve_mean: np.ndarray, target: float, window: int) -> int | None:
    hit = np.nonzero(_smooth(curve_mean, window) <= target)[0]
    return int(hit[0]) + 1 if hit.size else None


def run_suite(specs: Sequence[TaskSpec], learned: Sequence[Learned], *, steps: int, seeds: int,
              horizons: Sequence[int] = HORIZONS, include: Sequence[str] = ("adam", "sgd", "prodigy"),
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Evaluate; returns ``{"config": …, "tasks": {task_label: {...}}, "summary": [...]}`` (JSON-able).

    ``include`` names the hand-designed baselines (``adam`` brings constant and cosine Adam);
    every learned optimizer gets its fresh-θ, told-horizon and schedule-mode columns
    (:meth:`Learned.modes`).
    """
    horizons = sorted({int(h) for h in horizons})
    if not horizons or horizons[0] < 1:
        raise ValueError(f"horizons must be positive integers, got {horizons!r}")
    if not isinstance(steps, int) or steps < 10:
        raise ValueError(f"steps must be an int ≥ 10 (the score averages the last 10 %), got {steps!r}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    unknown = set(include) - {"adam", "sgd", "prodigy"}
    if unknown:
        raise ValueError(f"unknown baselines {sorted(unknown)}; known: adam, sgd, prodigy")
    labels = [lrn.label for lrn in learned]
    if len(set(labels)) != len(labels) or any(n.startswith(("adam", "sgd_m", "prodigy")) for n in labels):
        raise ValueError(f"learned optimizer labels must be distinct and not baseline names, got {labels}")
    smooth = max(1, steps // 20)
    columns = {lrn.label: [c for m in lrn.modes() for c in lrn.columns(m)] for lrn in learned}
    out: dict[str, Any] = {"config": {"steps": steps, "seeds": seeds, "horizons": horizons,
                                      "tail_fraction": TAIL_FRACTION, "smooth": smooth,
                                      "adam_lrs": list(ADAM_LRS), "sgd_lrs": list(SGD_LRS),
                                      "learned": columns}, "tasks": {}}
    families = _families(include, learned)
    for spec in specs:
        label = _label(spec)
        if progress:
            progress(label)
        task = make_task(spec)
        runs: dict[str, dict[int, tuple[np.ndarray, dict]]] = {}  # name → horizon → (curves, evaluation)
        for fam in families:
            runner = _Runner(task, fam, steps)
            todo = [(h, [h]) for h in horizons] if fam.per_horizon else [(max(horizons), horizons)]
            for n_chunks, read_at in todo:
                curves, evals = runner.curves(seeds, n_chunks, read_at)
                for i, name in enumerate(fam.names):
                    for h in read_at:
                        runs.setdefault(name, {})[h] = (curves[i], {k: v[i] for k, v in evals[h].items()})
        out["tasks"][label] = _summarise(spec, runs, steps, horizons, smooth, columns)
    out["summary"] = summarise(out)
    return out


def _best(names: list[str], finals: dict[str, float | None]) -> str | None:
    return min(names, key=lambda n: _val(finals[n])) if names else None


def _summarise(spec: TaskSpec, runs: dict, steps: int, horizons: list[int], smooth: int,
               columns: dict[str, list[str]]) -> dict[str, Any]:
    res: dict[str, Any] = {"spec": json.loads(spec.to_json()), "horizons": {}, "curves": {}}
    groups = {key: [n for n in runs if n.startswith(prefix)]
              for key, prefix in (("adam_best", "adam("), ("adam_cos_best", "adam_cos("), ("sgd_best", "sgd_m("))}
    for h in horizons:
        hs = h * steps
        window = max(1, int(hs * TAIL_FRACTION))
        per_seed = {n: _tail_means(r[h][0], hs, window) for n, r in runs.items()}
        finals = {n: _num(float(np.mean(v))) for n, v in per_seed.items()}
        row: dict[str, Any] = {"steps": hs, "window": window, "final_train_loss": finals,
                               "final_train_loss_seeds": {n: [_num(float(x)) for x in v] for n, v in per_seed.items()},
                               "test_accuracy": {}, "test_loss": {}}
        for n, r in runs.items():
            for metric in ("test_accuracy", "test_loss"):
                if metric in r[h][1]:
                    row[metric][n] = _num(float(np.mean(r[h][1][metric])))
        for key, names in groups.items():
            if names:
                row[key] = _best(names, finals)
        if groups["adam_best"]:
            target = _val(finals[row["adam_best"]])
            row["steps_to_adam_best"] = {n: _steps_to(r[h][0].mean(axis=0)[:hs], target, smooth)
                                         for n, r in runs.items()}
        res["horizons"][str(h)] = row
    first, last = res["horizons"][str(horizons[0])], res["horizons"][str(horizons[-1])]
    keep = {n for cols in columns.values() for n in cols} | {"adam(1.0e-03)", "prodigy"}
    keep |= {first.get("adam_best"), first.get("sgd_best"), last.get("adam_cos_best")}
    stride = max(1, max(horizons) * steps // 500)
    for n in sorted(keep & set(runs)):
        mean = runs[n][horizons[-1]][0].mean(axis=0)  # a per-horizon run: the longest one
        res["curves"][n] = [float(x) if np.isfinite(x) else None for x in mean[::stride]]
    res["curve_stride"] = stride
    return res


def _label(spec: TaskSpec) -> str:
    kw = dict(spec.kwargs)
    parts = [spec.name]
    for key in ("hidden", "channels", "activation", "patch", "dim", "depth"):
        if key in kw:
            v = kw[key]
            parts.append("x".join(map(str, v)) if isinstance(v, list) else str(v))
    return "/".join(parts)


def format_table(results: dict[str, Any], learned: Sequence[str] | None = None) -> str:
    """A plain-text table per task and horizon, then the summary lines.

    Columns: final training loss, its ratio to cosine-best, test accuracy, steps to Adam-best's
    loss. ``learned`` restricts the learned optimizers shown (default: all).
    """
    columns = results["config"].get("learned", {})
    shown = [c for label, cols in columns.items() if learned is None or label in learned for c in cols]
    lines = []
    for label, res in results["tasks"].items():
        for h, row in res["horizons"].items():
            finals = row["final_train_loss"]
            names = shown + [row.get("adam_best"), row.get("adam_cos_best"), "adam(1.0e-03)", row.get("sgd_best"),
                             "prodigy"]
            names = [n for n in dict.fromkeys(names) if n and n in finals]
            cos = _val(finals.get(row.get("adam_cos_best")))
            lines.append(f"{label}  @ {row['steps']} steps ({h}x; loss = mean of the last {row['window']} steps)")
            lines.append(f"  {'optimizer':<26}{'train loss':>12}{'÷ cos-best':>11}{'test acc':>10}"
                         f"{'steps→Adam-best':>17}")
            for n in names:
                tag = f"{n} *" if n == row.get("adam_best") else f"{n} †" if n == row.get("adam_cos_best") else n
                acc = row["test_accuracy"].get(n)
                reach = row.get("steps_to_adam_best", {}).get(n)
                loss = _val(finals[n])
                ratio = loss / cos if math.isfinite(cos) and cos > 0 else math.nan
                lines.append(f"  {tag:<26}{loss:>12.4g}{ratio:>11.3f}"
                             f"{(f'{acc:.3f}' if acc is not None else '-'):>10}{(reach or '-'):>17}")
    lines.append("(* Adam-best: best constant learning rate; † cosine-best: best cosine-decay Adam, told the horizon)")
    summary = [e for e in results.get("summary") or summarise(results)
               if learned is None or any(e["optimizer"] in columns.get(lb, []) for lb in learned)]
    if summary:
        lines.append("")
        lines.extend(format_summary(summary))
    return "\n".join(lines)


def _log_ratios(rows: list[dict], name: str, ref: Callable[[dict], str | None]) -> tuple[list[float], list[float]]:
    """Per task log(F_name / F_ref) of the seed means, and per (task, seed) of the paired seed values."""
    per_task, per_seed = [], []
    for r in rows:
        other = ref(r)
        if other is None or name not in r["final_train_loss"] or other not in r["final_train_loss"]:
            continue
        per_task.append(_log(r["final_train_loss"][name], r["final_train_loss"][other]))
        per_seed += [_log(a, b) for a, b in zip(r["final_train_loss_seeds"][name], r["final_train_loss_seeds"][other])]
    return per_task, per_seed


def _log(value: float | None, reference: float | None) -> float:
    """log(value / reference); +inf when ``value`` diverged, −inf when only the reference did."""
    v, r = _val(value), _val(reference)
    if math.isinf(v) or math.isinf(r):
        return math.inf if math.isinf(v) else -math.inf
    return math.log(max(v, 1e-300) / max(r, 1e-300))


def _ratio_stats(per_task: list[float], per_seed: list[float]) -> dict[str, Any]:
    """Geometric-mean ratio exp(mean log) over tasks, with standard errors of the mean log ratio."""
    def se(xs: list[float]) -> float | None:
        if len(xs) < 2 or not all(map(math.isfinite, xs)):
            return None
        return float(np.std(xs, ddof=1) / math.sqrt(len(xs)))

    if not per_task:
        return {"n": 0, "geomean": None, "mean_log": None, "se_tasks": None, "se_task_seeds": None}
    mean_log = float(np.mean(per_task))
    return {"n": len(per_task), "geomean": None if math.isnan(mean_log) else _num(math.exp(mean_log)),
            "mean_log": _num(mean_log), "se_tasks": se(per_task), "se_task_seeds": se(per_seed),
            "diverged": sum(x == math.inf for x in per_task)}


def _clear(rows: list[dict], name: str, ref: Callable[[dict], str | None], z: float = 2.0) -> dict[str, int]:
    """Tasks where ``name`` is lower / higher than ``ref`` beyond noise, and the rest.

    Per task, the paired per-seed log ratios log(F_name / F_ref) (same seeds): ``better`` when
    their mean is below −z standard errors, ``worse`` above +z, otherwise ``noise``. A task
    with one seed, or a diverged seed, is ``noise`` unless only one side diverged.
    """
    out = {"better": 0, "worse": 0, "noise": 0}
    for r in rows:
        other = ref(r)
        if other is None or name not in r["final_train_loss_seeds"] or other not in r["final_train_loss_seeds"]:
            continue
        logs = [_log(a, b) for a, b in zip(r["final_train_loss_seeds"][name], r["final_train_loss_seeds"][other])]
        if logs and all(x == math.inf for x in logs) or logs and all(x == -math.inf for x in logs):
            out["worse" if logs[0] > 0 else "better"] += 1
            continue
        if len(logs) < 2 or not all(map(math.isfinite, logs)):
            out["noise"] += 1
            continue
        mean, se = float(np.mean(logs)), float(np.std(logs, ddof=1) / math.sqrt(len(logs)))
        out["better" if mean < -z * se else "worse" if mean > z * se else "noise"] += 1
    return out


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per learned column and horizon: wins and geometric-mean loss ratios (JSON-able dicts).

    Wins count tasks where the column's final training loss (mean over seeds) is ≤ Adam-best's,
    ≤ cosine-best's, ≤ Adam(1e-3)'s and < its fresh θ's (same mode). ``vs_cos`` / ``vs_fresh``:
    the geometric mean over tasks of the final-loss ratio (< 1: the column is lower), with the
    standard error of the mean log ratio over tasks (``se_tasks``) and over (task, seed) pairs of
    paired per-seed values (``se_task_seeds``). ``clear_vs_*`` (:func:`_clear`) says on how many
    tasks each comparison is decided beyond two standard errors of the paired seed differences,
    so a count that a reseed could flip is visible as such.
    """
    tasks = results["tasks"]
    out: list[dict[str, Any]] = []
    if not tasks:
        return out
    horizons = list(next(iter(tasks.values()))["horizons"])
    for label, cols in results["config"].get("learned", {}).items():
        for col in cols:
            base = not col[len(label):].startswith("[")  # the trained θ, not its fresh θ or an ablation
            fresh = col.replace(label, label + "[fresh]", 1) if base else None
            ablations = {c[len(label) + 2:c.index("]")]: c for c in cols
                         if base and c.startswith(label + "[-") and c[c.index("]") + 1:] == col[len(label):]}
            for h in horizons:
                rows = [t["horizons"][h] for t in tasks.values()]

                def wins(ref: Callable[[dict], str | None], strict: bool = False, rows=rows, col=col) -> int:
                    n = 0
                    for r in rows:
                        other = ref(r)
                        if other in r["final_train_loss"]:
                            a, b = _val(r["final_train_loss"][col]), _val(r["final_train_loss"][other])
                            n += (a < b) if strict else (a <= b and math.isfinite(a))
                    return n

                entry = {"optimizer": col, "horizon": int(h), "tasks": len(rows),
                         "wins_vs_adam_best": wins(lambda r: r.get("adam_best")),
                         "wins_vs_adam_cos_best": wins(lambda r: r.get("adam_cos_best")),
                         "wins_vs_adam_1e-3": wins(lambda r: "adam(1.0e-03)"),
                         "vs_cos": _ratio_stats(*_log_ratios(rows, col, lambda r: r.get("adam_cos_best"))),
                         "clear_vs_adam_best": _clear(rows, col, lambda r: r.get("adam_best")),
                         "clear_vs_adam_cos_best": _clear(rows, col, lambda r: r.get("adam_cos_best"))}
                if fresh is not None:
                    entry["wins_vs_fresh"] = wins(lambda r, f=fresh: f, strict=True)
                    entry["vs_fresh"] = _ratio_stats(*_log_ratios(rows, col, lambda r, f=fresh: f))
                    entry["clear_vs_fresh"] = _clear(rows, col, lambda r, f=fresh: f)
                if ablations:
                    entry["vs_ablated"] = {
                        part: {"wins": wins(lambda r, a=name: a, strict=True),
                               **_ratio_stats(*_log_ratios(rows, col, lambda r, a=name: a)),
                               "clear": _clear(rows, col, lambda r, a=name: a)}
                        for part, name in ablations.items()}
                out.append(entry)
    return out


def _ratio_text(stats: dict[str, Any]) -> str:
    if not stats["n"]:
        return "n/a"
    if stats["geomean"] is None:
        return f"inf (diverged on {stats['diverged']})"
    errors = [f"± {stats[k]:.3f} s.e. over {what}" for k, what in (("se_tasks", "tasks"),
                                                                    ("se_task_seeds", "task-seeds"))
              if stats[k] is not None]
    return f"{stats['geomean']:.3f} (log {stats['mean_log']:+.3f}" + "".join(f", {e}" for e in errors) + ")"


def format_summary(summary: Sequence[dict[str, Any]]) -> list[str]:
    """One line per learned column and horizon (see :func:`summarise`)."""
    lines = []
    for e in summary:
        n = e["tasks"]
        text = (f"{e['optimizer']} @ {e['horizon']}x: ≤ Adam-best on {e['wins_vs_adam_best']}/{n}, "
                f"≤ cosine-best on {e['wins_vs_adam_cos_best']}/{n}, ≤ Adam(1e-3) on {e['wins_vs_adam_1e-3']}/{n}")
        if "wins_vs_fresh" in e:
            text += f", < fresh θ on {e['wins_vs_fresh']}/{n}"
        text += f"; loss ÷ cosine-best {_ratio_text(e['vs_cos'])}"
        if "vs_fresh" in e:
            text += f"; ÷ fresh θ {_ratio_text(e['vs_fresh'])}"
        for part, stats in e.get("vs_ablated", {}).items():
            text += (f"; < without its {part} on {stats['wins']}/{n}, ÷ without {part} {_ratio_text(stats)}"
                     f" [{stats['clear']['better']} lower / {stats['clear']['worse']} higher beyond 2 s.e.]")
        lines.append(text)
        if "clear_vs_adam_best" in e:
            parts = [(what, e[key]) for what, key in (("Adam-best", "clear_vs_adam_best"),
                                                      ("cosine-best", "clear_vs_adam_cos_best"),
                                                      ("fresh θ", "clear_vs_fresh")) if key in e]
            lines.append("    beyond 2 s.e. of the paired seeds: " + "; ".join(
                f"vs {what} {c['better']} lower, {c['worse']} higher, {c['noise']} within noise" for what, c in parts))
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

