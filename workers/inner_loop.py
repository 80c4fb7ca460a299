"""``InnerLoopWorker``: a Ray actor that runs inner unrolls for tickets.

The actor is deliberately thin: it rebuilds the meta-training config once, keeps
the persistent inner problems of the pairs it runs (PES / truncated backprop)
in its own :class:`~mnemosyne_core.meta.evaluator.InnerStateStore`, and calls
:func:`~mnemosyne_core.meta.evaluator.evaluate_tickets` — the very function the
in-process ``LocalEvaluator`` calls, vmapped over tickets that share a task
shape on this actor's device. It answers ``PairResult.encode()`` bytes (36 B
per ES/PES pair), so θ goes out once per generation (``ray.put``) and only ids
and scalars come back.

Placement (CPUs, fractional GPUs, TPU hosts) and restarts are set by
:func:`actor_options`; the actor itself only pins its process to the CPUs it is
given, before JAX starts its thread pools, so two 1-CPU workers on a 2-core
machine do not fight over both cores.

Example (plain Python, no Ray — what the actor does inside a call):
    >>> from mnemosyne_core.meta.config import MetaConfig
    >>> cfg = MetaConfig.from_dict({"name": "t", "estimator": {"num_pairs": 2}})
    >>> from mnemosyne_core.meta.evaluator import learned_optimizer
    >>> from mnemosyne_core.meta.noise import run_key_data
    >>> from mnemosyne_core.meta.protocol import PairResult, Ticket
    >>> from mnemosyne_core.tasks import TaskSpec
    >>> import jax
    >>> w = InnerLoopWorker(cfg.to_dict(), worker_id=3)
    >>> theta = learned_optimizer(w.config).init_theta(jax.random.key(0))
    >>> t = Ticket(0, 5, TaskSpec("quadratic", {"dim": 4}), 10, 10, run_key=run_key_data(0))
    >>> [blob] = w.evaluate(theta, [t])
    >>> r = PairResult.decode(blob)
    >>> len(blob), r.pair_id, r.worker_id, r.status.name
    (36, 5, 3, 'OK')
"""
from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

__all__ = ["InnerLoopWorker", "PoisonedTicketError"]


class PoisonedTicketError(RuntimeError):
    """Raised by a worker for a ticket it was told to fail (fault-injection in tests)."""


class InnerLoopWorker:
    """Evaluates batches of tickets against θ. Wrap with ``ray.remote(**actor_options(...))``.

    ``config`` is ``MetaConfig.to_dict()`` (plain data, cheap to ship).
    ``cpu_affinity``: CPUs to pin this process to (``None``: leave as is).
    ``poison``: pair ids whose tickets raise :class:`PoisonedTicketError`; ``stall_s``: sleep
    that long in every call — both only for fault-injection tests of the driver's policy.
    """

    def __init__(self, config: dict[str, Any], worker_id: int = 0,
                 cpu_affinity: Sequence[int] | None = None, poison: Sequence[int] = (),
                 stall_s: float = 0.0):
        if cpu_affinity:
            # Before JAX initialises: its CPU thread pool sizes itself from the affinity mask.
            os.sched_setaffinity(0, set(cpu_affinity))
        from mnemosyne_core.meta.config import MetaConfig
        from mnemosyne_core.meta.evaluator import InnerStateStore

        self.config = MetaConfig.from_dict(config)
        self.worker_id = int(worker_id)
        self.poison = frozenset(int(p) for p in poison)
        self.stall_s = float(stall_s)
        self.store = InnerStateStore()
        self.calls = 0

    def ping(self) -> dict[str, Any]:
        """Who and where this actor is (pid for fault tests, devices for placement checks)."""
        import jax

        info = {"worker_id": self.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                "devices": [str(d) for d in jax.devices()],
                "cpus": sorted(os.sched_getaffinity(0)), "calls": self.calls,
                "env": {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "XLA_PYTHON_"))}}
        try:
            import ray

            if ray.is_initialized():
                info["resources"] = ray.get_runtime_context().get_assigned_resources()
                info["gpu_ids"] = ray.get_gpu_ids()
        except ImportError:  # plain-Python use without Ray
            pass
        return info

    def evaluate(self, theta: Any, tickets: Sequence[Any] | bytes) -> list[bytes]:
        """Run ``tickets`` (all of one generation; a list or a :func:`workers.wire.pack_tickets`
        blob) against ``theta``; one encoded result each."""
        from mnemosyne_core.meta.evaluator import evaluate_tickets
        from workers.wire import unpack_tickets

        if isinstance(tickets, (bytes, bytearray, memoryview)):
            tickets = unpack_tickets(bytes(tickets))

        self.calls += 1
        if self.stall_s:
            import time

            time.sleep(self.stall_s)  # a straggler, for fault-injection tests
        bad = [t.pair_id for t in tickets if t.pair_id in self.poison]
        if bad:
            raise PoisonedTicketError(f"worker {self.worker_id}: poisoned pairs {bad}")
        results = evaluate_tickets(theta, list(tickets), self.config, store=self.store,
                                   worker_id=self.worker_id)
        return [r.encode() for r in results]

    def noise_sum(self, run_key: Sequence[int], generation: int, pair_ids: Sequence[int],
                  weights: Any, dim: int) -> Any:
        """Σ_j w_j ε(generation, pair_j) for one chunk of pairs, as float32 numpy.

        Lets the driver hand ε regeneration (the only |θ|-sized per-pair work of ES) to the
        workers: it sums one vector per chunk instead of rebuilding every ε itself.
        """
        import numpy as np

        from mnemosyne_core.meta.es import weighted_noise_sum

        ids = [int(i) for i in pair_ids]
        out = weighted_noise_sum(run_key, [generation] * len(ids), ids, np.asarray(weights, np.float32), dim)
        return np.asarray(out, np.float32)

    def state_dict(self) -> dict[int, Any]:
        """This actor's persistent inner problems (host copies), for driver checkpoints."""
        return self.store.state_dict()

    def load_state_dict(self, items: dict[int, Any]) -> int:
        self.store.load_state_dict(items)
        return len(self.store)
