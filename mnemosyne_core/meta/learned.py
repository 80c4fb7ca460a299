"""Which learned optimizer is meta-trained: one adapter over Mnemosyne and the LSTM baseline.

Both follow one contract (``transform(theta, config)`` returns an optax
``GradientTransformationExtraArgs`` that keeps θ in ``state.theta``), so the
estimators never care which one they train. θ is flattened to one float32
vector with ``jax.flatten_util.ravel_pytree`` for ES noise; :meth:`swap_theta`
puts a new (e.g. perturbed) θ into an existing optimizer state, which is how a
persistent PES inner problem continues under the next generation's θ.

Example:
    >>> import jax
    >>> lo = LearnedOptimizer.from_section("mnemosyne", {"learning_rate": 1e-3})
    >>> theta = lo.init_theta(jax.random.key(0))
    >>> flat, unravel = lo.ravel(theta)
    >>> flat.ndim, lo.config.learning_rate
    (1, 0.001)
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from mnemosyne_core.meta.config import ConfigError

__all__ = ["KINDS", "LearnedOptimizer"]

# kind -> (module, config class, init function, transform)
KINDS: dict[str, tuple[str, str, str, str]] = {
    "mnemosyne": ("mnemosyne_core.mnemosyne", "MnemosyneConfig", "init_theta", "mnemosyne"),
    "lstm": ("mnemosyne_core.baselines", "LSTMConfig", "init_lstm_theta", "lstm_optimizer"),
}


@dataclasses.dataclass(frozen=True)
class LearnedOptimizer:
    """A learned-optimizer kind plus its static config (hashable: usable as a jit static)."""

    kind: str
    config: Any

    @classmethod
    def from_section(cls, kind: str, config: dict[str, Any] | Any) -> LearnedOptimizer:
        if kind not in KINDS:
            raise ValueError(f"unknown learned optimizer kind {kind!r}; known: {sorted(KINDS)}")
        mod, cfg_name, _, _ = KINDS[kind]
        cfg_cls = getattr(importlib.import_module(mod), cfg_name)
        if not isinstance(config, cfg_cls):
            config = cfg_cls.from_dict(dict(config or {}))
        return cls(kind, config)

    @staticmethod
    def kind_of(config: Any) -> str:
        """The kind whose config class ``config`` is (``ValueError`` for anything else)."""
        for kind, (mod, cfg_name, _, _) in KINDS.items():
            if type(config).__name__ == cfg_name and isinstance(
                    config, getattr(importlib.import_module(mod), cfg_name)):
                return kind
        raise ValueError(f"config type {type(config).__name__} is not a learned optimizer ({', '.join(sorted(KINDS))})")

    @classmethod
    def for_config(cls, config: Any) -> LearnedOptimizer:
        """The learned optimizer that runs a checkpoint's config (Mnemosyne or LSTM)."""
        return cls(cls.kind_of(config), config)

    def _fn(self, index: int) -> Callable[..., Any]:
        mod = KINDS[self.kind][0]
        return getattr(importlib.import_module(mod), KINDS[self.kind][index])

    def init_theta(self, key: jax.Array) -> Any:
        return self._fn(2)(key, self.config)

    def transform(self, theta: Any) -> optax.GradientTransformationExtraArgs:
        return self._fn(3)(theta, self.config)

    @staticmethod
    def ravel(theta: Any) -> tuple[jax.Array, Callable[[jax.Array], Any]]:
        flat, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), theta))
        return flat, unravel

    @staticmethod
    def _paths(theta: Any) -> list[str]:
        return [jax.tree_util.keystr(p, simple=True, separator=".")
                for p, _ in jax.tree_util.tree_flatten_with_path(theta)[0]]

    @staticmethod
    def _under(path: str, prefix: str) -> bool:
        return path == prefix or path.startswith(prefix + ".")

    @classmethod
    def _check_prefixes(cls, paths: Sequence[str], prefixes: Sequence[str], what: str) -> None:
        # A typo must not silently freeze (or leave unscaled) part of the optimizer.
        for t in prefixes:
            if not any(cls._under(p, t) for p in paths):
                tops = sorted({p.split(".")[0] for p in paths})
                raise ConfigError(f"{what} entry {t!r} names no part of θ; its parts start with "
                                  f"{', '.join(tops)} (e.g. {paths[0]!r})")

    @classmethod
    def trainable_leaves(cls, theta: Any, trainable: Sequence[str]) -> Any:
        """θ's structure with ``True`` on the leaves meta-training may change.

        ``trainable`` holds dotted path prefixes (``"head"``, ``"cam.q.w"``); empty means
        every leaf. A prefix that names no part of θ is a :class:`ConfigError` listing what
        exists, so a typo cannot silently freeze the whole optimizer.
        """
        return jax.tree.unflatten(jax.tree.structure(theta), cls._trainable_flags(cls._paths(theta), trainable))

    @classmethod
    def _trainable_flags(cls, paths: Sequence[str], trainable: Sequence[str]) -> list[bool]:
        prefixes = [t.strip(". ") for t in trainable]
        cls._check_prefixes(paths, prefixes, "outer.trainable")
        return [not prefixes or any(cls._under(p, t) for t in prefixes) for p in paths]

    @classmethod
    def leaf_scales(cls, theta: Any, trainable: Sequence[str], scale: Sequence[tuple[str, float]] = ()) -> Any:
        """θ's structure with each leaf's meta-training scale ``s`` (a float; 0 = frozen).

        ``scale`` holds ``(dotted prefix, factor)`` pairs (``outer.scale``); the longest
        prefix matching a leaf sets its factor, 1 elsewhere; leaves outside ``trainable``
        get 0. Unknown prefixes are a :class:`ConfigError`, as for ``trainable``.
        """
        paths = cls._paths(theta)
        flags = cls._trainable_flags(paths, trainable)
        cls._check_prefixes(paths, [t for t, _ in scale], "outer.scale")
        out = []
        for path, flag in zip(paths, flags):
            hits = [(len(t), f) for t, f in scale if cls._under(path, t)]
            out.append(0.0 if not flag else max(hits)[1] if hits else 1.0)
        return jax.tree.unflatten(jax.tree.structure(theta), out)

    @classmethod
    def coordinate_scale(cls, theta: Any, trainable: Sequence[str],
                         scale: Sequence[tuple[str, float]] = ()) -> jax.Array | None:
        """:meth:`leaf_scales` as a float32 vector over :meth:`ravel` (θ)'s coordinates,
        or ``None`` when every coordinate is trained at scale 1 (ES then skips the multiply)."""
        if not trainable and not scale:
            return None
        factors = jax.tree.leaves(cls.leaf_scales(theta, trainable, scale))
        sizes = [int(jnp.size(x)) for x in jax.tree.leaves(theta)]
        return jnp.concatenate([jnp.full((n,), f, jnp.float32) for f, n in zip(factors, sizes)])

    @staticmethod
    def swap_theta(opt_state: Any, theta: Any) -> Any:
        """The same optimizer state, now running θ (``state.theta`` replaced)."""
        if hasattr(opt_state, "theta") and hasattr(opt_state, "_replace"):
            return opt_state._replace(theta=theta)
        raise TypeError(
            f"optimizer state {type(opt_state).__name__} has no 'theta' field: learned optimizers "
            "must keep θ in state.theta so that it can be swapped between truncations"
        )

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": self.config.to_dict()}
