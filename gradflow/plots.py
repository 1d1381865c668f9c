"""Figures shared by the CLI, the atlas and the experiments (matplotlib, Agg backend)."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402


def layer_heatmap(
    values_TxL: np.ndarray,
    ax=None,
    *,
    title: str = "",
    label: str = "log10 ||dL/dW_l||",
    xlabel: str = "epoch",
    layers: Sequence[str] | None = None,
):
    """log10 of a per-layer quantity over training: rows are layers (bottom = layer 1), columns time.

    Non-positive or non-finite entries are left blank. The layer axis is ticked at whole layers,
    labelled by `layers` (their names, one per row; at most about 20 labels shown) when given.
    Returns the image.
    """
    v = np.asarray(values_TxL, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        img = np.where(np.isfinite(v) & (v > 0), np.log10(np.where(v > 0, v, 1.0)), np.nan).T
    ax = ax if ax is not None else plt.gca()
    im = ax.imshow(
        img,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        extent=(0.5, v.shape[0] + 0.5, 0.5, v.shape[1] + 0.5),
    )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("layer")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if layers is not None and len(layers) == v.shape[1]:
        rows = np.arange(1, v.shape[1] + 1, max(1, -(-v.shape[1] // 20)))
        ax.set_yticks(rows, [layers[r - 1] for r in rows], fontsize=7)
    else:
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title)
    plt.colorbar(im, ax=ax, label=label)
    return im


def grad_norm_profiles(
    curves: dict[str, np.ndarray],
    path: str | pathlib.Path | None,
    *,
    title: str = "",
    ylabel: str = "||dL/dW_l||",
):
    """One line per named run: a per-layer quantity against the layer index, log scale. Writes
    the figure to `path`, or returns it when `path` is None."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, g in curves.items():
        g = np.asarray(g, np.float64)
        ok = np.isfinite(g) & (g > 0)
        if ok.any():
            ax.semilogy(np.arange(1, len(g) + 1)[ok], g[ok], label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if curves:
        ax.legend(fontsize=7)
    fig.tight_layout()
    if path is None:
        return fig
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _loss_axes(ax, history: Sequence[dict]) -> None:
    epochs = [r["epoch"] + 1 for r in history]
    ax.plot(epochs, [r["loss"] for r in history], "o-", label="train loss")
    if "test_loss" in history[0]:
        ax.plot(epochs, [r["test_loss"] for r in history], "s--", label="test loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()


def _grads(history: Sequence[dict]) -> np.ndarray | None:
    if "grad_norm" not in history[0] or history[0]["grad_norm"] is None:
        return None
    return np.asarray([[np.nan if v is None else v for v in r["grad_norm"]] for r in history], np.float64)


def train_run_figure(history: Sequence[dict], layers: Sequence[str] | None = None):
    """The loss curve and the per-layer gradient-norm heatmap of a run's records side by side,
    as one figure (for notebooks: `TrainResult._repr_html_`)."""
    grads = _grads(history)
    fig, axes = plt.subplots(1, 2 if grads is not None else 1, figsize=(11 if grads is not None else 6, 4))
    axes = np.atleast_1d(axes)
    _loss_axes(axes[0], history)
    if grads is not None:
        layer_heatmap(grads, axes[1], title="per-layer gradient norms over training", layers=layers)
    fig.tight_layout()
    return fig


def train_run_figures(
    history: Sequence[dict], out: str | pathlib.Path, layers: Sequence[str] | None = None
) -> list[pathlib.Path]:
    """Loss curve and per-layer gradient-norm heatmap of a `gradflow.train.fit` run's records
    (`layers`: the names of the records' per-layer entries, `TrainResult.diagnostic_layers`)."""
    out = pathlib.Path(out)
    paths = []
    if not history:
        return paths
    fig, ax = plt.subplots(figsize=(6, 4))
    _loss_axes(ax, history)
    fig.tight_layout()
    paths.append(out / "loss.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    grads = _grads(history)
    if grads is not None:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        layer_heatmap(grads, ax, title="per-layer gradient norms over training", layers=layers)
        fig.tight_layout()
        paths.append(out / "grad_norms.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths
