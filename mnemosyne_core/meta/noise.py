"""Seed-only perturbations: ε for pair ``i`` of generation ``g`` from three integers.

``ε = normal(fold_in(fold_in(run_key, g), i), (dim,))`` in float32. JAX's
threefry PRNG is counter-based, so the same ``(run_key, g, i, dim)`` gives the
same bits in any process, under ``jit`` or not, on any backend — which is what
lets a worker send back two losses instead of |θ| floats.

Example:
    >>> import jax, numpy as np
    >>> rk = run_key_data(0)
    >>> a = perturbation(rk, 3, 5, 10)
    >>> b = perturbations(rk, 3, [4, 5], 10)[1]
    >>> bool(np.array_equal(a, b))
    True
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_key", "pair_key", "perturbation", "perturbations", "run_key_data", "sub_key"]

# Tags for keys derived from a pair key; ε uses the pair key itself.
TAG_TASK = 1  # task spec + unroll length sampling
TAG_INNER = 2  # inner initialisation / data / augmentation


def run_key_data(seed: int) -> tuple[int, ...]:
    """Raw uint32 data of ``jax.random.key(seed)`` (plain ints: picklable, JSON-able)."""
    return tuple(int(x) for x in np.asarray(jax.random.key_data(jax.random.key(int(seed)))))


def as_key(run_key: Sequence[int] | jax.Array) -> jax.Array:
    """A typed threefry key from raw key data."""
    if isinstance(run_key, jax.Array) and jnp.issubdtype(run_key.dtype, jax.dtypes.prng_key):
        return run_key
    return jax.random.wrap_key_data(jnp.asarray(np.asarray(run_key, dtype=np.uint32)))


def pair_key(run_key: Sequence[int] | jax.Array, generation: int, pair_id: int) -> jax.Array:
    """``fold_in(fold_in(run_key, generation), pair_id)``."""
    return jax.random.fold_in(jax.random.fold_in(as_key(run_key), generation), pair_id)


def sub_key(run_key: Sequence[int] | jax.Array, generation: int, pair_id: int, tag: int) -> jax.Array:
    """A key for something other than ε, tied to (generation, pair)."""
    return jax.random.fold_in(pair_key(run_key, generation, pair_id), 1_000_000 + tag)


@functools.partial(jax.jit, static_argnums=3)
def _eps(key_data: jax.Array, generation: jax.Array, pair_ids: jax.Array, dim: int) -> jax.Array:
    base = jax.random.fold_in(jax.random.wrap_key_data(key_data), generation)
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), (dim,), jnp.float32))(pair_ids)


def perturbations(run_key: Sequence[int], generation: int, pair_ids: Sequence[int], dim: int) -> jax.Array:
    """ε for several pairs of one generation, shape ``(len(pair_ids), dim)``."""
    kd = jnp.asarray(np.asarray(run_key, dtype=np.uint32))
    return _eps(kd, jnp.asarray(generation, jnp.uint32), jnp.asarray(list(pair_ids), jnp.uint32), dim)


def perturbation(run_key: Sequence[int], generation: int, pair_id: int, dim: int) -> jax.Array:
    """ε of one pair, shape ``(dim,)``; the + half uses θ+σε, the − half θ−σε."""
    return perturbations(run_key, generation, [pair_id], dim)[0]
