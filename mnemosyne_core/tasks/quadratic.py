"""An ill-conditioned quadratic: the smallest task that still tells optimizers apart.

``f(x) = ½ (x − x*)ᵀ A (x − x*)`` with ``A = Q diag(λ) Qᵀ``: ``Q`` a random
rotation and ``λ`` log-spaced from ``1/condition`` to ``1`` (so the largest
curvature is 1 whatever the conditioning, and learning rates transfer across
``condition``). ``Q`` and ``x*`` come from ``seed``; the initial point from the
key passed to :meth:`QuadraticTask.init`.

With ``noise > 0`` a batch is a Gaussian vector ``z ~ N(0, noise² I)`` and the
training loss is ``f(x) + zᵀx``: the gradient gets unbiased noise ``z`` while the
expected loss stays ``f``. ``evaluate`` reports the noiseless ``f``.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks.quadratic import QuadraticTask
    >>> task = QuadraticTask(dim=4, condition=10.0)
    >>> x = task.init(jax.random.key(0))
    >>> float(task.evaluate(task.optimum())["test_loss"])
    0.0
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnemosyne_core.tasks.base import TaskSpec

__all__ = ["QuadraticTask"]


@functools.lru_cache(maxsize=32)
def _problem(dim: int, condition: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    key_q, key_opt = jax.random.split(jax.random.key(seed))
    q, r = np.linalg.qr(np.asarray(jax.random.normal(key_q, (dim, dim)), np.float64))
    q = q * np.sign(np.diag(r))  # make the rotation unique (Haar-distributed)
    eig = np.logspace(-np.log10(condition), 0.0, dim)
    a = (q * eig) @ q.T
    x_star = np.asarray(jax.random.normal(key_opt, (dim,)), np.float64)
    return a.astype(np.float32), x_star.astype(np.float32)


class QuadraticTask:
    """``½ (x − x*)ᵀ A (x − x*)`` with condition number ``condition``; params ``{"x": (dim,)}``."""

    def __init__(self, dim: int = 16, condition: float = 100.0, noise: float = 0.0, seed: int = 0):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"quadratic: dim must be a positive int, got {dim!r}")
        if not (isinstance(condition, (int, float)) and np.isfinite(condition) and condition >= 1.0):
            raise ValueError(f"quadratic: condition must be a finite number >= 1, got {condition!r}")
        if not (isinstance(noise, (int, float)) and np.isfinite(noise) and noise >= 0.0):
            raise ValueError(f"quadratic: noise must be a finite number >= 0, got {noise!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"quadratic: seed must be a non-negative int, got {seed!r}")
        self.name = "quadratic"
        self.spec = TaskSpec("quadratic", {"dim": dim, "condition": float(condition),
                                           "noise": float(noise), "seed": seed})
        self.dim, self.condition, self.noise, self.seed = dim, float(condition), float(noise), seed
        a, x_star = _problem(dim, self.condition, seed)
        self._a, self._x_star = jnp.asarray(a), jnp.asarray(x_star)

    def init(self, key: jax.Array) -> dict[str, jax.Array]:
        # Start at distance ~√dim from the optimum, in a random direction.
        return {"x": self._x_star + jax.random.normal(key, (self.dim,), jnp.float32)}

    def optimum(self) -> dict[str, jax.Array]:
        return {"x": self._x_star}

    def sample_batch(self, key: jax.Array) -> jax.Array:
        if self.noise == 0.0:  # same shape either way, so noisy and exact variants vmap alike
            return jnp.zeros((self.dim,), jnp.float32)
        return self.noise * jax.random.normal(key, (self.dim,), jnp.float32)

    def _f(self, params: Any) -> jax.Array:
        d = params["x"].astype(jnp.float32) - self._x_star
        return 0.5 * d @ (self._a @ d)

    def loss(self, params: Any, batch: jax.Array) -> jax.Array:
        return self._f(params) + batch @ params["x"].astype(jnp.float32)

    def evaluate(self, params: Any) -> dict[str, jax.Array]:
        return {"test_loss": self._f(params)}

    def __repr__(self) -> str:
        return f"QuadraticTask({self.spec.to_json()})"
