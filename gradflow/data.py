"""Offline datasets, deterministic given a seed, and epoch batching that is a pure function of (seed, epoch).

Every loader returns a `Dataset` of numpy arrays: float32 inputs; int32 labels for
classification (`num_classes` set) or float32 targets for regression (`num_classes=None`).
Nothing here touches the network:

- `mnist1d`: MNIST-1D (Greydanus 2020) *generated* locally with `mnist1d.data.make_dataset`
  (the package's download path, `get_dataset(download=True)`, is never called), cached as .npz.
- `digits`: scikit-learn's 8x8 digits, shipped inside the package (`load_digits`).
- `adding_problem`, `copy_task`: the long-memory benchmarks of recurrent-network papers.
- `teacher_student`, `random_regression`: synthetic regression.

The synthetic generators draw train and test from independent streams of one seed
(`np.random.SeedSequence(seed).spawn(2)`), so the test set does not change with `num_samples`.
`load(name, **kw)` looks a loader up by name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gradflow._checks import check_int, check_real

ADDING_BASELINE_MSE = 1.0 / 6.0
"""MSE of always predicting 1 on the adding problem: Var(U1 + U2) = 2/12 (Le et al. 2015)."""

COPY_BLANK = 0
"""Class index of the blank symbol in `copy_task`; data symbols are 1..num_symbols and the
delimiter is num_symbols + 1."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split of numpy arrays.

    Attributes:
      x_train, x_test: float32 inputs, shape (N, ...).
      y_train, y_test: int32 class labels (classification) or float32 targets (regression).
      num_classes: number of classes, or None for regression.
      name: a short description, e.g. "mnist1d".
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None
    name: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example."""
        return tuple(self.x_train.shape[1:])


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent train / test generators from one seed."""
    train, test = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(train), np.random.default_rng(test)


# --------------------------------------------------------------------------------------------- MNIST-1D


def mnist1d(seed: int = 0, num_samples: int = 5000, cache_dir: str | os.PathLike | None = "data/") -> Dataset:
    """MNIST-1D (Greydanus 2020), generated offline: 40-dim inputs, 10 classes.

    Runs `mnist1d.data.make_dataset` with the package's default arguments except `seed` and
    `num_samples` (train/test split 0.8/0.2, as the package does). Generation never touches
    the network. `make_dataset` seeds numpy's and python's global RNGs; their states are
    restored afterwards. 5000 samples take about 5 s, hence the cache.

    Args:
      seed: generation seed (the package's own default is 42).
      num_samples: total examples; rounded down to a multiple of 10 (equal per class).
      cache_dir: folder for the .npz cache (created if missing), keyed by (seed,
        num_samples, mnist1d version); None disables caching.

    Returns:
      Dataset with x of shape (N, 40) float32 and int32 labels in 0..9; N_train = 0.8 N.

    Raises:
      ValueError: num_samples < 10.
    """
    check_int("num_samples", num_samples, 1)
    if num_samples < 10:
        raise ValueError(f"mnist1d needs num_samples >= 10 (one per class), got {num_samples}")
    key = {
        "seed": int(seed),
        "num_samples": int(num_samples),
        "mnist1d": importlib.metadata.version("mnist1d"),
        "format": 1,
    }
    path = None
    if cache_dir is not None:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
        path = Path(cache_dir) / f"mnist1d_n{num_samples}_s{seed}_{digest}.npz"
        if path.exists():
            with np.load(path) as f:
                arrays = {k: f[k] for k in f.files}
            return Dataset(**arrays, num_classes=10, name="mnist1d")
    arrays = _generate_mnist1d(int(seed), int(num_samples))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # write-then-rename: concurrent runs never read a half-written file
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    return Dataset(**arrays, num_classes=10, name="mnist1d")


def _generate_mnist1d(seed: int, num_samples: int) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset  # lazy: imports matplotlib (~2 s)

    args = get_dataset_args()
    args.seed, args.num_samples = seed, num_samples
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002 (mnist1d seeds the globals)
    try:
        d = make_dataset(args)  # the generation path; `get_dataset` would try to download
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {
        "x_train": np.asarray(d["x"], np.float32),
        "y_train": np.asarray(d["y"], np.int32),
        "x_test": np.asarray(d["x_test"], np.float32),
        "y_test": np.asarray(d["y_test"], np.int32),
    }


# ----------------------------------------------------------------------------------------------- digits


def digits(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images), pixels scaled to [0, 1].

    Args:
      seed: seed of the split (stratified by class, `sklearn.model_selection.train_test_split`).
      test_fraction: fraction of examples in the test set, in (0, 1).

    Returns:
      Dataset with x of shape (N, 64) float32 in [0, 1] and int32 labels in 0..9.

    Raises:
      ValueError: test_fraction outside (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    d = load_digits()
    x = (np.asarray(d.data) / 16.0).astype(np.float32)  # pixel values are 0..16
    y = np.asarray(d.target, np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes=10, name="digits")


# ------------------------------------------------------------------------------- long-memory sequences


def _adding(rng: np.random.Generator, n: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    values = rng.uniform(0.0, 1.0, (n, seq_len))
    half = seq_len // 2
    first = rng.integers(0, half, n)
    second = rng.integers(half, seq_len, n)
    markers = np.zeros((n, seq_len))
    rows = np.arange(n)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values[rows, first] + values[rows, second])[:, None].astype(np.float32)
    return x, y


def adding_problem(
    seq_len: int, num_samples: int = 10_000, seed: int = 0, *, num_test: int = 1000
) -> Dataset:
    """The adding problem (Hochreiter & Schmidhuber 1997; the version of Le et al. 2015).

    Each input step carries two channels: a value U(0, 1) and a marker. Exactly two markers
    are 1, one at a uniform position in the first half [0, T//2) and one in the second half
    [T//2, T); the target is the sum of the two marked values. Predicting 1 always gives
    MSE = Var(U1 + U2) = 1/6 (`ADDING_BASELINE_MSE`); a model has learned something when
    it beats that.

    Args:
      seq_len: T >= 2.
      num_samples, num_test: train and test sizes.
      seed: seed; train and test come from independent streams.

    Returns:
      Dataset with x of shape (N, T, 2) float32 and targets of shape (N, 1) float32.

    Raises:
      ValueError: seq_len < 2 (no two halves) or a size < 1.
    """
    check_int("num_samples", num_samples, 1)
    check_int("num_test", num_test, 1)
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"adding_problem needs seq_len >= 2 (one marker in each half), got {seq_len!r}")
    rng_train, rng_test = _streams(seed)
    x_tr, y_tr = _adding(rng_train, num_samples, seq_len)
    x_te, y_te = _adding(rng_test, num_test, seq_len)
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes=None, name=f"adding_T{seq_len}")


def copy_baseline_xent(seq_len: int, num_symbols: int = 8, copy_len: int = 10) -> float:
    """Cross-entropy per step of the memoryless copy-task baseline (Arjovsky et al. 2016).

    Predicting blank for the first T + copy_len steps and a uniform symbol for the last
    copy_len gives copy_len * log(num_symbols) / (T + 2 * copy_len) nats per step.
    """
    return copy_len * math.log(num_symbols) / (seq_len + 2 * copy_len)


def _copy(
    rng: np.random.Generator, n: int, seq_len: int, num_symbols: int, copy_len: int, one_hot: bool
) -> tuple[np.ndarray, np.ndarray]:
    total = seq_len + 2 * copy_len
    symbols = rng.integers(1, num_symbols + 1, (n, copy_len))
    inputs = np.full((n, total), COPY_BLANK, np.int32)
    inputs[:, :copy_len] = symbols
    inputs[:, seq_len + copy_len - 1] = num_symbols + 1  # delimiter: "start recalling"
    labels = np.full((n, total), COPY_BLANK, np.int32)
    labels[:, seq_len + copy_len :] = symbols
    if one_hot:
        x = np.eye(num_symbols + 2, dtype=np.float32)[inputs]
    else:
        x = inputs[..., None].astype(np.float32)
    return x, labels


def copy_task(
    seq_len: int,
    num_symbols: int = 8,
    copy_len: int = 10,
    num_samples: int = 10_000,
    seed: int = 0,
    *,
    num_test: int = 1000,
    one_hot: bool = True,
) -> Dataset:
    """The copy-memory task (Hochreiter & Schmidhuber 1997, as set up by Arjovsky et al. 2016).

    Alphabet: blank 0 (`COPY_BLANK`), data symbols 1..num_symbols, delimiter num_symbols + 1.
    Input: copy_len uniform data symbols, T - 1 blanks, the delimiter, copy_len blanks
    (length T + 2 copy_len). Target: T + copy_len blanks, then the copy_len data symbols.
    The memoryless baseline scores `copy_baseline_xent(T, num_symbols, copy_len)`.

    Args:
      seq_len: T >= 1, the delay between the last data symbol and the delimiter (+1).
      num_symbols: data alphabet size (>= 1).
      copy_len: number of symbols to remember (>= 1).
      num_samples, num_test: train and test sizes.
      seed: seed; train and test come from independent streams.
      one_hot: inputs one-hot of width num_symbols + 2; else the integer symbol as one
        float channel.

    Returns:
      Dataset with x of shape (N, T + 2 copy_len, num_symbols + 2) (or (..., 1)) float32,
      per-step int32 labels of shape (N, T + 2 copy_len), num_classes = num_symbols + 2.

    Raises:
      ValueError: a size < 1.
    """
    check_int("seq_len", seq_len, 1)
    check_int("num_symbols", num_symbols, 1)
    check_int("copy_len", copy_len, 1)
    check_int("num_samples", num_samples, 1)
    check_int("num_test", num_test, 1)
    rng_train, rng_test = _streams(seed)
    x_tr, y_tr = _copy(rng_train, num_samples, seq_len, num_symbols, copy_len, one_hot)
    x_te, y_te = _copy(rng_test, num_test, seq_len, num_symbols, copy_len, one_hot)
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes=num_symbols + 2, name=f"copy_T{seq_len}")


# ------------------------------------------------------------------------------------ synthetic regression


def teacher_student(
    d_in: int,
    d_out: int,
    num_samples: int = 1000,
    seed: int = 0,
    teacher_depth: int = 2,
    width: int = 64,
    noise: float = 0.0,
    *,
    num_test: int = 1000,
) -> Dataset:
    """Regression targets from a random teacher MLP (tanh hidden layers).

    x ~ N(0, I_{d_in}); the teacher has `teacher_depth` dense layers (teacher_depth - 1
    hidden tanh layers of `width` units, then a linear readout), weights N(0, 1/fan_in),
    no biases, drawn from `seed`; y = teacher(x) + noise * N(0, 1). teacher_depth = 1 is a
    linear teacher. The teacher is the same for train and test.

    Args:
      d_in, d_out: input and output dimensions.
      num_samples, num_test: train and test sizes.
      seed: seed of the teacher, the inputs and the label noise.
      teacher_depth: number of dense layers of the teacher (>= 1).
      width: hidden width of the teacher.
      noise: standard deviation of additive Gaussian label noise (>= 0).

    Returns:
      Dataset with x of shape (N, d_in) and y of shape (N, d_out), both float32.

    Raises:
      ValueError: a size < 1 or negative noise.
    """
    check_int("d_in", d_in, 1)
    check_int("d_out", d_out, 1)
    check_int("num_samples", num_samples, 1)
    check_int("num_test", num_test, 1)
    check_int("teacher_depth", teacher_depth, 1)
    check_int("width", width, 1)
    check_real("noise", noise, lo=0.0)
    teacher_seq, train_seq, test_seq = np.random.SeedSequence(seed).spawn(3)
    rng = np.random.default_rng(teacher_seq)
    dims = [d_in] + [width] * (teacher_depth - 1) + [d_out]
    weights = [rng.standard_normal((a, b)) / math.sqrt(a) for a, b in zip(dims[:-1], dims[1:])]

    def sample(seq: np.random.SeedSequence, n: int) -> tuple[np.ndarray, np.ndarray]:
        r = np.random.default_rng(seq)
        x = r.standard_normal((n, d_in))
        h = x
        for w in weights[:-1]:
            h = np.tanh(h @ w)
        y = h @ weights[-1] + noise * r.standard_normal((n, d_out))
        return x.astype(np.float32), y.astype(np.float32)

    x_tr, y_tr = sample(train_seq, num_samples)
    x_te, y_te = sample(test_seq, num_test)
    return Dataset(x_tr, y_tr, x_te, y_te, num_classes=None, name=f"teacher_student_L{teacher_depth}")


def random_regression(seed: int = 0) -> Dataset:
    """The classic two-layer-network exercise: N=64, D_in=1000, H=100, D_out=10.

    x (64, 1000) and y (64, 10) are independent standard normals (there is nothing to learn
    but the fit itself); the test split is empty, of shapes (0, 1000) and (0, 10).
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((64, 1000)).astype(np.float32)
    y = rng.standard_normal((64, 10)).astype(np.float32)
    return Dataset(
        x, y, np.zeros((0, 1000), np.float32), np.zeros((0, 10), np.float32), None, "random_regression"
    )


# ----------------------------------------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[..., Dataset]] = {
    "mnist1d": mnist1d,
    "digits": digits,
    "adding": adding_problem,
    "copy": copy_task,
    "teacher_student": teacher_student,
    "random_regression": random_regression,
}


def names() -> list[str]:
    """Names accepted by `load`, sorted."""
    return sorted(_LOADERS)


def load(name: str, **kwargs) -> Dataset:
    """The dataset `name` built with `kwargs`, e.g. `load("adding", seq_len=100)`.

    Raises:
      ValueError: unknown name (listing the known ones) or bad arguments.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(names())}")
    try:
        return _LOADERS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"dataset {name!r}: bad arguments {kwargs}: {e}") from None
