"""The built-in inner tasks, registered into :data:`~mnemosyne_core.tasks.TASKS` on import.

==============  =========================================================  ==================
name            problem                                                    metrics
==============  =========================================================  ==================
``quadratic``   ill-conditioned quadratic (``dim``, ``condition``,          ``test_loss``
                ``noise``, ``seed``)
``digits_mlp``  MLP on scikit-learn digits (``hidden``, ``activation``,     ``test_loss``,
                ``batch_size``, ``input_noise``, ``param_scale``,           ``test_accuracy``
                ``weight_decay``)
``mnist1d_mlp`` the same MLP on generated MNIST-1D                         idem
``digits_vit``  tiny ViT on 8×8 digit patches (``patch``, ``dim``,          idem
                ``depth``, ``heads``, ``mlp_ratio``, ``batch_size``)
``char_lm``     causal character Transformer LM on text shipped with       idem (next-char)
                Python (``dim``, ``depth``, ``heads``, ``mlp_ratio``,
                ``seq_len``, ``batch_size``, ``corpus``, ``param_scale``);
                corpus ``stdlib_docs`` for meta-training, ``pydoc_topics``
                held out
==============  =========================================================  ==================

Held-out evaluation tasks (never meta-trained on): ``wine_mlp``, ``cancer_mlp``, ``blobs_mlp``
(MLP classifiers on scikit-learn tables, same kwargs as ``digits_mlp``), ``diabetes_mlp``,
``friedman_mlp`` (regression MLPs, ``test_loss`` = MSE), ``digits_autoencoder`` (an MLP
autoencoder), ``digits_convnet`` (``channels``, ``activation``, ``batch_size``), and the badly
scaled ``illscaled_lstsq`` / ``illscaled_mlp`` of :mod:`~mnemosyne_core.tasks.illscaled`, where tuned
Adam wants a learning rate ≤ 1e-3.

``make_task`` imports this module lazily, so ``mnemosyne_core.tasks.base`` needs
no data packages; the data sets themselves load on first use and are cached.

Example:
    >>> import jax
    >>> from mnemosyne_core.tasks import make_task
    >>> task = make_task({"name": "digits_mlp", "kwargs": {"hidden": [32, 32], "activation": "gelu"}})
    >>> sorted(task.evaluate(task.init(jax.random.key(0))))
    ['test_accuracy', 'test_loss']
"""
from __future__ import annotations

import functools

from mnemosyne_core.tasks.base import register_task
from mnemosyne_core.tasks.convnet import ConvNetTask
from mnemosyne_core.tasks.illscaled import IllScaledLeastSquaresTask, IllScaledMLPTask
from mnemosyne_core.tasks.lm import CharLMTask
from mnemosyne_core.tasks.mlp import MLPTask
from mnemosyne_core.tasks.quadratic import QuadraticTask
from mnemosyne_core.tasks.regression import SQUARED_ERROR_TASKS, SquaredErrorMLPTask
from mnemosyne_core.tasks.vit import ViTTask

__all__ = ["BUILTIN_TASKS"]

BUILTIN_TASKS = ("quadratic", "digits_mlp", "mnist1d_mlp", "digits_vit", "wine_mlp", "cancer_mlp", "blobs_mlp",
                 *SQUARED_ERROR_TASKS, "digits_convnet", "char_lm",
                 "illscaled_lstsq", "illscaled_mlp")

register_task("quadratic")(QuadraticTask)
register_task("digits_mlp")(functools.partial(MLPTask, "digits"))
register_task("mnist1d_mlp")(functools.partial(MLPTask, "mnist1d"))
register_task("digits_vit")(ViTTask)
register_task("wine_mlp")(functools.partial(MLPTask, "wine"))
register_task("cancer_mlp")(functools.partial(MLPTask, "breast_cancer"))
register_task("blobs_mlp")(functools.partial(MLPTask, "blobs5"))
for _name in SQUARED_ERROR_TASKS:
    register_task(_name)(functools.partial(SquaredErrorMLPTask, _name))
register_task("digits_convnet")(ConvNetTask)
register_task("char_lm")(CharLMTask)
register_task("illscaled_lstsq")(IllScaledLeastSquaresTask)
register_task("illscaled_mlp")(IllScaledMLPTask)
