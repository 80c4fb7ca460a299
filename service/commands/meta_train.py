"""``mnemosyne meta-train``: meta-train a learned optimizer from a config.

Examples::

    mnemosyne meta-train --config quick --out runs/quick
    mnemosyne meta-train --config default --seed 0 --out runs/default          # the shipped optimizer
    mnemosyne meta-train --config default --optimizer-kind lstm --out runs/lstm   # the LSTM baseline
    mnemosyne meta-train --config quick --out runs/quick --resume --generations 20
    mnemosyne meta-train --config robotics --out runs/robotics \\
        --init-from mnemosyne_core/pretrained/superseded/default_v1.msgpack \\
        --publish grpc://127.0.0.1:50051/robotics
    mnemosyne meta-train --config quick --backend ray --workers 2 --out runs/ray

Writes ``DIR/metrics.jsonl`` (one object per generation), TensorBoard events in
``DIR/tb``, a resumable ``DIR/checkpoint.msgpack`` every ``checkpoint_every``
generations and ``DIR/optimizer.msgpack`` (θ + architecture + lineage).

Fails fast: the config is checked field by field and every task it can sample is built
(by shapes) before generation 0; ``--publish`` checks the registry's health, the token and
the name before training. A run in which no pair succeeds for ``stop_after_failed_generations``
generations in a row (or every pair of one generation raises) stops, keeps its last checkpoint
and writes and publishes no optimizer. Publishing never stops the run: snapshots go to
``DIR/publish/`` and are retried with backoff; what the registry never took is listed at the
end with the ``registry push`` command for it. Exit codes: 0 ok, 1 failure (run stopped, or
something not published), 2 usage (bad arguments or config).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shlex
import sys
import time
from typing import Any

from service.cli import CLIError, service_error


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
    p.add_argument("--publish-wait", type=float, default=120.0, metavar="SECONDS",
                   help="at the end, how long to keep retrying publishes the registry has not taken yet "
                        "(default 120); what is left is listed with the command that publishes it")
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
    """The config, checked field by field and task by task; every error is one line naming the file."""
    from mnemosyne_core.meta.config import (
        ConfigError,
        OptimizerSection,
        _freeze,
        check_tasks,
        config_path,
        load_config,
    )

    try:
        path = config_path(args.config)
        config = load_config(path)
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
    try:  # every task it can sample, built once by shapes, before any worker starts or any file is written
        check_tasks(config.tasks)
    except ConfigError as exc:
        raise CLIError(f"{path}: {exc}", 2) from exc
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
        code = 1 if service_error(exc) is not None else 2  # a registry that is down is no usage error
        raise CLIError(f"--init-from {spec}: {type(exc).__name__}: {exc}", code) from exc


def _registry_client():
    """The registry client package (``mnemosyne_registry``; it needs the grpc extra)."""
    import mnemosyne_registry as client

    return client


@dataclasses.dataclass
class _Job:
    """One optimizer snapshot to publish: the file (written when it was queued) and its metadata."""

    generation: int
    path: pathlib.Path
    score: float
    metadata: dict
    sha256: str
    final: bool = False
    number: int | None = None  # the registry's version number once published
    error: str = ""


class _Publisher:
    """Publishes to the registry without ever stopping the run.

    ``check()`` (before training) asks the registry's health service and makes one write call
    that changes nothing (deleting the reserved ``latest`` alias, which a server refuses with
    FAILED_PRECONDITION only after it accepted the token and the name), so a registry that is
    down, a wrong token or a bad name fail the command before generation 0.

    During the run ``submit`` writes the snapshot to ``DIR/publish/`` and queues it; one
    background thread publishes the queue in order, retrying transient failures with
    exponential backoff. Before any retry it looks for the snapshot's sha256 among the name's
    versions, so an upload the server committed but whose answer was lost is not published
    twice. ``finish(wait)`` gives the queue ``wait`` more seconds; what is left is reported
    with the ``registry push`` command that publishes it.
    """

    PERMANENT = frozenset({"INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                           "FAILED_PRECONDITION", "NOT_FOUND", "ALREADY_EXISTS", "UNIMPLEMENTED"})

    def __init__(self, uri: str, token: str | None, *, call_timeout: float = 30.0, max_backoff: float = 10.0):
        import queue
        import threading
        from urllib.parse import urlparse

        parsed = urlparse(uri)
        name = parsed.path.strip("/")
        try:
            port = parsed.port
        except ValueError:
            port = None
        if parsed.scheme != "grpc" or not parsed.hostname or not port or not name or "@" in name or "/" in name:
            raise CLIError(f"--publish needs grpc://HOST:PORT/NAME, got {uri!r}", 2)
        try:
            module = _registry_client()
        except ImportError as exc:
            raise CLIError(f"--publish needs the grpc extra: {exc}", 2) from exc
        self.uri = uri
        self.target = f"{parsed.hostname}:{port}"
        self.name = name
        self.token = token
        self._module = module
        self.client = module.RegistryClient(self.target, token=token, timeout=call_timeout)
        self.Error = module.RegistryClientError
        self.best = math.inf
        self.done: list[_Job] = []  # published, in order
        self.left: list[_Job] = []  # given up on (reported at the end)
        self.warnings: list[str] = []
        self.max_backoff = max_backoff
        self.base_backoff = 0.5
        self._queue: Any = queue.Queue()
        self._deadline: float | None = None  # set by finish(): after it, stop retrying
        self._wake = threading.Event()
        self._outage = False
        self._thread = threading.Thread(target=self._work, name="mnemosyne-publisher", daemon=True)
        self._thread.start()

    # -- before training -------------------------------------------------------
    def check(self, timeout: float = 10.0) -> None:
        """Health, token and name, or one ``CLIError`` line (1: unreachable, 2: refused)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        where = f"--publish {self.uri}"
        with grpc.insecure_channel(self.target) as channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="mnemosyne.registry.v1.RegistryService"), timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code().name if callable(getattr(exc, "code", None)) else "UNKNOWN"
                if code == "UNIMPLEMENTED":
                    raise CLIError(f"{where}: {self.target} is not a Mnemosyne registry (no health service)", 1) \
                        from None
                raise CLIError(f"{where}: registry unreachable ({code}: {' '.join(str(exc.details()).split())}); "
                               "start it or fix the address", 1) from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            raise CLIError(f"{where}: registry is not serving ({status})", 1)
        try:
            self.client.delete_alias(self.name, "latest")  # never succeeds: 'latest' can't be deleted
        except self.Error as exc:
            if exc.code == "FAILED_PRECONDITION":
                return  # token accepted, name valid
            if exc.code == "UNAUTHENTICATED":
                raise CLIError(f"{where}: the registry refused the token ({exc.message}); pass --token or set "
                               "MNEMOSYNE_REGISTRY_TOKEN", 2) from None
            if exc.code == "INVALID_ARGUMENT":
                raise CLIError(f"{where}: {exc.message}", 2) from None
            raise CLIError(f"{where}: registry check failed ({exc})", 1) from None
        raise CLIError(f"{where}: the registry deleted alias 'latest'; it does not follow the registry API", 1)

    # -- during the run --------------------------------------------------------
    def submit(self, trainer: Any, score: float, *, final: bool = False) -> _Job:
        """Snapshot θ now (the file is the version), queue it for the background thread."""
        import hashlib

        if final:
            path = trainer.export(run_score=score)  # DIR/optimizer.msgpack
        else:
            folder = trainer.out / "publish"
            folder.mkdir(exist_ok=True)
            path = trainer.export(folder / f"{self.name}-g{trainer.generation:06d}.msgpack", run_score=score)
        job = _Job(trainer.generation, pathlib.Path(path), score, _registry_metadata(trainer, score, []),
                   hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest(), final)
        self._queue.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._deadline is not None and time.monotonic() > self._deadline:
                job.error = job.error or "not tried: the wait for publishing ran out"
                self.left.append(job)
                continue
            self._deliver(job)

    def _parent(self) -> int | None:
        return self.done[-1].number if self.done else None

    def _deliver(self, job: _Job) -> None:
        delay, attempt = self.base_backoff, 0
        while True:
            try:
                if attempt and self._find(job):  # an earlier attempt did land: never publish twice
                    self._published(job)
                    return
                meta = dict(job.metadata, lineage=dict(job.metadata["lineage"]))
                if self._parent() is not None:
                    meta["lineage"]["parentVersion"] = str(self._parent())
                version = self.client.publish(str(job.path), self.name, meta)
                job.number = int(version.number)
                self._published(job)
                return
            except self.Error as exc:
                job.error = str(exc)
                if exc.code in self.PERMANENT:
                    self.left.append(job)
                    self._say(f"publish of generation {job.generation} refused by the registry ({exc}); "
                              "training goes on")
                    return
            except (OSError, ValueError) as exc:  # the snapshot file itself: not retryable
                job.error = f"{type(exc).__name__}: {exc}"
                self.left.append(job)
                return
            attempt += 1
            self._reconnect()
            if not self._outage:
                self._outage = True
                self._say(f"cannot publish generation {job.generation} to {self.uri} ({job.error}); "
                          "training goes on, retrying with backoff")
            if not self._sleep(delay):
                self.left.append(job)
                return
            delay = min(delay * 2, self.max_backoff)

    def _reconnect(self) -> None:
        """A fresh channel for the next try: a gRPC channel that saw its server die backs off its own
        reconnects (up to minutes), which would delay publishing long after the registry is back."""
        with contextlib.suppress(Exception):
            self.client.close()
        self.client = self._module.RegistryClient(self.target, token=self.token, timeout=self.client.timeout)

    def _sleep(self, seconds: float) -> bool:
        """Wait before a retry; ``False`` once ``finish``'s deadline has passed."""
        if self._deadline is not None:
            seconds = min(seconds, self._deadline - time.monotonic())
            if seconds <= 0:
                return False
        self._wake.wait(seconds)
        self._wake.clear()
        return self._deadline is None or time.monotonic() < self._deadline

    def _find(self, job: _Job) -> bool:
        """Whether the name already holds this exact snapshot (then ``job.number`` is set)."""
        try:
            for version in self.client.list_versions(self.name):
                if version.sha256 == job.sha256:
                    job.number = int(version.number)
                    return True
        except self.Error as exc:
            if exc.code != "NOT_FOUND":  # NOT_FOUND: the name has no version yet
                raise
        return False

    def _published(self, job: _Job) -> None:
        self.done.append(job)
        if not job.final:  # the registry holds it now; DIR/optimizer.msgpack (the final one) stays
            with contextlib.suppress(OSError):
                job.path.unlink()
        if self._outage:
            self._outage = False
            self._say(f"registry is back: published generation {job.generation} as {self.name} version {job.number}")
        if math.isfinite(job.score) and job.score < self.best:
            delay = self.base_backoff
            while True:  # lower meta-loss over the last 20 generations = better
                try:
                    self.client.set_alias(self.name, "best", job.number)
                    self.best = job.score
                    return
                except self.Error as exc:
                    if exc.code not in self.PERMANENT:
                        self._reconnect()
                    if exc.code in self.PERMANENT or not self._sleep(delay):
                        self.warnings.append(f"alias 'best' not moved to version {job.number} ({exc})")
                        return
                    delay = min(delay * 2, self.max_backoff)

    def _say(self, text: str) -> None:
        print(f"mnemosyne: {text}", file=sys.stderr, flush=True)

    # -- at the end ------------------------------------------------------------
    def finish(self, wait: float) -> None:
        """Publish what is queued within ``wait`` more seconds; the rest is in ``self.left``."""
        self._deadline = time.monotonic() + max(0.0, wait)
        self._queue.put(None)
        self._wake.set()
        self._thread.join(max(0.0, wait) + self.client.timeout + 5.0)
        if self._thread.is_alive():  # a call still hanging: report everything not confirmed
            while True:
                try:
                    job = self._queue.get_nowait()
                except Exception:  # noqa: BLE001 - queue.Empty
                    break
                if job is not None:
                    self.left.append(job)
        self.left.sort(key=lambda j: j.generation)
        for job in self.left:  # the metadata a manual push should send
            meta = dict(job.metadata, lineage=dict(job.metadata["lineage"]))
            if self._parent() is not None:
                meta["lineage"]["parentVersion"] = str(self._parent())
            _atomic_text(job.path.with_suffix(".metadata.json"), json.dumps(meta, sort_keys=True))
        with contextlib.suppress(Exception):  # closing a dead channel must not hide the report
            self.client.close()

    def push_command(self, job: _Job) -> str:
        meta = shlex.quote(str(job.path.with_suffix(".metadata.json")))
        return (f"mnemosyne registry push {shlex.quote(str(job.path))} --name {shlex.quote(self.name)} "
                f"--registry grpc://{self.target} --metadata \"$(cat {meta})\"")


def _atomic_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    from mnemosyne_core.meta.config import ConfigError
    from mnemosyne_core.meta.trainer import (
        CHECKPOINT,
        MetaTrainer,
        MetaTrainingStalled,
        NonFiniteError,
        ResumeError,
    )

    if args.publish_wait < 0:
        raise CLIError(f"--publish-wait must be ≥ 0, got {args.publish_wait}", 2)
    config = _load_config(args)
    init = _load_init(args.init_from) if args.init_from else None
    publisher = _Publisher(args.publish, args.token) if args.publish else None
    evaluator = None
    try:
        if publisher is not None:
            publisher.check()
        if args.backend == "ray":
            try:
                from service.ray_backend import make_ray_evaluator
            except ModuleNotFoundError as exc:
                raise CLIError(f"--backend ray is unavailable: {exc}", 2) from exc
            evaluator = make_ray_evaluator(args, config)
        resume = args.resume or (args.resume_if_present and (pathlib.Path(args.out) / CHECKPOINT).exists())
        try:
            trainer = MetaTrainer(config, args.out, seed=args.seed, evaluator=evaluator, init=init, resume=resume)
        except ResumeError as exc:
            raise CLIError(str(exc), 2) from exc
        except (ConfigError, ValueError) as exc:
            raise CLIError(f"cannot start meta-training: {exc}", 2) from exc
        except OSError as exc:
            raise CLIError(f"cannot start meta-training: {exc}", 1) from exc
    except BaseException:
        _close(evaluator)
        if publisher is not None:
            publisher.finish(0.0)
        raise

    recent: list[float] = []
    every = trainer.config.publish_every

    def score() -> float:
        return sum(recent) / len(recent) if recent else math.nan

    def on_generation(row: dict) -> None:
        if math.isfinite(row["meta_loss"]):
            recent.append(row["meta_loss"])
        del recent[:-20]
        if publisher is not None and every and row["generation"] + 1 < trainer.config.generations \
                and (row["generation"] + 1) % every == 0:
            publisher.submit(trainer, score())

    total = trainer.config.generations
    stopped: str | None = None
    try:
        if args.no_progress:
            trainer.run(total, on_generation=on_generation)
        else:
            _run_with_progress(trainer, total, on_generation)
    except MetaTrainingStalled as exc:
        stopped = str(exc)
    finally:
        _close(trainer.evaluator)
    code = 0
    if stopped is None:
        try:
            if publisher is not None:
                path = publisher.submit(trainer, score(), final=True).path
            else:
                path = trainer.export(run_score=score())
        except NonFiniteError as exc:  # cannot happen with the trainer's own guard; never write such θ
            stopped = str(exc)
    if publisher is not None:
        publisher.finish(args.publish_wait)
        for text in publisher.warnings:
            print(f"mnemosyne: warning: {text}", file=sys.stderr)
        if publisher.done:
            numbers = ", ".join(str(j.number) for j in publisher.done)
            gens = ", ".join(str(j.generation) for j in publisher.done)
            print(f"published {publisher.name} versions {numbers} (generations {gens}) to {publisher.uri}")
    if stopped is not None:
        checkpoint = trainer.out / CHECKPOINT
        kept = f"; last checkpoint kept: {checkpoint}" if checkpoint.exists() else ""
        print(f"mnemosyne: error: {stopped}; no optimizer written{kept}", file=sys.stderr)
        code = 1
    else:
        print(f"wrote {path} (generation {trainer.generation}, recent meta-loss {score():.4f})")
    if publisher is not None and publisher.left:
        job = publisher.left[0]
        more = f" (and generations {', '.join(str(j.generation) for j in publisher.left[1:])}: " \
               f"the same with their files in {job.path.parent})" if len(publisher.left) > 1 else ""
        print(f"mnemosyne: error: not published to {publisher.uri}: generation{'s' if len(publisher.left) > 1 else ''} "
              f"{', '.join(str(j.generation) for j in publisher.left)} ({job.error or 'gave up'}); "
              f"publish with: {publisher.push_command(job)}{more}", file=sys.stderr)
        code = 1
    return code


def _close(evaluator: Any) -> None:
    close = getattr(evaluator, "close", None)
    if callable(close):
        close()


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
