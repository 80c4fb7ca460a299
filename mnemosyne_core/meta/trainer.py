"""The meta-trainer: ask → evaluate → tell → outer update, with checkpoints and metrics.

One loop for every estimator and every backend: the evaluator is injected
(in-process :class:`~mnemosyne_core.meta.evaluator.LocalEvaluator` by default,
the Ray evaluator from ``service/`` otherwise). All randomness derives from the
run key and the generation number, so a run resumed from a checkpoint continues
exactly as the uninterrupted run would (tested bit-for-bit).

Run state (``DIR/checkpoint.msgpack``, written atomically every
``checkpoint_every`` generations): θ, the outer optimizer state, the next
generation, the run key, the estimator state (PES accumulators, episode book)
and the config. An evaluator that keeps persistent inner state and offers
``state_dict()``/``load_state_dict()`` (the local one does) is saved beside it in
``DIR/evaluator_state.pkl`` (a pickle of numpy arrays; it is this program's own
scratch file, never an exchange format).

Example:
    >>> import tempfile
    >>> from mnemosyne_core.meta.config import MetaConfig
    >>> cfg = MetaConfig.from_dict({"generations": 2, "estimator": {"num_pairs": 2, "truncation": 10},
    ...     "tasks": {"specs": [{"name": "quadratic", "kwargs": {"dim": 4}}], "min_unroll": 10,
    ...               "max_unroll": 10}, "optimizer": {"config": {"learning_rate": 0.05}}})
    >>> trainer = MetaTrainer(cfg, tempfile.mkdtemp())
    >>> rows = trainer.run()
    >>> [r["generation"] for r in rows], rows[0]["pairs_used"]
    ([0, 1], 2)
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import pickle
import platform
import subprocess
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from mnemosyne_core.meta.backprop import TruncatedBackprop
from mnemosyne_core.meta.config import MetaConfig
from mnemosyne_core.meta.episodes import EpisodeBook
from mnemosyne_core.meta.es import ES
from mnemosyne_core.meta.evaluator import LocalEvaluator, learned_optimizer
from mnemosyne_core.meta.learned import LearnedOptimizer
from mnemosyne_core.meta.noise import run_key_data
from mnemosyne_core.meta.pes import PES
from mnemosyne_core.meta.protocol import Evaluator, Status

__all__ = ["MetaTrainer", "MetaTrainingStalled", "NonFiniteError", "ResumeError", "lineage", "make_estimator",
           "make_outer", "validation_loss"]

ESTIMATOR_CLASSES = {"es": ES, "pes": PES, "backprop": TruncatedBackprop}
CHECKPOINT = "checkpoint.msgpack"
EVALUATOR_STATE = "evaluator_state.pkl"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed with the given config."""


class MetaTrainingStalled(RuntimeError):
    """The run learns nothing: every pair of a generation raised, or no pair succeeded for
    ``stop_after_failed_generations`` generations in a row. The message names a failing task
    and its exception; the last checkpoint (of a generation that learned) is left as it was."""


class NonFiniteError(ValueError):
    """θ (or a score) that is NaN/Inf: never saved as an optimizer, never published."""


def make_estimator(config: MetaConfig, run_key: tuple[int, ...]) -> Any:
    return ESTIMATOR_CLASSES[config.estimator.kind](config, run_key)


def make_outer(config: MetaConfig) -> optax.GradientTransformation:
    o = config.outer
    base = optax.adam(o.learning_rate, b1=o.b1, b2=o.b2) if o.optimizer == "adam" else optax.sgd(o.learning_rate)
    return optax.chain(optax.clip_by_global_norm(o.clip), base)


def _code_version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=pathlib.Path(__file__).resolve().parent)
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import mnemosyne_core

    return mnemosyne_core.__version__


def lineage(config: MetaConfig, seed: int, generation: int, **extra: Any) -> dict[str, Any]:
    """Metadata stored with every exported optimizer."""
    import mnemosyne_core

    return {
        "config": config.to_dict(),
        "config_name": config.name,
        "seed": seed,
        "generation": generation,
        "estimator": config.estimator.kind,
        "code_version": _code_version(),
        "package_version": mnemosyne_core.__version__,
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        **extra,
    }


def _est_to_plain(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if isinstance(v, EpisodeBook):
            d = v.state_dict()
            d["spec"] = json.dumps(d["spec"])
            out[k] = {"__book__": d}
        else:
            out[k] = v
    return out


def _est_from_plain(state: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict) and "__book__" in v:
            d = dict(v["__book__"])
            d["spec"] = json.loads(d["spec"])
            out[k] = EpisodeBook.from_state_dict(d)
        elif isinstance(v, np.ndarray) and v.shape == () and v.dtype == bool:
            out[k] = bool(v)
        elif isinstance(v, np.ndarray):
            out[k] = np.array(v, copy=True)  # msgpack gives read-only views; estimators update in place
        else:
            out[k] = v
    return out


def _finite(tree: Any) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


class MetaTrainer:
    """Owns θ, the outer optimizer, the generation counter and the estimator state."""

    def __init__(self, config: MetaConfig, out_dir: str | os.PathLike, *, seed: int | None = None,
                 evaluator: Evaluator | None = None, init: tuple[Any, Any, dict] | None = None,
                 resume: bool = False):
        self.out = pathlib.Path(out_dir)  # created once the config has been checked (below)
        self.seed = int(config.seed if seed is None else seed)
        self.config = config.replace(seed=self.seed)
        self.parent: dict[str, Any] = {}
        if init is not None:  # meta-fine-tuning: the architecture comes from the parent checkpoint
            _, opt_config, meta = init
            kind = LearnedOptimizer.kind_of(opt_config)
            from mnemosyne_core.meta.config import OptimizerSection, _freeze

            self.config = self.config.replace(optimizer=OptimizerSection(kind, _freeze(opt_config.to_dict())))
            self.parent = {k: meta.get(k) for k in ("config_name", "seed", "generation", "code_version",
                                                    "registry_version", "source") if k in (meta or {})}
        self.lo: LearnedOptimizer = learned_optimizer(self.config)
        self.run_key = run_key_data(self.seed)
        self.estimator = make_estimator(self.config, self.run_key)
        self.outer = make_outer(self.config)
        self.evaluator = evaluator if evaluator is not None else LocalEvaluator(self.config)
        if hasattr(self.estimator, "noise_sum") and hasattr(self.evaluator, "weighted_noise_sum"):
            # Rebuild ε where the evaluator runs (e.g. on Ray workers): the driver then only adds
            # one |θ| vector per chunk instead of regenerating every ε itself.
            self.estimator.noise_sum = self.evaluator.weighted_noise_sum
        if init is not None:
            from mnemosyne_core.meta.learned import LearnedOptimizer as _LO

            self.theta = jax.tree.map(jnp.asarray, init[0])
            _LO.ravel(self.theta)  # validates it is numeric
        else:
            self.theta = self.lo.init_theta(jax.random.fold_in(jax.random.key(self.seed), 2**31 - 1))
        # outer.trainable / outer.scale: each leaf is meta-trained as φ = θ/s. Frozen leaves (s = 0)
        # get a zero meta-gradient, so Adam/SGD leave them exactly as initialised (and the evaluator
        # does not perturb them). Checked here: a typo fails before any work or folder.
        self.scales = self.lo.leaf_scales(self.theta, self.config.outer.trainable, self.config.outer.scale)
        self.outer_state = self.outer.init(self.theta)
        self.est_state = self.estimator.init(self.theta)
        self.generation = 0
        self.skipped_updates = 0
        self.failed_generations = 0  # consecutive generations in which no pair succeeded
        if resume:
            self.load_checkpoint()
        elif (self.out / CHECKPOINT).exists():
            raise ResumeError(f"{self.out} already holds a checkpoint: pass --resume or use another --out")
        self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ loop
    def step(self) -> dict[str, Any]:
        """One generation; returns its metrics row."""
        t0 = time.perf_counter()
        g = self.generation
        tickets, self.est_state = self.estimator.ask(self.est_state, g)
        results = self.evaluator.evaluate(self.theta, tickets)
        self._last_tickets, self._last_results = tickets, results
        grad, self.est_state, stats = self.estimator.tell(self.est_state, tickets, results, self.theta)
        # Every estimator's grad is ∂L/∂φ: ES/PES perturb θ by σ·s·ε, and the evaluator scales backprop's.
        grad = jax.tree.map(lambda gr, s: gr if s else jnp.zeros_like(gr), grad, self.scales)
        applied = False
        if _finite(grad) and stats.pairs_used > 0:
            updates, new_outer = self.outer.update(grad, self.outer_state, self.theta)
            # A step of u in φ is a step of s·u in θ (s = 1 multiplies exactly: no scale, no change).
            updates = jax.tree.map(lambda u, s: u * s, updates, self.scales)
            new_theta = optax.apply_updates(self.theta, updates)
            if _finite(new_theta):  # θ never becomes non-finite
                self.theta, self.outer_state, applied = new_theta, new_outer, True
        if not applied:
            self.skipped_updates += 1
        self.generation = g + 1
        seconds = time.perf_counter() - t0
        row = {
            "generation": g,
            **stats.as_dict(),
            "seconds": seconds,
            "inner_steps_per_s": stats.inner_steps / max(seconds, 1e-9),
            "grad_norm": float(optax.global_norm(grad)) if _finite(grad) else float("nan"),
            "theta_norm": float(optax.global_norm(self.theta)),
            "update_applied": applied,
        }
        extra = getattr(self.evaluator, "metrics", None)
        if callable(extra):  # e.g. the Ray backend: pairs_reissued, workers_alive, ...
            row.update(extra())
        return row

    def run(self, generations: int | None = None, *, on_generation: Callable[[dict], None] | None = None,
            on_checkpoint: Callable[[MetaTrainer], None] | None = None) -> list[dict[str, Any]]:
        """Run until ``generations`` in total (default: the config's) have been done."""
        total = self.config.generations if generations is None else int(generations)
        rows = []
        writer = self._tb()
        try:
            self._run_loop(total, rows, writer, on_generation, on_checkpoint)
        finally:
            if writer is not None:
                writer.close()
        return rows

    def _run_loop(self, total: int, rows: list, writer: Any, on_generation: Callable[[dict], None] | None,
                  on_checkpoint: Callable[[MetaTrainer], None] | None) -> None:
        with open(self.out / "metrics.jsonl", "a") as metrics:
            while self.generation < total:
                row = self.step()
                rows.append(row)
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if writer is not None:
                    for k, v in row.items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "generation":
                            writer.add_scalar(f"meta/{k}", v, row["generation"])
                stalled = self._check_progress(row)  # raises after the row is on disk, before any save
                if on_generation is not None:
                    on_generation(row)
                if stalled:  # θ did not move: the checkpoint on disk is the last one of a generation that learned
                    continue
                if self.generation % self.config.checkpoint_every == 0 or self.generation == total:
                    self.save_checkpoint()
                    if on_checkpoint is not None:
                        on_checkpoint(self)

    def _check_progress(self, row: dict[str, Any]) -> bool:
        """Count generations without a usable pair; raise :class:`MetaTrainingStalled` when the run
        cannot learn. Returns whether this generation had no usable pair.

        It stops at once when every pair of the run's first generation failed (nothing has ever
        worked: the set-up is broken) or when every pair raised and the task's exception is
        reproduced on the driver (the spec itself is broken); otherwise, e.g. for NaN inner losses
        or a worker outage, after ``stop_after_failed_generations`` failed generations in a row.
        """
        if row.get("pairs_used", 0) > 0:
            self.failed_generations = 0
            return False
        self.failed_generations += 1
        limit = self.config.stop_after_failed_generations
        cause, reproduced = self._diagnose()
        if row["generation"] == 0 or reproduced:
            why = f"every pair of generation {row['generation']} failed"
        elif self.failed_generations >= limit:
            why = (f"no pair succeeded in {self.failed_generations} consecutive generations "
                   f"(stop_after_failed_generations = {limit})")
        else:
            return True
        raise MetaTrainingStalled(f"meta-training stopped: {why}; {cause}")

    def _diagnose(self) -> tuple[str, bool]:
        """Which task failed and why, and whether the driver reproduced it: the exception the spec
        raises when built and traced here (every pair raised), else the status the evaluator
        reported (NaN/Inf inner losses, or an error in the worker's log)."""
        from mnemosyne_core.meta.config import _task_error

        tickets = {t.pair_id: t for t in getattr(self, "_last_tickets", ())}
        results = list(getattr(self, "_last_results", ()) or ())
        failed = [r for r in results if not r.status.usable]
        if not failed:
            return "the evaluator returned no usable result", False
        if all(r.status == Status.ERROR for r in results):
            for r in failed:
                t = tickets.get(r.pair_id)
                error = _task_error(t.task.to_json()) if t is not None else None
                if error is not None:
                    return f"task {t.task.to_json()} raised: {error}", True
        r = failed[0]
        t = tickets.get(r.pair_id)
        task = t.task.to_json() if t is not None else f"pair {r.pair_id}"
        if r.status == Status.NAN:
            return f"task {task}: the inner loss became NaN/Inf ({len(failed)} pairs dropped)", False
        return f"task {task}: the evaluator raised ({len(failed)} pairs with status ERROR; see its log)", False

    def _tb(self) -> Any:
        try:
            from tensorboardX import SummaryWriter
        except ModuleNotFoundError:  # the train extra is optional for library users
            return None
        return SummaryWriter(str(self.out / "tb"))

    # ------------------------------------------------------------------ state
    def save_checkpoint(self) -> pathlib.Path:
        payload = {
            "theta": jax.device_get(self.theta),
            "outer_state": serialization.to_state_dict(jax.device_get(self.outer_state)),
            "generation": self.generation,
            "run_key": np.asarray(self.run_key, np.uint32),
            "seed": self.seed,
            "skipped_updates": self.skipped_updates,
            "config": self.config.to_json(),
            "estimator": _est_to_plain(self.est_state),
        }
        path = self.out / CHECKPOINT
        _atomic_write(path, serialization.msgpack_serialize(payload))
        snap = getattr(self.evaluator, "state_dict", None)
        if callable(snap):
            _atomic_write(self.out / EVALUATOR_STATE, pickle.dumps(snap()))
        return path

    def load_checkpoint(self) -> None:
        path = self.out / CHECKPOINT
        if not path.exists():
            raise ResumeError(f"--resume: no {CHECKPOINT} in {self.out}")
        data = serialization.msgpack_restore(path.read_bytes())
        saved = MetaConfig.from_dict(json.loads(data["config"]))
        if saved.replace(generations=0) != self.config.replace(generations=0):
            raise ResumeError(f"{path} was written with a different config ({saved.name!r}, seed {saved.seed}); "
                              "resume with the same config and seed")
        self.theta = serialization.from_state_dict(jax.device_get(self.theta), data["theta"])
        self.theta = jax.tree.map(jnp.asarray, self.theta)
        self.outer_state = serialization.from_state_dict(self.outer_state, data["outer_state"])
        self.generation = int(data["generation"])
        self.skipped_updates = int(data["skipped_updates"])
        self.est_state = _est_from_plain(data["estimator"])
        load = getattr(self.evaluator, "load_state_dict", None)
        if callable(load) and (self.out / EVALUATOR_STATE).exists():
            load(pickle.loads((self.out / EVALUATOR_STATE).read_bytes()))

    def export(self, path: str | os.PathLike | None = None, **extra_metadata: Any) -> pathlib.Path:
        """Write θ in the core checkpoint format with lineage metadata (``DIR/optimizer.msgpack``)."""
        from mnemosyne_core import checkpoint

        path = pathlib.Path(path) if path is not None else self.out / "optimizer.msgpack"
        if not _finite(self.theta):
            raise NonFiniteError(f"θ at generation {self.generation} is not finite: not written to {path}")
        # A NaN/Inf score is no score: it is left out rather than written (JSON has no NaN).
        extra_metadata = {k: v for k, v in extra_metadata.items()
                          if not (isinstance(v, float) and not np.isfinite(v))}
        meta = lineage(self.config, self.seed, self.generation, optimizer_kind=self.lo.kind, **extra_metadata)
        if self.parent:
            meta["parent"] = self.parent
        checkpoint.save(path, jax.device_get(self.theta), self.lo.config, metadata=meta)
        return path


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


VALIDATION_GENERATION = 2**30  # tickets of this generation are never used for training


def validation_loss(config: MetaConfig, theta: Any, *, num_pairs: int | None = None, seed: int | None = None,
                    evaluator: Evaluator | None = None) -> float:
    """Mean meta-loss of θ on a fixed held-out set of ES tickets (the same for every θ).

    Uses the antithetic pair mean (L⁺ + L⁻)/2 at ``VALIDATION_GENERATION`` so that two θ
    are compared on identical tasks, lengths, data and initialisations.
    """
    cfg = config.replace(estimator=dataclasses.replace(
        config.estimator, kind="es", num_pairs=num_pairs or config.estimator.num_pairs))
    run_key = run_key_data(config.seed if seed is None else seed)
    tickets, _ = ES(cfg, run_key).ask({}, VALIDATION_GENERATION)
    ev = evaluator if evaluator is not None else LocalEvaluator(cfg)
    results = [r for r in ev.evaluate(theta, tickets) if r.status.usable]
    if not results:
        return float("nan")
    return float(np.mean([(r.loss_pos + r.loss_neg) / 2 for r in results]))
