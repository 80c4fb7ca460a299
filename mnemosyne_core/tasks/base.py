"""The inner-task protocol: what a learned optimizer is trained and evaluated on.

A :class:`Task` is a pure description of one training problem. Everything is a
function of explicit ``jax.random`` keys, so the same key gives the same
parameters and the same batches in any process (driver, Ray worker, test).

A :class:`TaskSpec` is the JSON-able name of a task (registry name + keyword
arguments); it is what crosses process boundaries. :func:`make_task` turns it
back into a task. A :class:`TaskFamily` samples specs from a key.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks import TaskSpec, make_task
    >>> task = make_task(TaskSpec("quadratic", {"dim": 8}))
    >>> params = task.init(jax.random.key(0))
    >>> batch = task.sample_batch(jax.random.key(1))
    >>> float(task.loss(params, batch)) > 0
    True
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import jax

Params = Any
Batch = Any


class UnknownTaskError(KeyError):
    """Raised when a task name is not in :data:`TASKS`."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else "unknown task"


@runtime_checkable
class Task(Protocol):
    """One inner training problem.

    ``init``/``sample_batch`` are deterministic in their key; ``loss`` is a pure,
    differentiable scalar function. ``evaluate`` returns held-out metrics (at
    least ``"test_loss"``; ``"test_accuracy"`` where it is defined).
    """

    name: str

    def init(self, key: jax.Array) -> Params: ...

    def loss(self, params: Params, batch: Batch) -> jax.Array: ...

    def sample_batch(self, key: jax.Array) -> Batch: ...

    def evaluate(self, params: Params) -> dict[str, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A task by name: ``TASKS[name](**kwargs)``. ``kwargs`` must be JSON-able."""

    name: str
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"TaskSpec.name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.kwargs, Mapping):
            raise TypeError(f"TaskSpec.kwargs must be a mapping, got {type(self.kwargs).__name__}")
        # A private copy: a spec is a value (hashed, sent to workers), the caller's dict may change.
        object.__setattr__(self, "kwargs", dict(self.kwargs))
        try:
            self.to_json()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"TaskSpec {self.name!r}: kwargs must be JSON-able: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "kwargs": dict(self.kwargs)}, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> TaskSpec:
        try:
            obj = json.loads(text)
            return cls(obj["name"], obj.get("kwargs", {}))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"not a TaskSpec JSON object: {text[:200]!r}") from exc

    def fingerprint(self) -> str:
        """A short stable hash; equal specs (same shapes) can share a compiled step."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TaskSpec) and self.to_json() == other.to_json()


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Class/function decorator adding a task constructor to :data:`TASKS`."""

    def deco(ctor: Callable[..., Task]) -> Callable[..., Task]:
        if name in TASKS:
            raise ValueError(f"task {name!r} is already registered")
        TASKS[name] = ctor
        return ctor

    return deco


def make_task(spec: TaskSpec | str | Mapping[str, Any]) -> Task:
    """Build a task from a :class:`TaskSpec`, a bare name or a ``{"name", "kwargs"}`` dict."""
    if isinstance(spec, str):
        spec = TaskSpec(spec)
    elif isinstance(spec, Mapping):
        spec = TaskSpec(spec["name"], spec.get("kwargs", {}))
    _load_builtin_tasks()
    if spec.name not in TASKS:
        known = ", ".join(sorted(TASKS))
        raise UnknownTaskError(f"unknown task {spec.name!r}; known tasks: {known}")
    try:
        return TASKS[spec.name](**dict(spec.kwargs))
    except TypeError as exc:
        raise ValueError(f"bad arguments for task {spec.name!r}: {exc}") from exc


class TaskFamily(Protocol):
    """Samples task specs from a key (a distribution over inner problems)."""

    name: str

    def sample(self, key: jax.Array) -> TaskSpec: ...


def _load_builtin_tasks() -> None:
    # Task modules register themselves on import; importing lazily keeps
    # `mnemosyne_core.tasks.base` free of data dependencies.
    import importlib

    for module in ("mnemosyne_core.tasks.builtin", "mnemosyne_core.tasks.robotics"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            # Only skip when the task module itself (or its optional extra) is absent.
            if exc.name and (exc.name == module or not exc.name.startswith("mnemosyne_core")):
                continue
            raise
