"""How θ's leaves start: dense layers, the discount τ and one CAM layer's projections.

Shared by both variants (:mod:`mnemosyne_core.tensor_context` and
:mod:`mnemosyne_core.coordinate`), so that both draw the same layers the same way:

* a dense layer has ``w ~ N(0, 1/fan_in)`` (unit-variance outputs for unit-variance inputs)
  and ``b = 0``;
* CAM's discount τ must stay positive, so θ holds ``tau_raw`` with ``τ = softplus(tau_raw)``;
  :func:`inverse_softplus` sets ``tau_raw`` so that a fresh θ starts at the configured τ;
* one CAM layer's θ (:func:`init_cam_projections`) is Eq. 2's ``W_Q``, ``W_K``, ``W_V``
  (each with a bias) and ``tau_raw`` (Eq. 4's discount e^{−τ}); DESIGN.md section 2.

Example:
    >>> import jax
    >>> cam = init_cam_projections(jax.random.key(0), 5, 4, 2, init_discount=0.1)
    >>> {name: cam[name]["w"].shape for name in ("q", "k", "v")}
    {'q': (5, 4), 'k': (5, 4), 'v': (5, 2)}
    >>> round(float(jax.nn.softplus(cam["tau_raw"])), 6)   # τ as configured
    0.1
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["dense", "init_cam_projections", "inverse_softplus"]


def inverse_softplus(y: float) -> float:
    """x with softplus(x) = y (> 0): how the positive discount τ is parameterised."""
    return float(y + math.log(-math.expm1(-y)))


def dense(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    """``{"w": (fan_in, fan_out) ~ N(0, 1/fan_in), "b": 0}``."""
    w = jax.random.normal(key, (fan_in, fan_out), jnp.float32) / math.sqrt(fan_in)
    return {"w": w, "b": jnp.zeros((fan_out,), jnp.float32)}


def init_cam_projections(key: jax.Array, width_in: int, width: int, value_width: int,
                         init_discount: float) -> dict:
    """θ of one CAM layer: Eq. 2's projections of ξ_t (width ``width_in``) and τ.

    Queries and keys get ``width`` N (the random features φ act on them), values
    ``value_width`` (the width of the read-out, Eq. 5).
    """
    kq, kk, kv = jax.random.split(key, 3)
    return {
        "q": dense(kq, width_in, width),  # Eq. 2: W_Q
        "k": dense(kk, width_in, width),  # Eq. 2: W_K
        "v": dense(kv, width_in, value_width),  # Eq. 2: W_V
        "tau_raw": jnp.asarray(inverse_softplus(init_discount), jnp.float32),  # Eq. 4: τ = softplus(tau_raw)
    }
