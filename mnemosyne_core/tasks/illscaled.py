"""Badly scaled problems: where a well-tuned Adam wants a *small* learning rate (≤ 1e-3).

Most inner tasks here have standardised inputs, where Adam's best rate is 1e-3 to 1e-2;
a learned optimizer meta-trained on them may simply have learned "steps of ~3e-3".
These two held-out tasks punish that, as un-normalised real-world features do:

* ``illscaled_lstsq`` (convex): linear least squares ``½·mean((x·w + b − y)²)`` on
  synthetic features ``x = Q·(s ⊙ (offset + z))`` — ``z ~ N(0, I)``, sizes ``s`` log-spaced
  from ``scale/spread`` to ``scale``, mixed by a random rotation ``Q`` (so the Hessian's
  condition number ``spread²`` is *not* axis-aligned and a diagonal preconditioner such as
  Adam cannot undo it). Targets ``y = x·w* + b* + noise·ε`` with ``x·w* + b*`` centred and of
  unit variance, so the optimum scores ≈ ``noise²/2``. The weights start small (the usual
  ``N(0, 1/dim)`` divided by the largest feature size), so the optimum is close and the
  difficulty is approaching it *precisely* along features of size ~``scale``: every
  coordinate step of size ``lr`` moves the prediction by ~``lr·scale``.
* ``illscaled_mlp`` (non-convex): an MLP classifier (4 classes) on raw, *non-centred*
  features ``x = μ + s ⊙ z`` (sizes ``s`` log-spaced from ``scale/spread`` to ``scale``, in a
  shuffled order; positive offsets ``μ ≈ offset·s``, as raw measurements have — LeCun et al.'s
  "Efficient BackProp" advice to centre inputs is ignored), labelled by a fixed, nearly linear
  random teacher of the standardised ``z``. All inputs share a sign, so the gradient of a
  first-layer unit's fan-in has one sign, Adam moves those weights together, and the unit's
  pre-activation jumps by ≈ ``lr·Σ|x_j|`` per step.

The data are drawn once from ``seed`` with ``jax.random`` (bit-identical in every process);
batches are rows of the fixed training split gathered with a key; ``evaluate`` scores the
test split.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks.illscaled import IllScaledLeastSquaresTask, IllScaledMLPTask
    >>> task = IllScaledLeastSquaresTask(dim=8, scale=10.0)
    >>> params = task.init(jax.random.key(0))
    >>> params["w"].shape, float(task.evaluate(task.optimum())["test_loss"]) < 0.01
    ((8,), True)
    >>> mlp = IllScaledMLPTask(hidden=[16], dim=8)
    >>> x, y = mlp.sample_batch(jax.random.key(1))
    >>> x.shape, mlp.apply(mlp.init(jax.random.key(0)), x).shape
    ((64, 8), (64, 4))
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnemosyne_core.tasks.base import TaskSpec
from mnemosyne_core.tasks.classification import check_nonnegative, check_positive_int
from mnemosyne_core.tasks.mlp import (
    _GAIN,
    ACTIVATIONS,
    apply_mlp,
    check_mlp_args,
    init_mlp,
)

__all__ = ["IllScaledLeastSquaresTask", "IllScaledMLPTask"]

_N_TRAIN, _N_TEST = 2048, 512
_CLASSES = 4


def _check_scale(task: str, value: Any, field: str = "scale") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 1
    if not ok:
        raise ValueError(f"{task}: {field} must be a finite number >= 1, got {value!r}")
    return float(value)


def _scales(dim: int, scale: float, spread: float) -> np.ndarray:
    """Feature sizes log-spaced from ``scale / spread`` up to ``scale``."""
    return scale * np.logspace(-np.log10(spread), 0.0, dim)


def _check_seed(task: str, seed: Any) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"{task}: seed must be a non-negative int, got {seed!r}")
    return seed


@functools.lru_cache(maxsize=16)
def _lstsq_data(dim: int, scale: float, spread: float, offset: float, noise: float, seed: int) -> tuple[np.ndarray, ...]:
    k_rot, k_z, k_w, k_eps = jax.random.split(jax.random.key(seed), 4)
    q, r = np.linalg.qr(np.asarray(jax.random.normal(k_rot, (dim, dim)), np.float64))
    q = q * np.sign(np.diag(r))  # a unique (Haar) rotation
    s = _scales(dim, scale, spread)
    z = np.asarray(jax.random.normal(k_z, (_N_TRAIN + _N_TEST, dim)), np.float64)
    x = (s * (offset + z)) @ q.T
    # w* = Q·diag(1/s)·u/√dim makes (x − E x)·w* = z·u/√dim: unit variance, whatever the scales;
    # b* = −E[x]·w* centres the target, so the bias and the weights are strongly coupled.
    u = np.asarray(jax.random.normal(k_w, (dim,)), np.float64)
    w_star = q @ (u / s) / math.sqrt(dim)
    b_star = -offset * u.sum() / math.sqrt(dim)
    y = x @ w_star + b_star + noise * np.asarray(jax.random.normal(k_eps, (_N_TRAIN + _N_TEST,)), np.float64)
    return x.astype(np.float32), y.astype(np.float32), w_star.astype(np.float32), np.float32(b_star)


class IllScaledLeastSquaresTask:
    """Task ``illscaled_lstsq``: least squares with rotated, log-spaced feature scales; params ``{"w", "b"}``."""

    def __init__(self, dim: int = 32, scale: float = 100.0, spread: float = 10.0, offset: float = 0.0, noise: float = 0.1,
                 batch_size: int = 32, seed: int = 0, param_scale: float = 1.0):
        name = "illscaled_lstsq"
        check_positive_int(name, "dim", dim)
        check_positive_int(name, "batch_size", batch_size)
        scale = _check_scale(name, scale)
        spread = _check_scale(name, spread, "spread")
        offset = check_nonnegative(name, "offset", offset)
        noise = check_nonnegative(name, "noise", noise)
        seed = _check_seed(name, seed)
        self.param_scale = check_nonnegative(name, "param_scale", param_scale, strict=True)
        self.name = name
        self.spec = TaskSpec(name, {"dim": dim, "scale": scale, "spread": spread, "offset": offset, "noise": noise,
                                    "batch_size": batch_size, "seed": seed, "param_scale": self.param_scale})
        self.dim, self.scale, self.spread, self.offset, self.noise = dim, scale, spread, offset, noise
        self.batch_size, self.seed = batch_size, seed
        x, y, w_star, b_star = _lstsq_data(dim, scale, spread, offset, noise, seed)
        self._x_train, self._y_train = jnp.asarray(x[:_N_TRAIN]), jnp.asarray(y[:_N_TRAIN])
        self._x_test, self._y_test = jnp.asarray(x[_N_TRAIN:]), jnp.asarray(y[_N_TRAIN:])
        self._w_star, self._b_star = jnp.asarray(w_star), jnp.asarray(b_star)

    def init(self, key: jax.Array) -> dict:
        # Small weights (the default init divided by the largest feature size), so the initial
        # predictions are O(1): the optimum is near, and the difficulty is to approach it precisely.
        size = self.scale * math.sqrt(1.0 + self.offset**2)
        w = jax.random.normal(key, (self.dim,), jnp.float32) / (math.sqrt(self.dim) * size)
        return {"w": w * self.param_scale, "b": jnp.zeros((), jnp.float32)}

    def optimum(self) -> dict:
        """The generating weights (the least-squares optimum up to the noise)."""
        return {"w": self._w_star, "b": self._b_star}

    def sample_batch(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        idx = jax.random.randint(key, (self.batch_size,), 0, _N_TRAIN)
        return self._x_train[idx], self._y_train[idx]

    def _mse(self, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return 0.5 * jnp.mean(jnp.square(x @ params["w"] + params["b"] - y))

    def loss(self, params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        return self._mse(params, *batch)

    def evaluate(self, params: Any) -> dict[str, jax.Array]:
        return {"test_loss": self._mse(params, self._x_test, self._y_test)}

    def __repr__(self) -> str:
        return f"IllScaledLeastSquaresTask({self.spec.to_json()})"


@functools.lru_cache(maxsize=16)
def _raw_feature_data(dim: int, scale: float, spread: float, offset: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    k_z, k_t1, k_t2, k_perm, k_mu = jax.random.split(jax.random.key(seed), 5)
    z = np.asarray(jax.random.normal(k_z, (_N_TRAIN + _N_TEST, dim)), np.float64)
    # A fixed random teacher (32 tanh units of small gain: nearly linear, so a student can fit it
    # well in a few hundred steps and the final loss is set by how *precisely* it gets there).
    t1 = np.asarray(jax.random.normal(k_t1, (dim, 32)), np.float64) / math.sqrt(dim)
    t2 = np.asarray(jax.random.normal(k_t2, (32, _CLASSES)), np.float64)
    labels = np.argmax(np.tanh(0.3 * z @ t1) @ t2, axis=1).astype(np.int32)
    s = _scales(dim, scale, spread)[np.asarray(jax.random.permutation(k_perm, dim))]
    # Positive offsets (raw measurements rarely have mean 0): every input has the same sign, so
    # Adam moves a unit's fan-in weights together and its pre-activation by ≈ lr·Σ|x_j| per step.
    mu = offset * s * (1.0 + 0.5 * np.asarray(jax.random.uniform(k_mu, (dim,)), np.float64))
    return (mu + s * z).astype(np.float32), labels


class IllScaledMLPTask:
    """Task ``illscaled_mlp``: an MLP classifier (4 classes) on raw features of scales 1…``scale``."""

    def __init__(self, hidden: Sequence[int] = (256, 256), activation: str = "tanh", dim: int = 64,
                 scale: float = 1.0, spread: float = 1.0, offset: float = 4.0, batch_size: int = 64, seed: int = 0,
                 param_scale: float = 1.0):
        name = "illscaled_mlp"
        hidden = check_mlp_args(name, hidden, activation)
        check_positive_int(name, "dim", dim)
        check_positive_int(name, "batch_size", batch_size)
        scale = check_nonnegative(name, "scale", scale, strict=True)
        spread = _check_scale(name, spread, "spread")
        offset = check_nonnegative(name, "offset", offset)
        seed = _check_seed(name, seed)
        self.param_scale = check_nonnegative(name, "param_scale", param_scale, strict=True)
        self.name = name
        self.spec = TaskSpec(name, {"hidden": hidden, "activation": activation, "dim": dim, "scale": scale,
                                    "spread": spread, "offset": offset, "batch_size": batch_size, "seed": seed,
                                    "param_scale": self.param_scale})
        self.hidden, self.activation, self.dim, self.scale = tuple(hidden), activation, dim, scale
        self.spread, self.offset, self.batch_size, self.seed = spread, offset, batch_size, seed
        self._act = ACTIVATIONS[activation]
        x, y = _raw_feature_data(dim, scale, spread, offset, seed)
        self._x_train, self._y_train = jnp.asarray(x[:_N_TRAIN]), jnp.asarray(y[:_N_TRAIN])
        self._x_test, self._y_test = jnp.asarray(x[_N_TRAIN:]), jnp.asarray(y[_N_TRAIN:])

    def init(self, key: jax.Array) -> dict:
        params = init_mlp(key, [self.dim, *self.hidden, _CLASSES], _GAIN[self.activation])
        return jax.tree.map(lambda p: (p * self.param_scale).astype(jnp.float32), params)

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        return apply_mlp(params, x, self._act)

    def sample_batch(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        idx = jax.random.randint(key, (self.batch_size,), 0, _N_TRAIN)
        return self._x_train[idx], self._y_train[idx]

    def _cross_entropy(self, params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = self.apply(params, x).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]
        return jnp.mean(nll), jnp.mean(jnp.argmax(logits, axis=1) == y)

    def loss(self, params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        return self._cross_entropy(params, *batch)[0]

    def evaluate(self, params: Any) -> dict[str, jax.Array]:
        nll, acc = self._cross_entropy(params, self._x_test, self._y_test)
        return {"test_loss": nll, "test_accuracy": acc}

    def __repr__(self) -> str:
        return f"IllScaledMLPTask({self.spec.to_json()})"
