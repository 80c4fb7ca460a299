"""``make demo``'s comparison: what a short meta-training bought, next to the shipped ``default`` and Adam.

One held-out task (a digits MLP of a width and activation no meta-training config uses), one
table and one PNG, rows:

* the demo's **fresh θ** (its config, never meta-trained) and the **briefly trained θ**;
* the shipped **``default``** (told the horizon, ``total_steps=T``) and its own fresh θ;
* **Adam(1e-3)**, **tuned Adam** (best constant rate of the 7-point grid) and **tuned cosine
  Adam** (told the horizon).

Scores are the harness's (:mod:`service.evaluation`): mean training loss over the last 10 % of
the steps, mean over seeds, at 1× and 2× the horizon; the closing line says, in percent, how
far meta-training moved each learned optimizer from its own fresh θ.

Example (what ``python -m service.demo`` runs after its meta-training)::

    results, lines = compare(theta, config, out_dir="runs/demo/eval")
"""
from __future__ import annotations

import math
import pathlib
from typing import Any

from mnemosyne_core.tasks import TaskSpec

__all__ = ["DEMO_TASK", "compare", "rows", "summary_line"]

# Unseen by the quick and default configs (width 40, elu), cheap enough for a 3-minute demo.
DEMO_TASK = TaskSpec("digits_mlp", {"hidden": [40], "activation": "elu", "batch_size": 128})


def rows(results: dict[str, Any]) -> list[tuple[str, str, dict[str, float | None]]]:
    """``(row label, column name, {horizon: final loss})`` for the table's rows, in order."""
    [task] = results["tasks"].values()
    horizons = list(task["horizons"])
    first = task["horizons"][horizons[0]]
    picks = [("fresh θ (demo config)", "demo[fresh]"), ("demo θ (briefly meta-trained)", "demo"),
             ("shipped default, told T", "default+T"), ("default's fresh θ, told T", "default[fresh]+T"),
             ("Adam(1e-3)", "adam(1.0e-03)")]
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
    (out_dir / "table.txt").write_text(text + "\n\n" + line + "\n")
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False))
    png = plot(results, out_dir / "demo.png")
    return results, [text, "", line, f"(table: {out_dir / 'table.txt'}, plot: {png})"]
