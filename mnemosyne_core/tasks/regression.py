"""Squared-error tasks: regression MLPs on tables and an MLP autoencoder of the digits.

``diabetes_mlp`` / ``friedman_mlp`` regress the standardised target of scikit-learn's
bundled diabetes table / a ``make_friedman1`` set (see :mod:`mnemosyne_core.tasks.data`);
``digits_autoencoder`` reconstructs the standardised 8×8 digits through a bottleneck
(``hidden = [32, 8, 32]``: the middle width is the code). Loss: mean squared error
(per output, so a constant predictor of a standardised target scores ≈ 1); ``evaluate``
gives it on the test split. Parameters are the MLP dicts of :mod:`~mnemosyne_core.tasks.mlp`.
All three are held-out evaluation tasks: meta-training never sees them.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks.regression import SquaredErrorMLPTask
    >>> task = SquaredErrorMLPTask("digits_autoencoder", hidden=[32, 8, 32])
    >>> params = task.init(jax.random.key(0))
    >>> params["dense_3"]["w"].shape       # 32 → 64 reconstructed pixels
    (32, 64)
    >>> sorted(task.evaluate(params))
    ['test_loss']
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mnemosyne_core.tasks.base import TaskSpec
from mnemosyne_core.tasks.classification import ClassificationTask
from mnemosyne_core.tasks.mlp import (
    _GAIN,
    ACTIVATIONS,
    apply_mlp,
    check_mlp_args,
    init_mlp,
)

__all__ = ["SQUARED_ERROR_TASKS", "SquaredErrorMLPTask"]

# task name -> (data set, target): "y" = the regression target, "x" = the input itself.
SQUARED_ERROR_TASKS = {"diabetes_mlp": ("diabetes", "y"), "friedman_mlp": ("friedman1", "y"),
                       "digits_autoencoder": ("digits", "x")}


class SquaredErrorMLPTask(ClassificationTask):
    """An MLP trained on mean squared error: a regression (target ``y``) or an autoencoder (``x``)."""

    def __init__(self, name: str, hidden: Sequence[int] = (64,), activation: str = "relu",
                 batch_size: int = 64, input_noise: float = 0.0, param_scale: float = 1.0,
                 weight_decay: float = 0.0):
        if name not in SQUARED_ERROR_TASKS:
            raise ValueError(f"unknown squared-error task {name!r}; known: {sorted(SQUARED_ERROR_TASKS)}")
        hidden = check_mlp_args(name, hidden, activation)
        dataset, self.target = SQUARED_ERROR_TASKS[name]
        spec = TaskSpec(name, {"hidden": hidden, "activation": activation, "batch_size": batch_size,
                               "input_noise": input_noise, "param_scale": param_scale,
                               "weight_decay": weight_decay})
        super().__init__(spec, dataset, batch_size=batch_size, input_noise=input_noise,
                         param_scale=param_scale, weight_decay=weight_decay)
        self.hidden = tuple(hidden)
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    @property
    def num_outputs(self) -> int:
        return self.data.num_features if self.target == "x" else 1

    def _init_raw(self, key: jax.Array) -> dict:
        sizes = [self.data.num_features, *self.hidden, self.num_outputs]
        return init_mlp(key, sizes, _GAIN[self.activation])

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        return apply_mlp(params, x, self._act)

    def sample_batch(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        idx, x, y = self._sample(key)
        if self.target == "x":
            # Reconstruct the clean image: the input noise (if any) makes it a denoising autoencoder.
            return x, self.data.x_train[idx]
        return x, y

    def _mse(self, params: Any, x: jax.Array, target: jax.Array) -> jax.Array:
        pred = self.apply(params, x).astype(jnp.float32)
        return jnp.mean(jnp.square(pred - target.reshape(pred.shape)))

    def loss(self, params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, target = batch
        mse = self._mse(params, x, target)
        return mse + self._l2(params) if self.weight_decay > 0 else mse

    def evaluate(self, params: Any) -> dict[str, jax.Array]:
        """Mean squared error (without weight decay) on the whole test split."""
        target = self.data.x_test if self.target == "x" else self.data.y_test
        return {"test_loss": self._mse(params, self.data.x_test, target)}
