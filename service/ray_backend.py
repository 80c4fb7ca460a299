"""The Ray backend of ``mnemosyne meta-train``: an :class:`Evaluator` over ``InnerLoopWorker`` actors.

``meta-train --backend ray`` calls :func:`make_ray_evaluator(args, config)` and
then uses the object exactly like the in-process ``LocalEvaluator``:
``evaluate(θ, tickets) -> list[PairResult]``, ``state_dict()`` /
``load_state_dict()`` for checkpoints, ``close()``. In addition
:meth:`RayEvaluator.metrics` returns the fault/throughput counters of the
last generation, which the trainer adds to its ``metrics.jsonl`` row: ``pairs_reissued``, ``stale_results``,
``workers_alive`` (and ``workers``, ``unique_workers``, ``pairs_failed``,
``pairs_timed_out``, ``worker_deaths``, ``result_bytes``).

Per generation θ is put in the object store once (``ray.put``) and every call
references it; tickets are small dataclasses, results 36-byte records.
Scheduling and the fault policy live in :mod:`service.ray_scheduler`.

Example:
    >>> opts = BackendOptions(workers=2, worker_gpus=0.5)
    >>> o = actor_options(opts)
    >>> o["num_gpus"], o["runtime_env"]["env_vars"]["XLA_PYTHON_CLIENT_PREALLOCATE"]
    (0.5, 'false')
    >>> parse_worker_resources('{"TPU": 4}')
    {'TPU': 4.0}
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from mnemosyne_core.meta.protocol import PairResult, Ticket

__all__ = [
    "BackendOptions",
    "RayEvaluator",
    "actor_options",
    "connect",
    "make_ray_evaluator",
    "parse_worker_resources",
]

# JAX settings a worker inherits from the driver when both run on this machine.
_FORWARDED_ENV = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
                  "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "JAX_ENABLE_X64")


def _cli_error(message: str, code: int = 2) -> Exception:
    from service.cli import CLIError

    return CLIError(message, code)


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """Everything ``--backend ray`` needs besides the meta-training config."""

    workers: int = 2
    address: str | None = None  # None: start an embedded local Ray; "auto" or HOST:PORT: join
    worker_cpus: float = 1.0
    worker_gpus: float = 0.0
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    max_restarts: int = 4
    deadline_s: float | None = None
    min_fraction: float = 1.0
    straggler_s: float | None = None
    max_attempts: int = 3
    tickets_per_call: int | None = None
    pin_cpus: bool = False  # pin actor i to CPU i (single-node benchmarks)
    poison: tuple[int, ...] = ()  # fault injection for tests: pair ids whose tickets raise
    stall: dict[int, float] = dataclasses.field(default_factory=dict)  # tests: worker id -> sleep per call

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise _cli_error(f"--workers must be ≥ 1, got {self.workers}")
        if self.worker_cpus < 0 or self.worker_gpus < 0:
            raise _cli_error("--worker-cpus and --worker-gpus must be ≥ 0")
        if self.worker_gpus > 1 and self.worker_gpus != int(self.worker_gpus):
            raise _cli_error(f"--worker-gpus above 1 must be whole, got {self.worker_gpus}")
        if not 0 < self.min_fraction <= 1:
            raise _cli_error(f"min fraction of pairs must be in (0, 1], got {self.min_fraction}")


def parse_worker_resources(text: str | dict | None) -> dict[str, float]:
    """``'{"TPU": 4}'`` -> ``{"TPU": 4.0}``; raises ``CLIError`` on anything else."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text) if isinstance(text, str) else dict(text)
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise _cli_error(f"--worker-resources must be a JSON object like '{{\"TPU\": 4}}': {exc}") from None
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for k, v in value.items()):
        raise _cli_error("--worker-resources must map resource names to non-negative numbers")
    if {"CPU", "GPU"} & set(value):
        raise _cli_error("--worker-resources: use --worker-cpus/--worker-gpus for CPU and GPU")
    return {k: float(v) for k, v in value.items()}


def actor_options(opts: BackendOptions, forward_env: bool = False) -> dict[str, Any]:
    """``ray.remote`` options of one ``InnerLoopWorker``: resources, restarts, JAX environment."""
    env: dict[str, str] = {}
    if forward_env:
        env.update({k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ})
    if opts.worker_gpus > 0:
        # Several workers share one GPU: JAX must not grab 75 % of it up front.
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        if opts.worker_gpus < 1:
            env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 * opts.worker_gpus:.3f}"
    elif not opts.worker_resources:
        # A CPU worker on a GPU node must not initialise (and hold) the GPU. Workers that ask
        # for custom resources (e.g. {"TPU": 4}) let JAX pick the host's accelerator itself.
        env["JAX_PLATFORMS"] = "cpu"
    options: dict[str, Any] = {
        "num_cpus": opts.worker_cpus,
        "num_gpus": opts.worker_gpus,
        "max_restarts": opts.max_restarts,
        # The driver re-issues a dead actor's tickets to live actors itself (faster than
        # waiting for a restart), so Ray must not silently retry them too.
        "max_task_retries": 0,
        "runtime_env": {"env_vars": env},
    }
    if opts.worker_resources:
        options["resources"] = dict(opts.worker_resources)
    return options


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join ``address`` or start an embedded local Ray (no dashboard).

    Returns True when this call connected (so the caller owns the connection and shuts it
    down), False if the process was already connected.
    """
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = address or "an embedded local cluster"
        raise _cli_error(f"cannot connect to Ray at {where}: {str(exc).splitlines()[0]}", 3) from None
    return True


class RayEvaluator:
    """``evaluate(θ, tickets)`` on a pool of ``InnerLoopWorker`` actors (see module docstring)."""

    def __init__(self, config: Any, opts: BackendOptions):
        import ray

        from service.ray_scheduler import SchedulePolicy, TicketScheduler
        from workers.inner_loop import InnerLoopWorker

        self.opts = opts
        self._config_dict = config.to_dict()
        self._owns_ray = connect(opts.address, num_cpus=None)
        self._remote = ray.remote(InnerLoopWorker).options(
            **actor_options(opts, forward_env=opts.address is None))
        actors = [self._spawn(i) for i in range(opts.workers)]
        policy = SchedulePolicy(deadline_s=opts.deadline_s, min_fraction=opts.min_fraction,
                                straggler_s=opts.straggler_s, max_attempts=opts.max_attempts,
                                tickets_per_call=opts.tickets_per_call)
        self.scheduler = TicketScheduler(actors, policy, respawn=self._spawn)

    def _spawn(self, index: int) -> Any:
        ncpu = os.cpu_count() or 1
        pin = [index % ncpu] if self.opts.pin_cpus else None
        return self._remote.remote(self._config_dict, worker_id=index, cpu_affinity=pin,
                                   poison=self.opts.poison, stall_s=self.opts.stall.get(index, 0.0))

    @property
    def actors(self) -> list[Any]:
        return self.scheduler.actors

    def worker_info(self) -> list[dict[str, Any]]:
        """``ping()`` of every actor (waits for them to start): pid, host, devices, CPUs."""
        import ray

        return ray.get([a.ping.options(max_task_retries=-1).remote() for a in self.actors])

    def evaluate(self, theta: Any, tickets: Sequence[Ticket]) -> list[PairResult]:
        import jax
        import ray

        if not tickets:
            return []
        generation = tickets[0].generation
        theta_ref = ray.put(jax.device_get(theta))  # once per generation, shared by every call
        try:
            return self.scheduler.run(generation, theta_ref, tickets)
        finally:
            del theta_ref

    def weighted_noise_sum(self, run_key: Sequence[int], generations: Sequence[int], pair_ids: Sequence[int],
                           weights: Any, dim: int) -> Any:
        """``mnemosyne_core.meta.es.weighted_noise_sum`` with ε rebuilt on the workers.

        Same chunks (per generation, ``es._CHUNK`` pairs in the given order) and the same
        summation order as the in-process function, so on identical hardware the result is
        identical; the driver only adds one |θ| vector per chunk. Chunks go round-robin to the
        live actors; a chunk whose actor dies is recomputed locally.
        """
        import jax.numpy as jnp
        import numpy as np
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        from mnemosyne_core.meta import es

        chunk = getattr(es, "_CHUNK", 256)
        gens, ids = np.asarray(list(generations)), np.asarray(list(pair_ids))
        w = np.asarray(weights, np.float32)
        live = [a for a, ok in zip(self.actors, self.scheduler.alive) if ok] or self.actors
        parts = []
        for g in np.unique(gens):
            sel = np.nonzero(gens == g)[0]
            for start in range(0, sel.size, chunk):
                part = sel[start:start + chunk]
                actor = live[len(parts) % len(live)]
                args = (tuple(run_key), int(g), ids[part].tolist(), w[part], int(dim))
                parts.append((actor.noise_sum.remote(*args), args))
        total = jnp.zeros((dim,), jnp.float32)
        for ref, args in parts:
            try:
                partial = ray.get(ref)
            except (RayActorError, WorkerCrashedError):
                partial = es.weighted_noise_sum(args[0], [args[1]] * len(args[2]), args[2], args[3], args[4])
            total = total + jnp.asarray(partial)
        return total

    def metrics(self) -> dict[str, Any]:
        """Counters of the last ``evaluate`` call; the trainer adds them to its ``metrics.jsonl`` row."""
        return dict(self.scheduler.stats)

    last_stats = metrics

    def state_dict(self) -> dict[str, Any]:
        """Every actor's persistent inner problems (PES), merged by pair id."""
        import ray
        from ray.exceptions import RayActorError

        merged: dict[int, Any] = {}
        for ref in [a.state_dict.options(max_task_retries=-1).remote() for a in self.actors]:
            try:
                merged.update(ray.get(ref))
            except RayActorError:
                pass  # a dead actor's inner problems are gone; those pairs answer RESET
        return {"store": merged}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Hand each pair's inner problem to the actor its tickets go to (pair id mod workers)."""
        import ray

        items = state.get("store", {})
        n = len(self.actors)
        parts: list[dict[int, Any]] = [{} for _ in range(n)]
        for pair_id, item in items.items():
            parts[int(pair_id) % n][int(pair_id)] = item
        ray.get([a.load_state_dict.options(max_task_retries=-1).remote(p)
                 for a, p in zip(self.actors, parts)])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.scheduler.actors = []
        if self._owns_ray:  # an embedded Ray started for this run ends with it
            ray.shutdown()
            self._owns_ray = False


def make_ray_evaluator(args: Any, config: Any) -> RayEvaluator:
    """Build the evaluator from ``meta-train`` args (``workers``, ``address``, ``worker_cpus``,
    ``worker_gpus``, ``worker_resources``; optional ``deadline``, ``min_fraction``,
    ``straggler_seconds``, ``max_restarts``) and a ``MetaConfig``."""
    def opt(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    opts = BackendOptions(
        workers=int(opt("workers", 2)),
        address=opt("address", None) or None,
        worker_cpus=float(opt("worker_cpus", 1.0)),
        worker_gpus=float(opt("worker_gpus", 0.0)),
        worker_resources=parse_worker_resources(opt("worker_resources", None)),
        max_restarts=int(opt("max_restarts", 4)),
        deadline_s=opt("deadline", None),
        min_fraction=float(opt("min_fraction", 1.0)),
        straggler_s=opt("straggler_seconds", None),
        pin_cpus=bool(opt("pin_cpus", False)),
    )
    return RayEvaluator(config, opts)
