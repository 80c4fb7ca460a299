"""The registry of every optimizer the project compares: learned and hand-designed.

Each :class:`OptimizerEntry` says whether the optimizer is learned, how to draw a
fresh θ (``init_theta(key)``; ``None`` for hand-designed ones) and how to build
the optax transformation from θ (``build(theta)``; hand-designed ones take
``None``). ``make_config()`` returns the learned optimizer's static config
(what :func:`mnemosyne_core.checkpoint.save` stores next to θ).

All entries honour one contract, tested for every entry by
``tests/test_contract.py``: ``update(grads, state, params=None, **extra)`` with
unknown keywords ignored, non-finite gradients skipped without poisoning the
state, parameter dtypes kept, θ (when learned) carried in the state.

The Mnemosyne entries import :mod:`mnemosyne_core.mnemosyne` only when used.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mnemosyne_core.optimizers import OPTIMIZERS
    >>> entry = OPTIMIZERS["lstm"]
    >>> tx = entry.build(entry.init_theta(jax.random.key(0)))
    >>> params = {"w": jnp.ones(3)}
    >>> updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
    >>> updates["w"].shape
    (3,)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import optax

from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta, lstm_optimizer

__all__ = ["OPTIMIZERS", "OptimizerEntry", "UnknownOptimizerError", "get_optimizer", "skip_non_finite"]

# apply_if_finite gives up after this many consecutive bad steps; int32 max means "never".
_NEVER_GIVE_UP = 2**31 - 1


class UnknownOptimizerError(KeyError):
    """Raised by :func:`get_optimizer` for a name not in :data:`OPTIMIZERS`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown optimizer"


@dataclasses.dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer: ``build(init_theta(key))`` (learned) or ``build(None)`` (hand-designed)."""

    name: str
    learned: bool
    init_theta: Callable[[jax.Array], Any] | None
    build: Callable[[Any], optax.GradientTransformationExtraArgs]
    make_config: Callable[[], Any] | None = None


def skip_non_finite(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wrap ``tx`` so that a step with any NaN/Inf gradient is a no-op (zero update, state kept).

    Unlike plain ``optax.apply_if_finite(tx, n)`` it never gives up and applies a
    bad step, however many come in a row.
    """
    return optax.apply_if_finite(tx, max_consecutive_errors=_NEVER_GIVE_UP)


def _hand_designed(name: str, make: Callable[[], optax.GradientTransformation]) -> OptimizerEntry:
    def build(theta: Any = None) -> optax.GradientTransformationExtraArgs:
        if theta is not None:
            raise ValueError(f"{name!r} is hand-designed and takes no theta (got {type(theta).__name__})")
        return skip_non_finite(make())

    return OptimizerEntry(name=name, learned=False, init_theta=None, build=build)


def _mnemosyne_entry(name: str, **options: Any) -> OptimizerEntry:
    # Imported lazily: the Performer optimizer is a heavier module than the registry.
    def make_config():
        from mnemosyne_core.mnemosyne import MnemosyneConfig

        return MnemosyneConfig(**options)

    def init(key: jax.Array) -> Any:
        from mnemosyne_core.mnemosyne import init_theta

        return init_theta(key, make_config())

    def build(theta: Any) -> optax.GradientTransformationExtraArgs:
        from mnemosyne_core.mnemosyne import mnemosyne

        return mnemosyne(theta, make_config())

    return OptimizerEntry(name=name, learned=True, init_theta=init, build=build,
                          make_config=make_config)


def _lstm_entry() -> OptimizerEntry:
    config = LSTMConfig()
    return OptimizerEntry(
        name="lstm",
        learned=True,
        init_theta=lambda key: init_lstm_theta(key, config),
        build=lambda theta: lstm_optimizer(theta, config),
        make_config=lambda: config,
    )


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "mnemosyne_tensor": _mnemosyne_entry("mnemosyne_tensor", variant="tensor"),
    # Per-tensor hypergradient step sizes on top of the tensor variant (the shipped default also
    # turns the direction correction off; test_hypergradient.py covers that path).
    "mnemosyne_tensor_hd": _mnemosyne_entry("mnemosyne_tensor_hd", variant="tensor", hypergradient=True),
    # The previous default's shape: Adam's direction, hypergradient step sizes and the learned
    # schedule over the training progress (told through update(..., total_steps=T)).
    "mnemosyne_tensor_sched": _mnemosyne_entry("mnemosyne_tensor_sched", variant="tensor", hypergradient=True,
                                               direction_correction=False, use_param_feature=False,
                                               progress_schedule=True),
    # The hypergradient memory: each tensor's step size moved by the hypergradient rule and by
    # HPE → CAM's read-out (memory_step_size), Adam's direction and the learned schedule
    # (test_memory_step.py covers the rules themselves, each alone and together).
    "mnemosyne_tensor_mem": _mnemosyne_entry("mnemosyne_tensor_mem", variant="tensor", memory_step_size=True,
                                             hypergradient=True, direction_correction=False,
                                             use_param_feature=False, progress_schedule=True),
    "mnemosyne_coordinate": _mnemosyne_entry("mnemosyne_coordinate", variant="coordinate"),
    "lstm": _lstm_entry(),
    "adam": _hand_designed("adam", lambda: optax.adam(1e-3)),
    "sgd_momentum": _hand_designed("sgd_momentum", lambda: optax.sgd(1e-2, momentum=0.9)),
}


def get_optimizer(name: str) -> OptimizerEntry:
    """``OPTIMIZERS[name]`` with an error that lists the known names."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise UnknownOptimizerError(
            f"unknown optimizer {name!r}; known optimizers: {', '.join(sorted(OPTIMIZERS))}"
        ) from None
