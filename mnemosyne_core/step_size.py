"""Per-tensor step-size rules of the ``tensor`` variant: each tensor's log α, one step at a time.

Every tensor ℓ has a log step size ``log α_ℓ`` relative to the configured α
(``TensorMemory.log_lr``); the update of its coordinates is multiplied by ``exp(log α_ℓ)``. Two
rules move it (config ``hypergradient`` and/or ``memory_step_size``; with both, the hypergradient
moves it first and the memory's read-out then moves it further), and both read the same signal: with u_{t−1} = m̂_{t−1}/(√v̂_t+ε) the previous step's Adam direction,

    cos_t = g_t·u_{t−1} / (‖g_t‖ ‖u_{t−1}‖)        (:func:`hypergradient_sums`, :func:`hypergradient_cosine`)

Since ∂L/∂log α_{t−1} ∝ −g_t·u_{t−1}, its sign says whether the last step was too short (> 0)
or too long (< 0): hypergradient descent on log α (Baydin et al., 2018, "Online Learning Rate
Adaptation with Hypergradient Descent"), made scale-free by normalising to a cosine.

* hypergradient rule (:func:`hypergradient_log_lr`, θ ``hd``)::

      log α ← clip(log α + κ₀·e^{log_kappa}·c + DRIFT_SCALE·drift),  c = cos_t (× ``down`` if < 0)

* memory read-out (:func:`memory_log_lr`, θ ``ctrl``): the cosine is one of
  the HPE token features, CAM remembers it, and each of the tensor's b meta-tokens reads out a
  proposal ``o_j`` (:func:`~mnemosyne_core.tensor_context.tensor_context`)::

      log α ← clip(log α + rate · mean_j tanh(o_j))

The sums come from this step's pass over the gradient, so a new step size applies one step late
(no second pass over the parameters).

Example:
    >>> import jax.numpy as jnp
    >>> sums = jnp.array([[2.0, 4.0, 1.0],     # g·u, g·g, u·u: g = 2u, steps agree
    ...                   [-1.0, 1.0, 1.0],    # g = −u: the last step overshot
    ...                   [0.0, 1.0, 0.0]])    # first step, u = 0
    >>> hypergradient_cosine(sums).tolist()
    [1.0, -1.0, 0.0]
    >>> hd = {"log_kappa": jnp.zeros(()), "drift": jnp.zeros(()), "log_lr0": jnp.zeros(())}
    >>> log_lr = hypergradient_log_lr(hd, jnp.zeros(3), sums, rate=0.1, bounds=(-7.0, 2.3), down=2.0)
    >>> [round(float(x), 6) for x in log_lr]   # backs off twice as fast as it speeds up
    [0.1, -0.2, 0.0]
    >>> memory_log_lr(jnp.zeros((3, 2)), jnp.zeros(3), rate=0.1, bounds=(-7.0, 2.3)).tolist()  # fresh θ
    [0.0, 0.0, 0.0]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["DRIFT_SCALE", "hypergradient_cosine", "hypergradient_log_lr", "hypergradient_sums", "memory_log_lr"]

# Per-step drift of the log step size per unit of θ["hd"]["drift"]: ES perturbs θ
# by σ ≈ 0.02, which must move a 200-step schedule visibly (0.02·0.01·200 = 4 %).
DRIFT_SCALE = 0.01


def hypergradient_sums(g: jax.Array, m1_old: jax.Array, v: jax.Array, gg: jax.Array, *,
                       cv: jax.Array, eps: float) -> jax.Array:
    """``(g·u, g·g, u·u)`` over one tensor, u = m1_old/(√v̂+ε), for :func:`hypergradient_log_lr`.

    ``m1_old`` is the first moment before this step, ``v`` the second after it; ``gg`` = Σg² is
    passed in because the pooled token means already hold it (a second full-size g·g would give g²
    two consumers, and XLA would write it out). Each of the other two sums is its own reduction over
    the tensor's own shape that recomputes what it needs from g, m1_old and v (cheap next to a
    memory pass): a shared full-size intermediate (the head's ``1/(√v̂+ε)``, or u) has several
    consumers, and XLA then writes it out and reads it back. u·u uses (√v̂+ε)² ≈ v̂ + ε² (equal
    wherever √v̂ ≫ ε; it only normalises a cosine).
    """
    # v̂ = cv·v with the scalar cv taken outside each sum, so that neither sum shares a
    # full-size subexpression (cv·v, √(cv·v)) with the other or with the direction.
    root = jnp.sqrt(cv)
    gu = jnp.sum(g * m1_old / (jnp.sqrt(v) + eps / root)) / root
    uu = jnp.sum(m1_old * m1_old / (v + eps * eps / cv)) / cv
    return jnp.stack([gu, gg, uu])


def hypergradient_cosine(sums: jax.Array) -> jax.Array:
    """cos(g_t, u_{t-1}) per tensor from ``sums (L, 3)`` = (g·u, g·g, u·u); 0 where either is 0.

    Positive while successive steps agree (the step could be larger), negative when the new
    gradient undoes the last step (it was too large): the sign of −∂L/∂log α (Baydin et al., 2018).
    """
    dot, gg, uu = sums[:, 0], sums[:, 1], sums[:, 2]
    cos = dot * jax.lax.rsqrt(jnp.maximum(gg * uu, 1e-30))
    return jnp.where(gg * uu > 0, jnp.clip(cos, -1.0, 1.0), 0.0)


def hypergradient_log_lr(hd: dict, log_lr: jax.Array, sums: jax.Array, *, rate: float | jax.Array,
                         bounds: tuple[float, float], down: float = 1.0) -> jax.Array:
    """Next per-tensor log step size from this step's ``sums (L, 3)`` = (g·u, g·g, u·u).

    u is the previous step's direction m̂ₜ₋₁/√v̂ (before this step's update), so
    g·u = −∂L/∂log αₜ₋₁ up to the positive step size: hypergradient descent on
    log α (Baydin et al., 2018), normalised to a cosine so that the rate is
    scale-free. A first step (u = 0) has cosine 0. ``down`` multiplies the rate
    when the cosine is negative: backing off faster than speeding up (as Rprop
    does) damps a loss spike before it compounds.
    """
    cos = hypergradient_cosine(sums)
    cos = jnp.where(cos < 0, down * cos, cos)
    step = rate * jnp.exp(hd["log_kappa"]) * cos + DRIFT_SCALE * hd["drift"]
    return jnp.clip(log_lr + step, bounds[0], bounds[1])


def memory_log_lr(ctrl_out: jax.Array, log_lr: jax.Array, *, rate: float,
                  bounds: tuple[float, float]) -> jax.Array:
    """Next per-tensor log step size from the memory's read-out ``ctrl_out (L, b)``.

    Each meta-token proposes a change ``rate·tanh(out)`` (bounded per step, so no single read can
    throw the step size far); the tensor moves by their mean, inside ``bounds``.
    """
    step = rate * jnp.mean(jnp.tanh(ctrl_out), axis=-1)
    return jnp.clip(log_lr + step, bounds[0], bounds[1])
