"""gradflow.plots: the figures show the records' numbers (the heatmap's pixels, the loss curve)."""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradflow import plots  # noqa: E402


def test_heatmap_pixels_are_log10_of_the_values_and_blanks_stay_blank():
    v = np.array([[1.0, 10.0, 1e-19], [100.0, 0.0, np.nan]])  # (T=2 epochs, L=3 layers)
    fig, ax = plt.subplots()
    im = plots.layer_heatmap(v, ax)
    img = np.ma.filled(im.get_array(), np.nan)  # rows layers, columns epochs
    np.testing.assert_allclose(img[:, 0], [0.0, 1.0, -19.0])  # no underflow at 1e-19
    assert img[0, 1] == 2.0 and np.isnan(img[1, 1]) and np.isnan(img[2, 1])  # 0 and NaN: blank
    ticks = ax.get_yticks()
    assert np.all(ticks == np.round(ticks))  # whole layers, never 0.5, 1.5
    plt.close(fig)
    fig, ax = plt.subplots()
    plots.layer_heatmap(v, ax, layers=["embed", "stage1[1]", "head"])  # a CNN run's layers, by name
    assert ax.get_yticks().tolist() == [1, 2, 3]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["embed", "stage1[1]", "head"]
    plt.close(fig)


def test_train_run_figures_plot_the_history(tmp_path, monkeypatch):
    history = [
        {"epoch": e, "loss": 2.0 / (e + 1), "test_loss": 2.5 / (e + 1), "grad_norm": [1e-3 * (e + 1), 1.0]}
        for e in range(3)
    ]
    seen = {}
    savefig = matplotlib.figure.Figure.savefig

    def record(fig, path, *args, **kwargs):  # the plotted data, read back from the figure
        ax = fig.axes[0]
        seen[pathlib.Path(path).name] = [line.get_ydata().tolist() for line in ax.get_lines()] or [
            np.ma.filled(ax.images[0].get_array(), np.nan).tolist()
        ]
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", record)
    paths = plots.train_run_figures(history, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "grad_norms.png"] and all(
        p.stat().st_size > 0 for p in paths
    )
    np.testing.assert_allclose(seen["loss.png"][0], [h["loss"] for h in history])
    np.testing.assert_allclose(seen["loss.png"][1], [h["test_loss"] for h in history])
    np.testing.assert_allclose(seen["grad_norms.png"][0], np.log10([[1e-3, 2e-3, 3e-3], [1.0] * 3]))
    assert plots.train_run_figures([], tmp_path) == []
