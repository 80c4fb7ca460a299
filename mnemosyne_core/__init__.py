"""Mnemosyne: learned optimizers built from Performers.

A pure JAX/Flax/optax library, importable without Ray or gRPC. The public API
is flat::

    import jax, optax
    import mnemosyne_core as mn

    config = mn.MnemosyneConfig()                  # variant="tensor"
    theta = mn.init_theta(jax.random.key(0), config)
    tx = mn.mnemosyne(theta, config)               # an optax.GradientTransformationExtraArgs
    params = {"w": jax.numpy.ones(3)}
    state = tx.init(params)
    updates, state = tx.update({"w": jax.numpy.ones(3)}, state, params)

Names are resolved lazily so that ``import mnemosyne_core`` stays cheap and the
optional parts (tasks with their data packages) load only when used. The gRPC
registry client is a separate package (``mnemosyne_registry``) that depends on
this one; ``load`` imports it only for a ``grpc://`` URI.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# public name -> defining module
_EXPORTS: dict[str, str] = {
    # the Performer optimizer
    "MnemosyneConfig": "mnemosyne_core.mnemosyne",
    "MnemosyneState": "mnemosyne_core.mnemosyne",
    "init_theta": "mnemosyne_core.mnemosyne",
    "validate_theta": "mnemosyne_core.mnemosyne",
    "mnemosyne": "mnemosyne_core.mnemosyne",
    "scale_by_mnemosyne": "mnemosyne_core.mnemosyne",
    "scheduled": "mnemosyne_core.mnemosyne",
    # ablations: what each learned part buys
    "ablate": "mnemosyne_core.ablation",
    "ablation_parts": "mnemosyne_core.ablation",
    "AblationError": "mnemosyne_core.ablation",
    # building blocks
    "hyperbolic_features": "mnemosyne_core.favor",
    "orthogonal_directions": "mnemosyne_core.favor",
    # baselines and the optimizer registry
    "LSTMConfig": "mnemosyne_core.baselines",
    "init_lstm_theta": "mnemosyne_core.baselines",
    "lstm_optimizer": "mnemosyne_core.baselines",
    "OPTIMIZERS": "mnemosyne_core.optimizers",
    "OptimizerEntry": "mnemosyne_core.optimizers",
    # checkpoints
    "save": "mnemosyne_core.checkpoint",
    "load": "mnemosyne_core.loading",  # a file, or a grpc:// URI through the registry client
    "to_bytes": "mnemosyne_core.checkpoint",
    "from_bytes": "mnemosyne_core.checkpoint",
    "CheckpointError": "mnemosyne_core.checkpoint",
    # tasks
    "Task": "mnemosyne_core.tasks",
    "TaskSpec": "mnemosyne_core.tasks",
    "TaskFamily": "mnemosyne_core.tasks",
    "TASKS": "mnemosyne_core.tasks",
    "make_task": "mnemosyne_core.tasks",
    # shipped optimizers
    "pretrained": "mnemosyne_core.pretrained",
    "pretrained_theta": "mnemosyne_core.pretrained",
}

__all__ = sorted(_EXPORTS)  # noqa: PLE0605 - the lazy-export table above is the one list of names
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mnemosyne_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


class _FlatAPIModule(types.ModuleType):
    """Keeps exported functions from being shadowed by same-named submodules.

    ``import mnemosyne_core.mnemosyne`` (anywhere) makes the import system bind
    the *submodule* as ``mnemosyne_core.mnemosyne``; users expect the function of
    that name. Bind the exported attribute instead when that happens.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if (
            isinstance(value, types.ModuleType)
            and value.__name__ == f"{__name__}.{name}"
            and _EXPORTS.get(name) == value.__name__
            and hasattr(value, name)
        ):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _FlatAPIModule


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
