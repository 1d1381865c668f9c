"""Test-sized runs of the classic feed-forward experiments, asserting their claims against theory."""

import json
import math

import numpy as np
import pytest


def _run(load_experiment, tmp_path_factory, name, **extra):
    module = load_experiment(name)
    out = tmp_path_factory.mktemp(name)
    result = module.run(**module.QUICK, **extra, out=out, verbose=False)
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(result))
    return result, out


@pytest.fixture(scope="module")
def activations_depth(load_experiment, tmp_path_factory):
    return _run(load_experiment, tmp_path_factory, "activations_depth")


@pytest.fixture(scope="module")
def glorot_vs_he(load_experiment, tmp_path_factory):
    return _run(load_experiment, tmp_path_factory, "glorot_vs_he")


@pytest.fixture(scope="module")
def norm_and_residual(load_experiment, tmp_path_factory):
    return _run(load_experiment, tmp_path_factory, "norm_and_residual")


@pytest.fixture(scope="module")
def dynamical_isometry(load_experiment, tmp_path_factory):
    return _run(load_experiment, tmp_path_factory, "dynamical_isometry")


def test_sigmoid_gradient_vanishes_as_mean_field_predicts(activations_depth):
    result, out = activations_depth
    assert (out / "grad_norms.png").stat().st_size > 0 and (out / "learning.png").stat().st_size > 0
    c = result["configs"]
    sig, tanh = c["sigmoid"], c["tanh"]
    measured = {k: v["init"]["log10_preact_grad_ratio_first_last"] for k, v in c.items()}
    assert measured["sigmoid"] < -4  # orders of magnitude: ~0.24 per block
    assert measured["sigmoid"] == pytest.approx(sig["theory"]["log10_ratio_trajectory"], abs=0.5)
    assert measured["sigmoid"] == pytest.approx(sig["theory"]["log10_ratio_fixed_point"], abs=0.5)
    assert sig["theory"]["chi1"] == pytest.approx(0.0557, abs=1e-3)
    # tanh at sigma_w = 1: a polynomial loss that the fixed point (ratio 1) misses, the trajectory not
    assert tanh["theory"]["log10_ratio_fixed_point"] == pytest.approx(0.0, abs=1e-6)
    assert tanh["theory"]["log10_ratio_trajectory"] < -0.2
    assert measured["tanh"] == pytest.approx(tanh["theory"]["log10_ratio_trajectory"], abs=0.3)
    assert abs(measured["relu"]) < math.log10(3)  # ReLU + He: chi_1 = 1


def test_sigmoid_lower_layers_learn_slowest(activations_depth):
    result, _ = activations_depth
    c = result["configs"]
    sig = c["sigmoid"]["training"]
    assert sig["relative_change_first_over_last"] < 1e-3
    assert sig["update_ratio_first_over_last"] < 1e-3
    for name in ("tanh", "relu"):
        t = c[name]["training"]
        assert 0.1 < t["relative_change_first_over_last"] < 10, name
        assert 0.1 < t["update_ratio_first_over_last"] < 10, name
    assert abs(sig["train_loss"][-1] - math.log(10)) < 0.05  # sigmoid: still at chance


def test_glorot_halves_the_signal_per_layer(glorot_vs_he):
    result, out = glorot_vs_he
    assert (out / "signal.png").stat().st_size > 0 and (out / "training.png").stat().st_size > 0
    depth, he, gl = result["depth"], result["arms"]["he"], result["arms"]["glorot"]
    tol = 3 * result["log2_ratio_std_of_mean"]  # finite-width fluctuation (Hanin), 3 sigma
    assert 1.0 < tol < 6.0
    for arm in (he, gl):
        assert arm["log2_qL_over_q1_mean"] == pytest.approx(
            arm["log2_qL_over_q1_predicted_finite_width"], abs=tol
        )
        assert arm["log2_qL_over_q1_mean"] == pytest.approx(arm["log2_qL_over_q1_predicted"], abs=tol + 1.0)
        assert arm["nonfinite_steps"] == 0
    assert gl["log2_qL_over_q1_predicted"] == pytest.approx(-(depth - 1))
    assert gl["slope_per_block_mean"] == pytest.approx(-1.0, abs=0.25)
    assert he["slope_per_block_mean"] == pytest.approx(0.0, abs=0.25)
    # the same draws scaled by 1/sqrt(2): exactly one bit lost per block, seed by seed
    diff = np.asarray(gl["log2_qL_over_q1"]) - np.asarray(he["log2_qL_over_q1"])
    np.testing.assert_allclose(diff, -(depth - 1), atol=0.01)
    assert result["log10_grad_glorot_over_he"][0] == pytest.approx(
        result["log10_grad_glorot_over_he_predicted"], abs=0.5
    )


def test_he_trains_and_glorot_stalls(glorot_vs_he):
    result, _ = glorot_vs_he
    he, gl = result["arms"]["he"], result["arms"]["glorot"]
    assert he["final_train_accuracy"] > 0.25
    assert gl["final_train_accuracy"] < 0.15
    assert abs(gl["final_train_loss"] - math.log(10)) < 0.01
    assert he["final_train_loss"] < math.log(10) - 0.4


def test_batchnorm_without_residual_explodes_at_pi_over_pi_minus_one(norm_and_residual):
    result, out = norm_and_residual
    assert (out / "gradients.png").stat().st_size > 0
    c, depth = result["configs"], result["depth"]
    assert result["batchnorm_growth_lambda"] == pytest.approx(math.pi / (math.pi - 1), rel=1e-9)
    bn = c["batchnorm"]
    assert bn["log_slope_per_block_mean"] == pytest.approx(bn["log_slope_predicted"], rel=0.15)
    assert bn["log10_ratio_first_last_mean"] == pytest.approx(bn["log10_ratio_predicted"], rel=0.15)
    assert bn["log10_ratio_first_last_mean"] > math.log10(30)
    assert abs(c["plain"]["log10_ratio_first_last_mean"]) < 0.5  # He, no norm: chi_1 = 1
    res = c["bn_residual"]
    assert res["log10_ratio_first_last_mean"] < math.log10(10)  # polynomial, not lambda^(L/2)
    assert res["log10_ratio_first_last_mean"] == pytest.approx(res["log10_ratio_predicted"], abs=0.2)
    assert res["second_moment_init"][-1] == pytest.approx(res["second_moment_predicted"][-1], rel=0.15)
    assert res["second_moment_predicted"][-1] == pytest.approx(res["second_moment_init"][0] + depth)
    np.testing.assert_allclose(c["rezero"]["log10_ratio_first_last"], 0.0, atol=1e-6)  # identity at init


def test_orthogonal_tanh_is_isometric_and_relu_is_not(dynamical_isometry):
    result, out = dynamical_isometry
    assert (out / "spectra.png").stat().st_size > 0
    c = result["configs"]
    tanh_cp = result["critical_points"]["tanh"]
    assert tanh_cp["chi1"] == pytest.approx(1.0, abs=1e-6)
    assert result["critical_points"]["relu"]["sigma_w"] == pytest.approx(math.sqrt(2), rel=1e-6)
    iso = c["tanh_orthogonal"]
    assert iso["slope_measured"] == pytest.approx(iso["slope_predicted"], abs=0.05)
    for name in ("tanh_gaussian", "relu_orthogonal", "relu_gaussian"):
        assert c[name]["slope_measured"] == pytest.approx(c[name]["slope_predicted"], rel=0.3), name
        assert iso["slope_measured"] < 0.1 * c[name]["slope_measured"], name
    assert c["relu_orthogonal"]["slope_predicted"] == pytest.approx(1.0, abs=1e-6)  # ReLU: no isometry
    assert c["relu_gaussian"]["slope_predicted"] == pytest.approx(2.0, abs=1e-6)
    # criticality: E[lambda] = 1 at every depth; the sample means of the Gaussian ensembles are
    # heavy-tailed at width 32 (seed-to-seed spread of log mean lambda ~ 0.5; relu: dead units)
    tols = {"tanh_orthogonal": 0.25, "relu_orthogonal": 1.5, "tanh_gaussian": 1.5, "relu_gaussian": 1.5}
    for name, tol in tols.items():
        assert abs(c[name]["log_mean_lambda_last"]) < tol, name
    assert iso["isometry_gap_last"] < 0.2 * c["tanh_gaussian"]["isometry_gap_last"]
