"""A 30-layer ReLU MLP trains from He initialization and stalls from Glorot initialization.

He et al. 2015 ("Delving deep into rectifiers", fig. 3): with Glorot/Xavier weights (variance
1 / fan_in for square layers) a ReLU layer halves the second moment of the signal, because
E[relu(z)^2] = E[z^2] / 2; He weights (variance 2 / fan_in) preserve it. For zero biases the
identity holds at any width, in expectation over the weights:

    E[ q_L / q_1 ] = (sigma_w^2 / 2)^(L - 1),   q_l = mean of z_l^2 over the batch and units,

i.e. log2 q_L/q_1 = -(L - 1) for Glorot and 0 for He (mean-field `theory.length_map`; the
finite-width bias of E log, Hanin 2018, is `theory.relu_jacobian_norm_stats`). Backward the
same halving applies, so every block's weight gradient is ~2^(-(L-1)/2) of He's, and SGD with a
learning rate that trains the He net leaves the Glorot net at chance.

Set-up: `MLPStack(depth=30, activation="relu", kernel_init=he_normal())` on MNIST-1D; the
Glorot runs are the same draws with the blocks' kernels scaled by 1/sqrt(2) (`train.sweep`'s
weight_scale), which *is* `glorot_normal()` for the square blocks (variance 2 / (n + n) = 1/n,
the same truncated-normal draws); the input projection and the head are LeCun-normal in both.
Both arms in one `jit(vmap(...))` sweep over seeds x {He, Glorot}, SGD + momentum 0.9 (lr 0.01,
global-norm clipping at 1, batch 100), the same budget.

Measured (full size: depth 30, width 128, MNIST-1D 4000/1000, 30 epochs, seeds 0..3; 5.5 min
CPU, mostly the 8 vmapped training runs):
  log2 q_30 / q_1 at init (mean of 4 seeds): He -0.96, Glorot -29.96; mean field 0 and -29,
  with Hanin's finite-width E log -0.83 and -29.83; per-block slope -0.043 and -1.043.
  Block-1 gradient Glorot / He: 10^-4.46 (2^-14.5 = 10^-4.36).
  Final train / test accuracy: He 0.712 / 0.523 (seeds 0.70..0.74), Glorot 0.092 / 0.095 (chance,
  loss 2.3037 ~ ln 10).

Test size (`QUICK`: depth 30, width 32, 800/200 examples, 20 epochs, seeds 0..3; measured He
-4.04 and Glorot -33.04 bits against -3.45 and -32.45 at finite width, final train accuracy 0.31
against 0.11): the test asserts log2 q_L/q_1 within 3 standard errors of Hanin's finite-width
fluctuation (4.9 bits) of the finite-width prediction, the per-block slopes within 0.25 of -1
and 0, Glorot - He = -(L-1) bits seed by seed, the block-1 gradient ratio within 0.5 decades of
2^-(L-1)/2, and the final train accuracy above 0.25 (He) against below 0.15 with a loss within
0.01 of ln 10 (Glorot).

Writes `result.json`, `signal.png` and `training.png` under `--out` (default runs/glorot_vs_he).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np

from gradflow import data, initializers, progress, theory, train
from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig

FULL = dict(depth=30, width=128, num_samples=5000, epochs=30, seeds=4)
QUICK = dict(depth=30, width=32, num_samples=1000, epochs=20, seeds=4)
BATCH, LR = 100, 0.05
HE = initializers.he_normal()  # one instance: equal models hash equal, compiled code is reused
SCALES = {"he": 1.0, "glorot": 1.0 / math.sqrt(2.0)}  # blocks: Glorot = He / sqrt(2) when square


def _second_moment(epochs: dict, run: int) -> np.ndarray:
    """q_l at init (the record of the first step): variance plus squared mean of z_l, shape (L,)."""
    return epochs["preact_var"][run, 0] + epochs["preact_mean"][run, 0] ** 2


def run(
    depth: int = FULL["depth"],
    width: int = FULL["width"],
    num_samples: int = FULL["num_samples"],
    epochs: int = FULL["epochs"],
    seeds: int = FULL["seeds"],
    *,
    out: str | pathlib.Path = "runs/glorot_vs_he",
    verbose: bool = True,
    cache_dir: str | None = "data/",
) -> dict:
    """Sweep seeds x {He, Glorot}; write result.json and the figures; return the result."""
    if depth < 2 or width < 1 or epochs < 1 or seeds < 1:
        raise ValueError(f"need depth >= 2 and positive sizes; got {depth}, {width}, {epochs}, {seeds}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ds = data.mnist1d(seed=0, num_samples=num_samples, cache_dir=cache_dir)
    arrays = (ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    model = MLPStack(depth=depth, width=width, activation="relu", kernel_init=HE)
    steps = ds.x_train.shape[0] // BATCH
    cfg = train.TrainConfig(
        epochs=epochs,
        batch_size=BATCH,
        diagnostics_every=steps,  # one record per epoch, its first step: epoch 0 is the init
        optim=OptimConfig("momentum", LR, momentum=0.9, clip="global_norm", clip_value=1.0),
    )
    hp = train.grid(cfg, seeds=list(range(seeds)), weight_scale=list(SCALES.values()))
    with progress.stage(
        f"training {len(hp.seed)} nets (He, Glorot x {seeds} seeds), {epochs} epochs", verbose=verbose
    ):
        sw = train.sweep(model, cfg, arrays, hp)
    e = sw.epochs

    # E log2 of ||z_L||^2 / ||z_1||^2 through the L - 1 blocks after block 1 (He scale; Hanin 2018)
    hanin = theory.relu_jacobian_norm_stats([width] * depth)
    hanin_log2 = hanin.log_mean / math.log(2)
    arms = {}
    for name, scale in SCALES.items():
        runs = [r for r in range(len(hp.seed)) if np.isclose(hp.weight_scale[r], scale)]
        log2_q = np.stack([np.log2(_second_moment(e, r)) for r in runs])  # (seeds, L)
        log2_ratio = log2_q[:, -1] - log2_q[:, 0]
        slopes = np.polyfit(np.arange(1, depth + 1), log2_q.T, 1)[0]
        grad = np.stack([e["grad_norm"][r, 0] for r in runs])  # (seeds, L) at init
        sigma_w2 = 2.0 * scale**2
        arms[name] = {
            "weight_scale": scale,
            "sigma_w2": sigma_w2,
            "log2_q_init": log2_q.mean(axis=0).tolist(),
            "log2_qL_over_q1": log2_ratio.tolist(),
            "log2_qL_over_q1_mean": float(log2_ratio.mean()),
            "log2_qL_over_q1_predicted": (depth - 1) * math.log2(sigma_w2 / 2),
            "log2_qL_over_q1_predicted_finite_width": (depth - 1) * math.log2(sigma_w2 / 2) + hanin_log2,
            "slope_per_block": slopes.tolist(),
            "slope_per_block_mean": float(slopes.mean()),
            "grad_norm_init": grad.mean(axis=0).tolist(),
            "train_loss": e["loss"][runs].tolist(),
            "train_accuracy": e["accuracy"][runs].tolist(),
            "test_accuracy": e["test_accuracy"][runs].tolist(),
            "final_train_accuracy": float(e["accuracy"][runs, -1].mean()),
            "final_train_loss": float(e["loss"][runs, -1].mean()),
            "final_test_accuracy": float(e["test_accuracy"][runs, -1].mean()),
            "nonfinite_steps": int(e["skipped"][runs].sum()),
        }
    g_he, g_gl = np.asarray(arms["he"]["grad_norm_init"]), np.asarray(arms["glorot"]["grad_norm_init"])
    result = {
        "depth": depth,
        "width": width,
        "num_samples": num_samples,
        "epochs": epochs,
        "seeds": seeds,
        "batch_size": BATCH,
        "optimizer": f"momentum(0.9) lr {LR}, global-norm clip 1",
        "chance_loss": math.log(10),
        "arms": arms,
        "log2_ratio_std_of_mean": math.sqrt(hanin.log_variance / seeds) / math.log(2),
        "log10_grad_glorot_over_he": np.log10(g_gl / g_he).tolist(),
        "log10_grad_glorot_over_he_predicted": -(depth - 1) / 2 * math.log10(2),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(result, out)
    if verbose:
        for name, a in arms.items():
            print(
                f"{name:6s} log2 q_L/q_1 {a['log2_qL_over_q1_mean']:7.2f} (predicted "
                f"{a['log2_qL_over_q1_predicted']:.0f}; finite width {a['log2_qL_over_q1_predicted_finite_width']:.2f})"
                f"  slope {a['slope_per_block_mean']:+.3f}/block  final train acc {a['final_train_accuracy']:.3f}"
                f"  loss {a['final_train_loss']:.4f}  test acc {a['final_test_accuracy']:.3f}"
            )
        r = result["log10_grad_glorot_over_he"]
        print(
            f"log10 grad Glorot/He: block 1 {r[0]:.2f}, block L {r[-1]:.2f} (~{result['log10_grad_glorot_over_he_predicted']:.2f})"
        )
        print(f"wrote {out}/result.json, signal.png, training.png")
    return result


def _plot(result: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = result["depth"]
    layers = np.arange(1, depth + 1)
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, a) in enumerate(result["arms"].items()):
        q = np.asarray(a["log2_q_init"])
        ax0.plot(layers, q - q[0], "o", ms=3, color=f"C{i}", label=f"{name} measured")
        ax0.plot(
            layers,
            (layers - 1) * math.log2(a["sigma_w2"] / 2),
            "-",
            color=f"C{i}",
            label=f"{name}: (l-1) log2(sigma_w^2/2)",
        )
        ax1.semilogy(layers, a["grad_norm_init"], color=f"C{i}", label=name)
    ax0.set(xlabel="block l", ylabel="log2 q_l / q_1", title="Forward signal at init")
    ax1.set(xlabel="block l", ylabel="||dL/dtheta_l||", title="Weight gradients at init")
    ax0.legend(fontsize=8)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "signal.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, a) in enumerate(result["arms"].items()):
        for j, acc in enumerate(a["train_accuracy"]):
            ax.plot(acc, color=f"C{i}", alpha=0.7, label=name if j == 0 else None)
    ax.axhline(0.1, color="gray", ls=":", label="chance")
    ax.set(xlabel="epoch", ylabel="train accuracy", title=f"ReLU depth {depth}: He vs Glorot, same budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line: `python experiments/glorot_vs_he.py [--out DIR] [--quick]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/glorot_vs_he", help="output directory")
    parser.add_argument("--quick", action="store_true", help="the test-sized configuration")
    args = parser.parse_args(argv)
    run(**(QUICK if args.quick else FULL), out=args.out)


if __name__ == "__main__":
    main()
