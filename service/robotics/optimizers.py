"""Optimizer specs for policy training: ``adam:LR``, ``sgd:LR``, a pretrained name,
a checkpoint path or a ``grpc://`` / ``grpcs://`` (TLS) registry URI.

Learned optimizers come from ``mnemosyne_core.pretrained.load_optimizer`` (paths,
``grpc://``/``grpcs://`` URIs and shipped names); the checkpoint's config type
decides which transform (Mnemosyne or the LSTM baseline) runs θ.

Example:
    >>> tx, info = resolve_optimizer("adam:1e-3")
    >>> info["kind"], info["learning_rate"]
    ('adam', 0.001)
"""
from __future__ import annotations

from typing import Any

import optax

PLAIN = {"adam": optax.adam, "sgd": optax.sgd}


class OptimizerSpecError(ValueError):
    """An optimizer spec that cannot be turned into a usable optimizer (one line)."""


def is_plain_spec(spec: str) -> bool:
    """``adam:LR`` / ``sgd:LR`` (a hand-set optax optimizer), as opposed to a learned one."""
    kind, sep, rest = spec.strip().partition(":")
    return bool(sep) and kind in PLAIN and not rest.startswith("//")


def resolve_optimizer(spec: str) -> tuple[optax.GradientTransformationExtraArgs, dict[str, Any]]:
    """Parse ``spec`` into an optax transformation and a JSON-able description."""
    spec = spec.strip()
    if is_plain_spec(spec):
        kind, _, rest = spec.partition(":")
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
    # Imported after the plain specs: it loads JAX. One dispatch for paths, URIs and
    # shipped names (the library's), with its errors turned into one line each.
    from mnemosyne_core.pretrained import PretrainedError, available, load_optimizer

    try:
        theta, config, metadata = load_optimizer(spec)
    except PretrainedError:
        if "/" in spec:  # a path without a suffix that is not there
            raise OptimizerSpecError(f"optimizer checkpoint {spec!r} does not exist") from None
        raise OptimizerSpecError(
            f"unknown optimizer {spec!r}: use adam:LR, sgd:LR, {', '.join(available()) or 'a shipped name'}, "
            "a checkpoint path or grpc[s]://HOST:PORT/NAME[@VERSION]") from None
    except FileNotFoundError:
        raise OptimizerSpecError(f"optimizer checkpoint {spec!r} does not exist") from None
    except Exception as exc:  # CheckpointError, registry errors, a damaged shipped file: all one line
        raise OptimizerSpecError(f"cannot load optimizer {spec!r}: {_one_line(exc)}") from exc
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
