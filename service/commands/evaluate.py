"""``mnemosyne eval``: compare a learned optimizer with its fresh θ, tuned Adam, SGD+momentum, prodigy and the LSTM.

Examples::

    mnemosyne eval --optimizer default --suite heldout --steps 200 --seeds 3 --out runs/eval
    mnemosyne eval --optimizer runs/quick/optimizer.msgpack --suite quick --seeds 1 --out runs/quick_eval

``--steps`` is the meta-training horizon (default: the optimizer's ``max_unroll``);
the runs continue to ``--horizons`` times it (default 1,2,5) to show how the
advantage changes beyond the horizon. Every learned optimizer is shown next to its own
fresh (never meta-trained) θ, told the horizon (``total_steps``) where it reads it, and in
direction mode under a cosine schedule; the baselines include Adam with cosine decay tuned
over the same 7 learning rates (a run per horizon). The score is the mean training loss
over the last 10 % of the steps before each horizon. Writes ``DIR/results.json``, ``DIR/table.txt``
and one loss-curve PNG per task.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from typing import Any

from service.cli import CLIError, service_error


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a learned optimizer against tuned baselines",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizer", required=True, metavar="PATH|NAME|URI",
                   help="checkpoint file, shipped name (default, lstm, …) or grpc://host:port/name@alias")
    p.add_argument("--suite", default="heldout", help="quick, train, heldout or a task family name")
    p.add_argument("--steps", type=int, default=None, help="horizon in steps (default: meta-training max_unroll)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--horizons", default="1,2,5", help="multiples of --steps to report (default 1,2,5)")
    p.add_argument("--lstm", default="lstm", metavar="PATH|NAME|none",
                   help="LSTM baseline (default: the shipped 'lstm'; 'none' to skip)")
    p.add_argument("--baselines", default="adam,sgd,prodigy", help="hand-designed optimizers to include")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run)


def load_optimizer(spec: str, label: str) -> tuple[Any, dict]:
    """A :class:`service.evaluation.Learned` from a path, URI or shipped name, plus its metadata."""
    from mnemosyne_core.pretrained import PretrainedError
    from mnemosyne_core.pretrained import load_optimizer as load_learned
    from service.evaluation import Learned

    try:
        theta, config, meta = load_learned(spec)
    except FileNotFoundError as exc:
        raise CLIError(f"optimizer {spec!r}: no such file", 2) from exc
    except PretrainedError as exc:
        raise CLIError(str(exc), 2) from exc
    except Exception as exc:
        code = 1 if service_error(exc) is not None else 2  # a registry that is down is a failure, not usage
        raise CLIError(f"optimizer {spec!r}: {type(exc).__name__}: {exc}", code) from exc
    return Learned(label, theta, config), dict(meta or {})


def run(args: argparse.Namespace) -> int:
    from service import evaluation

    if args.seeds < 1:
        raise CLIError(f"--seeds must be ≥ 1, got {args.seeds}", 2)
    try:
        horizons = sorted({int(h) for h in args.horizons.split(",") if h.strip()})
    except ValueError as exc:
        raise CLIError(f"--horizons must be comma-separated integers, got {args.horizons!r}", 2) from exc
    if not horizons or horizons[0] < 1:
        raise CLIError("--horizons needs positive integers", 2)
    try:
        specs = evaluation.suite_specs(args.suite)
    except KeyError as exc:
        raise CLIError(str(exc.args[0]), 2) from exc
    ours, meta = load_optimizer(args.optimizer, "mnemosyne" if args.optimizer != "lstm" else "lstm")
    learned = [ours]
    if args.lstm and args.lstm != "none" and args.optimizer != args.lstm:
        try:
            learned.append(load_optimizer(args.lstm, "lstm")[0])
        except CLIError as exc:
            if args.lstm != "lstm":
                raise
            print(f"note: LSTM baseline skipped ({exc})")
    steps = args.steps
    if steps is None:
        steps = int((meta.get("config") or {}).get("tasks", {}).get("max_unroll", 200))
    if steps < 20:
        raise CLIError(f"--steps must be ≥ 20, got {steps}", 2)
    include = [b.strip() for b in args.baselines.split(",") if b.strip()]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = evaluation.run_suite(specs, learned, steps=steps, seeds=args.seeds, horizons=horizons,
                                   include=include, progress=lambda label: print(f"evaluating {label} …",
                                                                                 flush=True))
    results["optimizer"] = {"source": args.optimizer, "metadata": _jsonable(meta)}
    (out / "results.json").write_text(json.dumps(results, indent=1, allow_nan=False, default=_none))
    table = evaluation.format_table(results, [lrn.label for lrn in learned])
    (out / "table.txt").write_text(table + "\n")
    evaluation.plot_curves(results, out)
    print(table)
    print(f"wrote {out / 'results.json'}, {out / 'table.txt'} and {len(results['tasks'])} PNG(s)")
    return 0


def _none(obj: Any) -> Any:  # pragma: no cover - numpy scalars that slipped through
    return float(obj)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
