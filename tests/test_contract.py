"""The optimizer contract, checked for every entry of ``OPTIMIZERS``.

Every optimizer — learned (Mnemosyne, LSTM) or hand-designed (Adam, SGD) — must
be a well-behaved optax citizen: converge on easy problems, compile once (also
when θ changes), keep parameter dtypes, compose with optax/flax wrappers, shrug
off non-finite gradients, ignore unknown keywords, and refuse a θ that does not
fit its config.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mnemosyne_core.optimizers import OPTIMIZERS
from mnemosyne_core.tasks import TaskSpec, make_task

NAMES = sorted(OPTIMIZERS)
LEARNED = [n for n in NAMES if OPTIMIZERS[n].learned]
HAND = [n for n in NAMES if not OPTIMIZERS[n].learned]


def _theta(name, seed=0):
    entry = OPTIMIZERS[name]
    return entry.init_theta(jax.random.key(seed)) if entry.learned else None


def _tx(name, seed=0):
    return OPTIMIZERS[name].build(_theta(name, seed))


def _perturbed_theta(name, seed):
    # A θ as meta-training would produce it: another init plus noise, so even an
    # optimizer whose fresh θ is key-independent (e.g. exactly Adam) sees a new θ.
    theta = _theta(name, seed)
    leaves, treedef = jax.tree.flatten(theta)
    keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, jnp.shape(x), x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


# A small least-squares problem with real (non-constant) gradients.
_X = jax.random.normal(jax.random.key(7), (16, 4))
_Y = jax.random.normal(jax.random.key(8), (16, 3))


def _params(dtype=jnp.float32):
    return {"w": (0.5 * jax.random.normal(jax.random.key(9), (4, 3))).astype(dtype), "b": jnp.zeros(3, dtype)}


def _ls_loss(params):
    pred = _X @ params["w"].astype(jnp.float32) + params["b"].astype(jnp.float32)
    return jnp.mean(jnp.square(pred - _Y))


def _grads(params):
    loss, g = jax.value_and_grad(_ls_loss)(params)
    return loss, g


def _close(a, b, rtol=1e-5, atol=1e-8):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                                                         rtol=rtol, atol=atol), a, b)


def _run(tx, loss_fn, params, steps):
    def step(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p, loss=loss)
        return (optax.apply_updates(p, u), s), loss

    (params, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), None, length=steps))(params)
    return params, losses


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_an_ill_conditioned_quadratic(name):
    task = make_task(TaskSpec("quadratic", {"dim": 8, "condition": 10.0}))
    x_star = task.optimum()["x"]
    # Start at distance ~0.3·√dim: lr-1e-3 optimizers can cover it in a few hundred steps.
    start = {"x": x_star + 0.3 * (task.init(jax.random.key(0))["x"] - x_star)}
    zero = task.sample_batch(jax.random.key(0))
    final, losses = _run(_tx(name), lambda p: task.loss(p, zero), start, 1000)
    initial = float(task.evaluate(start)["test_loss"])
    assert bool(jnp.all(jnp.isfinite(losses)))
    assert float(task.evaluate(final)["test_loss"]) < 0.02 * initial


@pytest.mark.parametrize("name", HAND)
def test_hand_designed_converge_on_rosenbrock(name):
    def rosenbrock(p):  # a = 1, b = 10: curved valley, minimum 0 at (1, 1)
        x, y = p["xy"][0], p["xy"][1]
        return (1 - x) ** 2 + 10.0 * (y - x * x) ** 2

    start = {"xy": jnp.array([-0.5, 0.5])}
    final, losses = _run(_tx(name), rosenbrock, start, 4000)
    assert bool(jnp.all(jnp.isfinite(losses)))
    assert float(rosenbrock(final)) < 0.01 * float(rosenbrock(start))


@pytest.mark.parametrize("name", NAMES)
def test_jitted_step_compiles_once_even_when_theta_changes(name):
    tx = _tx(name)
    traces = 0

    def step(params, state):
        nonlocal traces
        traces += 1
        loss, g = _grads(params)
        u, state = tx.update(g, state, params, loss=loss)
        return optax.apply_updates(params, u), state, u

    jstep = jax.jit(step)
    params = _params()
    state0 = tx.init(params)
    p1, s1, _ = jstep(params, state0)
    _, s2, u2 = jstep(p1, s1)
    assert traces == 1
    # State structure, shapes and dtypes are stable across steps (scan/jit friendly).
    assert jax.tree.structure(s2) == jax.tree.structure(state0)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), s2) == jax.tree.map(lambda a: (a.shape, a.dtype), state0)
    if OPTIMIZERS[name].learned:
        tx_b = OPTIMIZERS[name].build(_perturbed_theta(name, 1))
        _, sb1, _ = jstep(params, tx_b.init(params))
        _, _, ub2 = jstep(p1, sb1)
        assert traces == 1, "a new θ must not recompile the train step"
        diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(u2), jax.tree.leaves(ub2)))
        assert diff > 0, "the step must use the θ carried in the state"


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", NAMES)
def test_keeps_parameter_dtype(name, dtype):
    tx = _tx(name)
    params = _params(dtype)

    @jax.jit
    def step(params, state):
        loss, g = _grads(params)
        u, state = tx.update(g, state, params, loss=loss)
        return optax.apply_updates(params, u), state, u, loss

    state = tx.init(params)
    losses = []
    for _ in range(3):
        params, state, updates, loss = step(params, state)
        losses.append(float(loss))
        for tree in (updates, params):
            assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(tree)), jax.tree.map(lambda a: a.dtype, tree)
        assert all(bool(jnp.all(jnp.isfinite(leaf.astype(jnp.float32)))) for leaf in jax.tree.leaves(updates))
    assert losses[-1] <= losses[0]


@pytest.mark.parametrize("name", NAMES)
def test_inside_optax_chain_with_clipping(name):
    params = _params()
    loss, g = _grads(params)
    g = jax.tree.map(lambda x: 50.0 * x, g)  # make clipping bite
    chained = optax.chain(optax.clip_by_global_norm(1.0), _tx(name))
    u, state = jax.jit(chained.update)(g, chained.init(params), params, loss=loss)
    clipped = jax.tree.map(lambda x: x / optax.global_norm(g), g)
    tx = _tx(name)
    ref, _ = jax.jit(tx.update)(clipped, tx.init(params), params, loss=loss)
    _close(u, ref, rtol=1e-4, atol=1e-9)
    u2, _ = jax.jit(chained.update)(g, state, optax.apply_updates(params, u), loss=loss)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u2))


@pytest.mark.parametrize("name", NAMES)
def test_inside_optax_multisteps(name):
    params = _params()
    loss1, g1 = _grads(params)
    g2 = jax.tree.map(lambda x: -0.5 * x + 0.01, g1)
    multi = optax.MultiSteps(_tx(name), every_k_schedule=2)
    update = jax.jit(multi.update)
    state = multi.init(params)
    u1, state = update(g1, state, params, loss=loss1)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u1))
    u2, state = update(g2, state, params, loss=loss1)
    tx = _tx(name)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ref, _ = jax.jit(tx.update)(mean, tx.init(params), params, loss=loss1)
    _close(u2, ref, rtol=1e-4, atol=1e-9)


class _Tiny(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


@pytest.mark.parametrize("name", NAMES)
def test_inside_flax_nnx_optimizer(name):
    model = _Tiny(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _tx(name), wrt=nnx.Param)

    def loss_fn(model):
        return jnp.mean(jnp.square(model(_X) - _Y))

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        # nnx forwards keyword arguments to tx.update: `loss` and an unknown one.
        optimizer.update(model, grads, loss=loss, some_unknown_flag=True)
        return loss

    kernel0 = np.asarray(model.linear.kernel[...])
    losses = [float(train_step(model, optimizer)) for _ in range(30)]
    assert not np.array_equal(kernel0, np.asarray(model.linear.kernel[...]))
    assert losses[-1] < losses[0]
    assert int(optimizer.step[...]) == 30


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_gradient_does_not_poison_the_state(name, bad):
    tx = _tx(name)
    update = jax.jit(tx.update)
    params = _params()
    loss, g1 = _grads(params)
    g_bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(bad), g1)
    g2 = jax.tree.map(lambda x: 0.7 * x - 0.02, g1)

    u1, s = update(g1, tx.init(params), params, loss=loss)
    p = optax.apply_updates(params, u1)
    # Clean run: g1, g2.
    u_clean, _ = update(g2, s, p, loss=loss)
    # Run with a bad step in between: g1, bad, g2.
    u_bad, s_bad = update(g_bad, s, p, loss=loss)
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u_bad)), "a non-finite step must not move params"
    p_after = optax.apply_updates(p, u_bad)
    u_next, _ = update(g2, s_bad, p_after, loss=loss)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u_next))
    _close(u_next, u_clean, rtol=1e-6, atol=1e-10)
    # Every floating-point part of the state is exactly as before the bad step (counters may move).
    for before, after in zip(jax.tree.leaves(s), jax.tree.leaves(s_bad)):
        if jnp.issubdtype(before.dtype, jnp.floating):
            assert np.array_equal(np.asarray(before), np.asarray(after), equal_nan=True)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_keyword_arguments_are_ignored(name):
    tx = _tx(name)
    params = _params()
    loss, g = _grads(params)
    state = tx.init(params)
    ref, ref_state = tx.update(g, state, params, loss=loss)
    out, out_state = tx.update(g, state, params, loss=loss, step_size=3.0, task="digits", flag=None)
    _close(out, ref, rtol=0, atol=0)
    assert jax.tree.structure(out_state) == jax.tree.structure(ref_state)


@pytest.mark.parametrize("name", LEARNED)
def test_theta_of_wrong_shape_or_structure_is_refused(name):
    entry = OPTIMIZERS[name]
    theta = _theta(name)
    leaves, treedef = jax.tree.flatten(theta)
    widened = jax.tree.unflatten(treedef, [jnp.zeros((*jnp.shape(leaves[0]), 2))] + leaves[1:])
    retyped = jax.tree.unflatten(treedef, [leaves[0].astype(jnp.bfloat16)] + leaves[1:])
    for bad in (widened, retyped, {"not": jnp.zeros(3)}, {**theta, "extra": jnp.zeros(())} if isinstance(theta, dict) else [theta]):
        with pytest.raises(ValueError):
            entry.build(bad)
    # A state carrying a wrong θ is refused when the step is traced, not silently used.
    tx = entry.build(theta)
    params = _params()
    state = tx.init(params)
    bad_state = state._replace(theta=widened)
    with pytest.raises(ValueError):
        jax.jit(tx.update)(_grads(params)[1], bad_state, params, loss=jnp.float32(1.0))


@pytest.mark.parametrize("name", LEARNED)
def test_theta_of_another_learned_optimizer_is_refused(name):
    for other in LEARNED:
        if other != name:
            with pytest.raises(ValueError):
                OPTIMIZERS[name].build(_theta(other))


@pytest.mark.parametrize("name", HAND)
def test_hand_designed_take_no_theta(name):
    with pytest.raises(ValueError):
        OPTIMIZERS[name].build({"w": jnp.zeros(3)})
