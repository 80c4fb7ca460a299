"""Task families: distributions over inner problems, sampled from a ``jax.random`` key.

A family's :meth:`sample` returns a JSON-able :class:`~mnemosyne_core.tasks.TaskSpec`
(what a meta-training ticket carries to a worker). Every family here is a finite
grid, and :meth:`support` lists all the specs it can return: each distinct spec
is a distinct compiled program (~10 s of XLA compile on CPU), so keep grids small
and warm them up front if needed.

:data:`FAMILIES` holds the named families:

* ``digits_mlp_tiny`` — one digits MLP (CI, smoke runs);
* ``digits_mlp_small`` — the default meta-training distribution: digits MLPs of
  width 32/64, depth 1/2, ReLU/tanh, with task augmentation (init scale 1 or 2);
* ``digits_mlp_wide`` — a broader meta-training distribution (widths to 128,
  depth to 3, three activations, init scales 0.5–2, input noise);
* ``heldout`` — the project's held-out evaluation suite (:data:`HELDOUT_SUITE`, 17 tasks that
  meta-training never sees): MLP classifiers on three other data sets (wine, breast cancer,
  a generated 5-class set), two regression MLPs, a digits autoencoder, a small conv net, two
  tiny ViTs, MNIST-1D/digits MLPs of unseen width, depth and activation, two MLPs ~8×
  the size of the largest meta-training network, two causal character-level Transformer LMs
  on held-out text (116 k and 1.02 M parameters), and two badly scaled problems where tuned
  Adam wants a learning rate ≤ 1e-3 (rotated ill-conditioned least squares; an MLP on raw,
  non-centred features).

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks.families import FAMILIES
    >>> spec = FAMILIES["digits_mlp_small"].sample(jax.random.key(0))
    >>> spec.name, spec in FAMILIES["digits_mlp_small"].support()
    ('digits_mlp', True)
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from mnemosyne_core.tasks.base import TaskFamily, TaskSpec

__all__ = [
    "FAMILIES",
    "HELDOUT_SUITE",
    "DigitsMLPFamily",
    "FixedFamily",
    "MLPFamily",
    "MNIST1DMLPFamily",
    "MixtureFamily",
    "QuadraticFamily",
    "ViTFamily",
]


def _pick(key: jax.Array, options: Sequence[Any]) -> Any:
    return options[int(jax.random.randint(key, (), 0, len(options)))]


def _check_options(family: str, **fields: Sequence[Any]) -> None:
    for name, options in fields.items():
        if isinstance(options, (str, bytes)) or len(options) == 0:
            raise ValueError(f"{family}: {name} must be a non-empty tuple of options, got {options!r}")


class _GridFamily:
    """Each kwarg drawn independently and uniformly from its tuple of options."""

    name: str
    task: str

    def _grid(self) -> dict[str, Sequence[Any]]:
        raise NotImplementedError

    def _kwargs(self, choice: dict[str, Any]) -> dict[str, Any]:
        return dict(choice)

    def sample(self, key: jax.Array) -> TaskSpec:
        grid = self._grid()
        choice = {k: _pick(jax.random.fold_in(key, i), v) for i, (k, v) in enumerate(grid.items())}
        return TaskSpec(self.task, self._kwargs(choice))

    def support(self) -> list[TaskSpec]:
        grid = self._grid()
        specs = {TaskSpec(self.task, self._kwargs(dict(zip(grid, values))))
                 for values in itertools.product(*grid.values())}
        return sorted(specs, key=TaskSpec.to_json)


@dataclasses.dataclass(frozen=True)
class MLPFamily(_GridFamily):
    """MLPs on ``dataset`` with ``depth`` hidden layers of equal ``width``."""

    dataset: str = "digits"
    widths: tuple[int, ...] = (32, 64)
    depths: tuple[int, ...] = (1, 2)
    activations: tuple[str, ...] = ("relu", "tanh")
    batch_sizes: tuple[int, ...] = (128,)
    param_scales: tuple[float, ...] = (1.0,)
    input_noises: tuple[float, ...] = (0.0,)
    weight_decays: tuple[float, ...] = (0.0,)
    name: str = "mlp"

    def __post_init__(self) -> None:
        if self.dataset not in ("digits", "mnist1d"):
            raise ValueError(f"{self.name}: dataset must be 'digits' or 'mnist1d', got {self.dataset!r}")
        _check_options(self.name, **{k: v for k, v in self._grid().items()})

    @property
    def task(self) -> str:  # type: ignore[override]
        return f"{self.dataset}_mlp"

    def _grid(self) -> dict[str, Sequence[Any]]:
        return {"width": self.widths, "depth": self.depths, "activation": self.activations,
                "batch_size": self.batch_sizes, "param_scale": self.param_scales,
                "input_noise": self.input_noises, "weight_decay": self.weight_decays}

    def _kwargs(self, choice: dict[str, Any]) -> dict[str, Any]:
        width, depth = int(choice.pop("width")), int(choice.pop("depth"))
        out = {"hidden": [width] * depth, "activation": choice.pop("activation"),
               "batch_size": int(choice.pop("batch_size"))}
        out.update({k: float(v) for k, v in choice.items()})
        return out


@dataclasses.dataclass(frozen=True)
class DigitsMLPFamily(MLPFamily):
    dataset: str = "digits"
    name: str = "digits_mlp"


@dataclasses.dataclass(frozen=True)
class MNIST1DMLPFamily(MLPFamily):
    dataset: str = "mnist1d"
    name: str = "mnist1d_mlp"


@dataclasses.dataclass(frozen=True)
class ViTFamily(_GridFamily):
    """Tiny ViTs on digit patches."""

    patches: tuple[int, ...] = (4,)
    dims: tuple[int, ...] = (32,)
    depths: tuple[int, ...] = (1,)
    heads: tuple[int, ...] = (2,)
    batch_sizes: tuple[int, ...] = (128,)
    name: str = "digits_vit"
    task: str = "digits_vit"

    def __post_init__(self) -> None:
        _check_options(self.name, **self._grid())

    def _grid(self) -> dict[str, Sequence[Any]]:
        return {"patch": self.patches, "dim": self.dims, "depth": self.depths, "heads": self.heads,
                "batch_size": self.batch_sizes}

    def _kwargs(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {k: int(v) for k, v in choice.items()}


@dataclasses.dataclass(frozen=True)
class QuadraticFamily(_GridFamily):
    """Quadratics of varying conditioning, noise and rotation seed."""

    dims: tuple[int, ...] = (16,)
    conditions: tuple[float, ...] = (10.0, 100.0, 1000.0)
    noises: tuple[float, ...] = (0.0,)
    seeds: tuple[int, ...] = (0,)
    name: str = "quadratic"
    task: str = "quadratic"

    def __post_init__(self) -> None:
        _check_options(self.name, **self._grid())

    def _grid(self) -> dict[str, Sequence[Any]]:
        return {"dim": self.dims, "condition": self.conditions, "noise": self.noises, "seed": self.seeds}

    def _kwargs(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {"dim": int(choice["dim"]), "condition": float(choice["condition"]),
                "noise": float(choice["noise"]), "seed": int(choice["seed"])}


@dataclasses.dataclass(frozen=True)
class FixedFamily:
    """Always the same task (a degenerate family, handy for smoke runs and tests)."""

    spec: TaskSpec
    name: str = "fixed"

    def sample(self, key: jax.Array) -> TaskSpec:
        del key
        return self.spec

    def support(self) -> list[TaskSpec]:
        return [self.spec]


@dataclasses.dataclass(frozen=True)
class MixtureFamily:
    """Picks one of ``families`` (with probabilities ∝ ``weights``), then samples from it."""

    families: tuple[Any, ...]
    weights: tuple[float, ...] | None = None
    name: str = "mixture"

    def __post_init__(self) -> None:
        if not self.families:
            raise ValueError(f"{self.name}: a mixture needs at least one family")
        if self.weights is not None:
            w = np.asarray(self.weights, np.float64)
            if w.shape != (len(self.families),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
                raise ValueError(f"{self.name}: weights must be {len(self.families)} non-negative numbers "
                                 f"with a positive sum, got {self.weights!r}")

    def sample(self, key: jax.Array) -> TaskSpec:
        key_pick, key_sample = jax.random.split(key)
        n = len(self.families)
        p = None if self.weights is None else np.asarray(self.weights, np.float64) / sum(self.weights)
        logits = np.zeros(n) if p is None else np.log(np.maximum(p, 1e-300))
        index = int(jax.random.categorical(key_pick, jax.numpy.asarray(logits, jax.numpy.float32)))
        return self.families[index].sample(key_sample)

    def support(self) -> list[TaskSpec]:
        specs = {s for f in self.families for s in f.support()}
        return sorted(specs, key=TaskSpec.to_json)


def _spec(name: str, **kwargs: Any) -> TaskSpec:
    return TaskSpec(name, kwargs)


# Outside every meta-training family (configs/default.toml trains on digits and MNIST-1D MLPs of
# widths ≤ 160, depth ≤ 3, relu/tanh/gelu): other data sets, other losses, other architectures,
# unseen activations/depths, and sizes ~8× the largest meta-training network (≈ 37 k parameters).
HELDOUT_SUITE: tuple[TaskSpec, ...] = (
    _spec("wine_mlp", hidden=[32], activation="relu", batch_size=32),
    _spec("cancer_mlp", hidden=[64, 64], activation="tanh", batch_size=64),
    _spec("blobs_mlp", hidden=[128, 128], activation="silu", batch_size=128),
    _spec("diabetes_mlp", hidden=[64], activation="relu", batch_size=32),
    _spec("friedman_mlp", hidden=[128, 128], activation="tanh", batch_size=64),
    _spec("digits_autoencoder", hidden=[32, 8, 32], activation="elu", batch_size=128),
    _spec("digits_convnet", channels=[8, 16], activation="relu", batch_size=128),
    _spec("digits_vit", patch=4, dim=32, depth=2, heads=2),
    _spec("digits_vit", patch=4, dim=16, depth=1, heads=2, mlp_ratio=4, batch_size=64),
    _spec("mnist1d_mlp", hidden=[96, 96, 96], activation="silu", batch_size=128),
    _spec("digits_mlp", hidden=[256, 256, 256], activation="elu", batch_size=128),
    _spec("mnist1d_mlp", hidden=[1024], activation="gelu", batch_size=128),  # ~52 k parameters
    _spec("digits_mlp", hidden=[512, 512], activation="relu", batch_size=64),  # ~300 k parameters
    # Causal character-level Transformer LMs on text meta-training never reads (pydoc's language
    # reference; meta-training LMs, if any, use corpus="stdlib_docs"). Sized for 2 CPU cores:
    # one 400-step Adam run took ≲ 4 s (116 k parameters) and ≈ 10 s (1.02 M parameters).
    _spec("char_lm", dim=64, depth=2, heads=4, mlp_ratio=4, seq_len=32, batch_size=8, corpus="pydoc_topics"),
    _spec("char_lm", dim=128, depth=5, heads=4, mlp_ratio=4, seq_len=32, batch_size=8, corpus="pydoc_topics"),
    # Badly scaled problems where tuned Adam's best constant rate at 400 steps is ≤ 1e-3 (3e-4 and
    # 1e-3 with the harness, 3 seeds): a rule that learned "steps of ~3e-3" on standardised data fails.
    _spec("illscaled_lstsq", dim=32, scale=100.0, spread=10.0, offset=0.0, noise=0.1, batch_size=32),
    _spec("illscaled_mlp", hidden=[256, 256], activation="tanh", dim=64, scale=1.0, spread=1.0, offset=4.0,
          batch_size=64),
)

FAMILIES: dict[str, TaskFamily] = {
    "digits_mlp_tiny": DigitsMLPFamily(widths=(32,), depths=(1,), activations=("relu",),
                                       name="digits_mlp_tiny"),
    "digits_mlp_small": DigitsMLPFamily(widths=(32, 64), depths=(1, 2), activations=("relu", "tanh"),
                                        param_scales=(1.0, 2.0), name="digits_mlp_small"),
    "digits_mlp_wide": DigitsMLPFamily(widths=(32, 64, 128), depths=(1, 2, 3),
                                       activations=("relu", "tanh", "gelu"),
                                       param_scales=(0.5, 1.0, 2.0), input_noises=(0.0, 0.1),
                                       name="digits_mlp_wide"),
    "quadratic": QuadraticFamily(),
    "heldout": MixtureFamily(families=tuple(FixedFamily(s, name=f"heldout_{s.name}") for s in HELDOUT_SUITE),
                             name="heldout"),
}
