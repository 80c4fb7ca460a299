"""Optimizer specs for policy training: ``adam:LR``, ``sgd:LR``, a pretrained name,
a checkpoint path or a ``grpc://`` registry URI.

Learned optimizers come from ``mnemosyne_core.checkpoint.load`` (paths and
``grpc://`` URIs) or ``mnemosyne_core.pretrained(name)``; the checkpoint's config
type decides which transform (Mnemosyne or the LSTM baseline) runs θ.

Example:
    >>> tx, info = resolve_optimizer("adam:1e-3")
    >>> info["kind"], info["learning_rate"]
    ('adam', 0.001)
"""
from __future__ import annotations

import importlib
import pathlib
from typing import Any

import optax

PLAIN = {"adam": optax.adam, "sgd": optax.sgd}


class OptimizerSpecError(ValueError):
    """An optimizer spec that cannot be turned into a usable optimizer (one line)."""


def resolve_optimizer(spec: str) -> tuple[optax.GradientTransformationExtraArgs, dict[str, Any]]:
    """Parse ``spec`` into an optax transformation and a JSON-able description."""
    spec = spec.strip()
    kind, sep, rest = spec.partition(":")
    if sep and kind in PLAIN and not rest.startswith("//"):
        try:
            lr = float(rest)
        except ValueError:
            raise OptimizerSpecError(f"bad learning rate in {spec!r}: expected e.g. '{kind}:1e-3'") from None
        if not lr > 0:
            raise OptimizerSpecError(f"learning rate must be > 0 in {spec!r}")
        # The learning rate lives in the optimizer state, not in the compiled
        # program: every learning rate of a grid reuses one compiled train step.
        tx = optax.with_extra_args_support(optax.inject_hyperparams(PLAIN[kind])(learning_rate=lr))
        return tx, {"spec": spec, "kind": kind, "learning_rate": lr}
    # Imported after the plain specs: it loads JAX.
    from mnemosyne_core.pretrained import available

    shipped = available()
    if spec in shipped:
        theta, config, metadata = _load_pretrained(spec)
    elif spec.startswith("grpc://") or pathlib.Path(spec).exists():
        theta, config, metadata = _load_checkpoint(spec)
    elif "/" in spec or spec.endswith(".msgpack"):
        raise OptimizerSpecError(f"optimizer checkpoint {spec!r} does not exist")
    else:
        raise OptimizerSpecError(
            f"unknown optimizer {spec!r}: use adam:LR, sgd:LR, {', '.join(shipped) or 'a shipped name'}, "
            "a checkpoint path or grpc://HOST:PORT/NAME[@VERSION]")
    return learned_transform(theta, config, spec), {
        "spec": spec, "kind": _kind_of(config, spec), "metadata": _jsonable(metadata)}


def learned_transform(theta: Any, config: Any, spec: str = "checkpoint") -> optax.GradientTransformationExtraArgs:
    """The optax transform that runs ``theta`` under ``config`` (Mnemosyne or LSTM)."""
    from mnemosyne_core.meta.learned import LearnedOptimizer

    learned = LearnedOptimizer(_kind_of(config, spec), config)
    try:
        return learned.transform(theta)
    except (ValueError, TypeError, KeyError) as exc:
        raise OptimizerSpecError(f"optimizer {spec!r} is incompatible: {_one_line(exc)}") from exc


def _kind_of(config: Any, spec: str) -> str:
    from mnemosyne_core.meta.learned import LearnedOptimizer

    try:
        return LearnedOptimizer.kind_of(config)
    except ValueError as exc:
        raise OptimizerSpecError(f"optimizer {spec!r} is incompatible: {exc}") from exc


def _load_checkpoint(spec: str) -> tuple[Any, Any, Any]:
    try:
        checkpoint = importlib.import_module("mnemosyne_core.checkpoint")
    except ModuleNotFoundError as exc:
        raise OptimizerSpecError(f"cannot load {spec!r}: checkpoint support missing ({exc})") from exc
    try:
        return checkpoint.load(spec)
    except Exception as exc:  # CheckpointError, registry errors, corrupt files: all one line
        raise OptimizerSpecError(f"cannot load optimizer {spec!r}: {_one_line(exc)}") from exc


def _load_pretrained(name: str) -> tuple[Any, Any, Any]:
    try:
        from mnemosyne_core.pretrained import pretrained_theta
    except ModuleNotFoundError as exc:
        raise OptimizerSpecError(f"pretrained optimizer {name!r} is not available: {exc}") from exc
    try:
        return pretrained_theta(name)  # (theta, config, metadata)
    except Exception as exc:  # PretrainedError, a missing or damaged shipped file
        raise OptimizerSpecError(f"pretrained optimizer {name!r} is not available: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
