"""Multi-layer perceptron classifiers on offline data (digits, MNIST-1D, the held-out tables).

Parameters are a plain dict ``{"dense_0": {"w", "b"}, ..., "dense_L": {"w", "b"}}``
of float32 arrays: ``len(hidden)`` hidden layers with the chosen activation,
then a linear read-out to 10 classes. Weights start from a variance-scaling
normal (gain 2 for ReLU-like activations, 1 for tanh), biases at zero.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks.mlp import MLPTask
    >>> task = MLPTask("digits", hidden=[32], activation="tanh")
    >>> params = task.init(jax.random.key(0))
    >>> params["dense_0"]["w"].shape, params["dense_1"]["w"].shape
    ((64, 32), (32, 10))
    >>> x, y = task.sample_batch(jax.random.key(1))
    >>> task.apply(params, x).shape
    (128, 10)
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mnemosyne_core.tasks.base import TaskSpec
from mnemosyne_core.tasks.classification import ClassificationTask, check_positive_int

__all__ = ["ACTIVATIONS", "MLPTask", "apply_mlp", "check_mlp_args", "init_mlp"]

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "elu": jax.nn.elu,
}
_GAIN = {"relu": 2.0, "tanh": 1.0, "gelu": 2.0, "silu": 2.0, "elu": 2.0}

# The last three are held-out evaluation tasks (scikit-learn tables), never meta-trained on.
_TASK_NAME = {"digits": "digits_mlp", "mnist1d": "mnist1d_mlp", "wine": "wine_mlp",
              "breast_cancer": "cancer_mlp", "blobs5": "blobs_mlp"}


def init_mlp(key: jax.Array, sizes: Sequence[int], gain: float) -> dict:
    """Dense layers ``sizes[0] → … → sizes[-1]`` with ``N(0, gain / fan_in)`` weights."""
    keys = jax.random.split(key, len(sizes) - 1)
    params = {}
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        w = jax.random.normal(k, (n_in, n_out), jnp.float32) * jnp.sqrt(gain / n_in)
        params[f"dense_{i}"] = {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}
    return params


def apply_mlp(params: dict, x: jax.Array, activation) -> jax.Array:
    depth = len(params)
    for i in range(depth):
        layer = params[f"dense_{i}"]
        x = x @ layer["w"] + layer["b"]
        if i < depth - 1:
            x = activation(x)
    return x


def check_mlp_args(task: str, hidden: Any, activation: str) -> list[int]:
    """The hidden widths as a list of positive ints; ``ValueError`` for bad widths or activation."""
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence):
        # ValueError, not TypeError: every bad task kwarg is one error type for callers.
        raise ValueError(f"{task}: hidden must be a list of layer widths, got {hidden!r}")  # noqa: TRY004
    widths = [check_positive_int(task, "hidden width", h) for h in hidden]
    if activation not in ACTIVATIONS:
        raise ValueError(f"{task}: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    return widths


class MLPTask(ClassificationTask):
    """MLP classifier on ``dataset`` (``"digits"`` → task ``digits_mlp``, ``"mnist1d"`` → ``mnist1d_mlp``)."""

    def __init__(self, dataset: str, hidden: Sequence[int] = (64,), activation: str = "relu",
                 batch_size: int = 128, input_noise: float = 0.0, param_scale: float = 1.0,
                 weight_decay: float = 0.0):
        if dataset not in _TASK_NAME:
            raise ValueError(f"MLPTask: unknown dataset {dataset!r}; known: {sorted(_TASK_NAME)}")
        name = _TASK_NAME[dataset]
        hidden = check_mlp_args(name, hidden, activation)
        spec = TaskSpec(name, {
            "hidden": hidden, "activation": activation, "batch_size": batch_size,
            "input_noise": input_noise, "param_scale": param_scale, "weight_decay": weight_decay,
        })
        super().__init__(spec, dataset, batch_size=batch_size, input_noise=input_noise,
                         param_scale=param_scale, weight_decay=weight_decay)
        self.hidden = tuple(hidden)
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    def _init_raw(self, key: jax.Array) -> dict:
        sizes = [self.data.num_features, *self.hidden, self.data.num_classes]
        return init_mlp(key, sizes, _GAIN[self.activation])

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        return apply_mlp(params, x, self._act)
