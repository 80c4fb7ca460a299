"""A tiny Vision Transformer on the 8×8 digits — "a Transformer trained by a Transformer".

The image is cut into ``(8/patch)²`` non-overlapping patches, each linearly
embedded; a learned class token is prepended and learned position embeddings
added; ``depth`` pre-LayerNorm Transformer blocks follow (multi-head
self-attention and a GELU MLP, each with a residual connection); the final
LayerNorm of the class token feeds a linear classifier.

Parameters are a plain dict of float32 arrays (no framework objects), so the
optimizers see exactly the tensor shapes a real ViT has: embedding matrices,
fused QKV projections, LayerNorm scales/biases, position embeddings.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks.vit import ViTTask
    >>> task = ViTTask(patch=4, dim=16, depth=1, heads=2)
    >>> params = task.init(jax.random.key(0))
    >>> params["pos"].shape           # 4 patches + class token
    (5, 16)
    >>> x, y = task.sample_batch(jax.random.key(1))
    >>> task.apply(params, x).shape
    (128, 10)
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from mnemosyne_core.tasks import transformer as tf
from mnemosyne_core.tasks.base import TaskSpec
from mnemosyne_core.tasks.classification import ClassificationTask, check_positive_int

__all__ = ["ViTTask", "patchify"]

_IMAGE = 8
_PATCHES = (2, 4)


def patchify(x: jax.Array, patch: int) -> jax.Array:
    """``(B, 64)`` flattened 8×8 images → ``(B, (8/patch)², patch²)`` row-major patches."""
    n = _IMAGE // patch
    img = x.reshape(x.shape[0], n, patch, n, patch)
    return img.transpose(0, 1, 3, 2, 4).reshape(x.shape[0], n * n, patch * patch)


# The ViT's numerics, kept bit-identical to its original code: LayerNorm eps 1e-6 and 1/√n
# factors computed in float32 (see transformer's module docstring).
_EPS = 1e-6


def _dense(key: jax.Array, n_in: int, n_out: int) -> dict:
    return tf.dense(key, n_in, n_out, float32_scale=True)


class ViTTask(ClassificationTask):
    """Task ``digits_vit``: a pre-LN ViT classifier on 8×8 digit patches."""

    def __init__(self, patch: int = 4, dim: int = 32, depth: int = 1, heads: int = 2,
                 mlp_ratio: int = 2, batch_size: int = 128, input_noise: float = 0.0,
                 param_scale: float = 1.0, weight_decay: float = 0.0):
        name = "digits_vit"
        if patch not in _PATCHES or isinstance(patch, bool):
            raise ValueError(f"{name}: patch must be one of {_PATCHES}, got {patch!r}")
        for field, value in (("dim", dim), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio)):
            check_positive_int(name, field, value)
        if dim % heads:
            raise ValueError(f"{name}: dim ({dim}) must be divisible by heads ({heads})")
        spec = TaskSpec(name, {
            "patch": patch, "dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio,
            "batch_size": batch_size, "input_noise": input_noise, "param_scale": param_scale,
            "weight_decay": weight_decay,
        })
        super().__init__(spec, "digits", batch_size=batch_size, input_noise=input_noise,
                         param_scale=param_scale, weight_decay=weight_decay)
        self.patch, self.dim, self.depth, self.heads, self.mlp_ratio = patch, dim, depth, heads, mlp_ratio
        self.num_patches = (_IMAGE // patch) ** 2

    def _init_raw(self, key: jax.Array) -> dict:
        d, hidden = self.dim, self.mlp_ratio * self.dim
        keys = iter(jax.random.split(key, 4 + 4 * self.depth))
        params = {
            "embed": _dense(next(keys), self.patch * self.patch, d),
            "cls": 0.02 * jax.random.normal(next(keys), (d,), jnp.float32),
            "pos": 0.02 * jax.random.normal(next(keys), (self.num_patches + 1, d), jnp.float32),
        }
        for i in range(self.depth):
            params[f"block_{i}"] = {
                "ln1": tf.layer_norm_params(d),
                "attn": {"qkv": _dense(next(keys), d, 3 * d), "proj": _dense(next(keys), d, d)},
                "ln2": tf.layer_norm_params(d),
                "mlp": {"fc1": _dense(next(keys), d, hidden), "fc2": _dense(next(keys), hidden, d)},
            }
        params["ln_f"] = tf.layer_norm_params(d)
        params["head"] = _dense(next(keys), d, self.data.num_classes)
        return params

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        tokens = patchify(x, self.patch) @ params["embed"]["w"] + params["embed"]["b"]
        cls = jnp.broadcast_to(params["cls"], (tokens.shape[0], 1, self.dim)).astype(tokens.dtype)
        h = jnp.concatenate([cls, tokens], axis=1) + params["pos"]
        for i in range(self.depth):
            h = tf.block(params[f"block_{i}"], h, self.heads, causal=False, eps=_EPS, float32_scale=True)
        return tf.layer_norm(params["ln_f"], h[:, 0], eps=_EPS) @ params["head"]["w"] + params["head"]["b"]
