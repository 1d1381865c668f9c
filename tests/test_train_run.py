"""gradflow.train.run: fit, its records on disk, stopping, and resume after a kill."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _datasets import classification, regression

from gradflow import initializers as gi
from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig
from gradflow.train import (
    NONFINITE_KINDS,
    TrainConfig,
    fit,
)


def test_deep_relu_trains_while_deep_sigmoid_stays_at_chance():
    # The classic result (Glorot & Bengio 2010) at test size: 12 blocks, SGD + momentum.
    x, y = classification(2, 1536, d=16, c=4)
    data = (x[:1024], y[:1024], x[1024:], y[1024:])
    cfg = TrainConfig(epochs=16, batch_size=64, diagnostics_every=16, optim=OptimConfig("momentum", 0.02))
    acc, ratio = {}, {}
    for act, init in [("relu", gi.he_normal()), ("sigmoid", gi.lecun_normal())]:
        model = MLPStack(depth=12, width=24, activation=act, kernel_init=init, num_outputs=4)
        result = fit(model, cfg, data, progress=False)
        acc[act] = result.test["accuracy"]
        g = result.history[0]["grad_norm"]
        ratio[act] = g[0] / g[-1]
    majority = float(jnp.max(jnp.bincount(data[3], length=4))) / data[3].shape[0]  # chance level
    print(f"test accuracy {acc}, chance {majority:.3f}, first/last-block gradient norm {ratio}")
    assert acc["relu"] > 0.75, acc
    assert acc["sigmoid"] < majority + 0.05, (acc, majority)
    assert ratio["sigmoid"] < 1e-4 < 1e-1 < ratio["relu"], ratio


def test_clipping_keeps_an_exploding_net_finite_and_stop_keeps_earlier_records(tmp_path):
    x, y = regression(3, 256)
    model = MLPStack(depth=4, width=16, activation="tanh", kernel_init=gi.gaussian(3.0), num_outputs=1)
    base = dict(task="regression", epochs=10, batch_size=64, diagnostics_every=0)
    unclipped = TrainConfig(**base, optim=OptimConfig("sgd", 0.5))
    clipped = TrainConfig(**base, optim=OptimConfig("sgd", 0.5, clip="global_norm", clip_value=1.0))
    r = fit(model, unclipped, (x, y, x, y), run_dir=tmp_path / "unclipped")
    assert r.stopped and r.nonfinite is not None
    stop_epoch = r.nonfinite["epoch"]
    assert 1 <= stop_epoch < 9 and len(r.history) == stop_epoch + 1
    assert all(np.isfinite(h["loss"]) for h in r.history[:stop_epoch])
    assert r.nonfinite["kind"] in NONFINITE_KINDS[1:]
    lines = (tmp_path / "unclipped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == list(range(stop_epoch + 1))
    assert all(
        jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(r.state.params)
    )  # last finite state
    # the run directory's identity covers the data and the initializers: a rerun with either
    # changed is refused naming it, before any training (the records stay)
    with pytest.raises(ValueError, match=r"another config \(data\.sha256"):
        fit(model, unclipped, (x, y * 2, x, y), run_dir=tmp_path / "unclipped")
    with pytest.raises(ValueError, match=r"another config \(init"):
        fit(
            model.clone(kernel_init=gi.gaussian(2.9)), unclipped, (x, y, x, y), run_dir=tmp_path / "unclipped"
        )
    assert (tmp_path / "unclipped" / "metrics.jsonl").read_text().splitlines() == lines
    c = fit(model, clipped, (x, y, x, y))
    assert not c.stopped and c.nonfinite is None and len(c.history) == 10
    assert np.isfinite(c.test["loss"]) and c.history[-1]["loss"] < c.history[0]["loss"]


_CASE = """
import jax, jax.numpy as jnp
from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig
from gradflow.train import TrainConfig

def build():
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (192, 8))
    y = jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1)
    model = MLPStack(depth=3, width=16, activation="relu", norm="batch", dropout_rate=0.1, num_outputs=3)
    cfg = TrainConfig(epochs=4, batch_size=32, seed=3, diagnostics_every=0, optim=OptimConfig("adam", 3e-3))
    return model, cfg, (x[:160], y[:160], x[160:], y[160:])
"""


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    (tmp_path / "case.py").write_text(_CASE)
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from case import build
        from gradflow.train import fit
        model, cfg, data = build()
        def die(epoch, record):
            if epoch == 1:
                os._exit(3)  # killed after epoch 1's checkpoint: no cleanup, no flush
        fit(model, cfg, data, run_dir={str(run_dir)!r}, callback=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0", "1"]

    sys.path.insert(0, str(tmp_path))
    try:
        from case import build
    finally:
        sys.path.remove(str(tmp_path))
    model, cfg, data = build()
    resumed = fit(model, cfg, data, run_dir=run_dir)
    whole = fit(model, cfg, data)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, whole.state.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.batch_stats, whole.state.batch_stats)
    assert int(resumed.state.step) == int(whole.state.step) == 4 * 5
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 3
    # a corrupt latest checkpoint is set aside with a warning; the run resumes from the one before
    # and redoes the lost epoch, to the same result
    for f in (run_dir / "checkpoints" / "3").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")
    with pytest.warns(UserWarning, match="checkpoint of epoch 3 .* unreadable"):
        again = fit(model, cfg, data, run_dir=run_dir)
    assert (run_dir / "corrupt-checkpoints" / "3").is_dir()
    assert [h["epoch"] for h in again.history] == [0, 1, 2, 3]
    jax.tree.map(np.testing.assert_array_equal, again.state.params, whole.state.params)
    with pytest.raises(ValueError, match="another config"):
        fit(model, TrainConfig(epochs=5), data, run_dir=run_dir)


def test_ctrl_c_stops_at_an_epoch_boundary_with_a_checkpoint(tmp_path):
    # The first SIGINT is a request: the epoch in flight finishes, is recorded and checkpointed,
    # and fit returns `interrupted`; the rerun resumes to the uninterrupted result.
    sys.path.insert(0, str(tmp_path))
    (tmp_path / "case.py").write_text(_CASE)
    try:
        from case import build
    finally:
        sys.path.remove(str(tmp_path))
    model, cfg, data = build()
    run_dir = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)

    def ctrl_c(epoch, record):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGINT)

    cut = fit(model, cfg, data, run_dir=run_dir, callback=ctrl_c)
    assert cut.interrupted and [h["epoch"] for h in cut.history] == [0, 1]
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0", "1"]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    resumed = fit(model, cfg, data, run_dir=run_dir)
    whole = fit(model, cfg, data)
    assert not resumed.interrupted and [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, whole.state.params)
