"""A researcher's own MLP with changing widths (784-512-256-10): rank bounds, and He vs Glorot.

The model is plain flax.linen (no gradflow inside), cut by `gradflow.nn.chain` at its Dense
layers; `gradflow.spectra.model_spectra` gives every layer's Jacobian spectrum exactly.

Claims, each checked against its oracle:

1. Rank bounds. The forward Jacobian dh_l/dx of layer l has at most min(784, n_1, .., n_l)
   nonzero singular values and the backward one dy/dh_l at most 10 (the classifier's outputs);
   the spectra are padded with -inf past those bounds and are full rank up to them.
2. He vs Glorot through changing widths (mean field; He et al. 2015, Glorot & Bengio 2010).
   With W_l of shape (n_{l-1}, n_l) drawn N(0, s_l^2 / n_{l-1}) and ReLU between layers,
   E ||J_l||_F^2 = ||J_{l-1}||_F^2 * n_l * s_l^2 * E[relu'(z)^2] / n_{l-1}, E[relu'^2] = 1/2
   (||J_1||_F^2 = n_1 s_1^2), so the per-unit gain r_l = ||J_l||_F^2 / n_l obeys
       r_1 = s_1^2,   r_l = r_{l-1} * s_l^2 / 2.
   He (s^2 = 2) keeps r_l = 2 at every layer whatever the widths; Glorot
   (s_l^2 = 2 n_{l-1} / (n_{l-1} + n_l)) shrinks it by n_{l-1} / (n_{l-1} + n_l) per ReLU
   layer: 0.67 from 512 to 256 units, so a deep Glorot ReLU net loses signal geometrically.
   The measured ||J_l||_F^2 (the sum of the exact sigma^2) is compared with this prediction,
   averaged over inputs and weight draws (finite-width fluctuations are O(1/sqrt(n_l))).
   The two inits draw the same normal weights, only scaled, and ReLU is positively
   homogeneous, so the He / Glorot ratio of ||J_l||_F^2 is exactly prod_{k<=l} s_He^2 / s_Glorot^2
   at every input: the measured ratio must match it to float precision.

Run: `python experiments/widths_mlp.py [--out DIR] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import flax.linen as nn
import jax
import numpy as np

from gradflow import progress, spectra

INITS = ("he", "glorot")


class MLP(nn.Module):
    """Dense layers of the given widths with ReLU between them (the last is the classifier)."""

    widths: tuple[int, ...]
    scheme: str = "he"  # "he" or "glorot"

    @nn.compact
    def __call__(self, x):
        for i, n in enumerate(self.widths):
            if i:
                x = nn.relu(x)
            fan_in = x.shape[-1]
            var = 2.0 if self.scheme == "he" else 2.0 * fan_in / (fan_in + n)  # s_l^2 (module docstring)
            x = nn.Dense(n, kernel_init=nn.initializers.normal(math.sqrt(var / fan_in)))(x)
        return x


def predicted_gain(widths: tuple[int, ...], init: str) -> np.ndarray:
    """Mean-field per-unit gain r_l = ||dh_l/dx||_F^2 / n_l, l = 1 .. L (module docstring)."""
    fans = (widths[0], *widths[1:-1])
    s2 = [2.0 if init == "he" else 2.0 * a / (a + b) for a, b in zip(fans, widths[1:], strict=True)]
    r = [s2[0]]
    for s in s2[1:]:
        r.append(r[-1] * s / 2.0)
    return np.asarray(r)


def _log_sum_sq(logs: np.ndarray) -> np.ndarray:
    """log sum_i sigma_i^2 per row, overflow-free (-inf entries contribute nothing)."""
    x = 2.0 * np.asarray(logs, np.float64)
    m = np.max(x, axis=1, keepdims=True)
    return m[:, 0] + np.log(np.sum(np.exp(x - m), axis=1))


def run(
    widths: tuple[int, ...] = (784, 512, 256, 10),
    num_inputs: int = 4,
    num_seeds: int = 2,
    seed: int = 0,
    out: str | pathlib.Path = "runs/widths_mlp",
    verbose: bool = True,
) -> dict:
    """Both claims for both inits; writes out/result.json and out/widths_mlp.png."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d_in, layer_widths = widths[0], tuple(widths[1:])
    xs = jax.random.normal(jax.random.key(seed), (num_inputs, 1, d_in))
    result: dict = {"widths": list(widths), "num_inputs": num_inputs, "num_seeds": num_seeds, "inits": {}}
    log_gain: dict[str, list] = {}
    for init in progress.track(
        INITS, f"inits ({num_seeds} seeds x {num_inputs} inputs each)", verbose=verbose
    ):
        model = MLP(layer_widths, init)
        gains, bounds_ok = [], True
        for s in range(num_seeds):
            variables = model.init(jax.random.key(seed + 1 + s), xs[0])
            for x in xs:
                fwd = spectra.model_spectra(model, variables, x, direction="forward")
                bwd = spectra.model_spectra(model, variables, x, direction="backward")
                rank_fwd = np.minimum.accumulate(np.minimum(d_in, np.asarray(layer_widths)))
                for res, ranks in ((fwd, rank_fwd), (bwd, np.full(len(layer_widths), layer_widths[-1]))):
                    for row, k in zip(res.log_singular_values, ranks, strict=True):
                        bounds_ok &= bool(np.all(np.isfinite(row[:k])) and np.all(row[k:] == -np.inf))
                gains.append(_log_sum_sq(fwd.log_singular_values) - np.log(np.asarray(layer_widths)))
        log_gain[init] = np.asarray(gains)  # (seeds x inputs, L)
        measured = np.exp(np.mean(gains, axis=0))
        predicted = predicted_gain(widths, init)
        result["inits"][init] = {
            "layers": list(fwd.layers),
            "measured_gain": measured.tolist(),
            "predicted_gain": predicted.tolist(),
            "rank_bounds_hold": bounds_ok,
            "max_rel_error": float(np.max(np.abs(measured / predicted - 1))),
        }
        if verbose:
            print(f"{init:7s} measured {np.round(measured, 3)}  mean field {np.round(predicted, 3)}")
    # the exact He / Glorot ratio, input by input (module docstring)
    ratio = np.exp(log_gain["he"] - log_gain["glorot"])
    want = predicted_gain(widths, "he") / predicted_gain(widths, "glorot")
    result["ratio_max_rel_error"] = float(np.max(np.abs(ratio / want - 1)))
    he, glorot = result["inits"]["he"], result["inits"]["glorot"]
    result["he_over_glorot_last"] = he["measured_gain"][-1] / glorot["measured_gain"][-1]
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "widths_mlp.png")
    return result


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (init, r) in enumerate(result["inits"].items()):
        layers = np.arange(1, len(r["layers"]) + 1)
        ax.semilogy(layers, r["measured_gain"], "o-", color=f"C{i}", label=f"{init}: exact spectra")
        ax.semilogy(layers, r["predicted_gain"], "--", color=f"C{i}", label=f"{init}: mean field")
    ax.set_xticks(layers, r["layers"])
    ax.set(
        xlabel="layer (widths " + "-".join(map(str, result["widths"])) + ")",
        ylabel="||dh_l/dx||_F^2 / n_l",
        title="Signal gain through changing widths: He vs Glorot (ReLU)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


QUICK = dict(widths=(128, 96, 64, 10), num_inputs=3, num_seeds=3)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/widths_mlp", help="output directory")
    parser.add_argument("--quick", action="store_true", help="the test-sized widths")
    args = parser.parse_args(argv)
    run(**(QUICK if args.quick else {}), out=args.out)


if __name__ == "__main__":
    main()
