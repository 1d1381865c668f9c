"""Per-layer spectra of a researcher's own small ResNet, at initialization and after training.

The model is plain flax.linen with no gradflow inside: a conv stem with BatchNorm, then stages
of residual blocks of growing width (the first block of a stage strided, with a 1x1 projection
shortcut), global average pooling and a linear classifier, trained on scikit-learn's 8x8 digits.
`gradflow.nn.chain` cuts it at its top-level submodules (the stem's conv and norm, each residual
block, the classifier); the skip connections lie inside the blocks, so every cut is valid, and a
cut inside a block would be refused. For every layer l it measures

- forward: the singular values of d h_l / d x (rank <= 64, the input's size);
- backward: those of d y / d h_l (rank <= 10, the classes), 10 vjps per layer;

with BatchNorm's running statistics (the per-example map of the trained net), at initialization
and after a short training run (`gradflow.train.fit`, Adam), whose per-layer gradient norms the
trainer records by the same cuts. The test checks every row against a float64 jacfwd + SVD of
the blocks composed by hand.

Run: `python experiments/resnet_spectra.py [--out DIR] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import numpy as np
from flax import serialization

from gradflow import data, progress, spectra, train
from gradflow.optim import OptimConfig


class ResBlock(nn.Module):
    """relu(BN(conv(relu(BN(conv(x))))) + shortcut(x)); a strided block projects its shortcut."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)  # noqa: E731
        y = nn.relu(norm()(nn.Conv(self.features, (3, 3), strides=self.strides)(x)))
        y = norm()(nn.Conv(self.features, (3, 3))(y))
        if self.strides != 1 or x.shape[-1] != self.features:
            x = norm()(nn.Conv(self.features, (1, 1), strides=self.strides)(x))
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Stem conv + BN, stages of `blocks` residual blocks at `widths`, average pool, classifier."""

    widths: tuple[int, ...] = (8, 16)
    blocks: int = 1
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.widths[0], (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        for s, width in enumerate(self.widths):
            for b in range(self.blocks):
                x = ResBlock(width, strides=2 if (s > 0 and b == 0) else 1)(x, train)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


def run(
    widths: tuple[int, ...] = (8, 16, 32),
    blocks: int = 2,
    epochs: int = 10,
    diagnostics_every: int = 1,
    seed: int = 0,
    out: str | pathlib.Path = "runs/resnet_spectra",
    verbose: bool = True,
) -> dict:
    """Spectra at init and after training; writes result.json, spectra_<when>_<direction>.npz,
    trained_variables.msgpack (flax serialization) and resnet_spectra.png under `out`."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = data.digits(seed=seed)
    images = lambda a: np.asarray(a, np.float32).reshape(-1, 8, 8, 1)  # noqa: E731
    x_train, x_test = images(ds.x_train), images(ds.x_test)
    model = ResNet(tuple(widths), blocks)
    cfg = train.TrainConfig(
        epochs=epochs,
        batch_size=64,
        seed=seed,
        diagnostics_every=diagnostics_every,
        optim=OptimConfig("adam", 3e-3),
    )
    with progress.stage(f"training the ResNet, {epochs} epochs", verbose=verbose):
        fitted = train.fit(model, cfg, (x_train, ds.y_train, x_test, ds.y_test), progress=False)
    x = x_test[:1]
    init_vars = train.init_variables(model, train.run_keys(seed)[0], x_train[: cfg.batch_size])
    trained_vars = {"params": fitted.state.params, "batch_stats": fitted.state.batch_stats}
    (out / "trained_variables.msgpack").write_bytes(serialization.to_bytes(trained_vars))
    result: dict = {
        "widths": list(widths),
        "blocks": blocks,
        "epochs": epochs,
        "test_accuracy": fitted.test["accuracy"],
        "grad_norm_first_epoch": fitted.history[0].get("grad_norm"),  # None without diagnostics
        "diagnostic_layers": fitted.diagnostic_layers,
    }
    variables_at = {"init": init_vars, "trained": trained_vars}
    todo = [(when, direction) for when in variables_at for direction in ("forward", "backward")]
    for when, direction in progress.track(
        todo, "spectra (init, trained x forward, backward)", verbose=verbose
    ):
        res = spectra.model_spectra(model, variables_at[when], x, direction=direction)
        res.save(out / f"spectra_{when}_{direction}.npz")
        result[f"{when}_{direction}"] = {
            "layers": list(res.layers),
            "widths": [int(w) for w in res.widths],
            "log_smax": res.log_max.tolist(),
            "rank": [int(np.isfinite(row).sum()) for row in res.log_singular_values],
        }
    if verbose:
        print(f"test accuracy {result['test_accuracy']:.3f} after {epochs} epochs")
        for when in ("init", "trained"):
            print(when, "backward log s_max", np.round(result[f"{when}_backward"]["log_smax"], 2))
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "resnet_spectra.png")
    return result


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, direction in zip(axes, ("forward", "backward"), strict=True):
        for when, style in (("init", "o--"), ("trained", "o-")):
            r = result[f"{when}_{direction}"]
            ax.plot(range(len(r["layers"])), r["log_smax"], style, ms=3, label=when)
        ax.set_xticks(range(len(r["layers"])), r["layers"], rotation=45, ha="right", fontsize=7)
        what = "d h_l / d x" if direction == "forward" else "d y / d h_l"
        ax.set(ylabel=f"log sigma_max of {what}", title=f"{direction} spectra")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the test-sized run records no diagnostics (the trainer's tests cover them on a BatchNorm CNN)
QUICK = dict(widths=(4, 8), blocks=1, epochs=2, diagnostics_every=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/resnet_spectra", help="output directory")
    parser.add_argument("--quick", action="store_true", help="the test-sized ResNet")
    args = parser.parse_args(argv)
    run(**(QUICK if args.quick else {}), out=args.out)


if __name__ == "__main__":
    main()
