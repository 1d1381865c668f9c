"""The atlas report: figures (PNG), `report.md` and a self-contained `report.html` from a run's records.

Everything here reads what `gradflow.atlas.run` wrote (`results.jsonl`, `arrays/*.npz`,
`config.json`), so `gradflow report RUN_DIR` rebuilds the report of a finished or interrupted
run without recomputing anything.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import pathlib
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradflow import atlas  # noqa: E402
from gradflow.atlas.measure import SIGNAL, TOKENS  # noqa: E402

COLUMNS = (
    ("name", "configuration"),
    ("sigma_w", "sigma_w"),
    ("log_sigma_max", "log s_max"),
    ("log_sigma_min", "log s_min"),
    ("measured_rate", "log mean s^2 / layer"),
    ("mean_field_rate", "mean field"),
    ("log10_grad_ratio", "log10 g_1/g_L"),
    ("token_residual", "tokens res(X_L)"),
    ("final_accuracy", "trained: test accuracy"),
    ("label", "verdict (signal at init)"),
)
_LABEL_COLOURS = {"vanishing": "#cfe2ff", "exploding": "#f8d7da", "healthy": "#d1e7dd"}


def _fmt(v, key: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return str(v)
    if not math.isfinite(v):
        return "-inf" if v < 0 else "inf"
    if v == 0:
        return "0"
    if key == "final_accuracy":
        return f"{v:.3f}"
    if key == "sigma_w":
        return f"{v:.3g}"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"


def at_chance(row: dict) -> bool:
    """Whether a row's test accuracy is within 3 standard errors of guessing (1 / classes)."""
    acc, chance, n = row.get("final_accuracy"), row.get("chance_accuracy"), row.get("test_examples")
    if acc is None or chance is None or not n:
        return False
    return acc <= chance + 3 * math.sqrt(chance * (1 - chance) / n)


def table_rows(rows: Sequence[dict]) -> list[list[str]]:
    """The verdict table's cells, one list per configuration (see `COLUMNS`).

    A verdict is about signal propagation at initialization; a net that trained no better than
    chance in the atlas's short budget says so in both its accuracy and its verdict cell.
    """
    out = []
    for r in rows:
        r = dict(r)
        g = r.get("log_grad_ratio")
        r["log10_grad_ratio"] = None if g is None else g / math.log(10.0)
        chance = at_chance(r)
        if r.get("diverged"):
            r["final_accuracy"] = "diverged"
        elif chance:
            r["final_accuracy"] = f"{r['final_accuracy']:.3f} (chance)"
        if chance and r["label"].startswith("healthy"):
            r["label"] = f"{r['label']}, but untrained in budget"
        out.append([_fmt(r.get(k), k) for k, _ in COLUMNS])
    return out


def markdown_table(rows: Sequence[dict]) -> str:
    head = "| " + " | ".join(t for _, t in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    return "\n".join([head, rule, *("| " + " | ".join(c) + " |" for c in table_rows(rows))])


def _plot_jacobian_growth(rows, arrays, path: pathlib.Path) -> bool:
    """log RMS singular value of J_l against l for the plain nets at the deepest depth."""
    ff = [r for r in rows if r["kind"] == "feedforward"]
    if not ff:
        return False
    deep = max(r["depth"] for r in ff)
    chosen = [r for r in ff if r["depth"] == deep]
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for r in chosen:
        logs = arrays.get(f"{r['name']}/log_sv")
        if logs is None:
            continue
        x = 2.0 * logs
        m = np.max(x, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore"):
            rms = 0.5 * (m[:, 0] + np.log(np.mean(np.exp(x - m), axis=1)))
        line = ax.plot(np.arange(1, len(rms) + 1), rms, label=f"{r['name']} ({r['label']})")[0]
        if r.get("mean_field_rate") is not None:
            ls = np.arange(1, len(rms) + 1)
            ax.plot(ls, 0.5 * r["mean_field_rate"] * ls, "--", color=line.get_color(), lw=0.8)
    ax.set_xlabel("layer l")
    # symlog: linear within +-1 (the healthy curves stay apart), logarithmic beyond, so a
    # sigmoid net at -850 does not flatten the rest
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylabel("natural log of the RMS singular value of J_l = dh_l/dh_0 (symlog axis)")
    ax.set_title(f"Jacobian growth at initialization, depth {deep} (dashed: mean field)")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_gradients(rows, arrays, path: pathlib.Path) -> bool:
    """Per-layer gradient norms in the first epoch of training, deepest depth."""
    ff = [r for r in rows if r["kind"] == "feedforward" and r.get("grad_norm_first_epoch")]
    if not ff:
        return False
    deep = max(r["depth"] for r in ff)
    fig, ax = plt.subplots(figsize=(11, 5.5))
    for r in ff:
        if r["depth"] != deep:
            continue
        g = np.asarray(r["grad_norm_first_epoch"], np.float64)
        ok = np.isfinite(g) & (g > 0)
        if ok.any():
            ax.semilogy(np.arange(1, len(g) + 1)[ok], g[ok], label=f"{r['name']} ({r['label']})")
    ax.set_xlabel("layer l")
    ax.set_ylabel("||dL/dW_l|| (mean over the first epoch)")
    ax.set_title(f"Per-layer gradient norms during training, depth {deep}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_map(rows, path: pathlib.Path) -> bool:
    """Activation x initialization at one depth, coloured by the measured log mean sigma^2 per layer."""
    ff = [r for r in rows if r["kind"] == "feedforward" and r["arch"] == "plain"]
    if not ff:
        return False
    counts: dict[int, int] = {}
    for r in ff:
        counts[r["depth"]] = counts.get(r["depth"], 0) + 1
    depth = max(counts, key=lambda d: counts[d])
    acts = [a for a in atlas.ACTIVATIONS if any(r["activation"] == a and r["depth"] == depth for r in ff)]
    inits = [i for i in atlas.INITS if any(r["init"] == i and r["depth"] == depth for r in ff)]
    grid = np.full((len(acts), len(inits)), np.nan)
    labels = [["not run" for _ in inits] for _ in acts]
    for r in ff:
        if r["depth"] == depth:
            i, j = acts.index(r["activation"]), inits.index(r["init"])
            v = r["measured_rate"]
            grid[i, j] = -np.inf if math.isnan(v) else v  # +-inf keep their sign
            labels[i][j] = f"{_fmt(v, 'rate')}\n{r['label'].split(' ')[0]}"
    fig, ax = plt.subplots(figsize=(1.5 * len(inits) + 2.5, 0.75 * len(acts) + 1.8))
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#dddddd")  # not run: grey, hatched below
    shown = np.ma.masked_invalid(np.clip(grid, -3, 3))
    im = ax.imshow(shown, cmap=cmap, vmin=-3, vmax=3, aspect="auto")
    ax.set_xticks(range(len(inits)), inits, rotation=30, ha="right")
    ax.set_yticks(range(len(acts)), acts)
    for i in range(len(acts)):
        for j in range(len(inits)):
            if np.isnan(grid[i, j]):
                ax.add_patch(
                    matplotlib.patches.Rectangle(
                        (j - 0.5, i - 0.5), 1, 1, fill=False, hatch="//", ec="#999999", lw=0
                    )
                )
            dark = np.isfinite(grid[i, j]) and abs(grid[i, j]) > 1.8 or grid[i, j] == -np.inf
            ax.text(
                j, i, labels[i][j], ha="center", va="center", fontsize=7, color="white" if dark else "black"
            )
    fig.colorbar(im, ax=ax, label="ln mean s^2 per layer (colour clipped at +-3)")
    ax.set_title(
        f"The atlas at depth {depth}: ln mean s^2 per layer in each cell; blue vanishes, red explodes"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_recurrent(rows, path: pathlib.Path) -> bool:
    rec = [r for r in rows if r["kind"] == "recurrent" and r.get("grad_norm_through_time")]
    if not rec:
        return False
    longest = max(r["seq_len"] for r in rec)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rec:
        if r["seq_len"] == longest:
            g = np.asarray(r["grad_norm_through_time"], np.float64)
            ok = g > 0
            ax.semilogy(np.arange(1, len(g) + 1)[ok], g[ok], label=f"{r['cell']} ({r['label']})")
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dL/ds_t|| (loss at the last step)")
    ax.set_title(f"Gradients through time at initialization, T = {longest}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _skipped(config: dict) -> list[tuple[str, str]]:
    """The grid's configurations that cannot be built (`atlas.grid.skipped`), from config.json."""
    fields = {f.name for f in dataclasses.fields(atlas.AtlasConfig)}
    try:
        cfg = atlas.AtlasConfig(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        )
    except (TypeError, ValueError):
        return []
    return [] if "only" in config else atlas.skipped(cfg)


FIGURES = {
    "atlas_map.png": (
        "The atlas",
        "Measured log mean squared singular value per layer of the input-output "
        "Jacobian at initialization, for every activation and initialization at one depth.",
    ),
    "jacobian_growth.png": (
        "Jacobian growth with depth",
        "log RMS singular value of J_l against l "
        "(solid: measured, exact in log space; dashed: mean-field l log chi_1 / 2).",
    ),
    "gradient_norms.png": (
        "Gradient norms during training",
        "Per-layer weight-gradient norms, mean over the first epoch of training on MNIST-1D.",
    ),
    "recurrent.png": (
        "Through time",
        "Gradient norm ||dL/ds_t|| reaching each time step of a recurrent net "
        "on the adding problem, at initialization.",
    ),
}


def build(run_dir: str | pathlib.Path, *, seconds: float | None = None) -> pathlib.Path:
    """Write the figures, report.md, report.html and summary.json of an atlas run; return report.html."""
    run_dir = pathlib.Path(run_dir)
    rows = atlas.load_rows(run_dir)
    arrays = atlas.load_arrays(run_dir)
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    made = {
        "atlas_map.png": _plot_map(rows, run_dir / "atlas_map.png"),
        "jacobian_growth.png": _plot_jacobian_growth(rows, arrays, run_dir / "jacobian_growth.png"),
        "gradient_norms.png": _plot_gradients(rows, arrays, run_dir / "gradient_norms.png"),
        "recurrent.png": _plot_recurrent(rows, run_dir / "recurrent.png"),
    }
    counts: dict[str, int] = {}
    for r in rows:
        key = r["label"].split(" ")[0]
        counts[key] = counts.get(key, 0) + 1
    summary = {"configurations": len(rows), "labels": counts, "seconds": seconds, "config": config}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    intro = (
        f"{len(rows)} configurations; labels: "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + (f"; measured in {seconds:.0f} s." if seconds else ".")
    )
    ff = [r for r in rows if r["kind"] == "feedforward"]
    chance = next((r["chance_accuracy"] for r in ff if r.get("chance_accuracy")), None)
    if config.get("epochs") and ff:
        untrained = sum(at_chance(r) for r in ff)
        intro += (
            f" Two claims, kept apart: the verdict is signal propagation at initialization; the accuracy is "
            f"what {config['epochs']} epochs of Adam (lr {config.get('lr')}, batch {config.get('batch_size')}, "
            f"{config.get('train_samples')} MNIST-1D examples) reached"
            + (f", against chance {chance:.2f}" if chance else "")
            + f". {untrained} of {len(ff)} feed-forward nets stayed at chance in that budget (marked)."
        )
    not_run = _skipped(config)
    if not_run:
        intro += " Not run: " + "; ".join(f"{n} ({why})" for n, why in not_run) + "."
    how = (
        "Columns: log s_max / log s_min are the natural logs of the largest and smallest singular values "
        "of the end-to-end Jacobian dh_L/dh_0 at initialization (through time for recurrent nets); "
        "'log mean s^2 / layer' is its measured log mean squared singular value divided by the depth, "
        "beside the mean-field prediction log chi_1 (BatchNorm: the large-batch gradient growth of "
        "Yang et al. 2019; ReZero: 0); 'log10 g_1/g_L' is the first-layer over last-layer gradient "
        "norm in the first epoch of training (recurrent: ||dL/ds_1|| / ||dL/ds_T|| at init); 'tokens "
        "res(X_L)' is a Transformer's rank-collapse residual at its last block (the conv and attention "
        f"nets read MNIST-1D as a 1-D signal of {SIGNAL} positions or as {TOKENS} tokens of "
        f"{SIGNAL // TOKENS} samples; their Jacobian "
        "is d h_l / d h_0 over their blocks, and a circular CNN's mean field is the fully connected "
        "one, Xiao et al. 2018); accuracy "
        "is MNIST-1D test accuracy after the short training run. Verdict rule: " + atlas.VERDICT_RULE
    )
    md = [f"# gradflow atlas\n\n{intro}\n\n{how}\n", "## Verdicts\n", markdown_table(rows), ""]
    for name, ok in made.items():
        if ok:
            title, caption = FIGURES[name]
            md += [f"## {title}\n", f"![{title}]({name})\n", caption, ""]
    md += [
        "Raw numbers: `results.jsonl` (one JSON object per configuration), `arrays/*.npz` "
        "(log singular values `<name>/log_sv`, per layer for the MLPs and recurrent nets, of the "
        "last block for the conv and attention nets, and gradient norms `<name>/grad_norm`).",
        "",
    ]
    (run_dir / "report.md").write_text("\n".join(md))

    cells = []
    for r, row in zip(rows, table_rows(rows)):
        colour = _LABEL_COLOURS.get(r["label"].split(" ")[0], "#ffffff")
        tds = "".join(f"<td>{html.escape(c)}</td>" for c in row[:-1])
        cells.append(f"<tr>{tds}<td style='background:{colour}'>{html.escape(row[-1])}</td></tr>")
    header = "".join(f"<th>{html.escape(t)}</th>" for _, t in COLUMNS)
    figs = []
    for name, ok in made.items():
        if ok:
            title, caption = FIGURES[name]
            data = base64.b64encode((run_dir / name).read_bytes()).decode()
            figs.append(
                f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
                f"src='data:image/png;base64,{data}'><p>{html.escape(caption)}</p>"
            )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradflow atlas</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>gradflow atlas</h1><p>{html.escape(intro)}</p><p>{html.escape(how)}</p>
<h2>Verdicts</h2><table><tr>{header}</tr>{"".join(cells)}</table>{"".join(figs)}
</body></html>
"""
    out = run_dir / "report.html"
    out.write_text(page)
    return out
