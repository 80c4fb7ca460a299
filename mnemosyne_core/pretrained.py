"""Shipped optimizers: ``pretrained("default")`` is a ready optax transformation, no tuning needed.

Checkpoints live in ``mnemosyne_core/pretrained/<name>.msgpack`` (the core
checkpoint format) and are produced by the documented meta-training commands:

* ``default`` — ``mnemosyne meta-train --config default --seed 0 --out runs/default``
  (``runs/default/optimizer.msgpack``; 150 generations, 2026-12-03, exp8, plus the long-run guard and
  hypergradient clock of 2026-12-05): the tensor variant with per-tensor hypergradient step sizes,
  Adam's direction and a bounded per-chunk gain set by HPE → CAM; told ``total_steps`` it runs a
  learned schedule over t/T, and past step 400 a long-run guard and hypergradient clock act;
* ``lstm`` — the LSTM baseline, the same config (as of commit 2933842) and budget:
  ``mnemosyne meta-train --config default --optimizer-kind lstm --seed 0 --out runs/default_lstm``;
* ``robotics`` — ``mnemosyne meta-train --config robotics --init-from
  mnemosyne_core/pretrained/superseded/default_v1.msgpack --seed 0``: ``default_v1`` meta-fine-tuned
  on gymnax policy tasks.

Each checkpoint's metadata records the config, seed, generation, code and JAX versions; one
meta-fine-tuned from another (``--init-from``) also records its parent (``metadata["parent"]``:
source, config name, code version, generation, seed).

Superseded optimizers are not shipped names (:func:`available` does not list them) but stay in
``mnemosyne_core/pretrained/superseded/`` (:data:`SUPERSEDED_DIR`), loaded by path — e.g.
``load_optimizer(str(SUPERSEDED_DIR / "default_v1.msgpack"))``, ``mnemosyne_core.load(path)`` or
``meta-train --init-from PATH`` — for comparisons and lineage; their configs are in ``configs/superseded/``:

* ``default_v1`` — the first shipped ``default`` (before the hypergradient step sizes: Adam's
  direction with a learned per-coordinate correction and a loss-progress feature),
  ``meta-train --config default --seed 0`` at commit 1c51e63; ``robotics``' parent;
* ``default_ceiling`` — ``default`` (exp8's θ, without the guard and clock) with a step ceiling
  that falls over t/T, for runs much longer than the 400-step meta-training horizon:
  ``meta-train --config configs/superseded/default_ceiling.toml --seed 0``.

``configs/memory_step.toml`` is the recipe of the memory step-size design (HPE → CAM set each
tensor's step size), evaluated but not shipped — see docs/benchmarks.md.

Example:
    >>> import jax.numpy as jnp
    >>> tx = pretrained("default")
    >>> params = {"w": jnp.ones(3)}
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params, loss=jnp.float32(1.0))
    >>> updates["w"].shape
    (3,)
"""
from __future__ import annotations

import pathlib
from typing import Any

import optax

__all__ = ["PRETRAINED_DIR", "SUPERSEDED_DIR", "PretrainedError", "available", "load_optimizer", "pretrained", "pretrained_theta"]

PRETRAINED_DIR = pathlib.Path(__file__).resolve().parent / "pretrained"
#: Superseded optimizers: not shipped names, loaded by path (``load_optimizer(str(SUPERSEDED_DIR / "default_v1.msgpack"))``).
SUPERSEDED_DIR = PRETRAINED_DIR / "superseded"


class PretrainedError(KeyError):
    """No shipped optimizer of that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown pretrained optimizer"


def available() -> list[str]:
    """Names of the shipped optimizers."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.msgpack"))


def _path(name: str) -> pathlib.Path:
    if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
        raise PretrainedError(f"invalid pretrained optimizer name {name!r}")
    path = PRETRAINED_DIR / f"{name}.msgpack"
    if not path.is_file():
        raise PretrainedError(f"no pretrained optimizer {name!r}; available: {', '.join(available()) or 'none'}")
    return path


def pretrained_theta(name: str = "default") -> tuple[Any, Any, dict[str, Any]]:
    """``(theta, config, metadata)`` of a shipped optimizer."""
    from mnemosyne_core import checkpoint

    return checkpoint.load(_path(name))


def load_optimizer(spec: str) -> tuple[Any, Any, dict[str, Any]]:
    """``(theta, config, metadata)`` from a checkpoint path, a ``grpc://``/``grpcs://`` URI or a shipped name.

    A spec that is a URI, an existing file or has a file suffix is read with
    :func:`mnemosyne_core.loading.load` (``FileNotFoundError``/``CheckpointError``);
    anything else names a shipped optimizer (``PretrainedError``), so a directory
    called e.g. ``default`` in the working directory does not hide the shipped one. ``metadata["source"]``
    says where it came from (the spec, or ``pretrained:NAME``) unless the checkpoint set it.
    """
    from mnemosyne_core import loading

    if loading.is_registry_uri(spec) or pathlib.Path(spec).suffix or pathlib.Path(spec).is_file():
        theta, config, meta = loading.load(spec)
        source = spec
    else:
        theta, config, meta = pretrained_theta(spec)
        source = f"pretrained:{spec}"
    meta = dict(meta or {})
    meta.setdefault("source", source)
    return theta, config, meta


def pretrained(name: str = "default", *, schedule: optax.ScalarOrSchedule | None = None,
               ) -> optax.GradientTransformationExtraArgs:
    """The shipped optimizer as an optax transformation (Mnemosyne or the LSTM baseline).

    Pass ``loss=`` to ``update`` (some optimizers use the loss as a feature) and, when you know
    how long you will train, ``total_steps=`` (the shipped ``default`` then runs its learned
    schedule over the training progress; without it, it runs without a schedule).

    ``schedule`` (a learning rate or an optax schedule) runs the learned rule in *direction
    mode* under your schedule instead (:func:`mnemosyne_core.mnemosyne.scheduled`); Mnemosyne
    optimizers only. E.g. ``pretrained("default", schedule=optax.cosine_decay_schedule(5e-3, T))``.
    """
    from mnemosyne_core.meta.learned import LearnedOptimizer
    from mnemosyne_core.mnemosyne import MnemosyneConfig, scheduled

    theta, config, _ = pretrained_theta(name)
    if schedule is not None:
        if not isinstance(config, MnemosyneConfig):
            raise ValueError(f"pretrained({name!r}, schedule=...): direction mode needs a Mnemosyne "
                             f"optimizer, {name!r} is a {type(config).__name__}")
        return scheduled(theta, config, schedule)
    return LearnedOptimizer.for_config(config).transform(theta)
