"""Held-out benchmark: the shipped ``default`` optimizer vs tuned Adam, SGD+momentum, prodigy and the LSTM baseline.

Tasks come from the ``heldout`` family (never seen in meta-training): the tiny
ViT on digits (two patch sizes), MNIST-1D MLPs of unseen width/depth/activation,
and a deeper, wider digits MLP with an unseen activation. Target (issue 4):
``default`` ends at a training loss ≤ Adam-best on most tasks and ≤ Adam(1e-3)
and the LSTM baseline on all, at the meta-training horizon; the 2× and 5× rows
show how the advantage changes beyond it.

Run::

    python benchmarks/heldout_eval.py [--steps 200] [--seeds 3] [--out runs/heldout_eval]

(equivalent to ``mnemosyne eval --optimizer default --suite heldout …``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from service import evaluation
from service.commands.evaluate import load_optimizer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", default="default")
    p.add_argument("--lstm", default="lstm")
    p.add_argument("--steps", type=int, default=200, help="the meta-training horizon (default config: 200)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--horizons", default="1,2,5")
    p.add_argument("--suite", default="heldout")
    p.add_argument("--out", default="runs/heldout_eval")
    args = p.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ours, meta = load_optimizer(args.optimizer, "mnemosyne")
    learned = [ours]
    if args.lstm != "none":
        learned.append(load_optimizer(args.lstm, "lstm")[0])
    t0 = time.perf_counter()
    results: dict = {}
    for spec in evaluation.suite_specs(args.suite):  # one task at a time: partial results survive
        part = evaluation.run_suite(
            [spec], learned, steps=args.steps, seeds=args.seeds,
            horizons=[int(h) for h in args.horizons.split(",")],
            progress=lambda label: print(f"[{time.perf_counter() - t0:7.1f}s] {label}", flush=True))
        if not results:
            results = part
        else:
            results["tasks"].update(part["tasks"])
        results["optimizer"] = {"source": args.optimizer, "generation": meta.get("generation"),
                                "seed": meta.get("seed")}
        results["seconds"] = time.perf_counter() - t0
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
        table = evaluation.format_table(results, [lrn.label for lrn in learned])
        (out / "table.txt").write_text(table + "\n")
    (out / "table.txt").write_text(table + "\n")
    evaluation.plot_curves(results, out)
    print(table)
    print(f"{len(results['tasks'])} tasks in {results['seconds']:.0f}s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
