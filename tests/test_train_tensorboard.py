"""gradflow.train.tensorboard: the events read back (tensorboard's own reader) are the records."""

import json

import numpy as np
import pytest
from _datasets import classification

from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig
from gradflow.train import TrainConfig, fit
from gradflow.train.tensorboard import layer_tag

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(run_dir):
    acc = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"),
        size_guidance={event_accumulator.SCALARS: 0, event_accumulator.HISTOGRAMS: 0},
    )
    acc.Reload()
    return acc


def test_the_events_are_the_records_and_a_resumed_run_logs_each_epoch_once(tmp_path):
    x, y = classification(5, 384, d=8, c=3)
    data = (x[:256], y[:256], x[256:], y[256:])
    model = MLPStack(depth=3, width=8, activation="tanh", num_outputs=3)
    cfg = TrainConfig(epochs=3, batch_size=64, diagnostics_every=1, optim=OptimConfig("adam", 1e-2))
    run_dir = tmp_path / "run"

    def crash(epoch, rec):
        if epoch == 1:
            raise RuntimeError("killed after epoch 1")

    with pytest.raises(RuntimeError, match="killed"):
        fit(model, cfg, data, run_dir=run_dir, progress=False, tensorboard=True, callback=crash)
    result = fit(model, cfg, data, run_dir=run_dir, progress=False, tensorboard=True)  # resumes
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1, 2] == [r["epoch"] for r in result.history]
    acc = _events(run_dir)
    tags = acc.Tags()["scalars"]
    layers = [layer_tag(name) for name in result.diagnostic_layers]
    assert layers == ["blocks.1", "blocks.2", "blocks.3"], result.diagnostic_layers
    assert f"grad_norm/{layers[0]}" in tags and f"update_ratio/{layers[-1]}" in tags
    for tag in ("loss", "accuracy", "test_loss", "test_accuracy", "grad_norm_global"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [0, 1, 2], tag  # each epoch once, though epoch 2 ran after a crash
        np.testing.assert_allclose(
            [e.value for e in events], [r[tag] for r in records], rtol=1e-6, err_msg=tag
        )
    for i, name in enumerate(layers):
        for diag in ("grad_norm", "update_ratio", "saturated"):
            got = [e.value for e in acc.Scalars(f"{diag}/{name}")]
            np.testing.assert_allclose(
                got, [r[diag][i] for r in records], rtol=1e-6, err_msg=f"{diag}/{name}"
            )
    # events lost: a rerun of the finished run trains nothing and rewrites them from the records
    import shutil

    shutil.rmtree(run_dir / "tensorboard")
    fit(model, cfg, data, run_dir=run_dir, progress=False, tensorboard=True)
    acc = _events(run_dir)
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2]
    np.testing.assert_allclose(
        [e.value for e in acc.Scalars("loss")], [r["loss"] for r in records], rtol=1e-6
    )
    hist = acc.Histograms("layers/grad_norm")
    assert [h.step for h in hist] == [0, 1, 2]
    for h, r in zip(hist, records):
        v = h.histogram_value
        assert v.num == 3 and v.min == pytest.approx(min(r["grad_norm"]), rel=1e-6)
        assert v.max == pytest.approx(max(r["grad_norm"]), rel=1e-6)


def test_layer_names_become_tensorboard_tags():
    assert layer_tag("stage1[0]") == "stage1.0" and layer_tag("ResBlock_0") == "ResBlock_0"
    assert layer_tag("stage2/block1") == "stage2/block1" and layer_tag("a b:c") == "a_b_c"


def test_tensorboard_needs_a_run_dir():
    x, y = classification(5, 128, d=8, c=3)
    model = MLPStack(depth=2, width=8, activation="tanh", num_outputs=3)
    with pytest.raises(ValueError, match="give a run_dir"):
        fit(model, TrainConfig(epochs=1, batch_size=64), (x, y, None, None), tensorboard=True)
