"""Test-sized runs of the any-model research scripts (users' own architectures), asserting their claims."""

import json

import numpy as np
import pytest


def test_widths_mlp_rank_bounds_and_he_vs_glorot(tmp_path, load_experiment):
    exp = load_experiment("widths_mlp")
    result = exp.run(**exp.QUICK, out=tmp_path, verbose=False)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert (tmp_path / "widths_mlp.png").stat().st_size > 1000
    he, glorot = result["inits"]["he"], result["inits"]["glorot"]
    # 1. every forward row is full rank up to min(widths so far), every backward row up to 10
    assert he["rank_bounds_hold"] and glorot["rank_bounds_hold"]
    assert he["layers"] == ["Dense_0", "Dense_1", "Dense_2"]
    # 2. mean field through changing widths: He keeps the per-unit gain at 2, Glorot loses it
    widths = result["widths"]
    np.testing.assert_allclose(he["predicted_gain"], 2.0)
    shrink = [a / (a + b) for a, b in zip(widths[1:-1], widths[2:])]  # per ReLU layer
    np.testing.assert_allclose(np.diff(np.log(glorot["predicted_gain"])), np.log(shrink), rtol=1e-12)
    assert he["max_rel_error"] < 0.1 and glorot["max_rel_error"] < 0.1  # exact spectra vs theory
    assert result["ratio_max_rel_error"] < 1e-4  # the He / Glorot ratio is exact (homogeneity)
    assert result["he_over_glorot_last"] == pytest.approx(
        he["predicted_gain"][-1] / glorot["predicted_gain"][-1], rel=1e-4
    )
