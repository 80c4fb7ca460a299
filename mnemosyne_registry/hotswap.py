"""Swap a new θ into a running optimizer without recompiling the train step.

Mnemosyne and the LSTM baseline keep θ in their optax state (a NamedTuple
field ``theta``), and the jitted train step takes that state as an argument.
Replacing θ by arrays of the *same tree structure, shapes and dtypes* keeps
the step's abstract signature, so JAX reuses the compiled executable: the
swap costs one host→device copy and nothing else. Optimizer memories (CAM,
moments, LSTM hidden state) are kept; only the update rule changes.

The usual loop, fetching version k+1 while training::

    client = RegistryClient("grpc://127.0.0.1:50051")
    theta, config, meta = client.fetch_theta("mnemosyne-digits", "best", like=opt_state)
    opt_state = swap_theta(opt_state, theta)   # no recompilation on the next step

:func:`swap_theta` walks any nesting optax builds (``chain`` tuples,
``inject_hyperparams``, ``MultiSteps``, dicts) and replaces every ``theta``
field it finds; it raises :class:`IncompatibleVersionError` if there is none
or if the new θ would change the compiled signature.

>>> import typing, jax.numpy as jnp
>>> class S(typing.NamedTuple):
...     count: jnp.ndarray
...     theta: dict
>>> state = (S(jnp.zeros(()), {"w": jnp.zeros(2)}), ())
>>> swap_theta(state, {"w": jnp.ones(2)})[0].theta["w"].tolist()
[1.0, 1.0]
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import IncompatibleVersionError


def theta_signature(theta: Any) -> tuple:
    """(tree structure, [(shape, dtype)…]) — what the compiled step depends on."""
    leaves, treedef = jax.tree_util.tree_flatten(theta)
    return treedef, [(tuple(np.shape(x)), np.dtype(getattr(x, "dtype", np.asarray(x).dtype))) for x in leaves]


def check_swappable(current: Any, new: Any) -> None:
    """Raise :class:`IncompatibleVersionError` if ``new`` can't replace ``current`` as is."""
    cur_def, cur_leaves = theta_signature(current)
    new_def, new_leaves = theta_signature(new)
    if cur_def != new_def:
        raise IncompatibleVersionError(f"θ tree structure differs: running {cur_def}, new {new_def}")
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(current)[0]]
    for path, (cs, cd), (ns, nd) in zip(paths, cur_leaves, new_leaves):
        if cs != ns or cd != nd:
            raise IncompatibleVersionError(
                f"θ leaf {path}: running {cs} {cd}, new {ns} {nd}; a swap would change the compiled step"
            )


def find_theta(opt_state: Any) -> Any:
    """The first θ found in an optimizer state, or raise :class:`IncompatibleVersionError`."""
    found: list[Any] = []
    _walk(opt_state, lambda node: found.append(node.theta) or node)
    if not found:
        raise IncompatibleVersionError("optimizer state holds no θ (no NamedTuple with a 'theta' field)")
    return found[0]


def swap_theta(opt_state: Any, new_theta: Any) -> Any:
    """Return ``opt_state`` with every ``theta`` field replaced by ``new_theta`` (device arrays)."""
    replaced = [0]

    def replace(node):
        check_swappable(node.theta, new_theta)
        # Same dtypes as the running θ (checked above); place on device like the original.
        theta = jax.tree.map(lambda old, new: jnp.asarray(new, dtype=old.dtype), node.theta, new_theta)
        replaced[0] += 1
        return node._replace(theta=theta)

    out = _walk(opt_state, replace)
    if not replaced[0]:
        raise IncompatibleVersionError("optimizer state holds no θ (no NamedTuple with a 'theta' field)")
    return out


def _walk(node: Any, fn) -> Any:
    fields = getattr(node, "_fields", None)
    if isinstance(node, tuple) and fields is not None:
        if "theta" in fields:
            return fn(node)
        return node._replace(**{f: _walk(getattr(node, f), fn) for f in fields})
    if isinstance(node, (tuple, list)):
        return type(node)(_walk(x, fn) for x in node)
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    return node
