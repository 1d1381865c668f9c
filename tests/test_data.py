import math
import socket
import time
import urllib.request

import numpy as np
import pytest

from gradflow import data


def _same(a: data.Dataset, b: data.Dataset) -> bool:
    return all(
        np.array_equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_test", "y_test")
    )


def _block_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    import requests

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_mnist1d_generates_offline_and_caches(monkeypatch, tmp_path):
    _block_network(monkeypatch)
    cache = tmp_path / "not" / "yet" / "there"
    state = np.random.get_state()  # noqa: NPY002
    ds = data.mnist1d(seed=3, num_samples=200, cache_dir=cache)
    assert np.array_equal(np.random.get_state()[1], state[1])  # noqa: NPY002 (global RNG untouched)
    assert ds.x_train.shape == (160, 40) and ds.x_test.shape == (40, 40)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.num_classes == 10 and set(np.unique(ds.y_train)) <= set(range(10))
    assert len(list(cache.glob("*.npz"))) == 1
    t = time.perf_counter()
    again = data.mnist1d(seed=3, num_samples=200, cache_dir=cache)
    assert time.perf_counter() - t < 0.5 and _same(ds, again)
    other = data.mnist1d(seed=4, num_samples=200, cache_dir=None)
    assert not np.array_equal(ds.x_train, other.x_train)
    assert _same(ds, data.mnist1d(seed=3, num_samples=200, cache_dir=None))  # cache == fresh generation
    with pytest.raises(ValueError, match="num_samples"):
        data.mnist1d(num_samples=5, cache_dir=None)


def test_digits():
    ds = data.digits(seed=0)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert ds.x_train.shape[1:] == (64,) and ds.x_train.dtype == np.float32 and ds.y_test.dtype == np.int32
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1 and ds.x_train.max() == 1
    assert len(ds.x_test) == math.ceil(0.2 * 1797)
    assert _same(ds, data.digits(seed=0)) and not _same(ds, data.digits(seed=1))
    with pytest.raises(ValueError, match="test_fraction"):
        data.digits(test_fraction=1.0)


def test_adding_problem_structure_and_baseline():
    T = 20
    ds = data.adding_problem(T, num_samples=20_000, seed=0, num_test=10)
    x, y = ds.x_train, ds.y_train
    assert x.shape == (20_000, T, 2) and y.shape == (20_000, 1) and ds.num_classes is None
    assert x.dtype == np.float32 and y.dtype == np.float32
    marks = x[..., 1]
    assert np.all(marks.sum(1) == 2)
    assert np.all(marks[:, : T // 2].sum(1) == 1) and np.all(marks[:, T // 2 :].sum(1) == 1)
    np.testing.assert_allclose(y[:, 0], (x[..., 0] * marks).sum(1), rtol=1e-6)
    # predicting 1 always: MSE = 1/6; sd of (S - 1)^2 is sqrt(1/15 - 1/36) ~ 0.197
    mse = float(np.mean((y - 1.0) ** 2))
    se = math.sqrt(1 / 15 - 1 / 36) / math.sqrt(len(y))
    assert abs(mse - data.ADDING_BASELINE_MSE) < 4 * se, (mse, se)


def test_copy_task_structure_and_baseline():
    T, K, C = 15, 8, 10
    ds = data.copy_task(T, num_symbols=K, copy_len=C, num_samples=4000, seed=0, num_test=10)
    x, y = ds.x_train, ds.y_train
    assert x.shape == (4000, T + 2 * C, K + 2) and y.shape == (4000, T + 2 * C)
    assert x.dtype == np.float32 and y.dtype == np.int32 and ds.num_classes == K + 2
    tokens = x.argmax(-1)
    assert np.all(y[:, : T + C] == data.COPY_BLANK)
    np.testing.assert_array_equal(y[:, T + C :], tokens[:, :C])
    assert np.all((tokens[:, :C] >= 1) & (tokens[:, :C] <= K))
    assert np.all(tokens[:, T + C - 1] == K + 1)  # delimiter
    # the best memoryless predictor: per-position empirical label frequencies
    counts = np.stack([(y == c).mean(0) for c in range(K + 2)])  # (classes, steps)
    xent = float(np.mean([-(p * np.log(p)).sum() for p in (counts.T + 1e-30)]))
    baseline = data.copy_baseline_xent(T, K, C)
    assert baseline == pytest.approx(C * math.log(K) / (T + 2 * C))
    assert abs(xent - baseline) < 0.005, (xent, baseline)
    flat = data.copy_task(T, K, C, num_samples=3, seed=0, num_test=1, one_hot=False)
    np.testing.assert_array_equal(flat.x_train[..., 0], tokens[:3])


def test_teacher_student_and_random_regression():
    ds = data.teacher_student(5, 3, num_samples=50, seed=0, teacher_depth=3, width=16, num_test=20)
    assert ds.x_train.shape == (50, 5) and ds.y_train.shape == (50, 3) and ds.x_test.shape == (20, 5)
    assert ds.y_train.dtype == np.float32 and ds.num_classes is None
    noisy = data.teacher_student(
        5, 3, num_samples=50, seed=0, teacher_depth=3, width=16, noise=0.1, num_test=20
    )
    np.testing.assert_array_equal(noisy.x_train, ds.x_train)  # same teacher and inputs, noise only
    assert 0 < np.std(noisy.y_train - ds.y_train) < 0.2
    lin = data.teacher_student(4, 2, num_samples=30, seed=1, teacher_depth=1)
    w, *_ = np.linalg.lstsq(lin.x_train, lin.y_train, rcond=None)
    np.testing.assert_allclose(lin.x_train @ w, lin.y_train, atol=1e-5)  # linear teacher is linear
    rr = data.random_regression()
    assert rr.x_train.shape == (64, 1000) and rr.y_train.shape == (64, 10) and rr.x_test.shape == (0, 1000)
    assert abs(rr.x_train.std() - 1) < 0.02


@pytest.mark.parametrize(
    "make",
    [
        lambda s: data.adding_problem(8, 30, s, num_test=5),
        lambda s: data.copy_task(4, 3, 2, 30, s, num_test=5),
        lambda s: data.teacher_student(3, 2, 30, s, num_test=5),
        lambda s: data.random_regression(s),
    ],
    ids=["adding", "copy", "teacher_student", "random_regression"],
)
def test_determinism(make):
    assert _same(make(0), make(0))
    assert not _same(make(0), make(1))


def test_test_set_independent_of_train_size():
    a = data.adding_problem(10, 100, 0, num_test=50)
    b = data.adding_problem(10, 300, 0, num_test=50)
    np.testing.assert_array_equal(a.x_test, b.x_test)


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="seq_len"):
        data.adding_problem(1, 10)
    with pytest.raises(ValueError, match="num_samples"):
        data.adding_problem(10, -5)
    with pytest.raises(ValueError, match="copy_len"):
        data.copy_task(10, copy_len=0)
    with pytest.raises(ValueError, match="noise"):
        data.teacher_student(2, 2, noise=-1.0)
    with pytest.raises(ValueError, match="known datasets: adding, copy, digits"):
        data.load("cifar10")
    with pytest.raises(ValueError, match="bad arguments"):
        data.load("adding", seq_len=10, colour="red")


def test_load_registry():
    assert data.names() == ["adding", "copy", "digits", "mnist1d", "random_regression", "teacher_student"]
    assert _same(
        data.load("adding", seq_len=6, num_samples=4, num_test=2), data.adding_problem(6, 4, num_test=2)
    )
