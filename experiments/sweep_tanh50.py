"""8 learning rates x 4 seeds of a 50-layer tanh MLP on MNIST-1D, trained in one vmapped call.

`train.sweep` runs the 32 configurations as one `jit(vmap(run))`; the per-layer gradient norms
(recorded every 10 steps, averaged per epoch) go into one heatmap per run: columns are learning
rates, rows seeds. Writes grad_norms.png under `--out` (default runs/sweep_tanh50).

    python experiments/sweep_tanh50.py [--epochs 10] [--width 32] [--depth 50]
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib.pyplot as plt
import numpy as np

from gradflow import data, progress, train
from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig
from gradflow.plots import layer_heatmap


def main(epochs=10, width=32, depth=50, num_samples=5000, out="runs/sweep_tanh50", verbose=False):
    ds = data.mnist1d(num_samples=num_samples)
    model = MLPStack(depth=depth, width=width, activation="tanh", num_outputs=10)
    cfg = train.TrainConfig(
        epochs=epochs, batch_size=100, diagnostics_every=10, optim=OptimConfig("sgd", 0.1)
    )
    hp = train.grid(cfg, seeds=range(4), lr=np.geomspace(1e-3, 1.0, 8))
    with progress.stage(
        f"training {len(hp.seed)} nets (8 learning rates x 4 seeds), {epochs} epochs", verbose=verbose
    ):
        result = train.sweep(model, cfg, (ds.x_train, ds.y_train, ds.x_test, ds.y_test), hp)
    with progress.stage(f"plotting {len(hp.seed)} heatmaps", verbose=verbose):
        fig, axes = plt.subplots(4, 8, figsize=(40, 14), squeeze=False, layout="constrained")
        for i, ax in enumerate(axes.T.flat):  # grid order: seeds vary fastest
            acc = result.epochs["test_accuracy"][i, -1]
            layer_heatmap(
                result.epochs["grad_norm"][i], ax, title=f"lr {hp.lr[i]:.3g} seed {hp.seed[i]}: {acc:.2f}"
            )
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
        fig.savefig(pathlib.Path(out) / "grad_norms.png", dpi=60)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in [("epochs", 10), ("width", 32), ("depth", 50), ("num_samples", 5000)]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--out", default="runs/sweep_tanh50")
    main(**vars(parser.parse_args()), verbose=True)
