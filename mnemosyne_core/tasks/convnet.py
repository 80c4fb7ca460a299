"""A small convolutional network on the 8×8 digits (a held-out evaluation task).

``channels = [c₁, c₂]``: a 3×3 convolution with c₁ channels (stride 1, SAME padding) →
activation → a 3×3 convolution with c₂ channels and stride 2 (8×8 → 4×4) → activation →
global average pooling → a linear read-out to 10 classes. Weights are variance-scaling normal
(fan-in = 9·channels in), biases zero; parameters ``{"conv_0", "conv_1", "out"}`` with
``"w"``/``"b"`` leaves (so weight decay applies to the kernels). Meta-training never sees it.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks.convnet import ConvNetTask
    >>> task = ConvNetTask(channels=[8, 16])
    >>> params = task.init(jax.random.key(0))
    >>> params["conv_1"]["w"].shape    # HWIO
    (3, 3, 8, 16)
    >>> x, _ = task.sample_batch(jax.random.key(1))
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
from mnemosyne_core.tasks.mlp import _GAIN, ACTIVATIONS

__all__ = ["ConvNetTask"]

_SIDE = 8  # digits are 8×8


class ConvNetTask(ClassificationTask):
    """Two 3×3 convolutions (the second with stride 2), global average pooling, a linear read-out."""

    def __init__(self, channels: Sequence[int] = (8, 16), activation: str = "relu", batch_size: int = 128,
                 input_noise: float = 0.0, param_scale: float = 1.0, weight_decay: float = 0.0):
        name = "digits_convnet"
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence) or len(channels) != 2:
            raise ValueError(f"{name}: channels must be a list of two widths, got {channels!r}")
        channels = [check_positive_int(name, "channels", c) for c in channels]
        if activation not in ACTIVATIONS:
            raise ValueError(f"{name}: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        spec = TaskSpec(name, {"channels": channels, "activation": activation, "batch_size": batch_size,
                               "input_noise": input_noise, "param_scale": param_scale,
                               "weight_decay": weight_decay})
        super().__init__(spec, "digits", batch_size=batch_size, input_noise=input_noise,
                         param_scale=param_scale, weight_decay=weight_decay)
        self.channels = tuple(channels)
        self.activation = activation
        self._act = ACTIVATIONS[activation]

    def _init_raw(self, key: jax.Array) -> dict:
        k0, k1, k2 = jax.random.split(key, 3)
        gain = _GAIN[self.activation]
        c1, c2 = self.channels

        def kernel(k, c_in, c_out):
            return jax.random.normal(k, (3, 3, c_in, c_out), jnp.float32) * jnp.sqrt(gain / (9 * c_in))

        return {
            "conv_0": {"w": kernel(k0, 1, c1), "b": jnp.zeros((c1,), jnp.float32)},
            "conv_1": {"w": kernel(k1, c1, c2), "b": jnp.zeros((c2,), jnp.float32)},
            "out": {"w": jax.random.normal(k2, (c2, self.data.num_classes), jnp.float32) / jnp.sqrt(c2),
                    "b": jnp.zeros((self.data.num_classes,), jnp.float32)},
        }

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        h = x.reshape(x.shape[0], _SIDE, _SIDE, 1)
        for name, stride in (("conv_0", 1), ("conv_1", 2)):
            h = jax.lax.conv_general_dilated(h, params[name]["w"], (stride, stride), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = self._act(h + params[name]["b"])
        return h.mean(axis=(1, 2)) @ params["out"]["w"] + params["out"]["b"]
