"""``mnemosyne meta-train``: meta-train a learned optimizer from a config.

Examples::

    mnemosyne meta-train --config quick --out runs/quick
    mnemosyne meta-train --config default --seed 0 --out runs/default          # the shipped optimizer
    mnemosyne meta-train --config default --optimizer-kind lstm --out runs/lstm   # the LSTM baseline
    mnemosyne meta-train --config quick --out runs/quick --resume --generations 20
    mnemosyne meta-train --config robotics --init-from default_v1 --out runs/robotics \\
        --publish grpc://127.0.0.1:50051/robotics
    mnemosyne meta-train --config quick --backend ray --workers 2 --out runs/ray

Writes ``DIR/metrics.jsonl`` (one object per generation), TensorBoard events in
``DIR/tb``, a resumable ``DIR/checkpoint.msgpack`` every ``checkpoint_every``
generations and ``DIR/optimizer.msgpack`` (θ + architecture + lineage).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
from typing import Any

from service.cli import CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("meta-train", help="meta-train a learned optimizer (ES, PES or truncated backprop)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config name in configs/ (quick, default, …) or a .toml path")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.msgpack")
    p.add_argument("--resume-if-present", action="store_true",
                   help="resume when DIR holds a checkpoint, else start fresh (for job retries, e.g. KubeRay)")
    p.add_argument("--seed", type=int, default=None, help="run seed (default: the config's)")
    p.add_argument("--generations", type=int, default=None, help="total generations (default: the config's)")
    p.add_argument("--optimizer-kind", choices=("mnemosyne", "lstm"), default=None,
                   help="meta-train another learned optimizer with the same config and budget")
    p.add_argument("--backend", choices=("local", "ray"), default="local")
    p.add_argument("--init-from", default=None, metavar="PATH|URI|NAME",
                   help="start from a published optimizer (file, grpc://host:port/name@alias, or a shipped name)")
    p.add_argument("--publish", default=None, metavar="grpc://HOST:PORT/NAME",
                   help="publish to a registry every publish_every generations and at the end")
    p.add_argument("--token", default=None, help="registry bearer token (for --publish)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    ray = p.add_argument_group("ray backend")
    ray.add_argument("--workers", type=int, default=2)
    ray.add_argument("--address", default=None, help="join an existing Ray cluster (auto or HOST:PORT)")
    ray.add_argument("--worker-cpus", type=float, default=1.0)
    ray.add_argument("--worker-gpus", type=float, default=0.0)
    ray.add_argument("--worker-resources", default=None, help='JSON, e.g. \'{"TPU": 4}\'')
    ray.add_argument("--max-restarts", type=int, default=None,
                     help="restarts per worker actor before it is replaced (default 4)")
    ray.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                     help="close a generation after this long if --min-fraction of pairs are in")
    ray.add_argument("--min-fraction", type=float, default=None,
                     help="fraction of pairs a generation needs before its deadline may close it (default 1.0)")
    ray.add_argument("--straggler-seconds", type=float, default=None,
                     help="duplicate a call on an idle worker when it runs longer than this")
    p.set_defaults(func=run)


def _load_config(args: argparse.Namespace) -> Any:
    from mnemosyne_core.meta.config import (
        ConfigError,
        OptimizerSection,
        _freeze,
        load_config,
    )

    try:
        config = load_config(args.config)
        if args.optimizer_kind and args.optimizer_kind != config.optimizer.kind:
            # Same budget and base step size; the other kind's own architecture defaults.
            lr = config.optimizer.config_dict.get("learning_rate")
            cfg = {"learning_rate": lr} if lr is not None else {}
            config = config.replace(optimizer=OptimizerSection(args.optimizer_kind, _freeze(cfg)))
        if args.generations is not None:
            if args.generations < 0:
                raise CLIError(f"--generations must be ≥ 0, got {args.generations}")
            config = config.replace(generations=args.generations)
    except ConfigError as exc:
        raise CLIError(str(exc), 2) from exc
    return config


def _load_init(spec: str) -> tuple[Any, Any, dict]:
    from mnemosyne_core.pretrained import PretrainedError, load_optimizer

    try:
        return load_optimizer(spec)
    except FileNotFoundError as exc:
        raise CLIError(f"--init-from: {exc}", 2) from exc
    except PretrainedError as exc:
        raise CLIError(f"--init-from: {exc}", 2) from exc
    except Exception as exc:
        raise CLIError(f"--init-from {spec}: {type(exc).__name__}: {exc}", 2) from exc


class _Publisher:
    """Publishes to the registry: every ``publish_every`` generations, at the end; moves ``best``."""

    def __init__(self, uri: str, token: str | None):
        from urllib.parse import urlparse

        parsed = urlparse(uri)
        name = parsed.path.strip("/")
        if parsed.scheme != "grpc" or not parsed.hostname or not parsed.port or not name:
            raise CLIError(f"--publish needs grpc://HOST:PORT/NAME, got {uri!r}", 2)
        try:
            from mnemosyne_registry import RegistryClient
        except ImportError as exc:
            raise CLIError(f"--publish needs the grpc extra: {exc}", 2) from exc
        self.client = RegistryClient(f"{parsed.hostname}:{parsed.port}", token=token)
        self.name = name
        self.best = math.inf
        self.versions: list[int] = []

    def publish(self, trainer: Any, score: float) -> int:
        path = trainer.export(run_score=score)
        version = self.client.publish(str(path), self.name, _registry_metadata(trainer, score, self.versions))
        number = int(version.number)
        self.versions.append(number)
        if math.isfinite(score) and score < self.best:
            self.best = score  # lower meta-loss over the last 20 generations = better
            self.client.set_alias(self.name, "best", number)
        return number


def _registry_metadata(trainer: Any, score: float, earlier: list[int]) -> dict:
    """Lineage in the registry's VersionMetadata shape (JSON form of the proto)."""
    import hashlib

    from mnemosyne_core.meta.trainer import lineage

    meta = lineage(trainer.config, trainer.seed, trainer.generation, optimizer_kind=trainer.lo.kind)
    family = trainer.config.tasks.family or json.dumps(trainer.config.tasks.spec_dicts, sort_keys=True)
    lin = {
        "runId": str(trainer.out.resolve()),
        "generation": str(trainer.generation),
        "configJson": json.dumps(meta["config"], sort_keys=True),
        "taskFamilyFingerprint": hashlib.sha256(family.encode()).hexdigest()[:16],
        "codeVersion": meta["code_version"],
        "jaxVersion": meta["jax_version"],
    }
    if math.isfinite(score):
        lin["evalMetrics"] = {"meta_loss": score}
    if earlier:
        lin["parentVersion"] = str(earlier[-1])
    elif trainer.parent.get("registry_version"):
        lin["parentVersion"] = str(trainer.parent["registry_version"])
    tags = {"optimizer_kind": trainer.lo.kind, "config": trainer.config.name, "seed": str(trainer.seed),
            "estimator": trainer.config.estimator.kind}
    if trainer.parent.get("source"):
        tags["parent_source"] = str(trainer.parent["source"])
    return {"lineage": lin, "tags": tags, "description": f"meta-trained with config {trainer.config.name!r}"}


def run(args: argparse.Namespace) -> int:
    from mnemosyne_core.meta.trainer import CHECKPOINT, MetaTrainer, ResumeError

    config = _load_config(args)
    init = _load_init(args.init_from) if args.init_from else None
    evaluator = None
    if args.backend == "ray":
        try:
            from service.ray_backend import make_ray_evaluator
        except ModuleNotFoundError as exc:
            raise CLIError(f"--backend ray is unavailable: {exc}", 2) from exc
        evaluator = make_ray_evaluator(args, config)
    publisher = _Publisher(args.publish, args.token) if args.publish else None
    resume = args.resume or (args.resume_if_present and (pathlib.Path(args.out) / CHECKPOINT).exists())
    try:
        trainer = MetaTrainer(config, args.out, seed=args.seed, evaluator=evaluator, init=init, resume=resume)
    except ResumeError as exc:
        raise CLIError(str(exc), 2) from exc
    except ValueError as exc:
        raise CLIError(f"cannot start meta-training: {exc}", 2) from exc

    recent: list[float] = []
    every = trainer.config.publish_every

    def on_generation(row: dict) -> None:
        if math.isfinite(row["meta_loss"]):
            recent.append(row["meta_loss"])
        del recent[:-20]
        if publisher is not None and every and row["generation"] + 1 < trainer.config.generations \
                and (row["generation"] + 1) % every == 0:
            publisher.publish(trainer, sum(recent) / max(len(recent), 1))

    total = trainer.config.generations
    try:
        if args.no_progress:
            trainer.run(total, on_generation=on_generation)
        else:
            _run_with_progress(trainer, total, on_generation)
    finally:
        close = getattr(trainer.evaluator, "close", None)
        if callable(close):
            close()
    path = trainer.export()
    score = sum(recent) / max(len(recent), 1) if recent else math.nan
    if publisher is not None:
        version = publisher.publish(trainer, score)
        print(f"published {publisher.name} version {version}")
    print(f"wrote {path} (generation {trainer.generation}, recent meta-loss {score:.4f})")
    return 0


def _run_with_progress(trainer: Any, total: int, on_generation: Any) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("meta-train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}")) as bar:
        task = bar.add_task("gen", total=total, completed=trainer.generation, info="")

        def hook(row: dict) -> None:
            on_generation(row)
            bar.update(task, completed=row["generation"] + 1,
                       info=f"meta-loss {row['meta_loss']:.3f}  pairs {row['pairs_used']}/"
                            f"{row['pairs_used'] + row['pairs_dropped']}  {row['inner_steps_per_s']:.0f} steps/s")

        trainer.run(total, on_generation=hook)
