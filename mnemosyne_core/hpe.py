"""Hierarchical pooling encoding (HPE): the spatial encoder of Mnemosyne.

A weight tensor of any shape (scalar, vector, matrix, conv kernel) is
flattened to ``n`` coordinates and turned into ``b`` *meta-tokens* of width
``N``, which CAM then treats as a batch of independent memory streams.

Layout (:class:`ChunkLayout`): the flat tensor is cut into ``b`` contiguous
**chunks**; each chunk into ``T`` **tokens**; each token holds ``P`` coordinates,
``P = ceil(n / (b·T))`` (the tail is zero padding, masked out everywhere).

1. **Pooling level 1** (coordinates → tokens, :func:`pool_tokens`): masked
   mean of a few cheap per-coordinate quantities over the token's coordinates. This is the only per-coordinate work and is a plain fused
   reduction — the Performer never runs over individual coordinates, which
   would cost ``r`` exponentials per parameter.
2. **Bidirectional Performer per chunk** (:func:`encode`): token statistics are
   embedded to width ``N``, then one non-causal FAVOR+ self-attention block
   with a residual and a ReLU feed-forward, attending among the ``T`` tokens of
   the same chunk (padding tokens masked out of the keys).
3. **Pooling level 2** (tokens → meta-token): masked mean over the chunk's
   real tokens gives one meta-token per chunk.

Example:
    >>> import jax, jax.numpy as jnp
    >>> layout = chunk_layout(12, num_chunks=2, tokens_per_chunk=2)   # the paper's 3×4 example
    >>> (layout.num_chunks, layout.tokens_per_chunk, layout.token_size)
    (2, 2, 3)
    >>> params = init_hpe(jax.random.key(0), num_stats=1, width=4, hidden=8)
    >>> omega = jax.random.normal(jax.random.key(1), (4, 4))
    >>> tokens, mask = pool_tokens([jnp.arange(12.0).reshape(3, 4)], layout)
    >>> encode(params, tokens, mask, omega).shape
    (2, 4)
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mnemosyne_core.favor import favor_attention

__all__ = ["ChunkLayout", "chunk_layout", "encode", "from_chunks", "hpe_encode", "init_hpe", "pool_tokens", "to_chunks"]


@dataclasses.dataclass(frozen=True)
class ChunkLayout:
    """Static split of ``size`` flat coordinates into chunks × tokens × coordinates."""

    size: int
    num_chunks: int  # b
    tokens_per_chunk: int  # T
    token_size: int  # P

    @property
    def padded_size(self) -> int:
        return self.num_chunks * self.tokens_per_chunk * self.token_size

    @property
    def chunk_size(self) -> int:
        """Coordinates per chunk (``T·P``), i.e. per meta-token."""
        return self.tokens_per_chunk * self.token_size

    def token_counts(self) -> np.ndarray:
        """Real (unpadded) coordinates per token, shape ``(b, T)``; static."""
        starts = np.arange(self.num_chunks * self.tokens_per_chunk) * self.token_size
        counts = np.clip(self.size - starts, 0, self.token_size)
        return counts.reshape(self.num_chunks, self.tokens_per_chunk)


def chunk_layout(size: int, num_chunks: int, tokens_per_chunk: int) -> ChunkLayout:
    """The layout for a tensor of ``size`` coordinates (``size`` ≥ 1; scalars have 1)."""
    for name, value in (("size", size), ("num_chunks", num_chunks), ("tokens_per_chunk", tokens_per_chunk)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    token_size = -(-int(size) // (num_chunks * tokens_per_chunk))
    return ChunkLayout(int(size), int(num_chunks), int(tokens_per_chunk), token_size)


def _to_tokens(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    flat = x.reshape(-1)
    if flat.shape[0] != layout.size:
        raise ValueError(f"feature has {flat.shape[0]} entries, layout expects {layout.size}")
    if layout.padded_size != layout.size:  # pad only when needed: a reshape alone is free
        flat = jnp.pad(flat, (0, layout.padded_size - layout.size))
    return flat.reshape(layout.num_chunks, layout.tokens_per_chunk, layout.token_size)


def to_chunks(x: jax.Array, layout: ChunkLayout) -> jax.Array:
    """``(b, T·P)`` view of a tensor's coordinates (zero-padded at the end)."""
    return _to_tokens(x, layout).reshape(layout.num_chunks, layout.chunk_size)


def from_chunks(x: jax.Array, layout: ChunkLayout, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`to_chunks`: drop the padding, restore ``shape``."""
    flat = x.reshape(-1)
    if layout.padded_size != layout.size:
        flat = flat[: layout.size]
    return flat.reshape(shape)


def pool_tokens(
    features: Sequence[jax.Array], layout: ChunkLayout
) -> tuple[jax.Array, jax.Array]:
    """Pooling level 1: per-token masked mean of each per-coordinate quantity.

    ``features``: arrays with ``layout.size`` entries each (any shape). Pass
    cheap elementwise expressions of the inputs (``m``, ``m²``, ``v``, ...):
    XLA then fuses them into one reduction pass per quantity without
    materialising anything per coordinate; nonlinear normalisation belongs on
    the small token arrays afterwards.
    Returns ``tokens (b, T, len(features))`` float32 and ``mask (b, T)`` (True
    where the token has at least one real coordinate). Padding is zero, so sums
    ignore it and we divide by the static count of real coordinates.
    """
    counts = layout.token_counts()
    inv = jnp.asarray(1.0 / np.maximum(counts, 1), jnp.float32)
    stats = [jnp.sum(_to_tokens(f.astype(jnp.float32), layout), axis=-1) * inv for f in features]
    return jnp.stack(stats, axis=-1), jnp.asarray(counts > 0)


def _dense(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def init_hpe(key: jax.Array, num_stats: int, width: int, hidden: int) -> dict:
    """HPE parameters (part of θ): embedding, Q/K/V/O projections, feed-forward."""
    keys = jax.random.split(key, 7)
    return {
        "embed": _dense(keys[0], num_stats, width),
        "q": _dense(keys[1], width, width),
        "k": _dense(keys[2], width, width),
        "v": _dense(keys[3], width, width),
        "o": _dense(keys[4], width, width),
        "ff1": _dense(keys[5], width, hidden),
        "ff2": _dense(keys[6], hidden, width),
    }


def _apply(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return x @ p["w"] + p["b"]


def encode(params: dict, tokens: jax.Array, mask: jax.Array, omega: jax.Array) -> jax.Array:
    """Performer block per chunk + pooling level 2: ``(b, T, S)`` → ``(b, N)``.

    ``mask (b, T)`` marks real tokens; padding tokens neither act as keys nor
    enter the pooled mean, so their values never matter. A chunk with no real
    token (tiny tensors) yields a zero meta-token.
    """
    x = _apply(params["embed"], tokens)
    width = x.shape[-1]
    # exp(qᵀk / √N) is the softmax kernel with the usual temperature.
    scale = width ** -0.25
    q = _apply(params["q"], x) * scale
    k = _apply(params["k"], x) * scale
    v = _apply(params["v"], x)
    x = x + _apply(params["o"], favor_attention(q, k, v, omega, mask))
    x = x + _apply(params["ff2"], jax.nn.relu(_apply(params["ff1"], x)))
    m = mask.astype(x.dtype)[..., None]
    count = jnp.maximum(jnp.sum(m, axis=-2), 1.0)
    return jnp.sum(jnp.where(m > 0, x, 0.0), axis=-2) / count


def hpe_encode(
    params: dict,
    features: Sequence[jax.Array],
    omega: jax.Array,
    num_chunks: int,
    tokens_per_chunk: int,
) -> jax.Array:
    """Whole HPE for one tensor: its per-coordinate features → ``(b, N)`` meta-tokens."""
    layout = chunk_layout(int(np.prod(features[0].shape, dtype=np.int64)), num_chunks, tokens_per_chunk)
    tokens, mask = pool_tokens(features, layout)
    return encode(params, tokens, mask, omega)
