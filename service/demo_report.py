"""``make demo``'s comparison: what a short meta-training bought, next to the shipped ``default`` and Adam.

One held-out task (a digits MLP of a width and activation no meta-training config uses), one
table and one PNG, rows:

* the demo's **fresh θ** (its config, never meta-trained) and the **briefly trained θ**;
* the shipped **``default``** told the horizon (``total_steps=T``) and not told it, and its own
  fresh θ;
* **Adam(1e-3)**, **tuned Adam** (best constant rate of the 7-point grid) and **tuned cosine
  Adam** (told the horizon).

Scores are the harness's (:mod:`service.evaluation`): mean training loss over the last 10 % of
the steps, mean over seeds, at 1× and 2× the horizon. :func:`summary_line` says, in percent, how
far meta-training moved each learned optimizer from its own fresh θ; :func:`curve_notes` says in a
sentence what each curve of the PNG is; :func:`recommendation` is the demo's closing line, computed
from these measurements: which optimizer to use, and whether passing ``total_steps`` helped.

Example (what ``python -m service.demo`` runs after its meta-training)::

    results, lines = compare(theta, config, out_dir="runs/demo/eval")
"""
from __future__ import annotations

import math
import pathlib
from typing import Any

from mnemosyne_core.tasks import TaskSpec

__all__ = ["DEMO_TASK", "compare", "curve_notes", "recommendation", "rows", "summary_line"]

# Unseen by the quick and default configs (width 40, elu), cheap enough for a 3-minute demo.
DEMO_TASK = TaskSpec("digits_mlp", {"hidden": [40], "activation": "elu", "batch_size": 128})


def rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, float | None]]]:
    """``(row label, column name, {horizon: final loss})`` for the table's rows, in order."""
    [task] = results["tasks"].values()
    horizons = list(task["horizons"])
    first = task["horizons"][horizons[0]]
    picks = [("fresh θ (demo config)", "demo[fresh]"), ("demo θ (briefly meta-trained)", "demo"),
             ("shipped default, told T", "default+T"), ("shipped default, not told T", "default"),
             ("default's fresh θ, told T", "default[fresh]+T"), ("Adam(1e-3)", "adam(1.0e-03)")]
    out = []
    for label, col in picks:
        out.append((label, col, {h: task["horizons"][h]["final_train_loss"].get(col) for h in horizons}))
    for key, label in (("adam_best", "tuned Adam"), ("adam_cos_best", "tuned cosine Adam")):
        # the best learning rate per horizon (it may differ between horizons)
        per_h = {h: task["horizons"][h]["final_train_loss"][task["horizons"][h][key]] for h in horizons}
        out.append((f"{label} ({first[key].split('(')[-1].rstrip(')')} at {horizons[0]}x)", first[key], per_h))
    return out


def _pct(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or not (math.isfinite(value) and math.isfinite(reference)) or reference <= 0:
        return "n/a (diverged)"
    return f"{100.0 * (value / reference - 1.0):+.1f}%"


def summary_line(results: dict[str, Any]) -> str:
    """One line: each learned optimizer's final loss relative to its own fresh θ, and default vs tuned Adam."""
    listed = rows(results)
    table = {col: per_h for _, col, per_h in listed}
    h = next(iter(table["demo"]))
    tuned = next(per_h for label, _, per_h in listed if label.startswith("tuned cosine Adam"))
    return (f"what meta-training bought (final training loss at {h}x): the briefly trained θ "
            f"{_pct(table['demo'][h], table['demo[fresh]'][h])} vs its fresh θ; the shipped default "
            f"{_pct(table['default+T'][h], table['default[fresh]+T'][h])} vs its fresh θ and "
            f"{_pct(table['default+T'][h], tuned[h])} vs tuned cosine Adam (negative = lower loss)")


# What each curve of the PNG is, by row label (tuned rows are matched by their prefix).
CURVE_NOTES = {
    "fresh θ (demo config)": "the demo's optimizer before meta-training: its config with an untrained θ",
    "demo θ (briefly meta-trained)": "the same optimizer after step 2's short meta-training; its gap to the "
                                     "fresh-θ curve is what that meta-training bought",
    "shipped default, told T": "the optimizer that ships with the package, mn.pretrained(\"default\"), "
                               "told total_steps=T, so it runs its learned schedule over the run",
    "shipped default, not told T": "the same optimizer called without total_steps (no schedule)",
    "default's fresh θ, told T": "the shipped default's architecture with an untrained θ; its gap to the "
                                 "default curve is what the full meta-training bought",
    "Adam(1e-3)": "Adam at the usual learning rate, no tuning",
    "tuned Adam": "Adam at the best constant learning rate of 7 (1e-4 … 1e-1), i.e. after a 7-run sweep",
    "tuned cosine Adam": "Adam with a cosine decay over the run, best of the same 7 peak rates: the "
                         "strongest hand-tuned baseline here",
}


def curve_notes(results: dict[str, Any]) -> list[str]:
    """One sentence per curve of the PNG (the table's rows), and what the dotted lines mark."""
    lines = []
    for label, _, _ in rows(results):
        note = CURVE_NOTES.get(label) or next(v for k, v in CURVE_NOTES.items() if label.startswith(k + " ("))
        lines.append(f"- {label}: {note}.")
    steps = results["config"]["steps"]
    marks = ", ".join(str(int(h) * steps) for h in results["config"]["horizons"])
    lines.append(f"Dotted vertical lines: steps {marks}, where the table reads each curve (mean training loss "
                 f"over the last 10 % of the steps before them, log scale, mean over seeds).")
    return lines


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _ratio(value: float | None, reference: float | None) -> float | None:
    if not (_finite(value) and _finite(reference)) or reference <= 0:
        return None
    return value / reference


def recommendation(results: dict[str, Any]) -> str:
    """The demo's closing line, from its own measurements at the first horizon.

    Which optimizer to use: the best of the choices that need no tuning (the shipped ``default``
    told the horizon, the demo's θ, Adam(1e-3)), with its ratio to tuned cosine Adam; whether
    passing ``total_steps`` lowered the shipped ``default``'s loss here; and, honestly, whether
    the demo's short meta-training beat its own fresh θ.
    """
    listed = rows(results)
    table = {col: per_h for _, col, per_h in listed}
    h = next(iter(table["demo"]))
    steps = int(h) * results["config"]["steps"]
    tuned = next(per_h for label, _, per_h in listed if label.startswith("tuned cosine Adam"))[h]
    told, untold = table["default+T"][h], table["default"][h]
    untuned = {'mn.pretrained("default") with total_steps': told, "the demo's θ": table["demo"][h],
               "Adam(1e-3)": table["adam(1.0e-03)"][h]}
    finite = {k: v for k, v in untuned.items() if _finite(v)}
    if not finite:
        return "Use: nothing here finished without diverging; see the table."
    best = min(finite, key=finite.get)
    vs_cos = _ratio(finite[best], tuned)
    evidence = (f"lowest loss of the choices that need no tuning at {steps} steps" +
                (f", {vs_cos:.2f}x that of cosine Adam tuned over 7 learning rates" if vs_cos is not None else ""))
    if best == "the demo's θ":
        first = (f"Use the shipped default, mn.pretrained(\"default\"): the demo's θ had the {evidence} here, "
                 f"but on one task after a short run; the default is the one measured on 13 held-out tasks")
    elif best == "Adam(1e-3)":
        first = f"Use Adam: Adam(1e-3) had the {evidence}; the learned optimizers did not beat it on this task"
    else:
        first = f"Use mn.pretrained(\"default\"): it had the {evidence}"
    gain = _ratio(told, untold)
    if gain is None:
        second = "Pass total_steps=T to update() when you know the run's length (not measured here: a run diverged)"
    elif gain < 1.0:
        second = (f"Pass total_steps=T to update() whenever you know the run's length: here it lowered the "
                  f"default's loss by {100 * (1 - gain):.0f}%")
    else:
        second = (f"Passing total_steps did not help on this task (loss {100 * (gain - 1):+.0f}%); pass it when "
                  f"you know the run's length, as measured on the held-out suite (docs/benchmarks.md)")
    demo = _ratio(table["demo"][h], table["demo[fresh]"][h])
    if demo is None:
        third = "the demo's own meta-training diverged or could not be compared with its fresh θ"
    elif demo < 1.0:
        third = f"the demo's short meta-training lowered its loss by {100 * (1 - demo):.0f}% against its fresh θ"
    else:
        third = (f"the demo's short meta-training did not help ({100 * (demo - 1):+.0f}% against its fresh θ): "
                 f"it shows the pipeline, not a better optimizer")
    return f"{first}. {second}; {third}."


def format_rows(results: dict[str, Any]) -> str:
    table = rows(results)
    horizons = list(table[0][2])
    steps = results["config"]["steps"]
    head = f"{'optimizer':<34}" + "".join(f"{f'loss @ {int(h) * steps}':>16}" for h in horizons)
    lines = [head, "-" * len(head)]
    for label, _, per_h in table:
        lines.append(f"{label:<34}" + "".join(f"{(per_h[h] if per_h[h] is not None else math.inf):>16.4g}"
                                               for h in horizons))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """One PNG: the mean training-loss curves of the table's rows (log scale), horizons marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    [task] = results["tasks"].values()
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    stride = task["curve_stride"]
    for label, col, _ in rows(results):
        curve = task["curves"].get(col)
        if curve is None:
            continue
        y = np.array([np.nan if v is None else v for v in curve])
        ax.plot(np.arange(y.size) * stride, y, label=label, lw=1.6 if "θ" in label or "default" in label else 1.0)
    for h in results["config"]["horizons"]:
        ax.axvline(h * results["config"]["steps"], color="grey", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(f"{DEMO_TASK.name} {DEMO_TASK.kwargs['hidden']} {DEMO_TASK.kwargs['activation']} (held out)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(theta: Any, config: Any, *, out_dir: str | pathlib.Path, steps: int = 200, seeds: int = 2,
            horizons: tuple[int, ...] = (1, 2)) -> tuple[dict[str, Any], list[str]]:
    """Evaluate the demo's θ, the shipped ``default`` and Adam on :data:`DEMO_TASK`; write table + PNG."""
    import json

    from mnemosyne_core.pretrained import pretrained_theta
    from service.evaluation import Learned, run_suite

    shipped, shipped_config, _ = pretrained_theta("default")
    results = run_suite([DEMO_TASK], [Learned("demo", theta, config), Learned("default", shipped, shipped_config)],
                        steps=steps, seeds=seeds, horizons=horizons, include=("adam",))
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    text = format_rows(results)
    line = summary_line(results)
    notes = curve_notes(results)
    advice = recommendation(results)
    png = plot(results, out_dir / "demo.png")
    (out_dir / "table.txt").write_text("\n".join([text, "", line, "", f"The plot ({png.name}):", *notes, "",
                                                   advice]) + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    return results, [text, "", line, "", f"The plot, {png}, has one curve per row:", *notes,
                     f"(table: {out_dir / 'table.txt'})"]
