"""``MnemosyneConfig``: the static architecture and hyper-parameters of a Mnemosyne optimizer.

θ (the meta-learned weights) is separate; a config is JSON-able and travels in
checkpoints and registry metadata as the optimizer's architecture spec.

Example:
    >>> config = MnemosyneConfig(variant="coordinate")
    >>> MnemosyneConfig.from_dict(config.to_dict()) == config
    True
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

__all__ = ["MEMORY_INPUTS", "VARIANTS", "MnemosyneConfig"]

VARIANTS = ("tensor", "coordinate")
MEMORY_INPUTS = ("all", "dynamics")  # what HPE → CAM read (MnemosyneConfig.memory_inputs)


@dataclasses.dataclass(frozen=True)
class MnemosyneConfig:
    """Static architecture and hyper-parameters (JSON-able; θ is separate).

    Shared: ``learning_rate`` α (update = -α·d·exp(β·s)), ``beta1`` (Adam
    momentum, the initial direction), ``beta2`` (a slower momentum feature),
    ``beta_v`` (second moment), ``eps``, ``magnitude_scale`` β,
    ``init_discount`` (CAM's τ at initialisation), ``feature_seed`` (ω).
    ``use_loss_feature`` feeds log(loss/first loss) to the head and then
    requires ``update(..., loss=...)``.

    ``hypergradient`` (``tensor`` only) gives every tensor a log step size that
    follows the hypergradient of the loss with respect to it: it grows while the
    new gradient agrees with the previous direction and shrinks when they
    disagree, at ``hypergradient_rate`` κ₀ per step (times a meta-learned
    factor; ``hypergradient_down`` times that when they disagree), kept in
    ``[min_log_lr, max_log_lr]`` around log α. It starts at
    ``init_log_lr`` (plus a meta-learned offset): starting below α and letting
    the hypergradient raise it is a learned warm-up. ``max_log_gain`` > 0 bounds
    the learned per-chunk log gain softly to ±``max_log_gain`` (``tensor``; 0 =
    unbounded). ``max_log_step`` > 0 (``tensor``) is a hard ceiling on the product of every
    step-size factor — hypergradient step size, learned gain and learned schedule — at
    α·e^``max_log_step``: each factor has its own bound, but their product could reach
    α·e^(max_log_lr + max_log_gain + schedule_max_log), where long runs blow up (0 = no ceiling,
    as in checkpoints made before it existed). Told the horizon, the ceiling falls linearly
    over the training progress by ``step_ceiling_decay`` (log units; 0 = a constant ceiling):
    α·e^(max_log_step − step_ceiling_decay·t/T). ``step_ceiling_from`` S > 0 makes it a guard for runs
    longer than meta-training saw: no ceiling before step S, and from S on it falls over
    (t − S)/(T − S) instead of t/T, so a run of at most S steps runs exactly as without it (set S to the
    longest meta-training unroll). Being the tail of the learned schedule, this guard acts only when told
    the horizon (not untold, not in direction mode) and needs ``progress_schedule``.
    ``hypergradient_horizon`` H > 0 (0 = off) is the other half of that guard: told a horizon T > H,
    the hypergradient rate is multiplied by √(H/T), so the random walk of the log step size spreads
    over the whole run as far as it did over the H-step unrolls of meta-training (set H to the
    longest unroll; a run of ≤ H steps, untold or in direction mode runs the trained rate). Needs
    ``hypergradient`` and ``progress_schedule``. ``direction_correction=False`` (``tensor``) drops the learned
    per-coordinate correction of Adam's direction: θ then sets only step sizes.

    ``memory_step_size`` (``tensor`` only) hands the per-tensor log step size to the memory: every
    step, HPE → CAM read the tensor's recent history (token statistics,
    the current log step size, the cosine between the new gradient and the last direction, the
    progress) and a learned read-out of each meta-token gives a change of log step size,
    ``memory_step_rate``·tanh(·) per step, averaged over the tensor's meta-tokens and kept in
    ``[min_log_lr, max_log_lr]``. A fresh θ reads out 0: a constant step size α·e^``init_log_lr``
    (with the default config, Adam at α). What the memory learned is all of the step-size control, so
    :func:`~mnemosyne_core.ablate` of ``"memory"`` shows what it buys. With ``hypergradient`` too,
    each step the hypergradient moves the log step size first and the memory's read-out then moves
    it further (a fresh θ is the hypergradient rule alone): the memory learns how much to trust,
    speed up or brake that rule, per tensor, from the tensor's history.

    ``memory_inputs`` (``tensor`` only) says what HPE → CAM read. ``"all"``: the token statistics,
    the tensor's log step size (or, without a per-tensor step size, its log gradient scale) and,
    told the horizon, the progress. ``"dynamics"``: only what is scale-free and task-agnostic in
    the gradients' history — the momentum and gradient coherences and the last hypergradient
    cosine; the step-size feature and the progress inputs read 0 (the learned schedule still
    follows the progress). A memory that sees where its step size is, or how far training has
    gone, can learn the step sizes and the warm-up its meta-training family liked, which a
    different problem does not want; one that sees only the dynamics can learn only responses
    to them (docs/experiments/2026-12-08-dynamics-memory.md). θ's shapes are the same either way.

    ``progress_schedule`` (``tensor`` only) lets the optimizer use the training progress
    p = t/T when the caller tells it the horizon (``update(..., total_steps=T)``): p and a
    "horizon known" flag join the HPE token features (so CAM's memory sees them) and the
    per-chunk gain head's inputs, and a learned log step-size schedule over p
    (``schedule_knots`` values, piecewise linear in p, kept in
    ``[schedule_min_log, schedule_max_log]``) multiplies every step. All of it starts at zero
    (a fresh θ ignores the horizon). Without ``total_steps`` the flag and p are 0 and the
    schedule is off: the optimizer runs as it would without this option.

    ``tensor``: ``num_features`` r, ``width`` N (meta-token width), ``value_width``
    (CAM value width), ``num_meta_tokens`` b per tensor, ``tokens_per_chunk`` T,
    ``hpe_hidden``, ``head_hidden`` H, ``use_param_feature`` (the parameter value
    is a head input; then ``params`` are required).

    ``coordinate``: ``coord_num_features``, ``coord_width``, ``coord_value_width``,
    ``coord_head_hidden``, ``preprocess_p``.
    """

    variant: str = "tensor"
    feature_seed: int = 0
    learning_rate: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.99
    beta_v: float = 0.999
    eps: float = 1e-8
    magnitude_scale: float = 1.0
    init_discount: float = 0.1
    use_loss_feature: bool = False
    hypergradient: bool = False
    hypergradient_rate: float = 0.1
    hypergradient_down: float = 1.0
    init_log_lr: float = 0.0
    min_log_lr: float = -7.0
    max_log_lr: float = 2.3
    max_log_gain: float = 0.0
    max_log_step: float = 0.0
    step_ceiling_decay: float = 0.0
    step_ceiling_from: int = 0
    hypergradient_horizon: int = 0
    direction_correction: bool = True
    memory_step_size: bool = False
    memory_step_rate: float = 0.1
    memory_inputs: str = "all"
    progress_schedule: bool = False
    schedule_knots: int = 5
    schedule_min_log: float = -7.0
    schedule_max_log: float = 1.0
    # tensor variant
    num_features: int = 16
    width: int = 8
    value_width: int = 4
    num_meta_tokens: int = 2
    tokens_per_chunk: int = 8
    hpe_hidden: int = 16
    head_hidden: int = 4
    use_param_feature: bool = True
    # coordinate variant
    coord_num_features: int = 4
    coord_width: int = 2
    coord_value_width: int = 1
    coord_head_hidden: int = 4
    preprocess_p: float = 10.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = type(f.default)
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))  # accept 1 for 1.0
                ok = True
            if not ok:
                raise ValueError(f"MnemosyneConfig.{f.name} must be {expected.__name__}, got {value!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("num_features", "coord_num_features"):
            value = getattr(self, name)
            if value < 2 or value % 2:
                raise ValueError(f"{name} must be an even int ≥ 2 (features come in ± pairs), got {value}")
        for name in ("width", "value_width", "num_meta_tokens", "tokens_per_chunk", "hpe_hidden",
                     "head_hidden", "coord_width", "coord_value_width", "coord_head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "beta_v"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("learning_rate", "eps", "init_discount", "preprocess_p"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite positive number, got {value}")
        if self.hypergradient and self.variant != "tensor":
            raise ValueError("hypergradient=True is implemented for the 'tensor' variant only")
        if self.memory_step_size and self.variant != "tensor":
            raise ValueError("memory_step_size=True is implemented for the 'tensor' variant only")
        if self.memory_inputs not in MEMORY_INPUTS:
            raise ValueError(f"memory_inputs must be one of {MEMORY_INPUTS}, got {self.memory_inputs!r}")
        if self.memory_inputs != "all" and self.variant != "tensor":
            raise ValueError("memory_inputs other than 'all' is implemented for the 'tensor' variant only")
        if self.progress_schedule and self.variant != "tensor":
            raise ValueError("progress_schedule=True is implemented for the 'tensor' variant only")
        if self.schedule_knots < 2:
            raise ValueError(f"schedule_knots must be ≥ 2 (knots at p = 0 and p = 1), got {self.schedule_knots}")
        if not (np.isfinite(self.schedule_min_log) and np.isfinite(self.schedule_max_log)
                and self.schedule_min_log <= 0.0 <= self.schedule_max_log):
            raise ValueError("need finite schedule_min_log ≤ 0 ≤ schedule_max_log, got "
                             f"{self.schedule_min_log}, {self.schedule_max_log}")
        for name in ("hypergradient_rate", "hypergradient_down", "memory_step_rate"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value}")
        if not (np.isfinite(self.min_log_lr) and np.isfinite(self.max_log_lr)
                and self.min_log_lr <= self.init_log_lr <= self.max_log_lr):
            raise ValueError("need finite min_log_lr ≤ init_log_lr ≤ max_log_lr, got "
                             f"{self.min_log_lr}, {self.init_log_lr}, {self.max_log_lr}")
        for name in ("max_log_gain", "max_log_step", "step_ceiling_decay"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0 (0 = off), got {value}")
        if self.step_ceiling_from < 0:  # its type (int, not bool) is checked with every field's above
            raise ValueError(f"step_ceiling_from must be an integer step ≥ 0, got {self.step_ceiling_from!r}")
        if self.step_ceiling_from > 0 and self.max_log_step <= 0:
            raise ValueError("step_ceiling_from > 0 delays a ceiling that is off: set max_log_step > 0 too")
        if self.step_ceiling_from > 0 and not self.progress_schedule:
            raise ValueError("step_ceiling_from > 0 is a guard that acts only when told the horizon: "
                             "it needs progress_schedule=True")
        if self.hypergradient_horizon < 0:
            raise ValueError(f"hypergradient_horizon must be an integer step count ≥ 0 (0 = off), "
                             f"got {self.hypergradient_horizon!r}")
        if self.hypergradient_horizon > 0 and not (self.hypergradient and self.progress_schedule):
            raise ValueError("hypergradient_horizon > 0 slows the hypergradient on told horizons: "
                             "it needs hypergradient=True and progress_schedule=True")
        if not np.isfinite(self.magnitude_scale):
            raise ValueError(f"magnitude_scale must be finite, got {self.magnitude_scale}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists in JSON; :meth:`from_dict` restores them)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MnemosyneConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown MnemosyneConfig fields: {unknown}")
        kwargs = {k: tuple(v) if isinstance(names[k].default, tuple) and isinstance(v, list) else v
                  for k, v in d.items()}
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
