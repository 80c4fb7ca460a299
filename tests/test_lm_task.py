"""The causal character-level Transformer LM task (``char_lm``) and the badly scaled tasks."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mnemosyne_core.tasks import TASKS, TaskSpec, make_task
from mnemosyne_core.tasks.lm import CORPORA, CharLMTask, load_corpus, load_text

# Tiny shapes keep each compile to a second or two on 2 CPU cores.
TINY = {"dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 2, "seq_len": 12, "batch_size": 4}


def _num_params(spec: TaskSpec) -> int:
    params = jax.eval_shape(make_task(spec).init, jax.random.key(0))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_registered_and_spec_round_trips():
    task = make_task(TaskSpec("char_lm", {**TINY, "corpus": "pydoc_topics"}))
    assert "char_lm" in TASKS and isinstance(task, CharLMTask)
    assert TaskSpec.from_json(task.spec.to_json()) == task.spec
    assert make_task(task.spec).spec == task.spec  # the normalised spec rebuilds the same task


def test_shapes_and_batches():
    task = CharLMTask(**TINY, corpus="stdlib_docs")
    params = task.init(jax.random.key(0))
    assert params["embed"].shape == (task.vocab_size, 16) and params["pos"].shape == (12, 16)
    assert params["block_1"]["attn"]["qkv"]["w"].shape == (16, 48)
    assert params["block_1"]["mlp"]["fc1"]["w"].shape == (16, 32)
    assert params["unembed"]["w"].shape == (16, task.vocab_size)  # untied read-out
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    x, y = task.sample_batch(jax.random.key(1))
    assert x.shape == y.shape == (4, 12) and x.dtype == jnp.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert jax.jit(task.apply)(params, x).shape == (4, 12, task.vocab_size)
    # Deterministic in the keys; jittable and vmappable (what the harness and the workers do).
    np.testing.assert_array_equal(x, task.sample_batch(jax.random.key(1))[0])
    assert not np.array_equal(x, task.sample_batch(jax.random.key(2))[0])
    xs, _ = jax.jit(jax.vmap(task.sample_batch))(jax.random.split(jax.random.key(3), 5))
    assert xs.shape == (5, 4, 12)
    metrics = jax.jit(task.evaluate)(params)
    assert sorted(metrics) == ["test_accuracy", "test_loss"] and np.isfinite(float(metrics["test_loss"]))


def test_attention_is_causal():
    task = CharLMTask(**TINY, corpus="pydoc_topics")
    params = task.init(jax.random.key(0))
    x, _ = task.sample_batch(jax.random.key(1))
    t = 7
    changed = x.at[:, t:].set((x[:, t:] + 5) % task.vocab_size)  # every token from position t on
    apply = jax.jit(task.apply)
    before, after = apply(params, x), apply(params, changed)
    np.testing.assert_array_equal(before[:, :t], after[:, :t])  # earlier positions see nothing new
    assert not np.allclose(before[:, t:], after[:, t:])  # later positions do


def test_initial_loss_is_log_vocab_and_adam_lowers_it():
    task = CharLMTask(dim=16, depth=1, heads=2, seq_len=16, batch_size=16, corpus="stdlib_docs")
    params = task.init(jax.random.key(0))
    tx = optax.adam(3e-3)

    @jax.jit
    def train(params):
        def step(carry, i):
            params, state = carry
            loss, grads = jax.value_and_grad(task.loss)(params, task.sample_batch(jax.random.key(i)))
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(60))
        return params, losses

    trained, losses = train(params)
    log_v = math.log(task.vocab_size)
    assert abs(float(losses[0]) - log_v) < 0.1
    evaluate = jax.jit(task.evaluate)
    assert abs(float(evaluate(params)["test_loss"]) - log_v) < 0.1
    assert float(losses[-10:].mean()) < log_v - 1.0  # character frequencies alone give ≈ 1.3 nats
    assert float(evaluate(trained)["test_loss"]) < log_v - 1.0


def test_corpora_differ_and_are_deterministic():
    texts = {c: load_text(c) for c in CORPORA}
    assert all(len(t) > 100_000 for t in texts.values())
    a, b = texts["pydoc_topics"], texts["stdlib_docs"]
    # No shared 80-character window (sampled every 97 characters of the held-out corpus).
    windows = {b[i:i + 80] for i in range(len(b) - 80)}
    assert not any(a[i:i + 80] in windows for i in range(0, len(a) - 80, 97))
    # Rebuilt from scratch (caches cleared) the corpus and its vocabulary are identical.
    vocab, train, val = load_corpus("stdlib_docs")
    load_text.cache_clear()
    load_corpus.cache_clear()
    vocab2, train2, val2 = load_corpus("stdlib_docs")
    assert vocab == vocab2 and vocab == "".join(sorted(set(vocab)))
    np.testing.assert_array_equal(train, train2)
    np.testing.assert_array_equal(val, val2)
    assert len(val) == pytest.approx(0.1 * (len(train) + len(val)), abs=1)
    # Different text through the same task: different batches from the same key.
    xs = [CharLMTask(**TINY, corpus=c).sample_batch(jax.random.key(0))[0] for c in CORPORA]
    assert not np.array_equal(xs[0], xs[1])


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"dim": 0}, "dim"), ({"dim": 16.0}, "dim"), ({"depth": -1}, "depth"), ({"heads": True}, "heads"),
    ({"dim": 16, "heads": 3}, "heads"), ({"mlp_ratio": 0}, "mlp_ratio"), ({"seq_len": 0}, "seq_len"),
    ({"seq_len": 10**7}, "seq_len"), ({"batch_size": "8"}, "batch_size"), ({"corpus": "wikipedia"}, "corpus"),
    ({"param_scale": 0.0}, "param_scale"), ({"param_scale": -1}, "param_scale"),
])
def test_bad_kwargs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_task(TaskSpec("char_lm", {**TINY, **kwargs}))


def test_unknown_and_non_finite_kwargs():
    with pytest.raises(ValueError, match="bad arguments"):
        make_task(TaskSpec("char_lm", {"width": 8}))
    with pytest.raises(ValueError, match="param_scale"):  # NaN cannot be in a TaskSpec, only in a direct call
        CharLMTask(**TINY, param_scale=float("nan"))


def test_param_scale_multiplies_the_init():
    base = CharLMTask(**TINY).init(jax.random.key(0))
    scaled = CharLMTask(**TINY, param_scale=2.0).init(jax.random.key(0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(2.0 * a, b, rtol=1e-6), base, scaled)


@pytest.mark.parametrize("spec", [
    TaskSpec("illscaled_lstsq", {"dim": 8, "scale": 100.0, "batch_size": 16}),
    TaskSpec("illscaled_mlp", {"hidden": [16], "dim": 8, "batch_size": 16}),
])
def test_illscaled_tasks(spec):
    task = make_task(spec)
    assert TaskSpec.from_json(task.spec.to_json()) == task.spec
    params = task.init(jax.random.key(0))
    batch = task.sample_batch(jax.random.key(1))
    np.testing.assert_array_equal(batch[0], task.sample_batch(jax.random.key(1))[0])
    assert np.isfinite(float(task.loss(params, batch)))
    x = np.asarray(task._x_train, np.float64)
    if spec.name == "illscaled_lstsq":  # rotated scales: the design matrix is ill-conditioned
        sv = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
        assert sv.max() / sv.min() > 5
    else:  # raw, non-centred features: every input far from zero with the same sign
        assert np.all(np.abs(x.mean(axis=0)) > 2 * x.std(axis=0))
    assert np.isfinite(float(task.evaluate(params)["test_loss"]))


def test_illscaled_kwargs_are_validated():
    for kwargs, field in (({"scale": 0.5}, "scale"), ({"seed": -1}, "seed"), ({"noise": -1.0}, "noise"),
                          ({"dim": 0}, "dim"), ({"param_scale": 0}, "param_scale")):
        with pytest.raises(ValueError, match=field):
            make_task(TaskSpec("illscaled_lstsq", kwargs))
    with pytest.raises(ValueError, match="activation"):
        make_task(TaskSpec("illscaled_mlp", {"activation": "swish2"}))
    lstsq = make_task(TaskSpec("illscaled_lstsq", {"dim": 8, "scale": 10.0, "noise": 0.0}))
    assert float(lstsq.evaluate(lstsq.optimum())["test_loss"]) < 1e-8


def test_heldout_suite_has_lms_and_a_big_one():
    from mnemosyne_core.tasks.families import HELDOUT_SUITE

    lms = [s for s in HELDOUT_SUITE if s.name == "char_lm"]
    assert len(lms) >= 2 and all(s.kwargs["corpus"] == "pydoc_topics" for s in lms)
    assert len({(s.kwargs["dim"], s.kwargs["depth"]) for s in lms}) == len(lms)
    assert max(_num_params(s) for s in lms) >= 1_000_000
    assert {"illscaled_lstsq", "illscaled_mlp"} <= {s.name for s in HELDOUT_SUITE}


