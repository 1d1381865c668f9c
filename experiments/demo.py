"""The demonstration run by `make demo`: where gradients vanish or explode at initialization.

For a few deep MLPs (gradflow.nn.MLPStack) on one random batch it measures
- the per-layer gradient norms ||dL/dtheta_l|| of the blocks (float32-safe norms, by the
  model's layer layout), and
- the per-layer singular-value spectra of the input-output Jacobian J_l = d h_l / d h_0
  (gradflow.spectra, exact in log space),
and writes `results.json`, `gradient_norms.png`, `spectra.png` and one `spectra_<config>.npz`
per configuration under `--out`. Runs in about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradflow import initializers, progress, spectra
from gradflow.nn import MLPStack
from gradflow.train import diagnostics, layout

CONFIGS = {
    "sigmoid_glorot": ("sigmoid", "glorot_normal"),
    "tanh_glorot": ("tanh", "glorot_normal"),
    "tanh_orthogonal": ("tanh", "orthogonal"),
    "relu_he": ("relu", "he_normal"),
    "relu_glorot": ("relu", "glorot_normal"),
}


def measure(
    activation: str,
    init: str,
    depth: int,
    width: int,
    key: jax.Array,
    *,
    name: str = "",
    verbose: bool = False,
) -> dict:
    """Per-layer gradient norms and Jacobian spectra of one MLPStack at initialization.

    verbose reports its two stages (the gradient, then the spectra: each mostly compiling) as `name`.
    """
    with progress.stage(f"{name}: gradient (compile + run)", verbose=verbose):
        kx, ky, kp = jax.random.split(key, 3)
        x = jax.random.normal(kx, (128, width))
        y = jax.random.randint(ky, (128,), 0, 10)
        model = MLPStack(depth=depth, width=width, activation=activation, kernel_init=initializers.get(init))
        variables = model.init(kp, x)

        def loss(params):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        grads = jax.grad(loss)(variables["params"])
        norms = diagnostics.layer_norms(layout(model, variables, x), grads)  # (depth,): the blocks
        norms.block_until_ready()
    with progress.stage(f"{name}: spectra (compile + run)", verbose=verbose):
        res = spectra.model_spectra(model, variables, x[0])
    return {"grad_norms": np.asarray(norms), "spectra": res}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output directory (created)")
    parser.add_argument("--depth", type=int, default=30)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args(argv)
    if args.depth < 2 or args.width < 2:
        parser.error(f"--depth and --width must be >= 2, got {args.depth}, {args.width}")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = {}
    print(
        f"{len(CONFIGS)} MLPs of depth {args.depth}, width {args.width}, at initialization: per-layer"
        " gradient norms and Jacobian spectra (most of the time is XLA compiling)"
    )
    print(f"{'config':18s} {'|g_1|/|g_L|':>12s} {'log smax(J_L)':>14s} {'log smin(J_L)':>14s}")
    for name, (act, init) in progress.track(CONFIGS.items(), f"{len(CONFIGS)} nets"):
        r = measure(act, init, args.depth, args.width, jax.random.key(0), name=name, verbose=True)
        s = r["spectra"]
        s.save(out / f"spectra_{name}.npz")
        g = r["grad_norms"]
        results[name] = {
            "activation": act,
            "init": init,
            "grad_norms": g.tolist(),
            "grad_ratio_first_last": float(g[0] / g[-1]),
            "log_smax": s.log_max.tolist(),
            "log_smin": s.log_min.tolist(),
            "log_mean_sq": s.log_mean_sq.tolist(),
        }
        print(f"{name:18s} {g[0] / g[-1]:>12.3e} {s.log_max[-1]:>14.2f} {s.log_min[-1]:>14.2f}")
    (out / "results.json").write_text(
        json.dumps({"depth": args.depth, "width": args.width, "configs": results})
    )
    with progress.stage("plotting"):
        _plot(results, args.depth, out)
    print(f"wrote {out}/results.json, gradient_norms.png, spectra.png and spectra_*.npz")


def _plot(results: dict, depth: int, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, depth + 1)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.semilogy(layers, r["grad_norms"], label=name)
    ax.set(
        xlabel="layer l", ylabel="||dL/dtheta_l||", title=f"Gradient norms at initialization, depth {depth}"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gradient_norms.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, r) in enumerate(results.items()):
        color = f"C{i}"
        ax.plot(layers, r["log_smax"], color=color, label=name)
        ax.plot(layers, r["log_smin"], color=color, linestyle="--")
        ax.fill_between(layers, r["log_smin"], r["log_smax"], color=color, alpha=0.1)
    ax.set(
        xlabel="layer l",
        ylabel="log singular value of J_l",
        title="Jacobian spectra: max (solid) and min (dashed)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "spectra.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    jnp.zeros(1)
    main()
