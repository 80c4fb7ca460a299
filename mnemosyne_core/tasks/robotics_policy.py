"""Policy MLPs, vmapped rollouts and the surrogate losses that train them.

The parameters are a plain dict so any optax-style optimizer (Adam, a learned
optimizer) can update them::

    {"pi": [layers...], "v": [layers...], "log_std": (action_dim,)}

Two surrogates (both give a gradient *for the optimizer under test*; the
policy itself is never trained by ES):

* ``"a2c"`` — policy gradient with a learned value baseline and GAE. Actions
  are sampled and treated as constants (score-function estimator); the
  value head is trained jointly by regression. Time-limit truncations (and
  the end of the rollout window) bootstrap from ``V(final_obs)``; terminal
  states do not.
* ``"bptt"`` — reparameterised Gaussian actions, gradient of the mean reward
  back-propagated through differentiable transitions (gymnax Pendulum).

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks.robotics_envs import make_env
    >>> env = make_env("gymnax_cartpole")
    >>> params = init_policy(jax.random.key(0), env, hidden=(8,))
    >>> sorted(params)
    ['log_std', 'pi', 'v']
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mnemosyne_core.tasks.robotics_envs import EnvAdapter

Params = dict[str, Any]


def _init_mlp(key: jax.Array, sizes: Sequence[int], last_scale: float) -> list[dict[str, jax.Array]]:
    layers = []
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, n_in, n_out) in enumerate(zip(keys, sizes[:-1], sizes[1:])):
        # LeCun-normal hidden layers; a small last layer starts the policy near
        # uniform/zero-mean, which is the usual "random policy" baseline.
        scale = last_scale if i == len(sizes) - 2 else 1.0
        w = jax.random.normal(k, (n_in, n_out), jnp.float32) * scale / jnp.sqrt(n_in)
        layers.append({"w": w, "b": jnp.zeros((n_out,), jnp.float32)})
    return layers


def mlp(layers: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def init_policy(key: jax.Array, env: EnvAdapter, hidden: Sequence[int]) -> Params:
    k_pi, k_v = jax.random.split(key)
    sizes = [env.obs_dim, *hidden]
    return {
        "pi": _init_mlp(k_pi, [*sizes, env.action_dim], last_scale=0.01),
        "v": _init_mlp(k_v, [*sizes, 1], last_scale=1.0),
        "log_std": jnp.full((env.action_dim,), -0.5, jnp.float32),
    }


class ObsNorm(NamedTuple):
    mean: jax.Array
    std: jax.Array

    def __call__(self, obs: jax.Array) -> jax.Array:
        return jnp.clip((obs - self.mean) / self.std, -10.0, 10.0)


def _scale_action(env: EnvAdapter, raw: jax.Array) -> jax.Array:
    # Policies act in (-1, 1) through tanh; the env's box is an affine image of
    # that. tanh rather than clipping: a saturated action still has a gradient
    # (BPTT would otherwise get stuck at the bounds). The log-prob is that of
    # the raw Gaussian sample — the squashing is part of the environment.
    half = 0.5 * (env.action_high - env.action_low)
    mid = 0.5 * (env.action_high + env.action_low)
    return mid + half * jnp.tanh(raw)


class Trajectory(NamedTuple):
    reward: jax.Array  # (T, N)
    terminated: jax.Array
    truncated: jax.Array
    logp: jax.Array
    entropy: jax.Array
    obs: jax.Array  # raw observations (T, N, obs_dim)
    final_obs: jax.Array  # the real next observation of each step (before a reset)


def rollout(
    params: Params,
    env: EnvAdapter,
    norm: ObsNorm,
    key: jax.Array,
    num_envs: int,
    horizon: int,
    mode: str = "sample",
) -> Trajectory:
    """Run ``num_envs`` episodes from reset for ``horizon`` steps.

    ``mode``: ``"sample"`` (score-function, actions are constants),
    ``"reparam"`` (Gaussian noise added to a differentiable mean) or
    ``"greedy"`` (argmax / mean action, for evaluation).
    """
    k_reset, k_steps = jax.random.split(key)
    obs, state = jax.vmap(env.reset)(jax.random.split(k_reset, num_envs))

    def body(carry, k):
        obs, state = carry
        k_act, k_env = jax.random.split(k)
        out = mlp(params["pi"], norm(obs))
        if env.discrete:
            logits = jax.nn.log_softmax(out)
            if mode == "greedy":
                action = jnp.argmax(logits, -1)
            else:
                action = jax.random.categorical(k_act, jax.lax.stop_gradient(logits))
            logp = jnp.take_along_axis(logits, action[:, None], -1)[:, 0]
            entropy = -jnp.sum(jnp.exp(logits) * logits, -1)
            env_action = action
        else:
            log_std = jnp.broadcast_to(params["log_std"], out.shape)
            eps = jax.random.normal(k_act, out.shape)
            if mode == "greedy":
                raw = out
            elif mode == "reparam":
                raw = out + jnp.exp(log_std) * eps
            else:
                raw = jax.lax.stop_gradient(out + jnp.exp(log_std) * eps)
            logp = jnp.sum(-0.5 * ((raw - out) / jnp.exp(log_std)) ** 2 - log_std, -1)
            entropy = jnp.sum(log_std, -1)
            env_action = _scale_action(env, raw)
        step = jax.vmap(env.step)(jax.random.split(k_env, num_envs), state, env_action)
        out_t = (step.reward, step.terminated, step.truncated, logp, entropy, obs, step.final_obs)
        return (step.obs, step.state), out_t

    _, outs = jax.lax.scan(body, (obs, state), jax.random.split(k_steps, horizon))
    return Trajectory(*outs)


def first_episode_mask(traj: Trajectory) -> tuple[jax.Array, jax.Array]:
    """(alive, done) as floats (T, N); alive is 1 up to and including the step
    that ends each env's first episode in the window, 0 after (a new episode)."""
    done = jnp.logical_or(traj.terminated, traj.truncated).astype(jnp.float32)
    ended_before = jnp.cumsum(done, 0) - done
    return (ended_before < 0.5).astype(jnp.float32), done


def first_episode_return(traj: Trajectory) -> jax.Array:
    """Undiscounted return of each env's first episode in the window, shape (N,)."""
    alive, _ = first_episode_mask(traj)
    return jnp.sum(traj.reward * alive, 0)


def value_fn(v_params: Any, norm: ObsNorm, obs: jax.Array) -> jax.Array:
    return mlp(v_params, norm(obs))[..., 0]


def gae(reward: jax.Array, terminated: jax.Array, truncated: jax.Array, value: jax.Array,
        final_value: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimates and value targets (both gradient-free)."""
    value = jax.lax.stop_gradient(value)
    # Terminal: no future value. Truncated (time limit or end of window): bootstrap.
    next_value = jnp.where(terminated, 0.0, jax.lax.stop_gradient(final_value))
    delta = reward + gamma * next_value - value
    cont = 1.0 - jnp.logical_or(terminated, truncated).astype(jnp.float32)

    def back(adv_next, x):
        d, c = x
        adv = d + gamma * lam * c * adv_next
        return adv, adv

    _, adv = jax.lax.scan(back, jnp.zeros_like(delta[0]), (delta, cont), reverse=True)
    return jax.lax.stop_gradient(adv), jax.lax.stop_gradient(adv + value)


def _critic(params: Params, norm: ObsNorm, traj: Trajectory, gamma: float, lam: float,
            reward_scale: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Advantages, and the value regression loss on rollout states."""
    obs = jax.lax.stop_gradient(traj.obs)
    value = value_fn(params["v"], norm, obs)
    final_value = value_fn(params["v"], norm, jax.lax.stop_gradient(traj.final_obs))
    reward = jax.lax.stop_gradient(traj.reward) * reward_scale
    adv, target = gae(reward, traj.terminated, traj.truncated, value, final_value, gamma, lam)
    return adv, 0.5 * jnp.mean((value - target) ** 2), value


def a2c_loss(params: Params, norm: ObsNorm, traj: Trajectory, gamma: float, lam: float,
             reward_scale: float, vf_coef: float, ent_coef: float) -> jax.Array:
    adv, vf, _ = _critic(params, norm, traj, gamma, lam, reward_scale)
    # Per-batch advantage normalisation keeps the gradient scale independent of
    # the env's reward scale, so one optimizer serves all robotics tasks.
    adv = (adv - adv.mean()) / (adv.std() + 1e-6)
    pg = -jnp.mean(traj.logp * adv)
    return pg + vf_coef * vf - ent_coef * jnp.mean(traj.entropy)


def bptt_loss(params: Params, norm: ObsNorm, traj: Trajectory, gamma: float, lam: float,
              reward_scale: float, vf_coef: float, bootstrap: bool = True) -> jax.Array:
    """Short-horizon BPTT with a value bootstrap (SHAC-style).

    The actor maximises the discounted reward of each env's first episode in
    the window plus ``gamma * V(final_obs)`` where that episode is truncated
    (by the env's time limit or by the window end) — the critic's parameters
    are held fixed there, the gradient flows through the state. The critic is
    trained by TD(lambda) regression like in ``a2c``.
    """
    _, vf, _ = _critic(params, norm, traj, gamma, lam, reward_scale)
    horizon = traj.reward.shape[0]
    alive, done = first_episode_mask(traj)
    last = jnp.zeros((horizon, 1)).at[-1].set(1.0)
    end = jnp.maximum(done, last)
    if bootstrap:
        tail = jnp.where(traj.terminated, 0.0,
                         value_fn(jax.lax.stop_gradient(params["v"]), norm, traj.final_obs))
    else:  # plain truncated BPTT: the window's reward only
        tail = jnp.zeros_like(traj.reward)
    discount = gamma ** jnp.arange(horizon, dtype=jnp.float32)[:, None]
    ret = jnp.sum(discount * alive * (traj.reward * reward_scale + gamma * end * tail), 0)
    return -jnp.mean(ret) / horizon + vf_coef * vf
