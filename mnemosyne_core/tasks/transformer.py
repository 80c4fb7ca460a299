"""Pre-LayerNorm Transformer pieces shared by the ViT (:mod:`.vit`) and the char LM (:mod:`.lm`).

Pure functions on plain dicts of float32 arrays (no framework objects), so the
tasks stay free of model-library dependencies and optimizers see exactly the
tensors a real Transformer has: fused QKV projections, LayerNorm scales and
biases, MLP weights.

The two tasks have always differed in small numerical details, and their
losses, parameters and gradients must stay bit-identical (benchmark numbers
and checkpoints depend on them), so those details are parameters here rather
than being unified:

* ``eps`` of :func:`layer_norm` — 1e-5 for the LM, 1e-6 for the ViT;
* ``float32_scale`` of :func:`dense` and :func:`attention` — the ViT computes
  its ``1/√n`` factors with ``jnp`` in float32, the LM with Python's float64
  ``math``. The two round differently for some sizes (e.g. the init factor for
  ``n_in`` = 23, 30, 39, ...), so each task keeps its own form.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mnemosyne_core.tasks import transformer as tf
    >>> k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    >>> blk = {"ln1": tf.layer_norm_params(8), "ln2": tf.layer_norm_params(8),
    ...        "attn": {"qkv": tf.dense(k1, 8, 24), "proj": tf.dense(k2, 8, 8)},
    ...        "mlp": {"fc1": tf.dense(k3, 8, 16), "fc2": tf.dense(k4, 16, 8)}}
    >>> h = jax.random.normal(jax.random.key(1), (2, 5, 8))   # (batch, tokens, dim)
    >>> tf.block(blk, h, heads=2, causal=True, eps=1e-5).shape
    (2, 5, 8)
    >>> # Causal: the first token's output ignores every later token.
    >>> later = h.at[:, 1:].set(0.0)
    >>> a = tf.attention(blk["attn"], h, 2, causal=True)
    >>> bool(jnp.allclose(a[:, 0], tf.attention(blk["attn"], later, 2, causal=True)[:, 0]))
    True
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["attention", "block", "dense", "layer_norm", "layer_norm_params"]


def dense(key: jax.Array, n_in: int, n_out: int, gain: float = 1.0, *, float32_scale: bool = False) -> dict:
    """``{"w", "b"}`` of a linear layer: ``w ~ N(0, gain²/n_in)`` (fan-in scaling), ``b = 0``.

    ``gain`` shrinks residual-branch outputs (the LM's GPT-2-style ``1/√(2·depth)``).
    ``float32_scale`` computes ``√(1/n_in)`` with ``jnp`` in float32 (the ViT's form) instead
    of ``gain/√n_in`` in float64; kept only so existing inits stay bit-identical.
    """
    w = jax.random.normal(key, (n_in, n_out), jnp.float32)
    if float32_scale:
        std = jnp.sqrt(1.0 / n_in)
        # ×1.0 is exact, so the ViT's gain-less init is unchanged; skip it anyway to keep its ops.
        w = w * (std if gain == 1.0 else gain * std)
    else:
        w = w * (gain / math.sqrt(n_in))
    return {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}


def layer_norm_params(dim: int) -> dict:
    """Identity LayerNorm: ``scale = 1``, ``bias = 0``."""
    return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


def layer_norm(p: dict, x: jax.Array, *, eps: float) -> jax.Array:
    """LayerNorm over the last axis. ``eps`` has no default: the tasks use different ones."""
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attention(p: dict, x: jax.Array, heads: int, *, causal: bool, float32_scale: bool = False) -> jax.Array:
    """Multi-head self-attention of ``x`` ``(B, T, D)`` with a fused QKV projection ``p["qkv"]``.

    ``causal`` lets position q attend to keys k ≤ q only. ``float32_scale``: see :func:`dense`.
    """
    b, t, d = x.shape
    qkv = (x @ p["qkv"]["w"] + p["qkv"]["b"]).reshape(b, t, 3, heads, d // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, H, Dh)
    scale = jnp.sqrt(d // heads).astype(x.dtype) if float32_scale else math.sqrt(d // heads)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / scale
    if causal:
        # The diagonal is always allowed, so no row is all-masked and a finite fill value
        # (rather than -inf) cannot produce NaN.
        mask = jnp.tril(jnp.ones((t, t), bool))
        logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, t, d)
    return out @ p["proj"]["w"] + p["proj"]["b"]


def block(p: dict, h: jax.Array, heads: int, *, causal: bool, eps: float, float32_scale: bool = False) -> jax.Array:
    """One pre-LN block: ``h + attn(LN(h))``, then ``h + MLP(LN(h))`` with a GELU MLP.

    The MLP is written inline, not as a function returning its output, because
    ``h + z @ w + b`` adds ``z @ w`` to ``h`` before ``b``; ``h + (z @ w + b)`` would round
    differently and break bit-identity with the tasks' earlier code.
    """
    h = h + attention(p["attn"], layer_norm(p["ln1"], h, eps=eps), heads, causal=causal,
                      float32_scale=float32_scale)
    mlp = p["mlp"]
    z = jax.nn.gelu(layer_norm(p["ln2"], h, eps=eps) @ mlp["fc1"]["w"] + mlp["fc1"]["b"])
    return h + z @ mlp["fc2"]["w"] + mlp["fc2"]["b"]
