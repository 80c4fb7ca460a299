"""Hierarchical pooling encoding: any tensor shape → b meta-tokens; padding is invisible."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemosyne_core.favor import orthogonal_directions
from mnemosyne_core.hpe import (
    chunk_layout,
    encode,
    from_chunks,
    hpe_encode,
    init_hpe,
    pool_tokens,
    to_chunks,
)

WIDTH, CHUNKS, TOKENS = 4, 2, 3
PARAMS = init_hpe(jax.random.key(0), num_stats=2, width=WIDTH, hidden=8)
OMEGA = orthogonal_directions(jax.random.key(1), 4, WIDTH)


@pytest.mark.parametrize("shape", [(), (7,), (3, 4), (3, 3, 2, 5), (1001,), (2, 13)])
def test_any_shape_gives_b_meta_tokens(shape):
    x = jax.random.normal(jax.random.key(2), shape)
    meta = hpe_encode(PARAMS, [x, x * x], OMEGA, CHUNKS, TOKENS)
    assert meta.shape == (CHUNKS, WIDTH)
    assert bool(jnp.all(jnp.isfinite(meta)))


def test_paper_example_layout():
    # The paper's figure: a 3×4 tensor → b = 2 meta-tokens of width N = 4.
    layout = chunk_layout(12, num_chunks=2, tokens_per_chunk=2)
    assert (layout.num_chunks, layout.tokens_per_chunk, layout.token_size) == (2, 2, 3)
    x = jnp.arange(12.0).reshape(3, 4)
    assert hpe_encode(PARAMS, [x, x], OMEGA, 2, 2).shape == (2, 4)


@pytest.mark.parametrize("size", [1, 5, 17, 96, 1001])
def test_level1_pooling_is_the_mean_over_real_coordinates(size):
    layout = chunk_layout(size, CHUNKS, TOKENS)
    x = np.asarray(jax.random.normal(jax.random.key(size), (size,)))
    tokens, mask = pool_tokens([jnp.asarray(x)], layout)
    p = layout.token_size
    for c in range(CHUNKS):
        for t in range(TOKENS):
            start = (c * TOKENS + t) * p
            real = x[start : min(start + p, size)]
            assert bool(mask[c, t]) == (real.size > 0)
            expected = real.mean() if real.size else 0.0
            np.testing.assert_allclose(float(tokens[c, t, 0]), expected, rtol=1e-5, atol=1e-6)


def test_padding_tokens_do_not_change_the_encoding():
    # The same real tokens, with more padding tokens holding garbage, give the same meta-tokens.
    tokens = jax.random.normal(jax.random.key(3), (CHUNKS, TOKENS, 2))
    mask = jnp.array([[True, True, True], [True, True, False]])
    base = encode(PARAMS, tokens, mask, OMEGA)
    garbage = jax.random.normal(jax.random.key(4), (CHUNKS, 4, 2)) * 50
    padded = jnp.concatenate([tokens, garbage], axis=1)
    padded_mask = jnp.concatenate([mask, jnp.zeros((CHUNKS, 4), bool)], axis=1)
    padded = padded.at[1, 2].set(-1e3)  # the original padding token, now also garbage
    np.testing.assert_allclose(encode(PARAMS, padded, padded_mask, OMEGA), base, rtol=1e-5, atol=1e-6)
    # …while changing a real token does change it (the check can fail).
    changed = encode(PARAMS, tokens.at[1, 0].add(1.0), mask, OMEGA)
    assert float(jnp.max(jnp.abs(changed - base))) > 1e-4


def test_padding_amount_does_not_change_the_encoding():
    # Five real coordinates per token, padded to 5, 8 or 20 slots per token.
    values = jax.random.normal(jax.random.key(5), (CHUNKS, TOKENS, 5))
    counts = np.full((CHUNKS, TOKENS), 5)

    def encode_with_slots(slots: int) -> jax.Array:
        padded = jnp.pad(values, ((0, 0), (0, 0), (0, slots - 5)))
        inv = 1.0 / counts  # the static real-coordinate counts, as pool_tokens uses them
        stats = jnp.stack([padded.sum(-1) * inv, (padded**2).sum(-1) * inv], axis=-1)
        return encode(PARAMS, stats, jnp.ones((CHUNKS, TOKENS), bool), OMEGA)

    base = encode_with_slots(5)
    for slots in (8, 20):
        np.testing.assert_allclose(encode_with_slots(slots), base, rtol=1e-6)
    # End to end: a tensor whose size forces padding pools exactly as if unpadded.
    x = jax.random.normal(jax.random.key(6), (29,))
    layout = chunk_layout(29, CHUNKS, TOKENS)
    assert layout.padded_size > 29
    tokens, _mask = pool_tokens([x], layout)
    xs = np.asarray(x)
    p = layout.token_size
    manual = [xs[i * p : (i + 1) * p].mean() if i * p < 29 else 0.0 for i in range(CHUNKS * TOKENS)]
    np.testing.assert_allclose(np.asarray(tokens[..., 0]).reshape(-1), manual, rtol=1e-5, atol=1e-7)


def test_empty_chunk_gives_zero_meta_token():
    # A scalar has one real coordinate: the second chunk is all padding.
    meta = hpe_encode(PARAMS, [jnp.asarray(3.0), jnp.asarray(9.0)], OMEGA, CHUNKS, TOKENS)
    np.testing.assert_array_equal(meta[1], jnp.zeros(WIDTH))
    assert float(jnp.max(jnp.abs(meta[0]))) > 0


@pytest.mark.parametrize("shape", [(), (7,), (3, 4), (3, 3, 2, 5)])
def test_chunk_view_round_trip(shape):
    x = jax.random.normal(jax.random.key(7), shape)
    layout = chunk_layout(max(1, math.prod(shape)), CHUNKS, TOKENS)
    view = to_chunks(x, layout)
    assert view.shape == (CHUNKS, layout.chunk_size)
    np.testing.assert_array_equal(from_chunks(view, layout, shape), x)


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_layout_rejects_bad_sizes(bad):
    with pytest.raises(ValueError):
        chunk_layout(bad, 2, 2)
    with pytest.raises(ValueError):
        chunk_layout(10, bad, 2)
