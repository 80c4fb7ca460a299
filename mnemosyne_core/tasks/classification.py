"""Shared machinery of the image/sequence classification tasks (MLPs, ViT).

A subclass supplies ``_init_raw(key)`` (parameters before task augmentation)
and ``apply(params, x) -> logits``; this base class supplies batching, the
softmax cross-entropy loss with optional L2 weight decay, task augmentation by
``param_scale`` and held-out evaluation on the fixed test split.

Batches are ``(x, y)`` gathered with ``jnp`` indexing from device-resident
training arrays, so ``sample_batch`` can be jitted and vmapped (a population of
unrolls draws its batches inside one compiled program).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from mnemosyne_core.tasks.base import TaskSpec
from mnemosyne_core.tasks.data import Dataset, load_dataset

__all__ = ["ClassificationTask", "check_nonnegative", "check_positive_int"]


def check_positive_int(task: str, name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{task}: {name} must be a positive int, got {value!r}")
    return value


def check_nonnegative(task: str, name: str, value: Any, *, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if strict else value >= 0)
    if not ok:
        bound = "> 0" if strict else ">= 0"
        raise ValueError(f"{task}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


class ClassificationTask:
    """Base class: softmax cross-entropy on a :class:`~mnemosyne_core.tasks.data.Dataset`."""

    name: str

    def __init__(self, spec: TaskSpec, dataset: str, *, batch_size: int, input_noise: float = 0.0,
                 param_scale: float = 1.0, weight_decay: float = 0.0, data_seed: int = 0):
        task = spec.name
        self.name = task
        self.spec = spec
        self.batch_size = check_positive_int(task, "batch_size", batch_size)
        self.input_noise = check_nonnegative(task, "input_noise", input_noise)
        self.param_scale = check_nonnegative(task, "param_scale", param_scale, strict=True)
        self.weight_decay = check_nonnegative(task, "weight_decay", weight_decay)
        self.data: Dataset = load_dataset(dataset, data_seed)

    # -- to be provided by subclasses
    def _init_raw(self, key: jax.Array) -> dict:
        raise NotImplementedError

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        raise NotImplementedError

    # -- the Task protocol
    def init(self, key: jax.Array) -> dict:
        params = self._init_raw(key)
        # Task augmentation (Celo): rescaling the init keeps the rule from relying on one scale.
        return jax.tree.map(lambda p: (p * self.param_scale).astype(jnp.float32), params)

    def _sample(self, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Row indices of a batch and its (noisy) inputs and labels."""
        key_idx, key_noise = jax.random.split(key)
        idx = jax.random.randint(key_idx, (self.batch_size,), 0, self.data.x_train.shape[0])
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        if self.input_noise > 0:
            x = x + self.input_noise * jax.random.normal(key_noise, x.shape, x.dtype)
        return idx, x, y

    def sample_batch(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        _, x, y = self._sample(key)
        return x, y

    def _cross_entropy(self, params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = self.apply(params, x).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
        return jnp.mean(nll), jnp.mean(jnp.argmax(logits, axis=1) == y)

    def _l2(self, params: Any) -> jax.Array:
        # Decay only weight matrices ("w" leaves), never biases, norms or tokens.
        total = jnp.zeros((), jnp.float32)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            if getattr(path[-1], "key", None) == "w":
                total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        return 0.5 * self.weight_decay * total

    def loss(self, params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        nll, _ = self._cross_entropy(params, x, y)
        return nll + self._l2(params) if self.weight_decay > 0 else nll

    def evaluate(self, params: Any) -> dict[str, jax.Array]:
        """Cross-entropy (without weight decay) and accuracy on the whole test split."""
        nll, acc = self._cross_entropy(params, self.data.x_test, self.data.y_test)
        return {"test_loss": nll, "test_accuracy": acc}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.to_json()})"
