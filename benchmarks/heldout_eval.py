"""Held-out benchmark: the shipped ``default`` next to its own fresh θ, tuned constant and cosine Adam, SGD+momentum,
prodigy and the LSTM baseline.

Tasks come from the ``heldout`` suite (``FAMILIES["heldout"]``, 13 tasks never seen in
meta-training: other data sets, regression, an autoencoder, a conv net, ViTs, unseen MLPs,
~8× sizes). Every learned optimizer is reported with its fresh θ (the ablation: is the
meta-trained part worth having?), told the horizon (``+T``) and in direction mode under a
cosine schedule (``+cos``); the summary lines give the wins and geometric-mean loss ratios
(issue 21's targets). Score: mean training loss over the last 10 % of the steps.

Run::

    python benchmarks/heldout_eval.py [--steps 400] [--seeds 3] [--horizons 1,2,5] [--out runs/heldout_eval]

(equivalent to ``mnemosyne eval --optimizer default --suite heldout …``; one task at a time,
so partial results survive an interruption).
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
    p.add_argument("--steps", type=int, default=400, help="the meta-training horizon (default config: 400)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--horizons", default="1,2,5")
    p.add_argument("--suite", default="heldout")
    p.add_argument("--baselines", default="adam,sgd,prodigy", help="hand-designed optimizers to include")
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
            include=[b.strip() for b in args.baselines.split(",") if b.strip()],
            progress=lambda label: print(f"[{time.perf_counter() - t0:7.1f}s] {label}", flush=True))
        if not results:
            results = part
        else:
            results["tasks"].update(part["tasks"])
        results["summary"] = evaluation.summarise(results)  # over every task so far
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
