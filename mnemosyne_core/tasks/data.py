"""Offline classification data sets, loaded once per process and cached.

Every data set is produced locally, never downloaded:

* ``digits``: scikit-learn's bundled ``load_digits`` (1797 8×8 images, 10 classes);
* ``mnist1d``: MNIST-1D generated with ``mnist1d.data.make_dataset`` from its
  default arguments (40 features, 10 classes);
* ``wine`` (178×13, 3 classes) and ``breast_cancer`` (569×30, 2 classes): scikit-learn's
  bundled tables; ``blobs5``: ``make_classification`` (3000×20, 5 classes, fixed seed);
* regression (``num_classes == 0``, float targets standardised with training statistics):
  ``diabetes`` (442×10, bundled) and ``friedman1`` (``make_friedman1``, 2000×10, noise 1).

These extra sets belong to the held-out evaluation suite: meta-training never sees them.

The train/test split is a fixed permutation drawn from an explicit seed
(``numpy.random.default_rng(seed)``, never the global numpy RNG), and inputs are
standardised with *training-set* statistics, so every process that asks for the
same ``(name, seed)`` gets bit-identical arrays.

Example:
    >>> from mnemosyne_core.tasks.data import load_dataset
    >>> ds = load_dataset("digits")
    >>> ds.x_train.shape[1], ds.num_classes
    (64, 10)
    >>> bool(abs(float(ds.x_train.mean())) < 1e-5)
    True
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["DATASETS", "REGRESSION_DATASETS", "Dataset", "load_dataset"]

DATASETS = ("digits", "mnist1d", "wine", "breast_cancer", "blobs5", "diabetes", "friedman1")
REGRESSION_DATASETS = ("diabetes", "friedman1")

# Sizes are kept small on purpose: inner problems run on 2 CPU cores.
_DIGITS_TEST = 297  # 1500 train / 297 test
_MNIST1D_TRAIN = 4000
_MNIST1D_TEST = 1000


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Device arrays of one split data set (inputs float32; labels int32, or float32 targets
    of a regression set, whose ``num_classes`` is 0)."""

    name: str
    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x_train.mean(axis=0)
    # Constant pixels (digits' borders) have std 0: floor it so they map to 0, not NaN.
    std = np.maximum(x_train.std(axis=0), 1e-3)
    return (x_train - mean) / std, (x_test - mean) / std


def _split(x: np.ndarray, y: np.ndarray, n_test: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(x))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _digits_numpy(seed: int):
    try:
        from sklearn.datasets import load_digits
    except ModuleNotFoundError as exc:  # optional 'train' extra
        raise ModuleNotFoundError(
            "the digits tasks need scikit-learn: install mnemosyne[train]", name=exc.name
        ) from exc
    raw = load_digits()
    x = raw.data.astype(np.float64)
    y = raw.target.astype(np.int32)
    return _split(x, y, _DIGITS_TEST, seed)


def _mnist1d_numpy(seed: int):
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ModuleNotFoundError as exc:  # optional 'train' extra
        raise ModuleNotFoundError(
            "the MNIST-1D tasks need the mnist1d package: install mnemosyne[train]", name=exc.name
        ) from exc
    args = get_dataset_args()
    args.num_samples = _MNIST1D_TRAIN + _MNIST1D_TEST
    args.train_split = _MNIST1D_TRAIN / args.num_samples
    # mnist1d seeds its own generator from args.seed; the generated set is then
    # re-split with our seed so both data sets follow the same convention.
    # (make_dataset, not get_dataset: the latter tries to download a pickle.)
    data = make_dataset(args)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float64)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
    return _split(x, y, _MNIST1D_TEST, seed)


def _sklearn(name: str):
    try:
        from sklearn import datasets
    except ModuleNotFoundError as exc:  # optional 'train' extra
        raise ModuleNotFoundError(f"the {name} tasks need scikit-learn: install mnemosyne[train]",
                                  name=exc.name) from exc
    return datasets


def _table_numpy(name: str, seed: int):
    """The bundled/generated tables; generators use their own fixed ``random_state`` (0)."""
    datasets = _sklearn(name)
    if name == "wine":
        raw = datasets.load_wine()
        x, y, n_test = raw.data, raw.target, 38
    elif name == "breast_cancer":
        raw = datasets.load_breast_cancer()
        x, y, n_test = raw.data, raw.target, 100
    elif name == "blobs5":
        x, y = datasets.make_classification(n_samples=3000, n_features=20, n_informative=10, n_redundant=4,
                                            n_classes=5, n_clusters_per_class=2, class_sep=1.0, flip_y=0.02,
                                            random_state=0)
        n_test = 500
    elif name == "diabetes":
        raw = datasets.load_diabetes()
        x, y, n_test = raw.data, raw.target, 80
    else:  # friedman1
        x, y = datasets.make_friedman1(n_samples=2000, n_features=10, noise=1.0, random_state=0)
        n_test = 400
    y = y.astype(np.float64 if name in REGRESSION_DATASETS else np.int32)
    return _split(x.astype(np.float64), y, n_test, seed)


_LOADERS = {"digits": _digits_numpy, "mnist1d": _mnist1d_numpy}
_CLASSES = {"digits": 10, "mnist1d": 10, "wine": 3, "breast_cancer": 2, "blobs5": 5, "diabetes": 0,
            "friedman1": 0}


@functools.lru_cache(maxsize=16)
def load_dataset(name: str, seed: int = 0) -> Dataset:
    """The standardised train/test split of ``name`` (one of :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"dataset seed must be a non-negative int, got {seed!r}")
    loader = _LOADERS.get(name, lambda s: _table_numpy(name, s))
    x_tr, y_tr, x_te, y_te = loader(seed)
    x_tr, x_te = _standardise(x_tr, x_te)
    if name in REGRESSION_DATASETS:  # unit-variance targets: losses of the two sets are comparable
        mean, std = y_tr.mean(), max(float(y_tr.std()), 1e-3)
        y_tr, y_te = (y_tr - mean) / std, (y_te - mean) / std
        labels = jnp.float32
    else:
        labels = jnp.int32
    return Dataset(
        name=name,
        x_train=jnp.asarray(x_tr, jnp.float32),
        y_train=jnp.asarray(y_tr, labels),
        x_test=jnp.asarray(x_te, jnp.float32),
        y_test=jnp.asarray(y_te, labels),
        num_classes=_CLASSES[name],
    )
