"""The edge-of-chaos phase diagram of tanh in (sigma_w, sigma_b): chi_1 and xi_c, critical line.

Claim (Poole et al. 2016; Schoenholz et al. 2017): chi_1 = 1 separates the ordered phase
(chi_1 < 1, gradients vanish) from the chaotic one (chi_1 > 1, they explode), and the correlation
depth scale xi_c diverges on that line. Expected: the critical line passes through sigma_w = 1 at
sigma_b = 0 and 1.3956 at sigma_b = 0.3. Writes runs/phase_diagram/{phase_diagram.png, result.json}.
"""

import argparse
import json
import pathlib

import numpy as np

from gradflow import progress, theory
from gradflow.numerics import x64


def run(out: str = "runs/phase_diagram", n_w: int = 40, n_b: int = 16, verbose: bool = False) -> dict:
    """The tanh phase diagram on an n_w x n_b grid (verbose: progress); write result.json and the figure."""
    sw, sb = np.linspace(0.5, 3.0, n_w), np.linspace(0.0, 0.5, n_b)
    stage = progress.stage(f"mean-field maps on the {n_w} x {n_b} grid", verbose=verbose)
    with stage, x64():  # the whole grid is one vmapped call
        pd = theory.phase_diagram("tanh", sw, sb)
        line = np.asarray(theory.critical_sigma_w("tanh", sb))
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    _plot(sw, sb, np.asarray(pd.chi1), np.asarray(pd.xi_c), line, f"{out}/phase_diagram.png")
    result = {
        "sigma_b": sb.tolist(),
        "critical_sigma_w": line.tolist(),
        "chaotic_fraction": float(np.mean(pd.chaotic)),
    }
    pathlib.Path(f"{out}/result.json").write_text(json.dumps(result))
    return result


def _plot(sw, sb, chi1, xi_c, line, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    log_chi = np.log(chi1)
    centred = matplotlib.colors.TwoSlopeNorm(
        vcenter=0.0, vmin=min(log_chi.min(), -1e-3), vmax=max(log_chi.max(), 1e-3)
    )
    panels = (
        (log_chi, "log chi_1 (blue: ordered, red: chaotic)", "RdBu_r", centred),
        (np.log10(xi_c), "log10 xi_c (correlation depth)", "viridis", None),
    )
    for ax, (z, name, cmap, norm) in zip(axes, panels):
        im = ax.pcolormesh(sw, sb, z.T, shading="auto", cmap=cmap, norm=norm)
        ax.plot(line, sb, "k-", lw=2, label="critical line chi_1 = 1")
        ax.set(xlabel="sigma_w", ylabel="sigma_b", title=f"tanh: {name}")
        ax.legend(loc="upper left", fontsize=8)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/phase_diagram")
    r = run(parser.parse_args().out, verbose=True)
    print(
        "critical sigma_w at sigma_b =",
        [f"{b:.2f}: {w:.4f}" for b, w in zip(r["sigma_b"][::5], r["critical_sigma_w"][::5])],
    )
