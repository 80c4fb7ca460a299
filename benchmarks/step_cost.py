"""Step cost of Mnemosyne vs ``optax.adam``, all measured in one process.

Figures (each a median of ≥ 20 timed calls after warm-up, ``block_until_ready``):

* jitted optimizer update alone for parameter pytrees of ~1M and ~10M floats
  (a few realistic matrices + biases);
* a whole training step (forward + backward + update) of a ~1M-parameter MLP
  at batch 128;
* state floats per parameter (θ excluded: leaves of the state whose size
  scales with the parameters);
* peak temporary memory of the compiled update (XLA ``memory_analysis``) and
  the process's peak RSS.

Targets for ``tensor`` and the shipped ``default`` (``default+T``: told ``total_steps``, as it is
meant to run): update ≤ 3× Adam, whole step ≤ 1.3× Adam, ≤ 3 state floats per parameter.

Usage::

    python benchmarks/step_cost.py            # full run
    python benchmarks/step_cost.py --quick    # smaller pytrees, fewer repeats
    python benchmarks/step_cost.py --variants default+T,mnemosyne_core/pretrained/candidates/dynamics_memory.msgpack+T
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mnemosyne_core.mnemosyne import MnemosyneConfig, init_theta, mnemosyne


def make_params(key: jax.Array, sizes: list[tuple[int, int]]) -> dict[str, jax.Array]:
    """An MLP-like pytree: one (fan_in, fan_out) matrix + bias per layer."""
    params = {}
    for i, (a, b) in enumerate(sizes):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b), jnp.float32) / np.sqrt(a)
        params[f"b{i}"] = jnp.zeros((b,), jnp.float32)
    return params


def count(tree: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def median_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function, timed *interleaved* (one
    call of each per round), so load from other processes hits all of them
    alike. The minimum is the least contended run: on a shared machine it is
    the steadier estimate of the intrinsic cost."""
    for fn in fns.values():  # warm-up (compile)
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def state_floats_per_param(state: Any, params: Any) -> float:
    """All non-θ state floats divided by the parameter count.

    Includes the sublinear per-tensor memory (CAM, token moments) and scalars,
    so it is a slight over-estimate of the per-parameter part.
    """
    n = count(params)
    if hasattr(state, "theta"):
        state = state._replace(theta=None)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) / n


def opts() -> dict[str, Callable[[], optax.GradientTransformation]]:
    def mn(variant: str, **options: Any):
        config = MnemosyneConfig(variant=variant, **options)
        return lambda: mnemosyne(init_theta(jax.random.key(0), config), config)

    def shipped():
        from mnemosyne_core.pretrained import pretrained

        return pretrained("default")

    # default: the shipped optimizer (tensor variant; HPE → CAM set each tensor's step size; Adam's direction).
    return {"adam": lambda: optax.adam(1e-3), "tensor": mn("tensor"), "coordinate": mn("coordinate"),
            "default": shipped, "default+T": told(1000, shipped)}


def told(total_steps: int, make: Callable[[], Any]) -> Callable[[], optax.GradientTransformation]:
    """``make()``'s optimizer as it is meant to run: told the horizon, so the progress features and
    the learned schedule are in the step too."""
    def build():
        tx = make()
        return optax.GradientTransformationExtraArgs(
            tx.init, lambda g, s, p=None, **kw: tx.update(g, s, p, total_steps=total_steps))
    return build


def from_file(path: str) -> Callable[[], optax.GradientTransformation]:
    """The optimizer saved at ``path`` (``mn.save``), e.g. a candidate in ``pretrained/candidates/``."""
    def build():
        import mnemosyne_core

        theta, config, _ = mnemosyne_core.load(path)
        return mnemosyne(theta, config)
    return build


def update_case(tx: optax.GradientTransformation, params: Any) -> tuple[Callable[[], Any], float, float]:
    """(timed call, state floats per parameter, compiled temp bytes) of the jitted update."""
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
    update = jax.jit(tx.update)
    mem = update.lower(grads, state, params).compile().memory_analysis()
    temp = float(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else 0.0
    return (lambda: update(grads, state, params)), state_floats_per_param(state, params), temp


def train_case(tx: optax.GradientTransformation, sizes: list[tuple[int, int]], batch: int) -> Callable[[], Any]:
    """A timed call running one jitted forward + backward + update step of an MLP."""
    params = make_params(jax.random.key(1), sizes)
    x = jax.random.normal(jax.random.key(2), (batch, sizes[0][0]))
    y = jax.random.randint(jax.random.key(3), (batch,), 0, sizes[-1][1])

    def loss_fn(p):
        h = x
        for i in range(len(sizes)):
            h = h @ p[f"w{i}"] + p[f"b{i}"]
            if i < len(sizes) - 1:
                h = jax.nn.relu(h)
        return optax.softmax_cross_entropy_with_integer_labels(h, y).mean()

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p, loss=loss)
        return optax.apply_updates(p, u), s

    carry = {"p": params, "s": tx.init(params)}

    def run():
        carry["p"], carry["s"] = step(carry["p"], carry["s"])
        return carry["p"]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller pytrees, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--variants", default="tensor,default,coordinate")
    args = parser.parse_args()
    repeats = args.repeats or (20 if args.quick else 30)
    trees = {
        # ~1M: 512-wide MLP-ish blocks; ~10M: 1024/2048-wide.
        "update 1M": [(784, 512), (512, 512), (512, 512), (512, 10)] if not args.quick else [(256, 256), (256, 10)],
        "update 10M": [(1024, 2048), (2048, 2048), (2048, 1024), (1024, 1024), (1024, 10)]
        if not args.quick else [(512, 1024), (1024, 512)],
    }
    mlp = [(784, 1024), (1024, 256), (256, 10)] if not args.quick else [(256, 256), (256, 10)]
    makers = opts()
    names = ["adam"] + [v for v in args.variants.split(",") if v]
    for n in names:  # a checkpoint file (a candidate design), as it is and told the horizon (+T)
        path = n.removesuffix("+T")
        if n not in makers and path.endswith(".msgpack"):
            makers[n] = from_file(path) if n == path else told(1000, from_file(path))
    rows: dict[str, dict[str, float]] = {n: {} for n in names}
    for label, sizes in trees.items():
        params = make_params(jax.random.key(0), sizes)
        print(f"{label}: {count(params):,} parameters", flush=True)
        calls = {}
        for n in names:
            calls[n], floats, temp = update_case(makers[n](), params)
            rows[n]["state floats/param"] = floats
            rows[n][f"temp MiB ({label})"] = temp / 2**20
        for n, (med, low) in median_times(calls, repeats).items():
            rows[n][label] = med
            rows[n][f"{label} (min)"] = low
        del calls
    print(f"train step MLP {mlp}: {sum(a * b + b for a, b in mlp):,} parameters, batch 128", flush=True)
    for n, (med, low) in median_times({n: train_case(makers[n](), mlp, 128) for n in names}, repeats).items():
        rows[n]["train step"] = med
        rows[n]["train step (min)"] = low
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    print()
    print(f"{'metric (median; min)':<28}" + "".join(f"{n.rsplit('/', 1)[-1].replace('.msgpack', ''):>22}" for n in names))
    for metric in rows["adam"]:
        cells = []
        for n in names:
            value = rows[n][metric]
            if metric.startswith(("update", "train")):
                ratio = value / rows["adam"][metric]
                cells.append(f"{value * 1e3:9.3f} ms ({ratio:5.2f}x)")
            else:
                cells.append(f"{value:20.2f}")
        print(f"{metric:<28}" + "".join(f"{c:>22}" for c in cells))
    print(f"{'peak RSS (process) MiB':<28}{rss:>22.0f}")
    print("targets for tensor: update <= 3x Adam, train step <= 1.25x Adam, <= 3 state floats/param")


if __name__ == "__main__":
    main()
