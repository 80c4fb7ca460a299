"""The paper-faithful ``coordinate`` variant: every scalar parameter is its own CAM stream.

θ (CAM projections, τ, head) is shared by all coordinates; each coordinate keeps its own
memory (feature-major, :func:`~mnemosyne_core.cam.cam_init_feature_major`, ``r·(e+2)`` floats).
Per step and coordinate, with ξ_t the preprocessed gradient and momentum (:func:`preprocess`;
plus log(loss/first loss) with ``use_loss_feature``), DESIGN.md section 2::

    q_t = W_Q ξ_t,  k_t = W_K ξ_t,  v_t = W_V ξ_t                         (Eq. 2)
    N_t = e^{−τ} N_{t−1} + φ(k_t) v_tᵀ,  Ψ_t = e^{−τ} Ψ_{t−1} + φ(k_t)     (Eq. 4)
    r_t = N_tᵀ φ(q_t) / (φ(q_t)ᵀ Ψ_t)                                      (Eq. 5)
    h = ReLU(W_h [r_t, ξ_t] + b_h)
    update ∝ (m̂/(√v̂+ε) + w_d·h) · exp(β·(w_s·h + b_s))

The head's output weights (``w_d``, ``w_s``, ``b_s``) start at zero, so a fresh θ is Adam. The
widths are tiny (N = 2, r = 4), so everything is unrolled over them into elementwise arrays of
the parameter's shape: no per-coordinate matrices, which XLA would run as tiny batched matmuls.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from mnemosyne_core.cam import cam_init_feature_major
    >>> from mnemosyne_core.favor import orthogonal_directions
    >>> theta = init_coordinate_theta(jax.random.key(0), num_inputs=4, width=2, value_width=1,
    ...                               head_hidden=4, init_discount=0.1)
    >>> g = jnp.array([0.5, -2e-5, 0.0])
    >>> [[round(float(a), 3) for a in x] for x in preprocess(g, 10.0)]   # (log|g|/p, sign g) or (−1, e^p g)
    [[-0.069, -1.0, -1.0], [1.0, -0.441, 0.0]]
    >>> inputs = [*preprocess(g, 10.0), *preprocess(g, 10.0)]
    >>> memory = cam_init_feature_major(g.shape, 4, 1)
    >>> omega = orthogonal_directions(jax.random.key(1), 2, 2)
    >>> d, memory = coordinate_cam(theta, inputs, jnp.sign(g), memory, omega, magnitude_scale=1.0)
    >>> d.tolist()           # fresh θ: the Adam direction it was given
    [1.0, -1.0, 0.0]
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mnemosyne_core.cam import CAMState, cam_step_feature_major
from mnemosyne_core.initializers import dense, init_cam_projections

__all__ = ["coordinate_cam", "init_coordinate_theta", "preprocess"]


def _zero_head_out(hidden: int) -> dict[str, jax.Array]:
    # The learned correction starts at exactly zero: fresh θ == Adam.
    return {
        "w_d": jnp.zeros((hidden,), jnp.float32),
        "w_s": jnp.zeros((hidden,), jnp.float32),
        "b_s": jnp.zeros((), jnp.float32),
    }


def init_coordinate_theta(
    key: jax.Array, *, num_inputs: int, width: int, value_width: int, head_hidden: int, init_discount: float
) -> dict:
    """θ of the ``coordinate`` variant: CAM projections + τ and the head."""
    k_cam, k_h = jax.random.split(key)
    hidden = dense(k_h, value_width + num_inputs, head_hidden)  # reads [r_t (Eq. 5), ξ_t]
    return {
        "cam": init_cam_projections(k_cam, num_inputs, width, value_width, init_discount),
        "head": {"w_h": hidden["w"], "b_h": hidden["b"], **_zero_head_out(head_hidden)},
    }


def preprocess(x: jax.Array, p: float) -> tuple[jax.Array, jax.Array]:
    """Classic learned-optimizer input scaling (Andrychowicz et al.), two channels.

    ``(log|x|/p, sign x)`` if ``|x| ≥ e^{-p}``, else ``(-1, e^{p} x)``: scale-free
    for large inputs, linear near zero.
    """
    big = jnp.abs(x) >= math.exp(-p)
    log_abs = jnp.log(jnp.maximum(jnp.abs(x), math.exp(-p))) / p
    return jnp.where(big, log_abs, -1.0), jnp.where(big, jnp.sign(x), math.exp(p) * x)


def _lin(w: jax.Array, b: jax.Array, xs: list[jax.Array], col: int) -> jax.Array:
    """Column ``col`` of ``stack(xs) @ w + b``, unrolled: elementwise multiply-adds."""
    out = b[col]
    for i, x in enumerate(xs):
        out = out + w[i, col] * x
    return out


def _log_features(z: list[jax.Array], omega: jax.Array) -> list[jax.Array]:
    """:func:`~mnemosyne_core.favor.log_hyperbolic_features`, unrolled over the tiny widths."""
    num, dim = omega.shape
    base = -0.5 * sum(za * za for za in z) - 0.5 * math.log(2 * num)
    proj = [sum(omega[j, a] * z[a] for a in range(dim)) for j in range(num)]
    return [base + p for p in proj] + [base - p for p in proj]


def coordinate_cam(
    theta: dict,
    inputs: list[jax.Array],
    adam_dir: jax.Array,
    memory: CAMState,
    omega: jax.Array,
    *,
    magnitude_scale: float,
) -> tuple[jax.Array, CAMState]:
    """One ``coordinate``-variant step: every coordinate is its own CAM stream.

    ``inputs``: per-coordinate feature arrays (the preprocessed gradient and
    momentum); ``memory``: feature-major CAM state
    (:func:`~mnemosyne_core.cam.cam_init_feature_major`). Everything is unrolled
    over the tiny widths into elementwise arrays (Eqs. 2, 4, 5).
    """
    cam = theta["cam"]
    width = cam["q"]["w"].shape[-1]
    # N^{-1/4} on both q and k: φ(q)ᵀφ(k) then estimates exp(qᵀk/√N), softmax attention's temperature.
    scale = width ** -0.25
    q = [_lin(cam["q"]["w"], cam["q"]["b"], inputs, a) * scale for a in range(width)]  # Eq. 2: q_t = W_Q ξ_t
    k = [_lin(cam["k"]["w"], cam["k"]["b"], inputs, a) * scale for a in range(width)]  # Eq. 2: k_t = W_K ξ_t
    v = [_lin(cam["v"]["w"], cam["v"]["b"], inputs, i) for i in range(cam["v"]["w"].shape[-1])]  # Eq. 2: v_t
    tau = jax.nn.softplus(cam["tau_raw"])
    # Eq. 4 (write φ(k_t) v_tᵀ with discount e^{−τ}) then Eq. 5 (read with φ(q_t)), in log-features.
    memory, read = cam_step_feature_major(memory, _log_features(q, omega), _log_features(k, omega), v, tau)
    head = theta["head"]
    h_in = read + list(inputs)
    d, s = adam_dir, head["b_s"]
    for j in range(head["w_h"].shape[-1]):
        h = jnp.maximum(_lin(head["w_h"], head["b_h"], h_in, j), 0.0)
        d = d + head["w_d"][j] * h  # direction: Adam's plus the learned correction
        s = s + head["w_s"][j] * h  # log-magnitude
    return d * jnp.exp(magnitude_scale * s), memory
