"""Robotics tasks: a policy MLP trained by the optimizer under test.

Registered on import (``make_task`` imports this module lazily and skips it
when gymnax/brax are not installed):

=========================  ===============================  ==========
task name                  environment                      surrogate
=========================  ===============================  ==========
``gymnax_pendulum``        gymnax ``Pendulum-v1``           ``bptt``
``gymnax_cartpole``        gymnax ``CartPole-v1``           ``a2c``
``gymnax_acrobot``         gymnax ``Acrobot-v1``            ``a2c``
``brax_inverted_pendulum`` brax ``inverted_pendulum`` spring ``a2c``
``brax_reacher``           brax ``reacher`` spring          ``a2c``
=========================  ===============================  ==========

A batch is a rollout key: ``loss(params, key)`` rolls the current policy out in
``num_envs`` vmapped envs for ``horizon`` steps and returns the surrogate.
The *value* of the loss is replaced (without changing its gradient) by the
per-step regret of each env's first episode in the window,
``reward_scale * (reward_max - return / horizon) + LOSS_FLOOR`` (always > 0;
steps after a termination count as zero reward), so loss curves — and
meta-objectives built from them, e.g. log loss ratios — measure how well the
policy does, not the surrogate's arbitrary level. ``evaluate`` runs the greedy policy for a full episode on a fixed key.

Observations are normalised with fixed statistics from a rollout of the initial
(near-random) policy on ``norm_seed`` — deterministic, and identical in every
process that builds the same :class:`TaskSpec`.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks import make_task
    >>> task = make_task({"name": "gymnax_cartpole", "kwargs": {"num_envs": 4, "horizon": 16}})
    >>> params = task.init(jax.random.key(0))
    >>> loss = task.loss(params, task.sample_batch(jax.random.key(1)))
    >>> bool(jax.numpy.isfinite(loss))
    True
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from mnemosyne_core.tasks.base import TaskSpec, register_task
from mnemosyne_core.tasks.robotics_envs import (
    ENV_IDS,
    UnknownEnvError,
    check_env_name,
    make_env,
)
from mnemosyne_core.tasks.robotics_policy import (
    ObsNorm,
    a2c_loss,
    bptt_loss,
    first_episode_return,
    init_policy,
    rollout,
)

__all__ = ["ENV_DEFAULTS", "FAMILIES", "LOSS_FLOOR", "RoboticsFamily", "RoboticsTask", "UnknownEnvError", "robotics_spec"]

# Per-env defaults, chosen so a few hundred updates visibly improve the policy.
# Per-env defaults, chosen so a few hundred Adam updates visibly improve the
# policy. ``reward_max`` bounds the per-step reward from above (see ``_regret``).
ENV_DEFAULTS: dict[str, dict[str, Any]] = {
    "gymnax_pendulum": {"surrogate": "bptt", "horizon": 32, "gamma": 0.95, "reward_scale": 0.1,
                        "reward_max": 0.0, "eval_steps": 200},
    "gymnax_cartpole": {"surrogate": "a2c", "horizon": 64, "reward_scale": 0.1, "reward_max": 1.0,
                        "eval_steps": 500},
    "gymnax_acrobot": {"surrogate": "a2c", "horizon": 64, "reward_scale": 0.1, "reward_max": 0.0,
                       "eval_steps": 500},
    "brax_inverted_pendulum": {"surrogate": "a2c", "horizon": 128, "reward_scale": 0.1,
                               "reward_max": 1.0, "eval_steps": 200},
    "brax_reacher": {"surrogate": "a2c", "horizon": 64, "reward_scale": 1.0, "reward_max": 0.0,
                     "eval_steps": 200},
}

# Added to every reported loss so a solved task (regret 0) keeps log-ratio
# meta-objectives finite.
LOSS_FLOOR = 1e-2


class RoboticsTask:
    """Train an MLP policy on ``env`` from a policy-gradient/BPTT surrogate.

    Args:
        env: one of :data:`ENV_DEFAULTS` (``check_env_name`` lists them).
        hidden: hidden widths of the policy and value MLPs.
        num_envs: parallel envs per batch; horizon: steps per rollout window.
        surrogate: ``"a2c"`` or ``"bptt"`` (differentiable gymnax envs only).
        gamma, gae_lambda, vf_coef, ent_coef, reward_scale: loss constants.
        eval_envs, eval_steps, eval_seed: the fixed greedy evaluation.
        norm_seed: key of the rollout that fixes the observation statistics.
        bootstrap: ``bptt`` only — add ``gamma * V(final_obs)`` at the window end.
    """

    def __init__(self, env: str, hidden: Sequence[int] = (32, 32), num_envs: int = 16,
                 horizon: int | None = None, surrogate: str | None = None, gamma: float | None = None,
                 gae_lambda: float = 0.95, vf_coef: float = 0.5, ent_coef: float = 0.0,
                 reward_scale: float | None = None, eval_envs: int = 8,
                 eval_steps: int | None = None, eval_seed: int = 12345, norm_seed: int = 0,
                 bootstrap: bool | None = None):
        check_env_name(env)
        defaults = ENV_DEFAULTS[env]
        self.surrogate = surrogate or defaults["surrogate"]
        if self.surrogate not in ("a2c", "bptt"):
            raise ValueError(f"surrogate must be 'a2c' or 'bptt', got {self.surrogate!r}")
        self.name = env
        self.hidden = tuple(int(h) for h in hidden)
        self.num_envs, self.eval_envs = int(num_envs), int(eval_envs)
        self.horizon = int(horizon or defaults["horizon"])
        self.eval_steps = int(eval_steps or defaults["eval_steps"])
        self.gamma = float(gamma if gamma is not None else defaults.get("gamma", 0.99))
        self.gae_lambda = float(gae_lambda)
        self.bootstrap = bool(bootstrap if bootstrap is not None else defaults.get("bootstrap", True))
        self.vf_coef, self.ent_coef = float(vf_coef), float(ent_coef)
        self.reward_scale = float(reward_scale if reward_scale is not None else defaults["reward_scale"])
        self.reward_max = float(defaults["reward_max"])
        self.eval_key = jax.random.key(int(eval_seed))
        # The env's own time limit is the evaluation episode length, so that a
        # full greedy episode is truncated exactly where the env says.
        self.env = make_env(env, max_steps=self.eval_steps, differentiable=self.surrogate == "bptt")
        self.norm = self._observation_stats(jax.random.key(int(norm_seed)))

    @property
    def env_steps_per_batch(self) -> int:
        return self.num_envs * self.horizon

    def _observation_stats(self, key: jax.Array) -> ObsNorm:
        identity = ObsNorm(jnp.zeros(self.env.obs_dim), jnp.ones(self.env.obs_dim))
        k_init, k_roll = jax.random.split(key)
        traj = rollout(self.init(k_init), self.env, identity, k_roll, self.num_envs, self.horizon)
        obs = traj.obs.reshape(-1, self.env.obs_dim)
        # Floor the std so constant features (e.g. a fixed target) are not blown up.
        return ObsNorm(obs.mean(0), jnp.maximum(obs.std(0), 1e-2))

    def init(self, key: jax.Array) -> dict[str, Any]:
        return init_policy(key, self.env, self.hidden)

    def sample_batch(self, key: jax.Array) -> jax.Array:
        # The batch is the rollout key: the data depend on the current policy.
        return key

    def loss(self, params: dict[str, Any], batch: jax.Array) -> jax.Array:
        mode = "reparam" if self.surrogate == "bptt" else "sample"
        traj = rollout(params, self.env, self.norm, batch, self.num_envs, self.horizon, mode)
        if self.surrogate == "bptt":
            surrogate = bptt_loss(params, self.norm, traj, self.gamma, self.gae_lambda,
                                  self.reward_scale, self.vf_coef, self.bootstrap)
        else:
            surrogate = a2c_loss(params, self.norm, traj, self.gamma, self.gae_lambda,
                                 self.reward_scale, self.vf_coef, self.ent_coef)
        score = self._regret(jnp.mean(first_episode_return(traj)), self.horizon)
        # value = score, gradient = d surrogate (see the module docstring)
        return surrogate + jax.lax.stop_gradient(score - surrogate)

    def episode_return(self, params: dict[str, Any], key: jax.Array) -> jax.Array:
        """Mean undiscounted return of one full greedy episode per eval env."""
        traj = rollout(params, self.env, self.norm, key, self.eval_envs, self.eval_steps, "greedy")
        return jnp.mean(first_episode_return(traj))

    def evaluate(self, params: dict[str, Any]) -> dict[str, jax.Array]:
        ret = self.episode_return(params, self.eval_key)
        return {"test_loss": self._regret(ret, self.eval_steps), "return": ret}

    def _regret(self, episode_return: jax.Array, steps: int) -> jax.Array:
        return self.reward_scale * (self.reward_max - episode_return / steps) + LOSS_FLOOR


def _register(name: str) -> None:
    register_task(name)(lambda **kwargs: RoboticsTask(env=name, **kwargs))


for _name in ENV_IDS:
    _register(_name)


def robotics_spec(env: str, **kwargs: Any) -> TaskSpec:
    """The :class:`TaskSpec` of a robotics task, with a readable error for bad names."""
    check_env_name(env)
    return TaskSpec(env, kwargs)


class RoboticsFamily:
    """Samples robotics task specs (env, policy width, rollout shape) from a key.

    Example:
        >>> import jax
        >>> FAMILIES["robotics_gymnax"].sample(jax.random.key(0)).name in ENV_IDS
        True
    """

    def __init__(self, name: str, envs: Sequence[str], hidden_choices: Sequence[int] = (16, 32),
                 num_envs: int = 8, horizon: int = 32, extra: Mapping[str, Any] | None = None):
        for env in envs:
            check_env_name(env)
        self.name = name
        self.envs = tuple(envs)
        self.hidden_choices = tuple(hidden_choices)
        self.num_envs, self.horizon = num_envs, horizon
        self.extra = dict(extra or {})

    def sample(self, key: jax.Array) -> TaskSpec:
        k_env, k_width = jax.random.split(key)
        env = self.envs[int(jax.random.randint(k_env, (), 0, len(self.envs)))]
        width = self.hidden_choices[int(jax.random.randint(k_width, (), 0, len(self.hidden_choices)))]
        # Few distinct specs on purpose: equal specs share one compiled inner step.
        kwargs = {"hidden": [width, width], "num_envs": self.num_envs, "horizon": self.horizon,
                  **self.extra}
        return TaskSpec(env, kwargs)


FAMILIES: dict[str, RoboticsFamily] = {
    "robotics_gymnax": RoboticsFamily(
        "robotics_gymnax", ("gymnax_pendulum", "gymnax_cartpole", "gymnax_acrobot")),
    "robotics_brax": RoboticsFamily(
        "robotics_brax", ("brax_inverted_pendulum", "brax_reacher"), num_envs=4, horizon=32),
}
