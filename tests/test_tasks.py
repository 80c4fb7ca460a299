"""Inner tasks: determinism from keys, learnability, shapes, families, errors."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnemosyne_core.tasks import TASKS, Task, TaskSpec, UnknownTaskError, make_task
from mnemosyne_core.tasks.families import (
    FAMILIES,
    DigitsMLPFamily,
    MixtureFamily,
    ViTFamily,
)
from mnemosyne_core.tasks.vit import patchify

# Small variants keep compile time low on 2 CPU cores.
SPECS = {
    "quadratic": TaskSpec("quadratic", {"dim": 8, "condition": 50.0, "noise": 0.1}),
    "digits_mlp": TaskSpec("digits_mlp", {"hidden": [16], "batch_size": 64}),
    "mnist1d_mlp": TaskSpec("mnist1d_mlp", {"hidden": [16], "activation": "tanh", "batch_size": 64}),
    "digits_vit": TaskSpec("digits_vit", {"patch": 4, "dim": 16, "heads": 2, "batch_size": 64}),
    # held-out evaluation tasks
    "wine_mlp": TaskSpec("wine_mlp", {"hidden": [16], "batch_size": 32}),
    "cancer_mlp": TaskSpec("cancer_mlp", {"hidden": [16], "activation": "tanh", "batch_size": 32}),
    "blobs_mlp": TaskSpec("blobs_mlp", {"hidden": [16], "batch_size": 64}),
    "diabetes_mlp": TaskSpec("diabetes_mlp", {"hidden": [16], "batch_size": 32}),
    "friedman_mlp": TaskSpec("friedman_mlp", {"hidden": [16], "activation": "tanh", "batch_size": 32}),
    "digits_autoencoder": TaskSpec("digits_autoencoder", {"hidden": [16, 4, 16], "batch_size": 64}),
    "digits_convnet": TaskSpec("digits_convnet", {"channels": [8, 16], "batch_size": 64}),
}
SQUARED_ERROR = {"quadratic", "diabetes_mlp", "friedman_mlp", "digits_autoencoder"}


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_builtin_tasks_are_registered():
    make_task("quadratic")  # triggers the lazy registration
    assert set(SPECS) <= set(TASKS)
    for spec in SPECS.values():
        task = make_task(spec)
        assert isinstance(task, Task) and task.name == spec.name
        assert TaskSpec.from_json(task.spec.to_json()) == task.spec


@pytest.mark.parametrize("name", sorted(SPECS))
def test_task_is_deterministic_in_its_keys(name):
    task = make_task(SPECS[name])
    k0, k1 = jax.random.key(0), jax.random.key(1)
    assert _equal(task.init(k0), task.init(k0))
    assert not _equal(task.init(k0), task.init(k1))
    assert _equal(task.sample_batch(k0), task.sample_batch(k0))
    assert not _equal(task.sample_batch(k0), task.sample_batch(k1))
    # A second construction from the same spec gives the same problem (data cached, split fixed).
    again = make_task(SPECS[name])
    params = task.init(k0)
    assert float(task.loss(params, task.sample_batch(k1))) == float(again.loss(params, again.sample_batch(k1)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_adam_steps_lower_the_loss(name):
    task = make_task(SPECS[name])
    tx = optax.adam(1e-2)
    params = task.init(jax.random.key(0))

    def step(carry, key):
        p, s = carry
        loss, g = jax.value_and_grad(task.loss)(p, task.sample_batch(key))
        u, s = tx.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    (trained, _), losses = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), jax.random.split(jax.random.key(1), 40)))(params)
    assert bool(jnp.all(jnp.isfinite(losses)))
    before, after = task.evaluate(params), task.evaluate(trained)
    assert float(after["test_loss"]) < 0.8 * float(before["test_loss"])
    if name not in SQUARED_ERROR:
        assert set(before) == {"test_loss", "test_accuracy"}
        assert float(after["test_accuracy"]) > float(before["test_accuracy"])
    else:
        assert set(before) == {"test_loss"}


def test_quadratic_structure():
    task = make_task(TaskSpec("quadratic", {"dim": 6, "condition": 100.0}))
    eig = np.linalg.eigvalsh(np.asarray(task._a, np.float64))
    np.testing.assert_allclose(eig.max() / eig.min(), 100.0, rtol=1e-3)
    assert float(task.evaluate(task.optimum())["test_loss"]) == 0.0
    # Without noise the batch does not change the loss; with noise the gradient is perturbed.
    params = task.init(jax.random.key(0))
    b0, b1 = task.sample_batch(jax.random.key(1)), task.sample_batch(jax.random.key(2))
    assert float(task.loss(params, b0)) == float(task.loss(params, b1))
    noisy = make_task(TaskSpec("quadratic", {"dim": 6, "condition": 100.0, "noise": 1.0}))
    g = [jax.grad(noisy.loss)(params, noisy.sample_batch(jax.random.key(i)))["x"] for i in (1, 2)]
    assert not np.allclose(g[0], g[1])
    np.testing.assert_allclose(g[0] - g[1], noisy.sample_batch(jax.random.key(1)) - noisy.sample_batch(jax.random.key(2)),
                               rtol=1e-5, atol=1e-5)


def test_mlp_kwargs_change_the_network():
    base = make_task(TaskSpec("digits_mlp", {"hidden": [8, 8], "batch_size": 32}))
    params = base.init(jax.random.key(0))
    assert sorted(params) == ["dense_0", "dense_1", "dense_2"]
    assert params["dense_0"]["w"].shape == (64, 8) and params["dense_2"]["w"].shape == (8, 10)
    x, y = base.sample_batch(jax.random.key(3))
    assert x.shape == (32, 64) and y.shape == (32,) and y.dtype == jnp.int32
    tanh = make_task(TaskSpec("digits_mlp", {"hidden": [8, 8], "batch_size": 32, "activation": "tanh"}))
    assert not np.allclose(base.apply(params, x), tanh.apply(params, x))
    scaled = make_task(TaskSpec("digits_mlp", {"hidden": [8, 8], "batch_size": 32, "param_scale": 2.0}))
    assert _equal(scaled.init(jax.random.key(0)), jax.tree.map(lambda p: 2 * p, params))
    decayed = make_task(TaskSpec("digits_mlp", {"hidden": [8, 8], "batch_size": 32, "weight_decay": 0.1}))
    l2 = sum(float(jnp.sum(params[k]["w"] ** 2)) for k in params)
    np.testing.assert_allclose(decayed.loss(params, (x, y)) - base.loss(params, (x, y)), 0.05 * l2, rtol=1e-4)
    noisy = make_task(TaskSpec("digits_mlp", {"hidden": [8, 8], "batch_size": 32, "input_noise": 0.5}))
    xn, yn = noisy.sample_batch(jax.random.key(3))
    assert bool(jnp.array_equal(yn, y)) and 0.3 < float(jnp.std(xn - x)) < 0.7


def test_data_splits_are_standardised_and_fixed():
    task = make_task(SPECS["mnist1d_mlp"])
    data = task.data
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    np.testing.assert_allclose(np.asarray(data.x_train).mean(0), 0.0, atol=1e-4)
    assert set(np.unique(np.asarray(data.y_test)).tolist()) == set(range(10))
    digits = make_task(SPECS["digits_mlp"]).data
    assert digits.x_train.shape[0] + digits.x_test.shape[0] == 1797


def test_vit_is_a_transformer_on_patches():
    task = make_task(SPECS["digits_vit"])
    params = task.init(jax.random.key(0))
    assert params["embed"]["w"].shape == (16, 16) and params["pos"].shape == (5, 16)
    blk = params["block_0"]
    assert blk["attn"]["qkv"]["w"].shape == (16, 48) and blk["mlp"]["fc1"]["w"].shape == (16, 32)
    assert set(blk) == {"ln1", "attn", "ln2", "mlp"}
    x, _ = task.sample_batch(jax.random.key(1))
    assert task.apply(params, x).shape == (64, 10)
    # patchify: patch (1, 0) of a 4-patch image is rows 4..7, columns 0..3.
    img = jnp.arange(64.0).reshape(1, 64)
    patches = patchify(img, 4)
    assert patches.shape == (1, 4, 16)
    np.testing.assert_array_equal(patches[0, 2].reshape(4, 4), img.reshape(8, 8)[4:8, 0:4])
    assert patchify(img, 2).shape == (1, 16, 4)
    # Attention mixes tokens: changing one patch changes the class-token output.
    x2 = x.at[:, 0].add(5.0)
    assert not np.allclose(task.apply(params, x)[0], task.apply(params, x2)[0])
    deep = make_task(TaskSpec("digits_vit", {"patch": 2, "dim": 8, "depth": 2, "heads": 4, "batch_size": 8}))
    p2 = deep.init(jax.random.key(0))
    assert p2["pos"].shape == (17, 8) and "block_1" in p2


def test_unknown_task_lists_names():
    with pytest.raises(UnknownTaskError) as err:
        make_task("no_such_task")
    for name in SPECS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    "spec",
    [
        TaskSpec("digits_mlp", {"nonsense": 1}),
        TaskSpec("digits_mlp", {"activation": "sigmoidish"}),
        TaskSpec("digits_mlp", {"hidden": "64"}),
        TaskSpec("digits_mlp", {"hidden": [0]}),
        TaskSpec("digits_mlp", {"batch_size": -1}),
        TaskSpec("mnist1d_mlp", {"param_scale": 0.0}),
        TaskSpec("quadratic", {"condition": 0.5}),
        TaskSpec("quadratic", {"dim": 0}),
        TaskSpec("digits_vit", {"patch": 3}),
        TaskSpec("digits_vit", {"dim": 10, "heads": 3}),
    ],
    ids=lambda s: s.to_json(),
)
def test_bad_kwargs_raise_value_error(spec):
    with pytest.raises(ValueError):
        make_task(spec)


def test_families_sample_json_able_specs_deterministically():
    for name, family in FAMILIES.items():
        support = family.support()
        seen = set()
        for i in range(6):
            spec = family.sample(jax.random.key(i))
            assert spec == family.sample(jax.random.key(i))
            assert TaskSpec.from_json(json.dumps(json.loads(spec.to_json()))) == spec
            assert spec in support, (name, spec)
            seen.add(spec)
        assert len(support) == 1 or len(seen) > 1, name
    assert len(FAMILIES["digits_mlp_small"].support()) <= 16  # compile cost grows with distinct shapes


def test_heldout_family_is_outside_meta_training():
    heldout = FAMILIES["heldout"].support()
    train = set(FAMILIES["digits_mlp_small"].support()) | set(FAMILIES["digits_mlp_wide"].support())
    assert not set(heldout) & train
    assert {s.name for s in heldout} >= {"digits_vit", "mnist1d_mlp"}
    train_acts = {s.kwargs["activation"] for s in FAMILIES["digits_mlp_small"].support()}
    assert any(s.kwargs.get("activation") not in train_acts for s in heldout if "activation" in s.kwargs)
    spec = next(s for s in heldout if s.name == "mnist1d_mlp" and len(s.kwargs["hidden"]) == 3)
    assert make_task(spec).init(jax.random.key(0))["dense_3"]["w"].shape == (96, 10)


def test_heldout_suite_is_broad_and_disjoint_from_the_shipped_meta_training_tasks():
    from mnemosyne_core.meta.config import load_config
    from mnemosyne_core.tasks.families import HELDOUT_SUITE

    heldout = FAMILIES["heldout"].support()
    assert set(heldout) == set(HELDOUT_SUITE) and len(heldout) >= 10
    trained = {make_task(TaskSpec(d["name"], d["kwargs"])).spec for d in load_config("default").tasks.spec_dicts}
    assert not {make_task(s).spec for s in heldout} & trained
    names = {s.name for s in heldout}
    # other data sets, regression, an autoencoder, a conv net, a transformer, ~10× sizes
    assert {"wine_mlp", "cancer_mlp", "blobs_mlp", "diabetes_mlp", "friedman_mlp", "digits_autoencoder",
            "digits_convnet", "digits_vit"} <= names
    biggest_trained = max(_num_params(s) for s in trained)
    assert max(_num_params(s) for s in heldout) >= 7.5 * biggest_trained  # digits 512×512: 301 k vs 37.8 k


def _num_params(spec) -> int:
    params = jax.eval_shape(make_task(spec).init, jax.random.key(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_regression_and_autoencoder_targets():
    reg = make_task(SPECS["diabetes_mlp"])
    x, y = reg.sample_batch(jax.random.key(0))
    assert x.shape == (32, 10) and y.shape == (32,) and y.dtype == jnp.float32
    assert abs(float(reg.data.y_train.mean())) < 1e-5 and abs(float(reg.data.y_train.std()) - 1) < 1e-4
    params = reg.init(jax.random.key(1))
    pred = reg.apply(params, x)[:, 0]
    np.testing.assert_allclose(reg.loss(params, (x, y)), jnp.mean((pred - y) ** 2), rtol=1e-6)
    ae = make_task(TaskSpec("digits_autoencoder", {"hidden": [8], "batch_size": 16, "input_noise": 0.5}))
    noisy, clean = ae.sample_batch(jax.random.key(2))
    rows = [int(jnp.argmin(jnp.sum((ae.data.x_train - c) ** 2, axis=1))) for c in clean]
    np.testing.assert_array_equal(np.asarray(ae.data.x_train[np.array(rows)]), np.asarray(clean))  # clean rows
    assert float(jnp.mean((noisy - clean) ** 2)) > 0.1  # the input is the noisy copy of the target
    with pytest.raises(ValueError, match="unknown squared-error task"):
        from mnemosyne_core.tasks.regression import SquaredErrorMLPTask

        SquaredErrorMLPTask("nope")


def test_convnet_is_translation_equivariant_before_pooling():
    task = make_task(SPECS["digits_convnet"])
    params = task.init(jax.random.key(0))
    img = jnp.zeros((1, 8, 8)).at[0, 2, 2].set(1.0)
    shifted = jnp.roll(img, 2, axis=2)  # both impulses are away from the border
    logits = task.apply(params, img.reshape(1, 64))
    logits_shifted = task.apply(params, shifted.reshape(1, 64))
    np.testing.assert_allclose(logits, logits_shifted, rtol=1e-5, atol=1e-6)  # stride-2 shift by 2 ⇒ same pool
    with pytest.raises(ValueError, match="two widths"):
        make_task(TaskSpec("digits_convnet", {"channels": [4]}))


def test_mixture_respects_weights_and_validates():
    fam = MixtureFamily((DigitsMLPFamily(widths=(8,), depths=(1,), activations=("relu",)), ViTFamily()),
                        weights=(0.0, 1.0))
    assert {fam.sample(jax.random.key(i)).name for i in range(8)} == {"digits_vit"}
    with pytest.raises(ValueError):
        MixtureFamily(())
    with pytest.raises(ValueError):
        MixtureFamily((ViTFamily(),), weights=(1.0, 2.0))
    with pytest.raises(ValueError):
        DigitsMLPFamily(widths=())


@pytest.mark.parametrize("name", ["quadratic", "digits_mlp"])
def test_tasks_vmap_over_a_population(name):
    task = make_task(SPECS[name])
    keys = jax.random.split(jax.random.key(0), 3)
    params = jax.vmap(task.init)(keys)
    batches = jax.jit(jax.vmap(task.sample_batch))(keys)
    losses = jax.jit(jax.vmap(task.loss))(params, batches)
    assert losses.shape == (3,)
    for i in range(3):
        one = jax.tree.map(lambda x, i=i: x[i], params)
        np.testing.assert_allclose(losses[i], task.loss(one, task.sample_batch(keys[i])), rtol=1e-5)


@pytest.mark.parametrize("module", ["base", "data", "quadratic", "mlp", "vit", "builtin", "families",
                                    "regression", "convnet"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"mnemosyne_core.tasks.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_task_spec_is_a_json_value():
    kwargs = {"hidden": [8], "activation": "relu"}
    spec = TaskSpec("digits_mlp", kwargs)
    kwargs["hidden"] = [16]  # the spec keeps its own copy of the mapping
    assert spec.kwargs["activation"] == "relu" and "hidden" in spec.kwargs
    assert TaskSpec.from_json(spec.to_json()) == spec and hash(TaskSpec.from_json(spec.to_json())) == hash(spec)
    assert TaskSpec("q", {"t": (1, 2)}) == TaskSpec("q", {"t": [1, 2]})  # equal as JSON
    for bad in (lambda: TaskSpec("", {}), lambda: TaskSpec("q", {"f": object()}),
                lambda: TaskSpec("q", {"x": float("nan")}),
                lambda: TaskSpec.from_json("[1]"), lambda: TaskSpec.from_json("{bad")):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        TaskSpec("q", [1, 2])
