"""Ablations: a trained θ with one learned part put back to what a fresh θ has.

A learned part is worth shipping only if removing it costs something on tasks outside
the meta-training family. ``ablate(theta, config, part)`` returns θ with the leaves of
``part`` replaced by a fresh θ's (:func:`~mnemosyne_core.init_theta`), so the result runs
through the same ``mnemosyne(theta, config)`` and the same compiled program:

* ``"memory"`` — what HPE → CAM output: the read-outs of the per-tensor step-size
  controller (``ctrl.w``, ``ctrl.b``), the per-chunk gain (``head.w_s``, ``head.b_s``) and the
  per-coordinate direction correction (``head.w_d``). A fresh θ's read-outs are zero, so the
  memory then contributes its neutral value (no step-size change, gain 1, Adam's direction);
  the encoders' own weights stay, as they no longer reach the update.
* ``"schedule"`` — the learned log step-size schedule over t/T (``sched.knots``: zero, no schedule).
* ``"initial_step"`` — the learned offset of the initial log step size (``ctrl.log_lr0`` /
  ``hd.log_lr0``).
* ``"hypergradient"`` — the learned factors of the hand-written hypergradient rule
  (``hd.log_kappa``, ``hd.drift``; older ``default`` checkpoints).

:func:`ablation_parts` lists the parts a config has (an empty tuple for the LSTM, whose
parts are not separable).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta
    >>> config = MnemosyneConfig(memory_step_size=True, progress_schedule=True, direction_correction=False)
    >>> ablation_parts(config)
    ('memory', 'schedule', 'initial_step')
    >>> theta = init_theta(jax.random.key(0), config)
    >>> theta["ctrl"]["w"] = jnp.ones_like(theta["ctrl"]["w"])
    >>> float(ablate(theta, config, "memory")["ctrl"]["w"].sum())
    0.0
"""
from __future__ import annotations

from typing import Any

import jax

__all__ = ["PARTS", "AblationError", "ablate", "ablation_parts"]

# part -> the dotted θ paths it owns (those absent from a config's θ are skipped)
PARTS: dict[str, tuple[str, ...]] = {
    "memory": ("ctrl.w", "ctrl.b", "head.w_s", "head.b_s", "head.w_d"),
    "schedule": ("sched.knots",),
    "initial_step": ("ctrl.log_lr0", "hd.log_lr0"),
    "hypergradient": ("hd.log_kappa", "hd.drift"),
}


class AblationError(ValueError):
    """An unknown part, or one this optimizer does not have."""


def _path(p: Any) -> str:
    return jax.tree_util.keystr(p, simple=True, separator=".")


def _paths(theta: Any) -> set[str]:
    return {_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(theta)[0]}


def _fresh(config: Any) -> Any:
    from mnemosyne_core.meta.learned import LearnedOptimizer

    return LearnedOptimizer.for_config(config).init_theta(jax.random.key(0))


def ablation_parts(config: Any) -> tuple[str, ...]:
    """The learned parts of ``config``'s θ that :func:`ablate` can remove, in :data:`PARTS` order."""
    from mnemosyne_core.mnemosyne import MnemosyneConfig

    if not isinstance(config, MnemosyneConfig):
        return ()
    have = _paths(jax.eval_shape(lambda: _fresh(config)))
    return tuple(part for part, paths in PARTS.items() if have.intersection(paths))


def ablate(theta: Any, config: Any, part: str) -> Any:
    """θ with ``part``'s leaves replaced by a fresh θ's (see the module docstring).

    Raises :class:`AblationError` for an unknown part or one ``config`` does not have.
    """
    if part not in PARTS:
        raise AblationError(f"unknown part {part!r}; known: {', '.join(PARTS)}")
    parts = ablation_parts(config)
    if part not in parts:
        raise AblationError(f"this optimizer has no learned {part!r}; its parts: {', '.join(parts) or 'none'}")
    fresh = {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(_fresh(config))[0]}
    owned = set(PARTS[part])
    return jax.tree_util.tree_map_with_path(
        lambda p, leaf: fresh[_path(p)] if _path(p) in owned else leaf, theta)
