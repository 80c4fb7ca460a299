"""The ``tensor`` variant's per-coordinate head: the direction d and how far each chunk moves.

For every coordinate i of a tensor, with the chunk's context ``c`` and gain ``exp(β·s)`` from
:func:`~mnemosyne_core.tensor_context.tensor_context` (both per chunk, i.e. per meta-token),
and the Adam-normalised features ``f_i = (m̂1, m̂2, g, ·)/(√v̂+ε)`` plus the parameter value::

    d_i = m̂1_i/(√v̂_i+ε) + Σ_j w_d[j] · ReLU(c_j + Σ_k w1[k, j] f_{i,k})
    update_i ∝ d_i · exp(β·s)      (times the tensor's step size e^{log α}, already in the gain)

The first term is Adam's direction; the sum is a learned correction (not in the paper: ours,
DESIGN.md section 3) whose output weights ``w_d`` start at zero, so a fresh θ is exactly Adam.
Without ``direction_correction`` θ has no ``w1``: d is Adam's and only the gain is learned.

This is the hot path (every parameter, every step), so it is unrolled into elementwise
multiply-adds over the feature arrays: no ``stack(...) @ W`` (30–57× slower on XLA CPU, see
ENV.md), ReLU, and no transcendental beyond Adam's √ (the ``exp`` is per chunk).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mnemosyne_core.hpe import chunk_layout
    >>> from mnemosyne_core.tensor_context import init_tensor_theta
    >>> head = init_tensor_theta(jax.random.key(0), num_pool=4, num_coord=4, width=8, value_width=4,
    ...                          hpe_hidden=16, head_hidden=4, extra_ctx=0, init_discount=0.1)["head"]
    >>> g = jnp.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    >>> m1, m2, v = 0.1 * g, 0.01 * g, 0.001 * g * g      # the moments after a first step
    >>> d = tensor_head(head, jnp.zeros((2, 4)), jnp.array([1.0, 2.0]), g, m1, m2, v, g,
    ...                 chunk_layout(6, num_chunks=2, tokens_per_chunk=1),
    ...                 bias_corrections=(10.0, 100.0, 1000.0), eps=1e-8)
    >>> d.round(4).tolist()      # fresh θ: Adam's first step sign(g), times each chunk's gain
    [[1.0, -1.0, 1.0], [-2.0, 2.0, -2.0]]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mnemosyne_core.hpe import ChunkLayout, from_chunks, to_chunks

# TensorMemory is defined in tensor_context; the name stays importable from here because
# pickled optimizer states (the meta-trainer's evaluator_state.pkl holds persistent inner states)
# written before the split record it as mnemosyne_core.head.TensorMemory.
from mnemosyne_core.tensor_context import TensorMemory  # noqa: F401

__all__ = ["tensor_head"]


def tensor_head(
    head: dict,
    ctx: jax.Array,
    gain: jax.Array,
    g: jax.Array,
    m1: jax.Array,
    m2: jax.Array | None,
    v: jax.Array,
    param: jax.Array | None,
    layout: ChunkLayout,
    *,
    bias_corrections: tuple[jax.Array, jax.Array, jax.Array],
    eps: float,
) -> jax.Array:
    """Per-coordinate MLP of one tensor → direction ``d·exp(β·s)`` (same shape as ``g``).

    Runs on the ``(b, T·P)`` chunk view so each chunk's context ``ctx (b, H)``
    and gain ``exp(β·s)`` ``(b,)`` broadcast along rows, and is unrolled into
    elementwise multiply-adds (one fused loop; no ``stack(...) @ W``; ReLU; no
    transcendental beyond Adam's square root). With the zero-initialised output
    weights, ``d`` is Adam's ``m̂/(√v̂+ε)`` and the gain is 1.
    """
    shape = g.shape
    c1, c2, cv = bias_corrections

    def view(a: jax.Array) -> jax.Array:
        return to_chunks(a, layout)

    # One reciprocal shared by every feature: multiplies, not divides, in the fused loop.
    inv = 1.0 / (jnp.sqrt(view(v) * cv) + eps)
    adam_dir = view(m1) * (c1 * inv)
    d = adam_dir
    if "w1" in head:  # the learned direction correction (absent with direction_correction=False)
        coord = [adam_dir, view(m2) * (c2 * inv), view(g) * inv]
        if param is not None:
            coord.append(view(param))
        w1, w_d = head["w1"], head["w_d"]
        for j in range(w1.shape[1]):
            pre = ctx[:, j : j + 1]  # the chunk's context: broadcast along its coordinates
            for i, f in enumerate(coord):
                pre = pre + w1[i, j] * f
            d = d + w_d[j] * jnp.maximum(pre, 0.0)
    return from_chunks(d * gain[:, None], layout, shape)
