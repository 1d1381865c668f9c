"""The seed-program experiments at test size, asserting their findings."""

import json
import math

import pytest


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory, load_experiment):
    out = tmp_path_factory.mktemp("seed_two_layer")
    return load_experiment("seed_two_layer").run(steps=30, out=out, verbose=False), out


@pytest.fixture(scope="module")
def numpy_net(tmp_path_factory, load_experiment):
    out = tmp_path_factory.mktemp("seed_numpy_net")
    return load_experiment("seed_numpy_net").run(epochs=300, out=out, verbose=False), out


def test_two_layer_four_ways_agree_and_the_hand_gradient_passes(two_layer):
    result, out = two_layer
    assert json.loads((out / "result.json").read_text()) == result
    assert (out / "loss_curves.png").stat().st_size > 0
    variants = result["variants"]
    assert result["variants_compared"] == ["by_hand", "jax_grad", "optax_sgd", "gradflow_trainer"]
    assert result["max_rel_diff_between_variants"] < 1e-10
    initial = variants["by_hand"]["initial_loss"]
    assert 1e7 < initial < 1e8  # unscaled weights: Var(y_pred) ~ 100 * 500
    for name in result["variants_compared"]:
        assert variants[name]["initial_loss"] == initial
        assert variants[name]["final_loss"] < initial / 100  # lr 1e-6 does train
    assert result["checker_passed"]
    assert all(leaf["rel_error"] < 1e-12 for leaf in result["checker"]["leaves"].values())


def test_two_layer_he_init_buys_a_far_lower_loss_and_a_larger_lr(two_layer):
    result, _ = two_layer
    variants = result["variants"]
    naive, he = variants["by_hand"], variants["he_sgd_0.0001"]
    assert he["initial_loss"] < 1e4 < 1e7 < naive["initial_loss"]
    assert he["final_loss"] < 1e-3 * naive["final_loss"]
    assert result["he_final_over_naive_final"] == pytest.approx(he["final_loss"] / naive["final_loss"])
    big = variants["naive_sgd_1e-05"]  # ten times the tutorial's lr blows up
    assert big["final_loss"] is None and big["first_nonfinite_step"] is not None


def test_numpy_net_as_written_crashes_and_only_the_full_fix_passes(numpy_net):
    result, out = numpy_net
    assert json.loads((out / "result.json").read_text()) == result
    assert (out / "loss_curves.png").stat().st_size > 0
    variants = result["variants"]
    assert list(variants) == ["as_written", "fix_b", "fix_ba", "fix_bac", "fix_bacd", "fix_bacde"]
    as_written = variants["as_written"]
    assert as_written["crashed"] and "shape" in as_written["error"]

    for name in ["fix_b", "fix_ba", "fix_bac", "fix_bacd"]:
        v = variants[name]
        assert not v["crashed"] and not v["checker_passed"] and v["failed_leaves"], name
    fixed = variants["fix_bacde"]
    assert fixed["checker_passed"] and fixed["failed_leaves"] == []
    assert max(fixed["rel_errors"].values()) < 1e-5
    assert max(fixed["fd_rel_errors"].values()) < 1e-7

    # each remaining error shows where it should
    assert variants["fix_b"]["failed_leaves"] == ["b1", "b2", "w1", "w2"]  # the sign: everywhere
    assert variants["fix_bac"]["rel_errors"]["b2"] == pytest.approx(1.0)  # (d): output layer frozen
    assert variants["fix_bac"]["rel_errors"]["w2"] == pytest.approx(1.0)
    assert variants["fix_bacd"]["failed_leaves"] == ["w1", "w2"]  # (e): weights only, biases pass


def test_numpy_net_losses(numpy_net):
    result, _ = numpy_net
    variants = result["variants"]
    fixed, ascent = variants["fix_bacde"], variants["fix_b"]
    assert fixed["final_loss"] < 0.9 * fixed["initial_loss"]
    assert ascent["final_loss"] > ascent["initial_loss"]  # (a) unfixed: gradient ascent
    assert all(math.isfinite(v["final_loss"]) for v in variants.values() if not v["crashed"])
