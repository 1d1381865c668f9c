"""Test-sized runs of the theory experiments, asserting their claims."""

import numpy as np
import pytest


def test_phase_diagram_critical_line(tmp_path, load_experiment):
    r = load_experiment("phase_diagram").run(str(tmp_path), n_w=6, n_b=3)
    line = np.asarray(r["critical_sigma_w"])
    assert line[0] == pytest.approx(1.0, abs=1e-6)  # tanh, sigma_b = 0
    assert np.all(np.diff(line) > 0)  # biases push the edge of chaos to larger sigma_w
    assert (tmp_path / "phase_diagram.png").stat().st_size > 1000


def test_mean_field_overlay_slopes_match_chi1(tmp_path, load_experiment):
    r = load_experiment("mean_field_overlay").run(str(tmp_path), width=48, depth=12, seeds=3)
    c = r["curves"]
    assert c["ordered"]["slope_measured"] < -0.1 and c["chaotic"]["slope_measured"] > 0.1
    for curve in c.values():
        assert curve["slope_measured"] == pytest.approx(curve["slope_predicted"], abs=0.06)
    assert (tmp_path / "overlay.png").stat().st_size > 1000
