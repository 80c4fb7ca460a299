"""Meta-training configuration: frozen dataclasses loaded from TOML files.

A config names the learned optimizer being meta-trained (``[optimizer]``), the
gradient estimator (``[estimator]``), the outer optimizer (``[outer]``) and the
task distribution with its unroll-length curriculum (``[tasks]``). Everything
is static: θ, the outer optimizer state and PES accumulators are run state.

``load_config("quick")`` reads ``configs/quick.toml`` from the repository;
any other argument is a path. ``MetaConfig.to_dict()``/``from_dict`` round-trip
(the dict is stored in checkpoints as lineage).

Example:
    >>> cfg = MetaConfig.from_dict({"name": "t", "estimator": {"num_pairs": 4}})
    >>> cfg.estimator.num_pairs, cfg.estimator.kind, cfg.outer.learning_rate
    (4, 'es', 0.003)
    >>> MetaConfig.from_dict(cfg.to_dict()) == cfg
    True
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import tomllib
from typing import Any

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "EstimatorConfig",
    "MetaConfig",
    "OptimizerSection",
    "OuterConfig",
    "TaskConfig",
    "check_tasks",
    "config_path",
    "load_config",
]

_SOURCE_CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"  # a source checkout
_PACKAGED_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"  # inside an installed wheel
CONFIG_DIR = _SOURCE_CONFIGS if _SOURCE_CONFIGS.is_dir() else _PACKAGED_CONFIGS

ESTIMATORS = ("es", "pes", "backprop")
SHAPINGS = ("centered_rank", "zscore", "none")
META_LOSSES = ("log_ratio", "final", "heldout", "heldout_mean")
OPTIMIZER_KINDS = ("mnemosyne", "lstm")


class ConfigError(ValueError):
    """A config file or value that cannot be used."""


def _freeze(value: Any) -> Any:
    # TOML arrays/tables -> tuples so the dataclasses stay hashable.
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str)
                                                  for v in value):
        return {k: _thaw(v) for k, v in value}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


# What each field's value must be, by its annotation; the range, where there is one, is said in
# the same message ("generations must be an integer ≥ 0, got 'x'"). Fields added later are
# type-checked by their annotation without any change here.
_RANGES = {
    "generations": "≥ 0", "checkpoint_every": "≥ 1", "publish_every": "≥ 0",
    "stop_after_failed_generations": "≥ 1", "num_pairs": "≥ 1", "truncation": "≥ 1",
    "batch_pairs": "≥ 1", "sigma": "> 0", "learning_rate": "> 0", "clip": "> 0",
    "max_log_ratio": "> 0", "grad_clip": "> 0", "b1": "in [0, 1)", "b2": "in [0, 1)",
    "untold_fraction": "in [0, 1]", "min_unroll": "≥ 1", "max_unroll": "≥ 1",
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_field_types(obj: Any, section: str = "") -> None:
    """Each ``int``/``float``/``str``/``bool`` field of a config dataclass holds that type
    (a TOML ``generations = "x"`` is refused here, not by a comparison deep inside)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        where = f"{section}.{f.name}" if section else f.name
        rng = f" {_RANGES[f.name]}" if f.name in _RANGES else ""
        if kind == "int" and not _is_int(value):
            raise ConfigError(f"{where} must be an integer{rng}, got {value!r}")
        if kind == "float" and not (_is_number(value) and math.isfinite(value)):
            raise ConfigError(f"{where} must be a finite number{rng}, got {value!r}")
        if kind == "str" and not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")


def _require(ok: bool, where: str, value: Any) -> None:
    """Range check with the same wording as the type check."""
    if not ok:
        field = where.rsplit(".", 1)[-1]
        kind = "an integer" if _is_int(value) else "a number"
        raise ConfigError(f"{where} must be {kind} {_RANGES.get(field, '')}, got {value!r}".replace("  ", " "))


def _build(cls: type, section: str, data: Any) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"[{section}] has unknown keys {unknown}; known: {sorted(names)}")
    return cls(**{k: _freeze(v) for k, v in data.items()})


@dataclasses.dataclass(frozen=True)
class OptimizerSection:
    """Which learned optimizer is meta-trained: ``kind`` and its own config fields."""

    kind: str = "mnemosyne"
    config: Any = ()  # frozen key/value pairs for MnemosyneConfig / LSTMConfig

    def __post_init__(self) -> None:
        _check_field_types(self, "optimizer")
        if self.kind not in OPTIMIZER_KINDS:
            raise ConfigError(f"optimizer.kind must be one of {OPTIMIZER_KINDS}, got {self.kind!r}")

    @property
    def config_dict(self) -> dict[str, Any]:
        return _thaw(self.config) if self.config else {}


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """Gradient estimator. ``truncation`` is K: steps per compiled chunk (ES) or per
    truncation (PES, backprop). ``max_log_ratio`` caps log(loss/initial loss) per step
    so one diverging pair cannot dominate; ``grad_clip`` clips each backprop particle.
    ``meta_loss``: ``log_ratio`` (mean log training-loss ratio over the unroll), ``heldout``
    (log of the task's held-out loss after the unroll over the initial loss) or
    ``heldout_mean`` (that log ratio after every K-step chunk, averaged: it rewards getting
    there early, i.e. the area under the held-out curve, not only where the unroll ends) or
    ``final`` (the mean log training-loss ratio over the last 10 % of the unroll: the score a
    user reads at the end of training). ``tell_horizon`` passes each unroll's length to the
    optimizer as ``update(..., total_steps=T)`` (for ``progress_schedule`` optimizers);
    ``untold_fraction`` of the unrolls (chosen per pair and episode, the same in every
    truncation of an unroll) are run without it, so θ also learns the untold mode.
    ``shape_within_task`` applies ``shaping`` to each task spec's pairs separately: losses of
    different tasks are not comparable, so ranking them together lets the task with the widest
    spread decide the step. ``batch_pairs`` pairs share one vmapped call; groups are padded to
    it, so every task shape compiles exactly once (on CPU 1 is best; raise it on accelerators)."""

    kind: str = "es"
    num_pairs: int = 8
    sigma: float = 0.02
    shaping: str = "centered_rank"
    shape_within_task: bool = False  # shape each task's pairs among themselves (mixed-task families)
    meta_loss: str = "log_ratio"
    truncation: int = 25
    max_log_ratio: float = 2.0
    grad_clip: float = 10.0
    batch_pairs: int = 1  # pairs per vmapped call (fixed, padded): one compile per task shape
    tell_horizon: bool = False  # update(..., total_steps=unroll length)
    untold_fraction: float = 0.0  # with tell_horizon: this share of unrolls is not told (T = 0)


    def __post_init__(self) -> None:
        _check_field_types(self, "estimator")
        if self.kind not in ESTIMATORS:
            raise ConfigError(f"estimator.kind must be one of {ESTIMATORS}, got {self.kind!r}")
        if self.shaping not in SHAPINGS:
            raise ConfigError(f"estimator.shaping must be one of {SHAPINGS}, got {self.shaping!r}")
        for flag in ("shape_within_task", "tell_horizon"):  # a TOML "true" string would read as truthy
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"estimator.{flag} must be true or false, got {getattr(self, flag)!r}")
        if not (isinstance(self.untold_fraction, (int, float)) and 0.0 <= self.untold_fraction <= 1.0):
            raise ConfigError(f"estimator.untold_fraction must be in [0, 1], got {self.untold_fraction!r}")
        if self.untold_fraction and not self.tell_horizon:
            raise ConfigError("estimator.untold_fraction needs tell_horizon = true")
        if self.meta_loss not in META_LOSSES:
            raise ConfigError(f"estimator.meta_loss must be one of {META_LOSSES}, got {self.meta_loss!r}")
        for name in ("num_pairs", "truncation", "batch_pairs"):
            _require(getattr(self, name) >= 1, f"estimator.{name}", getattr(self, name))
        for name in ("sigma", "max_log_ratio", "grad_clip"):
            _require(getattr(self, name) > 0, f"estimator.{name}", getattr(self, name))
        if self.meta_loss.startswith("heldout") and self.kind != "es":
            raise ConfigError(f"estimator.meta_loss = {self.meta_loss!r} needs whole unrolls: use kind = 'es'")


@dataclasses.dataclass(frozen=True)
class OuterConfig:
    """The outer optimizer on θ: Adam (or SGD) with global-norm clipping.

    ``trainable`` restricts meta-training to parts of θ, named by dotted path prefixes
    (``["head"]``, ``["head.w_s", "head.b_s"]``); empty means all of θ. The rest stays
    bit-for-bit as initialised (e.g. from ``--init-from``) and is not perturbed by ES
    either, so the estimator's noise is spent on the parts being trained.

    ``scale`` maps dotted path prefixes to a factor ``s > 0`` (the longest matching prefix
    wins, 1 elsewhere): those coordinates are meta-trained in units of ``s``, i.e. as
    φ = θ/s. ES/PES perturb them by σ·s and the outer step moves them ``s`` times as far.
    Parts of θ that need different noise levels (a few gain numbers that only show an
    effect beyond a policy-gradient run's chaos, next to hundreds of network weights that
    need small σ) then train in one run. ``{}`` (the default) changes nothing."""

    optimizer: str = "adam"
    learning_rate: float = 3e-3
    clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    trainable: tuple[str, ...] = ()
    scale: Any = ()  # frozen (prefix, factor) pairs; a TOML table {"head.b_s" = 10.0}

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _scale_pairs(self.scale))
        _check_field_types(self, "outer")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"outer.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        _require(self.learning_rate > 0, "outer.learning_rate", self.learning_rate)
        _require(self.clip > 0, "outer.clip", self.clip)
        for name in ("b1", "b2"):
            _require(0 <= getattr(self, name) < 1, f"outer.{name}", getattr(self, name))
        if isinstance(self.trainable, str) or not all(isinstance(t, str) and t.strip(". ") for t in self.trainable):
            raise ConfigError(f"outer.trainable must be a list of dotted θ paths such as ['head'], "
                              f"got {self.trainable!r}")


def _scale_pairs(value: Any) -> tuple[tuple[str, float], ...]:
    """``outer.scale`` as sorted ``(dotted prefix, factor)`` pairs; nested tables
    (``scale = {head = {b_s = 10}}``, as TOML reads unquoted dotted keys) are flattened."""
    table = _thaw(value) if isinstance(value, tuple) else value
    if table in ([], ()):
        table = {}
    if not isinstance(table, dict):
        raise ConfigError(f"outer.scale must be a table of dotted θ paths to factors such as "
                          f"{{\"head.b_s\" = 10.0}}, got {value!r}")
    flat: dict[str, float] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        path = prefix.strip(". ")
        if isinstance(node, bool) or not isinstance(node, (int, float)) or not (
                math.isfinite(node) and node > 0) or not path:
            raise ConfigError(f"outer.scale[{prefix!r}] must be a finite factor > 0 "
                              f"(use outer.trainable to freeze a part), got {node!r}")
        flat[path] = float(node)

    walk("", table)
    return tuple(sorted(flat.items()))


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Task distribution: a family from ``tasks.families.FAMILIES`` or explicit ``specs``
    (list of ``{name, kwargs}`` sampled uniformly). Unroll lengths are log-uniform in
    ``[min_unroll, max_unroll]`` (rounded up to a multiple of K); a spec may set its own
    ``unroll = [min, max]``, for a task whose progress only shows after a longer horizon (a
    Pendulum policy's greedy return falls below the untrained one's for its first 150–200
    updates, so shorter unrolls reward the optimizer that moves least). Each parameter tensor
    is reparameterised by a log-uniform factor in ``param_scale``, and each episode's loss (so
    its gradients) is multiplied by a log-uniform factor in ``loss_scale`` (task augmentation)."""

    family: str = ""
    specs: Any = ()
    min_unroll: int = 50
    max_unroll: int = 200
    param_scale: tuple[float, float] = (1.0, 1.0)
    loss_scale: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self) -> None:
        _check_field_types(self, "tasks")
        if bool(self.family) == bool(self.specs):
            raise ConfigError("[tasks] needs exactly one of 'family' or 'specs'")
        if not isinstance(self.specs, tuple):  # a TOML array freezes to a tuple; a table would not
            raise ConfigError(f"tasks.specs must be a list of {{name, kwargs}} tables, got {_thaw(self.specs)!r}")
        for name in ("param_scale", "loss_scale"):
            ps = getattr(self, name)
            if not (isinstance(ps, (tuple, list)) and len(ps) == 2 and all(_is_number(x) and math.isfinite(x)
                                                                            for x in ps)):
                raise ConfigError(f"tasks.{name} must be [lo, hi] (two numbers), got {_thaw(ps)!r}")
        if not 1 <= self.min_unroll <= self.max_unroll:
            raise ConfigError(f"need 1 ≤ min_unroll ≤ max_unroll, got {self.min_unroll}, {self.max_unroll}")
        for d in self.spec_dicts:
            if "unroll" in d:
                u = d["unroll"]
                whole = isinstance(u, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in u)
                if not (whole and len(u) == 2 and 1 <= u[0] <= u[1]):
                    raise ConfigError(f"tasks.specs {d['name']!r}: unroll must be [min, max] with 1 ≤ min ≤ max, "
                                      f"got {u!r}")
        for name in ("param_scale", "loss_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"tasks.{name} must be 0 < lo ≤ hi, got {getattr(self, name)}")

    @property
    def spec_dicts(self) -> list[dict[str, Any]]:
        """``{name, kwargs}`` per spec, plus ``unroll`` where the spec sets its own range (absent
        otherwise, so a config without it keeps its task-family fingerprint)."""
        out = []
        for i, s in enumerate(self.specs):
            d = _thaw(s)
            if not isinstance(d, dict) or "name" not in d or set(d) - {"name", "kwargs", "unroll"}:
                raise ConfigError(f"each tasks.specs entry is {{name, kwargs, unroll}}, got {d!r}")
            if not (isinstance(d["name"], str) and d["name"]):
                raise ConfigError(f"tasks.specs[{i}].name must be a task name (a string), got {d['name']!r}")
            if not isinstance(d.get("kwargs") or {}, dict):
                raise ConfigError(f"tasks.specs[{i}] {d['name']!r}: kwargs must be a table, got {d['kwargs']!r}")
            # An empty table freezes to () and thaws to []: kwargs are always a table.
            out.append({"name": d["name"], "kwargs": d.get("kwargs") or {}}
                       | ({"unroll": d["unroll"]} if "unroll" in d else {}))
        return out


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    name: str = "custom"
    seed: int = 0
    generations: int = 20
    checkpoint_every: int = 10
    publish_every: int = 0
    # Stop when no pair of a generation succeeds this many generations in a row (a generation whose
    # every pair raised stops the run at once): a run that cannot learn must not burn a cluster.
    stop_after_failed_generations: int = 3
    optimizer: OptimizerSection = OptimizerSection()
    estimator: EstimatorConfig = EstimatorConfig()
    outer: OuterConfig = OuterConfig()
    tasks: TaskConfig = TaskConfig(specs=(_freeze({"name": "quadratic", "kwargs": {"dim": 8}}),))

    def __post_init__(self) -> None:
        _check_field_types(self)
        for name, low in (("generations", 0), ("checkpoint_every", 1), ("publish_every", 0),
                          ("stop_after_failed_generations", 1)):
            _require(getattr(self, name) >= low, name, getattr(self, name))
        for name, cls in (("optimizer", OptimizerSection), ("estimator", EstimatorConfig), ("outer", OuterConfig),
                          ("tasks", TaskConfig)):
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"[{name}] must be a table, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                out[f.name] = {g.name: _thaw(getattr(v, g.name)) for g in dataclasses.fields(v)}
            else:
                out[f.name] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaConfig:
        sections = {"optimizer": OptimizerSection, "estimator": EstimatorConfig, "outer": OuterConfig,
                    "tasks": TaskConfig}
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - top)
        if unknown:
            raise ConfigError(f"unknown top-level config keys {unknown}; known: {sorted(top)}")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key in sections:
                if key == "tasks" and isinstance(value, dict):  # TOML arrays → the fields' tuples
                    value = {**value, **{name: tuple(float(x) for x in value[name])
                                         for name in ("param_scale", "loss_scale")
                                         if isinstance(value.get(name), list) and all(_is_number(x) for x in value[name])}}
                kwargs[key] = _build(sections[key], key, value)
            else:
                kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a value of a type no field check expected (e.g. a table for a number)
            raise ConfigError(f"invalid config value: {exc}") from exc

    def replace(self, **changes: Any) -> MetaConfig:
        return dataclasses.replace(self, **changes)


def config_path(name_or_path: str | pathlib.Path) -> pathlib.Path:
    """The file ``load_config(name_or_path)`` reads (``ConfigError`` when there is none)."""
    path = pathlib.Path(name_or_path)
    if not path.suffix and not path.exists():
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(f"no config {str(name_or_path)!r} (not a file; known names: {', '.join(known) or 'none'})")
    return path


def load_config(name_or_path: str | pathlib.Path) -> MetaConfig:
    """``"quick"``/``"default"``/… from ``configs/`` or a path to a ``.toml`` file.

    Every error names the file: ``configs/x.toml: generations must be an integer ≥ 0, got 'x'``.
    """
    path = config_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    data.setdefault("name", path.stem)
    try:
        return MetaConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def check_tasks(tasks: TaskConfig) -> int:
    """Resolve and build every task the config can sample, once, by shapes only (no compile, no step).

    ``tasks.specs`` entries and every member of ``tasks.family`` are built with
    :func:`~mnemosyne_core.tasks.make_task` and traced with ``jax.eval_shape`` through
    ``init``, ``sample_batch`` and ``loss`` (datasets are loaded, nothing is compiled or run).
    Raises :class:`ConfigError` naming the first spec that fails and why (an unknown task name
    with the known ones, an impossible keyword argument with the task's own message). Returns
    the number of distinct specs checked. Run it before any worker starts: a bad spec then costs
    a second, not a cluster's generations of dropped pairs.

    Example:
        >>> check_tasks(TaskConfig(specs=(_freeze({"name": "quadratic", "kwargs": {"dim": 3}}),)))
        1
        >>> try:
        ...     check_tasks(TaskConfig(specs=(_freeze({"name": "nosuch"}),)))
        ... except ConfigError as exc:
        ...     print(str(exc).split(";")[0])
        tasks.specs[0] 'nosuch': unknown task 'nosuch'
    """
    if tasks.family:
        from mnemosyne_core.tasks.families import FAMILIES

        if tasks.family not in FAMILIES:
            raise ConfigError(f"tasks.family: unknown task family {tasks.family!r}; known: {', '.join(sorted(FAMILIES))}")
        try:
            support = FAMILIES[tasks.family].support()
        except Exception as exc:
            raise ConfigError(f"tasks.family {tasks.family!r}: {type(exc).__name__}: {exc}") from exc
        labelled = [(f"tasks.family {tasks.family!r} member {s.to_json()}", s.to_json()) for s in support]
    else:
        labelled = []
        for i, d in enumerate(tasks.spec_dicts):
            try:
                text = json.dumps({"name": d["name"], "kwargs": d["kwargs"]}, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"tasks.specs[{i}] {d['name']!r}: kwargs must be JSON-able: {exc}") from exc
            shown = f" kwargs {json.dumps(d['kwargs'], sort_keys=True)}" if d["kwargs"] else ""
            labelled.append((f"tasks.specs[{i}] {d['name']!r}{shown}", text))
    for label, text in labelled:
        error = _task_error(text)
        if error is not None:
            raise ConfigError(f"{label}: {error}")
    return len({text for _, text in labelled})


@functools.lru_cache(maxsize=512)
def _task_error(spec_json: str) -> str | None:
    """``None`` when the spec builds and traces, else one line saying why not (cached per spec)."""
    import jax

    from mnemosyne_core.tasks import make_task

    try:
        task = make_task(json.loads(spec_json))
        key = jax.random.key(0)
        params = jax.eval_shape(task.init, key)
        batch = jax.eval_shape(task.sample_batch, key)
        loss = jax.eval_shape(task.loss, params, batch)
        if getattr(loss, "shape", None) != ():
            return f"loss must be a scalar, got shape {getattr(loss, 'shape', None)}"
    except Exception as exc:  # noqa: BLE001 - any failure to build is the user's spec, said in one line
        text = " ".join(str(exc).split()) or type(exc).__name__
        return text if isinstance(exc, (ValueError, KeyError)) else f"{type(exc).__name__}: {text}"
    return None
