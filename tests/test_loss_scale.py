"""Loss / gradient-scale task augmentation (``[tasks] loss_scale``): the optimizer trains c·loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mnemosyne_core.meta.config import MetaConfig
from mnemosyne_core.meta.learned import LearnedOptimizer
from mnemosyne_core.meta.unroll import init_inner, run_chunk
from mnemosyne_core.mnemosyne import MnemosyneConfig
from mnemosyne_core.tasks import TaskSpec, make_task

TASK = make_task(TaskSpec("digits_mlp", {"hidden": [8], "batch_size": 32}))
LO = LearnedOptimizer.for_config(MnemosyneConfig(learning_rate=1e-2, hypergradient=True, direction_correction=False,
                                                 use_param_feature=False))
THETA = LO.init_theta(jax.random.key(0))


def _episode(loss_scale, key=5, steps=30):
    state = init_inner(TASK, LO, THETA, jax.random.key(key), (0.5, 2.0), loss_scale)
    after, out = run_chunk(TASK, LO, THETA, state, steps, steps, 2.0)
    return state, after, out


def test_the_factor_is_log_uniform_per_episode_and_leaves_the_other_draws_alone():
    plain, _, _ = _episode((1.0, 1.0))
    assert float(plain.loss_scale) == 1.0  # (1, 1): exactly 1, every loss and gradient unchanged
    cs = [float(_episode((0.01, 100.0), key=k)[0].loss_scale) for k in range(40)]
    assert 0.01 <= min(cs) < 0.1 and 10 < max(cs) <= 100.0  # spread over the log range
    assert len(set(cs)) == 40
    scaled, _, _ = _episode((0.01, 100.0))
    # Its own key: initialisation, parameter scales and data are those of the plain episode.
    for a, b in zip(jax.tree.leaves(scaled.params), jax.tree.leaves(plain.params)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(scaled.data_key, plain.data_key)
    assert float(scaled.loss0) == pytest.approx(float(scaled.loss_scale) * float(plain.loss0), rel=1e-6)


def test_the_optimizer_sees_the_scaled_loss_and_the_meta_loss_does_not():
    _, plain_after, plain = _episode((1.0, 1.0))
    _, big_after, big = _episode((50.0, 50.0))
    # The optimizer trained 50·loss: the last loss it saw is 50× (up to the rule's ε, which is
    # not scale-free: the trajectories stay close but not identical).
    assert float(big.last_loss) == pytest.approx(50.0 * float(plain.last_loss), rel=0.05)
    # The meta-loss is a ratio to the equally scaled initial loss: the same score.
    assert float(big.log_ratio_sum) == pytest.approx(float(plain.log_ratio_sum), rel=0.05)
    assert float(plain.log_ratio_sum) < 0  # it trained
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(big_after.params),
                                                            jax.tree.leaves(plain_after.params))]
    assert max(moved) > 0  # but it did train a different loss


def test_config_reads_loss_scale_and_old_configs_keep_their_value():
    cfg = MetaConfig.from_dict({"tasks": {"specs": [{"name": "quadratic"}], "loss_scale": [0.1, 10]}})
    assert cfg.tasks.loss_scale == (0.1, 10.0)
    old = MetaConfig.from_dict({"tasks": {"specs": [{"name": "quadratic"}]}})  # a checkpoint written before it
    assert old.tasks.loss_scale == (1.0, 1.0)
    assert MetaConfig.from_dict(old.to_dict()) == old


def test_a_state_pickled_before_the_field_existed_resumes_with_factor_one():
    from mnemosyne_core.meta.evaluator import InnerStateStore

    batched = jax.vmap(lambda k: init_inner(TASK, LO, THETA, k, (1.0, 1.0)))(jax.random.split(jax.random.key(1), 2))
    old = batched._replace(loss_scale=1.0)  # what unpickling a 6-field state gives
    store = InnerStateStore()
    store.load_state_dict({7: (3, 0, jax.device_get(old))})
    _, _, st = store._items[7]
    assert st.loss_scale.shape == (2,) and np.all(np.asarray(st.loss_scale) == 1.0)
    jax.vmap(lambda s: run_chunk(TASK, LO, THETA, s, 3, 3, 2.0))(st)  # maps like a new one
