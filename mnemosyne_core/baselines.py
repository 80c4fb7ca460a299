"""Baseline optimizers under the same contract as Mnemosyne: an LSTM learned optimizer.

The LSTM optimizer is the classic coordinate-wise design (Andrychowicz et al.
2016): every scalar parameter runs its own copy of a small 2-layer LSTM
(``hidden_size = 20``) whose weights θ are shared by all coordinates. Inputs per
coordinate are the gradient and a momentum, each through the classic
preprocessing with ``p = 10``::

    |g| ≥ e^{-p}:  (log|g| / p, sign g)        otherwise:  (-1, e^{p} g)

The LSTM's read-out is a *correction* on top of an Adam-like skip term::

    update = -exp(θ.log_lr) · (θ.skip · m̂/(√v̂ + ε) + output_scale · LSTM(...))

with ``log_lr = log 1e-3``, ``skip = 1`` and a small random read-out at
initialisation, so a fresh θ already trains like Adam(1e-3) and meta-training
only has to improve on it (the same choice as Mnemosyne's Adam-like head).

Cost: the state holds the hidden and cell vectors of both layers for every
coordinate, ``2 layers × 2 × 20 = 80`` floats per parameter, plus 2 moments —
the classic design's (well-known) memory price, which Mnemosyne's sublinear
memory avoids.

θ lives in the optimizer state (read by ``update``), so a state built from another
θ of the same :class:`LSTMConfig` runs through the same jitted step with no
recompilation. A non-finite gradient gives a zero update and leaves the state
untouched.

Example:
    >>> import jax, jax.numpy as jnp
    >>> config = LSTMConfig()
    >>> theta = init_lstm_theta(jax.random.key(0), config)
    >>> tx = lstm_optimizer(theta, config)
    >>> params = {"w": jnp.ones((3, 4))}
    >>> state = tx.init(params)
    >>> updates, state = jax.jit(tx.update)({"w": jnp.ones((3, 4))}, state, params)
    >>> bool(jnp.all(jnp.abs(updates["w"] + 1e-3) < 1e-4))    # ≈ Adam's first step -lr·sign(g)
    True
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "LSTMConfig",
    "LSTMState",
    "init_lstm_theta",
    "lstm_optimizer",
    "preprocess_gradient",
    "validate_lstm_theta",
]

NUM_INPUTS = 4  # preprocessed gradient (2) + preprocessed bias-corrected momentum (2)


@dataclasses.dataclass(frozen=True)
class LSTMConfig:
    """Static architecture and hyper-parameters of the LSTM optimizer (all fields JSON-able)."""

    hidden_size: int = 20
    num_layers: int = 2
    preprocess_p: float = 10.0
    beta1: float = 0.9  # momentum feature and Adam skip term
    beta2: float = 0.999
    eps: float = 1e-8
    learning_rate: float = 1e-3  # initial exp(θ.log_lr)
    output_scale: float = 0.1  # scale of the LSTM read-out relative to the Adam direction
    init_output_std: float = 0.1  # read-out weights ~ N(0, init_output_std² / hidden_size)

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LSTMConfig.{name} must be a positive int, got {value!r}")
        for name in ("preprocess_p", "eps", "learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"LSTMConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ValueError(f"LSTMConfig.{name} must be in [0, 1), got {value!r}")
        for name in ("output_scale", "init_output_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"LSTMConfig.{name} must be a finite number >= 0, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LSTMConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown LSTMConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class LSTMState(NamedTuple):
    """Optimizer state; ``hidden`` holds ``(layers, 2, size, hidden_size)`` (h, c) per parameter leaf."""

    count: jax.Array  # int32: applied (finite) steps
    skipped: jax.Array  # int32: steps skipped because of non-finite gradients
    theta: Any  # the LSTM weights in use
    m: Any  # first moment, pytree like params (float32)
    v: Any  # second moment, pytree like params (float32)
    hidden: tuple[jax.Array, ...]


def preprocess_gradient(g: jax.Array, p: float = 10.0) -> tuple[jax.Array, jax.Array]:
    """Classic log/sign preprocessing: two features of similar scale whatever ``|g|``."""
    g = g.astype(jnp.float32)
    big = jnp.abs(g) >= math.exp(-p)
    # The where on the log's argument keeps log(0) (and its NaN gradient) out of the graph.
    log_mag = jnp.log(jnp.where(big, jnp.abs(g), 1.0)) / p
    return jnp.where(big, log_mag, -1.0), jnp.where(big, jnp.sign(g), math.exp(p) * g)


def init_lstm_theta(key: jax.Array, config: LSTMConfig) -> dict:
    """Fresh θ: random LSTM, small random read-out, Adam skip term at ``config.learning_rate``."""
    if not isinstance(config, LSTMConfig):
        raise TypeError(f"config must be an LSTMConfig, got {type(config).__name__}")
    h = config.hidden_size
    keys = jax.random.split(key, 2 * config.num_layers + 1)
    theta: dict[str, Any] = {}
    for i in range(config.num_layers):
        n_in = NUM_INPUTS if i == 0 else h
        # Forget-gate bias 1: the classic trick so memories persist from the start.
        bias = jnp.zeros((4, h), jnp.float32).at[1].set(1.0).reshape(4 * h)
        theta[f"lstm_{i}"] = {
            "wx": jax.random.normal(keys[2 * i], (n_in, 4 * h), jnp.float32) / math.sqrt(n_in),
            "wh": jax.random.normal(keys[2 * i + 1], (h, 4 * h), jnp.float32) / math.sqrt(h),
            "b": bias,
        }
    theta["out"] = {
        "w": jax.random.normal(keys[-1], (h,), jnp.float32) * (config.init_output_std / math.sqrt(h)),
        "b": jnp.zeros((), jnp.float32),
    }
    theta["log_lr"] = jnp.asarray(math.log(config.learning_rate), jnp.float32)
    theta["skip"] = jnp.ones((), jnp.float32)
    return theta


def validate_lstm_theta(theta: Any, config: LSTMConfig) -> None:
    """Raise ``ValueError`` naming the first θ leaf whose structure, shape or dtype is wrong."""
    expected = jax.eval_shape(lambda: init_lstm_theta(jax.random.key(0), config))
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(theta)
    if got_def != exp_def:
        exp_paths = {jax.tree_util.keystr(p) for p, _ in exp_leaves}
        got_paths = {jax.tree_util.keystr(p) for p, _ in got_leaves}
        raise ValueError(
            f"LSTM theta does not match the config's structure: missing {sorted(exp_paths - got_paths)}, "
            f"unexpected {sorted(got_paths - exp_paths)}"
        )
    for (path, e), (_, g) in zip(exp_leaves, got_leaves):
        shape = tuple(np.shape(g))
        dtype = g.dtype if hasattr(g, "dtype") else np.asarray(g).dtype
        if shape != tuple(e.shape) or dtype != e.dtype:
            raise ValueError(
                f"LSTM theta leaf {jax.tree_util.keystr(path)}: expected shape {tuple(e.shape)} "
                f"dtype {e.dtype}, got shape {shape} dtype {dtype}"
            )


def _lstm_step(theta: dict, x: jax.Array, hidden: jax.Array, num_layers: int) -> tuple[jax.Array, jax.Array]:
    """One step of the stacked LSTM for ``n`` coordinates: ``x (n, in)``, ``hidden (L, 2, n, H)``."""
    new_hidden = []
    inp = x
    for i in range(num_layers):
        p = theta[f"lstm_{i}"]
        h_prev, c_prev = hidden[i, 0], hidden[i, 1]
        gates = inp @ p["wx"] + h_prev @ p["wh"] + p["b"]
        i_g, f_g, g_g, o_g = jnp.split(gates, 4, axis=-1)
        c = jax.nn.sigmoid(f_g) * c_prev + jax.nn.sigmoid(i_g) * jnp.tanh(g_g)
        h = jax.nn.sigmoid(o_g) * jnp.tanh(c)
        new_hidden.append(jnp.stack([h, c]))
        inp = h
    out = inp @ theta["out"]["w"] + theta["out"]["b"]
    return out, jnp.stack(new_hidden)


def lstm_optimizer(theta: Any, config: LSTMConfig) -> optax.GradientTransformationExtraArgs:
    """The LSTM learned optimizer as an optax transformation (θ kept in the state).

    Raises ``ValueError`` if θ does not match ``config``.
    """
    if not isinstance(config, LSTMConfig):
        raise TypeError(f"config must be an LSTMConfig, got {type(config).__name__}")
    validate_lstm_theta(theta, config)
    theta = jax.tree.map(jnp.asarray, theta)
    n_layers, h_size, p = config.num_layers, config.hidden_size, config.preprocess_p
    b1, b2 = config.beta1, config.beta2

    def init_fn(params: Any) -> LSTMState:
        zeros = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
        hidden = tuple(jnp.zeros((n_layers, 2, int(np.prod(jnp.shape(x))), h_size), jnp.float32)
                       for x in jax.tree.leaves(params))
        return LSTMState(count=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
                         theta=theta, m=zeros, v=zeros, hidden=hidden)

    def update_fn(grads: Any, state: LSTMState, params: Any = None, *, loss: Any = None, **extra: Any):
        del loss, extra  # the LSTM needs no extra inputs; unknown keywords are ignored (optax contract)
        validate_lstm_theta(state.theta, config)
        g_leaves, treedef = jax.tree.flatten(grads)
        p_leaves = treedef.flatten_up_to(params) if params is not None else [None] * len(g_leaves)
        if len(state.hidden) != len(g_leaves):
            raise ValueError(f"state was built for {len(state.hidden)} parameter leaves, grads have {len(g_leaves)}")
        m_leaves, v_leaves = treedef.flatten_up_to(state.m), treedef.flatten_up_to(state.v)
        # One non-finite entry anywhere skips the whole step: zero update, state kept.
        ok = jnp.array(True)
        for g in g_leaves:
            ok = ok & jnp.all(jnp.isfinite(g))
        count = state.count + ok.astype(jnp.int32)
        t = count.astype(jnp.float32)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        th = state.theta
        lr = jnp.exp(th["log_lr"])

        new_m, new_v, new_hidden, updates = [], [], [], []
        for g, prm, m, v, hid in zip(g_leaves, p_leaves, m_leaves, v_leaves, state.hidden):
            g32 = jnp.where(ok, g.astype(jnp.float32), 0.0)  # keep NaNs out of every branch
            m1 = b1 * m + (1 - b1) * g32
            v1 = b2 * v + (1 - b2) * g32 * g32
            m_hat = m1 / bc1
            adam_dir = m_hat / (jnp.sqrt(v1 / bc2) + config.eps)
            pg, pm = preprocess_gradient(g32, p), preprocess_gradient(m_hat, p)
            x = jnp.stack([pg[0], pg[1], pm[0], pm[1]], axis=-1).reshape(-1, NUM_INPUTS)
            out, hid1 = _lstm_step(th, x, hid, n_layers)
            step = -lr * (th["skip"] * adam_dir + config.output_scale * out.reshape(g.shape))
            out_dtype = prm.dtype if prm is not None else g.dtype
            updates.append(jnp.where(ok, step, 0.0).astype(out_dtype))
            new_m.append(jnp.where(ok, m1, m))
            new_v.append(jnp.where(ok, v1, v))
            new_hidden.append(jnp.where(ok, hid1, hid))

        new_state = LSTMState(
            count=count,
            skipped=state.skipped + (~ok).astype(jnp.int32),
            theta=state.theta,
            m=treedef.unflatten(new_m),
            v=treedef.unflatten(new_v),
            hidden=tuple(new_hidden),
        )
        return treedef.unflatten(updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
