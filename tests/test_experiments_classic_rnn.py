"""Test-sized runs of the classic-result experiments (adding problem, clipping and decay,
trainable depth), asserting their claims."""

import json
import math

import numpy as np
import pytest


@pytest.fixture(scope="module")
def adding(tmp_path_factory, load_experiment):
    out = tmp_path_factory.mktemp("rnn_lstm_gru_adding")
    module = load_experiment("rnn_lstm_gru_adding")
    return module.run(**module.QUICK, out=out, verbose=False), out


@pytest.fixture(scope="module")
def clipping(tmp_path_factory, load_experiment):
    out = tmp_path_factory.mktemp("clipping_and_decay")
    module = load_experiment("clipping_and_decay")
    return module.run(**module.QUICK, out=out, verbose=False), out


@pytest.fixture(scope="module")
def depth(tmp_path_factory, load_experiment):
    out = tmp_path_factory.mktemp("trainable_depth")
    module = load_experiment("trainable_depth")
    return module.run(**module.QUICK, out=out, verbose=False), out


def test_adding_lstm_beats_the_baseline_where_the_rnn_stays_at_it(adding):
    result, out = adding
    assert json.loads((out / "result.json").read_text()) == result
    for name in ("mse_vs_T.png", "loss_curves.png", "grad_through_time.png"):
        assert (out / name).stat().st_size > 1000
    rnn, lstm = result["runs"]["rnn_T100"], result["runs"]["lstm_T100"]
    assert rnn["baseline_mse"] == pytest.approx(1 / 6, abs=0.01)  # predicting 1 on the test set
    assert lstm["best_test_mse"] < 0.03  # learned: far below 1/6
    assert rnn["best_test_mse"] >= 0.15  # stuck at the baseline
    assert not rnn["nonfinite"] and not lstm["nonfinite"]


def test_adding_gradients_through_time(adding):
    result, _ = adding
    rnn, lstm = result["runs"]["rnn_T100"], result["runs"]["lstm_T100"]
    # At initialization both vanish through time (many decades over 100 steps), the default LSTM
    # (forget gate ~0.5) no better than the orthogonal-init RNN.
    for r in (rnn, lstm):
        assert r["grad_init"]["decay_decades"] > 3
        assert r["spectra_init"]["marker_log_smax"] < -5
    assert lstm["spectra_init"]["marker_log_smax"] < rnn["spectra_init"]["marker_log_smax"]
    # Trained, the LSTM carries the gradient from the end back to the first marker; the RNN's
    # still vanishes there (decades of ||d loss / d s_t||; log sigma_max of d s_T / d s_t).
    assert rnn["grad_trained"]["marker_decay_decades"] > 4
    assert lstm["grad_trained"]["marker_decay_decades"] < 1.5
    assert lstm["spectra_trained"]["marker_log_smax"] > -2
    assert rnn["spectra_trained"]["marker_log_smax"] < lstm["spectra_trained"]["marker_log_smax"] - 8


def test_clipping_rescues_the_exploding_rnn(clipping):
    result, out = clipping
    assert json.loads((out / "result.json").read_text()) == result
    assert (out / "clipping.png").stat().st_size > 1000 and (out / "decay.png").stat().st_size > 1000
    clip = result["clipping"]
    assert len(clip["unclipped"]) == len(clip["clipped"]) == 2
    for r in clip["unclipped"]:
        nf = r["nonfinite"]
        assert nf is not None and nf["step"] < clip["steps"] // 2  # caught early, by the trainer
        assert nf["layer"] in ("cell", "head") and nf["kind"] in ("loss", "gradient", "update")
        assert r["log10_grad_norm"][0] > 5  # it exploded before the NaN
        assert r["loss"][-1] is None
    for r in clip["clipped"]:
        assert r["nonfinite"] is None
        assert all(v is not None and math.isfinite(v) for v in r["loss"])
        assert r["loss"][-1] < 0.5 * r["loss"][0]  # it learns
        assert r["test_loss"] < 0.3
        assert r["log10_grad_norm"][0] > 1  # the raw gradient is large: clipping is active


def test_weight_decay_matches_the_geometric_oracle(clipping):
    result, _ = clipping
    o = result["decay_oracle"]
    factor = (1 - o["lr"] * o["weight_decay"]) ** o["steps"]
    assert o["predicted_factor"] == pytest.approx(factor)
    for name in ("sgd_weight_decay", "sgd_l2", "adamw"):
        assert o[name]["norm_ratio"] == pytest.approx(factor, rel=1e-5), name
        assert o[name]["max_rel_error_vs_geometric"] < 1e-5, name
        assert o[name]["biases_unchanged"], name
    # Adam normalizes the coupled L2 gradient: a fixed step lr per update, not a geometric decay.
    adam_l2 = o["adam_l2"]
    assert 0.85 < adam_l2["shrink_over_lr_t"] <= 1.0  # measured 0.93
    assert adam_l2["max_rel_error_vs_geometric"] > 0.05  # measured 0.09
    assert adam_l2["biases_unchanged"]


def test_trainable_depth_follows_six_xi_c(depth):
    result, out = depth
    assert json.loads((out / "result.json").read_text()) == result
    assert (out / "trainable_depth.png").stat().st_size > 1000
    sw = result["sigma_w"]
    acc = np.asarray(result["train_accuracy"])  # (sigma_w, depth)
    limit = np.asarray(result["six_xi_c"])
    assert result["depths"] == [6, 40]
    crit = sw.index(1.327)
    far = [i for i in range(len(sw)) if i != crit]
    assert result["critical_sigma_w"] == pytest.approx(1.327, abs=1e-3)
    # theory: depth 40 lies beyond 6 xi_c off criticality, far inside it at criticality
    assert all(limit[i] < 40 / 1.5 for i in far) and limit[crit] > 1000
    assert np.all(acc[:, 0] > 0.35)  # shallow: every sigma_w trains
    assert acc[crit, 1] > 0.25  # deep: the critical net trains ...
    assert all(acc[i, 1] < 0.2 for i in far)  # ... the ordered and chaotic ones do not
    assert result["agreement"] == 1.0
    assert result["trained_beyond_six_xi_c"] == 0
