"""``mnemosyne robotics train-policy``: train a policy with a chosen optimizer.

    mnemosyne robotics train-policy --env gymnax_cartpole --optimizer adam:1e-3 \\
        --steps 200 --seed 0 --out runs/cartpole

``--env`` takes a task name (``gymnax_cartpole``) or the library's env id
(``CartPole-v1``, ``inverted_pendulum``). ``--steps`` counts policy updates;
each update consumes ``num_envs * horizon`` environment steps (in summary.json).
Writes ``OUT/policy`` (Orbax), ``OUT/summary.json`` and ``OUT/returns.png``.

Exit codes: 0 ok, 1 failure (e.g. the registry of a ``grpc://`` optimizer cannot be
reached), 2 usage (unknown env, bad arguments or ``--task-kwargs``), 3 an optimizer spec
that cannot be used, 4 training diverged. Each error is one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib

from service.cli import CLIError, service_error

ENV_EXIT, OPTIMIZER_EXIT = 2, 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("robotics", help="train robot policies with a learned optimizer")
    sub = parser.add_subparsers(dest="robotics_command", metavar="ACTION", required=True)
    train = sub.add_parser("train-policy", help="train a policy MLP and save it with a return curve")
    train.add_argument("--env", required=True, help="e.g. gymnax_pendulum, gymnax_cartpole, brax_reacher")
    train.add_argument("--optimizer", default="adam:1e-3",
                       help="adam:LR | sgd:LR | a shipped name (robotics, default, …) | checkpoint path | grpc://HOST:PORT/NAME")
    train.add_argument("--steps", type=int, default=200, help="policy updates (default 200)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=int, default=0,
                       help="updates between evaluations (default: steps/20)")
    train.add_argument("--task-kwargs", default="{}",
                       help='JSON task options, e.g. \'{"num_envs": 8, "hidden": [32, 32]}\'')
    train.add_argument("--out", required=True, type=pathlib.Path, help="output directory")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=run_train_policy)


def resolve_env(name: str) -> str:
    """Task name for ``name`` (a task name or the library env id); one-line error otherwise."""
    from mnemosyne_core.tasks.robotics_envs import ENV_IDS

    if name in ENV_IDS:
        return name
    for task_name, (_, env_id, _) in ENV_IDS.items():
        if name == env_id:
            return task_name
    raise CLIError(f"unknown env {name!r}; valid envs: {', '.join(sorted(ENV_IDS))}", ENV_EXIT)


def run_train_policy(args: argparse.Namespace) -> int:
    try:
        import gymnax  # noqa: F401

        from mnemosyne_core.tasks.robotics_envs import ENV_IDS  # noqa: F401 - needs the extra
    except ModuleNotFoundError as exc:
        raise CLIError(f"robotics extra not installed ({exc.name}); pip install 'mnemosyne[robotics]'", 2)
    env = resolve_env(args.env)
    if args.steps < 1:
        raise CLIError(f"--steps must be ≥ 1, got {args.steps}", 2)
    try:
        task_kwargs = json.loads(args.task_kwargs)
        if not isinstance(task_kwargs, dict):
            raise TypeError(f"got {type(task_kwargs).__name__}")
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--task-kwargs must be a JSON object: {exc}", 2) from None

    from mnemosyne_core.tasks import make_task
    from service.robotics.optimizers import OptimizerSpecError, resolve_optimizer
    from service.robotics.report import plot_returns, save_policy, write_summary
    from service.robotics.train import train_policy

    try:
        tx, opt_info = resolve_optimizer(args.optimizer)
    except OptimizerSpecError as exc:
        # A registry that cannot be reached is a failure (1), not a bad optimizer spec.
        raise CLIError(str(exc), 1 if service_error(exc) is not None else OPTIMIZER_EXIT) from None
    try:
        task = make_task({"name": env, "kwargs": task_kwargs})
    except (TypeError, ValueError) as exc:
        raise CLIError(f"bad --task-kwargs for {env}: {exc}", 2) from None
    eval_every = args.eval_every or max(1, args.steps // 20)

    with _progress(args.no_progress, args.steps, f"{env} / {args.optimizer}") as advance:
        try:
            result = train_policy(task, tx, steps=args.steps, seed=args.seed, eval_every=eval_every,
                                  on_eval=advance)
        except (TypeError, ValueError) as exc:
            # e.g. a learned optimizer whose θ does not fit its config
            raise CLIError(f"optimizer {args.optimizer!r} is incompatible: {str(exc).splitlines()[0]}",
                           OPTIMIZER_EXIT) from None

    out: pathlib.Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    policy_path = save_policy(out, result.params)
    summary = write_summary(out, env=env, optimizer=opt_info, seed=args.seed, history=result.history,
                            diverged=result.diverged,
                            extra={"task": {"name": env, "kwargs": task_kwargs},
                                   "env_steps_per_update": task.env_steps_per_batch,
                                   "policy": str(policy_path)})
    plot_returns(out / "returns.png", {args.optimizer: result.history}, f"{env} (seed {args.seed})")
    final = summary["final_return"]
    print(f"{env}: final return {final if final is None else round(final, 2)} after "
          f"{summary['env_steps']} env steps ({args.optimizer}); wrote {out}/summary.json, returns.png, policy/")
    if result.diverged:
        raise CLIError(f"training diverged (non-finite loss or parameters) with {args.optimizer!r}", 4)
    return 0


class _progress:
    """A rich progress bar over updates (a no-op context when disabled)."""

    def __init__(self, disabled: bool, total: int, label: str):
        self.disabled, self.total, self.label = disabled, total, label

    def __enter__(self):
        if self.disabled:
            return lambda point: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("return {task.fields[ret]}"), TimeElapsedColumn())
        self.bar.__enter__()
        self.id = self.bar.add_task(self.label, total=self.total, ret="-")

        def advance(point) -> None:
            ret = "nan" if not math.isfinite(point.episode_return) else f"{point.episode_return:.1f}"
            self.bar.update(self.id, completed=point.update, ret=ret)

        return advance

    def __exit__(self, *exc):
        if not self.disabled:
            self.bar.__exit__(*exc)
        return False
