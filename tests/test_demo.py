import json

from gradflow import spectra


def test_demo_writes_results_and_shows_the_classic_picture(tmp_path, load_experiment):
    demo = load_experiment("demo")
    demo.main(["--out", str(tmp_path), "--depth", "12", "--width", "16"])
    r = json.loads((tmp_path / "results.json").read_text())["configs"]
    for name in demo.CONFIGS:
        assert (tmp_path / f"spectra_{name}.npz").exists()
    assert (tmp_path / "gradient_norms.png").stat().st_size > 1000
    assert (tmp_path / "spectra.png").stat().st_size > 1000
    # Sigmoid: gradients vanish toward the input (sigmoid' <= 1/4 per layer).
    assert r["sigmoid_glorot"]["grad_ratio_first_last"] < 1e-4
    assert r["sigmoid_glorot"]["log_smax"][-1] < -10
    # ReLU + He keeps the first-layer gradient within an order of magnitude of the last.
    assert 0.1 < r["relu_he"]["grad_ratio_first_last"] < 10
    # Orthogonal tanh stays far closer to isometry than Glorot-Gaussian tanh.
    orth = spectra.SpectraResult.load(tmp_path / "spectra_tanh_orthogonal.npz")
    glorot = spectra.SpectraResult.load(tmp_path / "spectra_tanh_glorot.npz")
    assert orth.log_spread[-1] < 0.5 * glorot.log_spread[-1]
