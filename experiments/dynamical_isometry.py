"""Dynamical isometry: critical tanh with orthogonal weights keeps the Jacobian spectrum at 1; ReLU cannot.

Pennington, Schoenholz & Ganguli 2017 ("Resurrecting the sigmoid in deep learning through
dynamical isometry") and 2018 ("The emergence of spectral universality in deep networks"): for
J_l = D_l W_l ... D_1 W_1 at criticality (chi_1 = 1, so the mean squared singular value is 1 at
every depth) the squared singular values lambda of J_l have, at infinite width,

    Var[lambda] / E[lambda]^2 = l (mu_2 / mu_1^2 - 1 - s1),   mu_k = E[phi'(z)^(2k)] at q*,

with s1 = -1 for Gaussian and 0 for orthogonal weights (`theory.jacobian_spectrum_moments`).
tanh near q* = 0 has mu_2 ~ mu_1^2, so with orthogonal weights the variance grows with a tiny
slope (isometry), with Gaussian weights with slope ~1 (Fuss-Catalan spreading). ReLU has
mu_2 / mu_1^2 = 2 at any scale: slope 1 even with orthogonal weights, 2 with Gaussian ones.

Set-up: `MLPStack(num_outputs=None)` blocks h_l = phi(W_l h_{l-1} + b_l), sigma_w at the
critical point, input scaled so the first pre-activations sit at q*:
  - tanh: sigma_b = 0.01, sigma_w = `theory.critical_sigma_w("tanh", 0.01)` = 1.0421
    (q* = 0.0457), weights `initializers.orthogonal(sigma_w)` or `initializers.gaussian(sigma_w)`;
  - relu: sigma_b = 0, sigma_w = sqrt(2), orthogonal or Gaussian.
Exact per-layer spectra of J_l = dh_l/dh_0 from `gradflow.spectra.model_spectra` (log space);
the moments of lambda are pooled over seeds, and the measured slope is the least-squares
slope through the origin of Var/mean^2 against l.

Measured (full size: width 64, depth 64, 4 seeds; 37 s CPU; width 128 x depth 100 took over 5
min CPU and was stopped), slope of Var[lambda]/E[lambda]^2 per layer, measured / predicted:
  tanh + orthogonal 0.0121 / 0.0115   (RMS log sigma_64 0.91, log mean lambda_64 -0.03)
  tanh + Gaussian   1.278  / 1.0115   (RMS log sigma_64 47)
  relu + orthogonal 1.135  / 1.0      (29% exact zeros: dead units)
  relu + Gaussian   1.574  / 2.0      (33% zeros; depth = width: the heavy tail that carries
                                       the second moment is undersampled by 4 x 64 values)
  Test size (width 32, depth 16, seed 0 before the key split was added): 0.0144 / 1.011 /
  1.154 / 2.279 against 0.0115 / 1.0115 / 1.0 / 2.0.

Test size (`QUICK`: width 32, depth 16, 4 seeds): the test asserts each measured slope against
theory (relative error below 30% for the three spreading cases; below 0.05 absolute for tanh +
orthogonal), tanh + orthogonal's slope below 1/10 of Gaussian tanh's and of orthogonal ReLU's,
and the log mean squared singular value at the last layer within 0.25 of 0 (tanh + orthogonal;
1.5 for the others, whose sample means are heavy-tailed at width 32).

Writes `result.json`, `spectra.png` and one `spectra_<config>.png` per configuration under
`--out` (default runs/dynamical_isometry).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import jax
import numpy as np

from gradflow import initializers, progress, spectra, theory
from gradflow.nn import MLPStack
from gradflow.numerics import x64

FULL = dict(width=64, depth=64, seeds=4)
QUICK = dict(width=32, depth=16, seeds=4)
TANH_SIGMA_B = 0.01
CONFIGS = {  # name: (activation, weight ensemble)
    "tanh_orthogonal": ("tanh", "orthogonal"),
    "tanh_gaussian": ("tanh", "gaussian"),
    "relu_orthogonal": ("relu", "orthogonal"),
    "relu_gaussian": ("relu", "gaussian"),
}


def critical_point(activation: str) -> dict:
    """sigma_w, sigma_b, q*, and the RMT per-layer slopes of Var/mean^2 for both ensembles."""
    sigma_b = TANH_SIGMA_B if activation == "tanh" else 0.0
    with x64():
        sigma_w = float(theory.critical_sigma_w(activation, sigma_b))
        q = float(theory.q_star(activation, sigma_w, sigma_b))
        slopes, chi = {}, None
        for ensemble in ("orthogonal", "gaussian"):
            m = theory.jacobian_spectrum_moments(activation, sigma_w, sigma_b, 1.0, ensemble)
            slopes[ensemble] = float(m.variance / m.mean**2)
            chi = float(m.mean)
    # relu's q* is 0 or inf (scale-free): any input scale is a fixed point; use q = 1
    return {
        "sigma_w": sigma_w,
        "sigma_b": sigma_b,
        "q_star": q if activation == "tanh" else 1.0,
        "chi1": chi,
        "slope": slopes,
    }


def moments(res: spectra.SpectraResult) -> tuple[np.ndarray, np.ndarray]:
    """Per depth, mean lambda and mean lambda^2 over the singular values (lambda = sigma^2)."""
    lam = np.exp(2.0 * res.log_singular_values.astype(np.float64))
    return lam.mean(axis=1), (lam**2).mean(axis=1)


def measure(
    activation: str, ensemble: str, cp: dict, width: int, depth: int, seeds: int, seed: int = 0
) -> dict:
    """Spectra of J_l for `seeds` random nets of one configuration."""
    sw, sb = cp["sigma_w"], cp["sigma_b"]
    kernel = initializers.orthogonal(sw) if ensemble == "orthogonal" else initializers.gaussian(sw)
    model = MLPStack(
        depth=depth,
        width=width,
        activation=activation,
        kernel_init=kernel,
        bias_init=initializers.bias(sb),
        input_init=initializers.orthogonal(),  # h_0 = Q x: keeps the input's norm
        num_outputs=None,
    )
    # x with mean square (q* - sigma_b^2) / sigma_w^2, so that z_1 = W_1 h_0 + b_1 starts at q*
    scale = math.sqrt(max(cp["q_star"] - sb**2, 0.0)) / sw
    k_init, k_x = jax.random.split(jax.random.key(seed))
    keys = jax.random.split(k_init, seeds)
    x = scale * jax.random.normal(k_x, (seeds, width))
    variables = jax.jit(jax.vmap(model.init))(keys, x)
    # The walk does not depend on the initializer: one walking model per activation, one compile.
    walker = MLPStack(depth=depth, width=width, activation=activation, num_outputs=None)
    m1, m2, gaps, spreads, zeros, last = [], [], [], [], [], None
    for s in range(seeds):
        v = jax.tree.map(lambda a, s=s: a[s], variables)
        res = spectra.model_spectra(walker, v, x[s])
        a, b = moments(res)
        m1.append(a)
        m2.append(b)
        log_s = res.log_singular_values[-1]
        finite = log_s[np.isfinite(log_s)]  # relu: dead units give exact zeros (-inf)
        gaps.append(float(np.sqrt(np.mean(finite**2))))
        spreads.append(float(finite[0] - finite[-1]))
        zeros.append(1.0 - finite.size / log_s.size)
        last = res
    m1, m2 = np.mean(m1, axis=0), np.mean(m2, axis=0)
    v_norm = m2 / m1**2 - 1.0
    l = np.arange(1, depth + 1)
    return {
        "mean_lambda": m1.tolist(),
        "var_over_mean2": v_norm.tolist(),
        "slope_measured": float(np.sum(l * v_norm) / np.sum(l * l)),
        "slope_predicted": cp["slope"][ensemble],
        "log_mean_lambda_last": float(np.log(m1[-1])),
        "isometry_gap_last": float(np.mean(gaps)),  # RMS log sigma over the nonzero ones
        "log_spread_last": float(np.mean(spreads)),  # log sigma_max / smallest nonzero sigma
        "zero_fraction_last": float(np.mean(zeros)),
        "_example": last,
    }


def run(
    width: int = FULL["width"],
    depth: int = FULL["depth"],
    seeds: int = FULL["seeds"],
    *,
    seed: int = 0,
    out: str | pathlib.Path = "runs/dynamical_isometry",
    verbose: bool = True,
) -> dict:
    """Measure the four configurations; write result.json and the figures; return the result."""
    if width < 2 or depth < 1 or seeds < 1:
        raise ValueError(f"need width >= 2, depth >= 1, seeds >= 1; got {width}, {depth}, {seeds}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = {act: critical_point(act) for act in ("tanh", "relu")}
    configs = {}
    for name, (act, ensemble) in progress.track(
        CONFIGS.items(), f"configurations ({seeds} seeds each)", verbose=verbose
    ):
        m = measure(act, ensemble, points[act], width, depth, seeds, seed)
        m.pop("_example").plot(out / f"spectra_{name}.png", title=f"{name}, width {width}")
        configs[name] = {"activation": act, "ensemble": ensemble, **m}
    result = {
        "width": width,
        "depth": depth,
        "seeds": seeds,
        "seed": seed,
        "critical_points": points,
        "configs": configs,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(result, out)
    if verbose:
        print(f"width {width}, depth {depth}, {seeds} seeds: slope of Var[lambda]/E[lambda]^2 per layer")
        for name, c in configs.items():
            print(
                f"{name:16s} measured {c['slope_measured']:8.4f}  predicted {c['slope_predicted']:8.4f}  "
                f"log mean lambda_L {c['log_mean_lambda_last']:+.3f}  RMS log sigma_L {c['isometry_gap_last']:.3f}  "
                f"log spread_L {c['log_spread_last']:.2f}  zeros {c['zero_fraction_last']:.3f}"
            )
        print(f"wrote {out}/result.json, spectra.png, spectra_*.png")
    return result


def _plot(result: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    l = np.arange(1, result["depth"] + 1)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, c) in enumerate(result["configs"].items()):
        ax.plot(l, c["var_over_mean2"], "o", ms=3, color=f"C{i}", label=f"{name} measured")
        ax.plot(l, c["slope_predicted"] * l, "-", color=f"C{i}", label=f"{name}: l (mu2/mu1^2 - 1 - s1)")
    ax.set(
        xlabel="layer l",
        ylabel="Var[lambda] / E[lambda]^2",
        title=f"Jacobian spectra at criticality, width {result['width']}",
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "spectra.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Command line: `python experiments/dynamical_isometry.py [--out DIR] [--quick]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/dynamical_isometry", help="output directory")
    parser.add_argument("--quick", action="store_true", help="the test-sized configuration")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(**(QUICK if args.quick else FULL), seed=args.seed, out=args.out)


if __name__ == "__main__":
    main()
