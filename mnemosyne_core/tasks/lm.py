"""A small causal Transformer language model on real text shipped with Python (task ``char_lm``).

Character-level next-token prediction: the vocabulary is the sorted set of
distinct characters of the chosen corpus (deterministic, no tokenizer files),
the loss the mean next-character cross-entropy in nats, so a model that knows
nothing scores ``log(vocab_size)`` (≈ 4.6).

Two corpora, so meta-training and evaluation never share text (no 80-character
window of one occurs in the other):

* ``"pydoc_topics"`` — the language-reference help topics of ``pydoc_data.topics``
  (≈ 465 k characters, 103 symbols on CPython 3.11): the **held-out** corpus;
* ``"stdlib_docs"`` — the docstrings of a fixed, sorted list of pure-Python,
  platform-neutral standard-library modules (≈ 0.4 M characters): the
  **meta-training** corpus. It is empty under ``python -OO`` (docstrings
  stripped), which raises a clear error.

Each corpus is split once: the first 90 % of its characters are training text
(batches are random windows of it), the last 10 % validation text
(``evaluate`` scores :data:`EVAL_WINDOWS` fixed, evenly spaced windows of it).

The model is a GPT-style decoder: token + learned position embeddings,
``depth`` pre-LayerNorm blocks (causal multi-head self-attention, GELU MLP of
width ``mlp_ratio·dim``, each with a residual connection), a final LayerNorm
and an **untied** linear read-out to the vocabulary. Untied because with a
~100-symbol vocabulary tying saves under 2 % of the parameters, while it would
merge two tensors whose gradients look nothing alike (the input embedding's
gradient is row-sparse — only the characters in the batch — the read-out's is
dense), which is exactly the kind of statistic a learned optimizer keys on.

Parameters are a plain dict of float32 arrays, so optimizers see the tensor
shapes of a real language model (fused QKV projections, LayerNorms, embedding
tables, position table).

Example:
    >>> import jax, math
    >>> from mnemosyne_core.tasks.lm import CharLMTask
    >>> task = CharLMTask(dim=32, depth=1, heads=2, seq_len=16, batch_size=4)
    >>> params = task.init(jax.random.key(0))
    >>> params["embed"].shape == (task.vocab_size, 32), params["pos"].shape
    (True, (16, 32))
    >>> x, y = task.sample_batch(jax.random.key(1))
    >>> x.shape, y.shape, task.apply(params, x).shape == (4, 16, task.vocab_size)
    ((4, 16), (4, 16), True)
    >>> abs(float(task.loss(params, (x, y))) - math.log(task.vocab_size)) < 0.2
    True
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mnemosyne_core.tasks import transformer as tf
from mnemosyne_core.tasks.base import TaskSpec
from mnemosyne_core.tasks.classification import check_nonnegative, check_positive_int

__all__ = ["CORPORA", "EVAL_WINDOWS", "STDLIB_DOC_MODULES", "CharLMTask", "load_corpus", "load_text"]

CORPORA = ("pydoc_topics", "stdlib_docs")
EVAL_WINDOWS = 16  # validation windows per evaluation: small, since the harness vmaps evaluate over runs
_VAL_FRACTION = 0.1
_MIN_CHARS = 10_000  # below this the corpus is not real text (e.g. docstrings stripped by -OO)

# Pure-Python (or C with fixed docstrings) modules whose import has no side effects and whose
# public API does not depend on the platform (no os, sys, subprocess, selectors, locale, shutil…),
# so the collected text is the same on every machine running this Python version.
STDLIB_DOC_MODULES = tuple(sorted((
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "colorsys", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "email.message", "enum", "filecmp", "fnmatch", "fractions", "functools", "getopt",
    "gettext", "glob", "gzip", "heapq", "hmac", "html.parser", "inspect", "ipaddress", "json", "logging",
    "lzma", "numbers", "operator", "optparse", "pickle", "pprint", "queue", "quopri", "random", "reprlib",
    "sched", "secrets", "shlex", "statistics", "string", "struct", "tarfile", "textwrap", "timeit",
    "tokenize", "traceback", "typing", "unittest.case", "urllib.parse", "uuid", "wave", "weakref",
    "xml.dom.minidom", "zipfile",
)))


def _stdlib_docs() -> str:
    parts: list[str] = []

    def add(doc: Any) -> None:
        if isinstance(doc, str) and doc.strip():
            parts.append(inspect.cleandoc(doc))  # strips the source indentation, identically everywhere

    for name in STDLIB_DOC_MODULES:
        module = importlib.import_module(name)
        add(module.__doc__)
        # vars(), not getattr/dir: no module __getattr__ hooks (typing's deprecated aliases warn),
        # and only what the module itself defines (no docstrings inherited or re-exported twice).
        members = vars(module)
        for attr in sorted(members):
            obj = members[attr]
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            add(obj.__doc__)
            if inspect.isclass(obj):
                methods = vars(obj)
                for meth in sorted(methods):
                    if not meth.startswith("_") and inspect.isfunction(methods[meth]):
                        add(methods[meth].__doc__)
    return "\n\n".join(parts)


def _pydoc_topics() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.lru_cache(maxsize=4)
def load_text(corpus: str) -> str:
    """The raw text of ``corpus`` (one of :data:`CORPORA`), built deterministically and cached."""
    if corpus not in CORPORA:
        raise ValueError(f"unknown corpus {corpus!r}; known corpora: {', '.join(CORPORA)}")
    text = _pydoc_topics() if corpus == "pydoc_topics" else _stdlib_docs()
    if len(text) < _MIN_CHARS:
        raise RuntimeError(f"corpus {corpus!r} has only {len(text)} characters (is Python running with -OO, "
                           "which strips docstrings?)")
    return text


@functools.lru_cache(maxsize=4)
def load_corpus(corpus: str) -> tuple[str, np.ndarray, np.ndarray]:
    """``(vocab, train_ids, val_ids)``: the sorted distinct characters and the int32 id arrays of the split."""
    text = load_text(corpus)
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.fromiter((lookup[c] for c in text), np.int32, len(text))
    split = int(len(ids) * (1.0 - _VAL_FRACTION))
    train, val = ids[:split], ids[split:]
    train.setflags(write=False)
    val.setflags(write=False)
    return vocab, train, val


_EPS = 1e-5  # LayerNorm epsilon (the ViT's is 1e-6; each task keeps its own, see transformer.py)


class CharLMTask:
    """Task ``char_lm``: a pre-LN causal Transformer predicting the next character of ``corpus``.

    Batches are ``(inputs, targets)``: ``batch_size`` windows of ``seq_len + 1`` characters at
    random offsets of the training text (``targets`` is ``inputs`` shifted by one).
    ``evaluate`` gives ``test_loss`` (nats per character) and ``test_accuracy`` (next-character
    top-1) on :data:`EVAL_WINDOWS` fixed validation windows.
    """

    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 4, seq_len: int = 32,
                 batch_size: int = 16, corpus: str = "stdlib_docs", param_scale: float = 1.0):
        name = "char_lm"
        for field, value in (("dim", dim), ("depth", depth), ("heads", heads), ("mlp_ratio", mlp_ratio),
                             ("seq_len", seq_len), ("batch_size", batch_size)):
            check_positive_int(name, field, value)
        if dim % heads:
            raise ValueError(f"{name}: dim ({dim}) must be divisible by heads ({heads})")
        if not isinstance(corpus, str) or corpus not in CORPORA:
            raise ValueError(f"{name}: corpus must be one of {', '.join(CORPORA)}, got {corpus!r}")
        self.param_scale = check_nonnegative(name, "param_scale", param_scale, strict=True)
        vocab, train, val = load_corpus(corpus)
        if seq_len + 1 > len(val):
            raise ValueError(f"{name}: seq_len must be < {len(val)} (the {corpus} validation text), got {seq_len}")
        self.name = name
        self.spec = TaskSpec(name, {"dim": dim, "depth": depth, "heads": heads, "mlp_ratio": mlp_ratio,
                                    "seq_len": seq_len, "batch_size": batch_size, "corpus": corpus,
                                    "param_scale": self.param_scale})
        self.dim, self.depth, self.heads, self.mlp_ratio = dim, depth, heads, mlp_ratio
        self.seq_len, self.batch_size, self.corpus = seq_len, batch_size, corpus
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self._train = jnp.asarray(train)
        # Evenly spaced, fixed validation windows: the same held-out text for every run and process.
        starts = np.linspace(0, len(val) - seq_len - 1, EVAL_WINDOWS).astype(np.int64)
        windows = val[starts[:, None] + np.arange(seq_len + 1)]
        self._val_x, self._val_y = jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:])

    def encode(self, text: str) -> np.ndarray:
        """Character ids of ``text`` (every character must be in the vocabulary)."""
        lookup = {c: i for i, c in enumerate(self.vocab)}
        return np.asarray([lookup[c] for c in text], np.int32)

    def init(self, key: jax.Array) -> dict:
        d, hidden, v = self.dim, self.mlp_ratio * self.dim, self.vocab_size
        # GPT-2-style scales: small embeddings, 1/√fan_in projections, residual-branch outputs
        # shrunk by 1/√(2·depth) so the residual stream's variance does not grow with depth, and a
        # small read-out so the initial loss is ≈ log(vocab) (logits std ≈ 0.02·√dim).
        residual = 1.0 / math.sqrt(2 * self.depth)
        keys = iter(jax.random.split(key, 3 + 4 * self.depth))
        params: dict[str, Any] = {
            "embed": 0.02 * jax.random.normal(next(keys), (v, d), jnp.float32),
            "pos": 0.02 * jax.random.normal(next(keys), (self.seq_len, d), jnp.float32),
        }
        for i in range(self.depth):
            params[f"block_{i}"] = {
                "ln1": tf.layer_norm_params(d),
                "attn": {"qkv": tf.dense(next(keys), d, 3 * d), "proj": tf.dense(next(keys), d, d, residual)},
                "ln2": tf.layer_norm_params(d),
                "mlp": {"fc1": tf.dense(next(keys), d, hidden), "fc2": tf.dense(next(keys), hidden, d, residual)},
            }
        params["ln_f"] = tf.layer_norm_params(d)
        params["unembed"] = {"w": 0.02 * jax.random.normal(next(keys), (d, v), jnp.float32),
                             "b": jnp.zeros((v,), jnp.float32)}
        # Task augmentation (as the other tasks): rescaling the init keeps a rule from relying on one scale.
        return jax.tree.map(lambda p: (p * self.param_scale).astype(jnp.float32), params)

    def apply(self, params: Any, x: jax.Array) -> jax.Array:
        """Logits ``(B, T, vocab)`` for int token ids ``x`` of shape ``(B, T)`` with ``T ≤ seq_len``."""
        t = x.shape[-1]
        h = jnp.take(params["embed"], x, axis=0) + params["pos"][:t]
        for i in range(self.depth):  # depth is static and small: unrolled, one fused program
            h = tf.block(params[f"block_{i}"], h, self.heads, causal=True, eps=_EPS)
        return tf.layer_norm(params["ln_f"], h, eps=_EPS) @ params["unembed"]["w"] + params["unembed"]["b"]

    def sample_batch(self, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        # One gather of (B, T+1) ids: jittable and vmappable, no Python loop over tokens.
        starts = jax.random.randint(key, (self.batch_size,), 0, self._train.shape[0] - self.seq_len)
        windows = self._train[starts[:, None] + jnp.arange(self.seq_len + 1)]
        return windows[:, :-1], windows[:, 1:]

    def _nll(self, params: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = self.apply(params, x).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return jnp.mean(nll), jnp.mean(jnp.argmax(logits, axis=-1) == y)

    def loss(self, params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        return self._nll(params, *batch)[0]

    def evaluate(self, params: Any) -> dict[str, jax.Array]:
        nll, acc = self._nll(params, self._val_x, self._val_y)
        return {"test_loss": nll, "test_accuracy": acc}

    def __repr__(self) -> str:
        return f"CharLMTask({self.spec.to_json()})"
