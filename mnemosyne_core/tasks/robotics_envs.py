"""Environment adapters: gymnax and brax behind one small, functional interface.

Both libraries are stepped through :class:`EnvAdapter`, which always

* auto-resets a finished episode (so rollouts are a plain ``lax.scan``),
* reports ``terminated`` (a true terminal state: no bootstrap) and ``truncated``
  (a time limit: bootstrap from the value of the real last observation)
  separately, and
* hands back that real last observation as ``final_obs`` before the reset.

The env is chosen by a short name (``ENV_IDS``); brax always uses the
``spring`` backend (cheap to compile on CPU, see ../shared/ENV.md).

Example:
    >>> import jax, jax.numpy as jnp
    >>> env = make_env("gymnax_cartpole")
    >>> obs, state = env.reset(jax.random.key(0))
    >>> obs.shape == (env.obs_dim,)
    True
    >>> step = env.step(jax.random.key(1), state, jnp.asarray(0))
    >>> bool(step.terminated), bool(step.truncated)
    (False, False)
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# short name -> (library, library env id, max episode steps)
ENV_IDS: dict[str, tuple[str, str, int]] = {
    "gymnax_pendulum": ("gymnax", "Pendulum-v1", 200),
    "gymnax_cartpole": ("gymnax", "CartPole-v1", 500),
    "gymnax_acrobot": ("gymnax", "Acrobot-v1", 500),
    "brax_inverted_pendulum": ("brax", "inverted_pendulum", 1000),
    "brax_reacher": ("brax", "reacher", 1000),
}


class UnknownEnvError(KeyError):
    """An env name that is not in :data:`ENV_IDS`."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown env"


class Step(NamedTuple):
    obs: jax.Array  # next observation (already reset if the episode ended)
    state: Any
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_obs: jax.Array  # the real next observation, before any reset


@dataclasses.dataclass(frozen=True)
class EnvAdapter:
    """A reset/step pair plus the shapes a policy needs.

    ``discrete`` envs take an integer action in ``[0, num_actions)``; continuous
    envs take a vector in ``[action_low, action_high]`` of size ``action_dim``.
    """

    name: str
    obs_dim: int
    discrete: bool
    action_dim: int  # number of actions (discrete) or action vector size
    action_low: float
    action_high: float
    max_steps: int
    differentiable: bool  # transitions carry gradients (BPTT surrogate allowed)
    reset: Callable[[jax.Array], tuple[jax.Array, Any]]
    step: Callable[[jax.Array, Any, jax.Array], Step]


def check_env_name(name: str) -> None:
    if name not in ENV_IDS:
        raise UnknownEnvError(f"unknown env {name!r}; valid envs: {', '.join(sorted(ENV_IDS))}")


def make_env(name: str, max_steps: int | None = None, differentiable: bool = False) -> EnvAdapter:
    """Build the adapter for a short env name; ``max_steps`` overrides the time limit."""
    check_env_name(name)
    library, env_id, default_steps = ENV_IDS[name]
    steps = int(max_steps or default_steps)
    if library == "gymnax":
        return _gymnax_env(name, env_id, steps, differentiable)
    if differentiable:
        raise ValueError(f"env {name!r}: the BPTT surrogate is only wired up for gymnax envs")
    return _brax_env(name, env_id, steps)


def _gymnax_env(name: str, env_id: str, max_steps: int, differentiable: bool) -> EnvAdapter:
    import gymnax

    env, params = gymnax.make(env_id)
    params = params.replace(max_steps_in_episode=max_steps)
    if differentiable:
        if not env.supports_transition_gradients:
            raise ValueError(f"env {name!r} has no differentiable transitions; use surrogate='a2c'")
        env = env.with_transition_gradients()
    space = env.action_space(params)
    discrete = not hasattr(space, "low")
    obs_dim = int(env.observation_space(params).shape[0])

    def reset(key):
        return env.reset(key, params)

    def step(key, state, action):
        # gymnax 1.0 splits terminated/truncated and keeps the pre-reset obs.
        obs, state, reward, terminated, truncated, info = env.step(key, state, action, params)
        # A time-limit hit on a terminal step is a termination (nothing to bootstrap).
        truncated = jnp.logical_and(truncated, jnp.logical_not(terminated))
        return Step(obs, state, jnp.asarray(reward, jnp.float32), terminated, truncated,
                    info["final_observation"])

    return EnvAdapter(
        name=name,
        obs_dim=obs_dim,
        discrete=discrete,
        action_dim=int(space.n) if discrete else int(space.shape[0]) if space.shape else 1,
        action_low=0.0 if discrete else float(jnp.min(space.low)),
        action_high=0.0 if discrete else float(jnp.max(space.high)),
        max_steps=max_steps,
        differentiable=differentiable,
        reset=reset,
        step=step,
    )


def _brax_env(name: str, env_id: str, max_steps: int) -> EnvAdapter:
    from brax import envs

    env = envs.get_environment(env_id, backend="spring")

    # Our state keeps only what is needed to step (pipeline state, obs, time);
    # brax's metrics/info dicts differ between reset and step, which would
    # break the select below.
    def reset(key):
        s = env.reset(key)
        return s.obs, (s, jnp.zeros((), jnp.int32))

    def step(key, state, action):
        s, t = state
        nxt = env.step(s, action)
        t = t + 1
        terminated = nxt.done > 0.5
        truncated = jnp.logical_and(t >= max_steps, jnp.logical_not(terminated))
        done = jnp.logical_or(terminated, truncated)
        fresh = env.reset(key)
        nxt = nxt.replace(info=s.info, metrics=s.metrics)  # same tree as `s`
        fresh = fresh.replace(info=s.info, metrics=s.metrics)
        merged = jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, nxt)
        t = jnp.where(done, 0, t)
        return Step(merged.obs, (merged, t), jnp.asarray(nxt.reward, jnp.float32), terminated,
                    truncated, nxt.obs)

    return EnvAdapter(
        name=name,
        obs_dim=int(env.observation_size),
        discrete=False,
        action_dim=int(env.action_size),
        action_low=-1.0,
        action_high=1.0,
        max_steps=max_steps,
        differentiable=False,
        reset=reset,
        step=step,
    )
