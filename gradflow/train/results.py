"""What the trainers return, and how it reads: `TrainResult` (`fit`), `SweepResult` (`sweep`).

Both display themselves in Jupyter (`_repr_html_`, built with `gradflow._html`). A sweep's runs
are ranked best first by `ranked_rows` and shown as cells by `ranked_table` (the notebook's
table here, the CLI's rich table); `grad_ratio` is the first/last-layer gradient-norm ratio of
a run's record, shown by `TrainResult` and `fit`'s progress bar.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gradflow.train.hparams import Hparams
from gradflow.train.state import TrainState


@dataclasses.dataclass
class TrainResult:
    """What `fit` (`gradflow.train.run`) returns.

    Attributes:
      state: the final `TrainState` (the last finite one if the run stopped on a NaN/Inf).
      history: one record per epoch, the dicts written to metrics.jsonl.
      test: final evaluation on the test set ({} without test data).
      stopped: the run ended early on a non-finite step (`on_nonfinite="stop"`).
      nonfinite: the first non-finite step, {"epoch", "step", "layer", "layer_name", "kind"},
        or None.
      layer_names: the layer order used to report non-finite values (diagnostics module).
      diagnostic_layers: the layers of the per-layer diagnostics (the records' lists).
      omitted: per-layer diagnostics not recorded for this model, name -> reason.
      run_dir: where the records are, or None.
      interrupted: Ctrl-C stopped the run after the last epoch in `history` (recorded and
        checkpointed: a rerun with the same arguments resumes there).
    """

    state: TrainState
    history: list[dict]
    test: dict[str, float]
    stopped: bool
    nonfinite: dict | None
    layer_names: list[str]
    diagnostic_layers: list[str] = dataclasses.field(default_factory=list)
    omitted: dict[str, str] = dataclasses.field(default_factory=dict)
    run_dir: Path | None = None
    interrupted: bool = False

    @property
    def skipped(self) -> int:
        """Steps whose update was not applied (non-finite), over the whole run."""
        return sum(r["skipped"] for r in self.history)

    def _repr_html_(self) -> str:
        """In Jupyter: the epochs (up to 12), how the run ended, and the loss and per-layer
        gradient-norm figure."""
        from gradflow import _html, plots

        cols = [
            c
            for c in ("loss", "accuracy", "test_loss", "test_accuracy")
            if self.history and c in self.history[0]
        ]
        idx = np.unique(np.linspace(0, len(self.history) - 1, min(12, len(self.history))).astype(int))
        rows = []
        for i in idx if self.history else ():
            r = self.history[i]
            ratio = "" if (q := grad_ratio(r)) is None else f"{q:.3g}"
            rows.append([r["epoch"], *(f"{r[c]:.4g}" for c in cols), ratio, r["skipped"]])
        if self.nonfinite is not None:
            nf = self.nonfinite
            end = (
                f"non-finite {nf['kind']} at epoch {nf['epoch']}, step {nf['step']}, layer {nf['layer_name']}"
            )
        else:
            end = "interrupted (a rerun resumes)" if self.interrupted else "finished"
        test = ", ".join(f"test {k} {v:.4g}" for k, v in self.test.items())
        caption = f"training run, {len(self.history)} epochs: {end}" + (f"; {test}" if test else "")
        out = _html.table(["epoch", *cols, "grad layer 1 / last", "skipped"], rows, caption)
        if self.history:
            out += _html.figure(plots.train_run_figure(self.history, self.diagnostic_layers))
        return out


def grad_ratio(rec: dict) -> float | None:
    """Layer 1's gradient norm over the last layer's in a record, where both are finite and nonzero."""
    g = rec.get("grad_norm")
    if (
        not g
        or g[0] is None
        or g[-1] is None
        or not math.isfinite(g[0])
        or not math.isfinite(g[-1])
        or g[-1] == 0
    ):
        return None
    return g[0] / g[-1]


@dataclasses.dataclass
class SweepResult:
    """Results of `sweep`, run axis first.

    Attributes:
      hparams: the `Hparams` run, each (S,).
      params: final parameters, every leaf with a leading axis S.
      batch_stats: final BatchNorm statistics ({} without BatchNorm), leading axis S.
      epochs: per-epoch summaries, each (S, epochs, ...) (see `gradflow.train.sweep.make_run`).
      layer_names: the layer order of `nonfinite_layer`.
      diagnostic_layers: the layers of the per-layer diagnostics' last axis.
      omitted: per-layer diagnostics not recorded for this model, name -> reason.
      num_devices: devices the sweep axis was sharded over (1: unsharded).
    """

    hparams: Hparams
    params: Any
    batch_stats: Any
    epochs: dict[str, np.ndarray]
    layer_names: list[str]
    diagnostic_layers: list[str]
    omitted: dict[str, str]
    num_devices: int

    def rows(self) -> list[dict]:
        """One row per run, the best first (`ranked_rows`)."""
        return ranked_rows(self.hparams, self.epochs)

    def _repr_html_(self) -> str:
        """In Jupyter: the runs best first (up to 16) and their epoch-1 per-layer gradient norms."""
        from gradflow import _html, plots

        rows = self.rows()
        head, cells = ranked_table(rows[:16], ("run", "seed", "lr", "weight_scale", "clip_value"))
        caption = f"sweep of {len(rows)} runs on {self.num_devices} device(s), best first" + (
            f" (the first 16 of {len(rows)})" if len(rows) > 16 else ""
        )
        out = _html.table(head, cells, caption)
        if "grad_norm" in self.epochs:
            curves = {
                f"run {r['run']}: lr={r['lr']:g} seed={r['seed']}": np.asarray(
                    self.epochs["grad_norm"][r["run"], 0]
                )
                for r in rows[:8]
            }
            fig = plots.grad_norm_profiles(curves, None, title="per-layer gradient norms, epoch 1 (best 8)")
            out += _html.figure(fig)
        return out

    def point(self, i: int) -> dict:
        """Run i's hparams, params, batch_stats and epochs (leading axis removed)."""
        take = lambda t: jax.tree.map(lambda a: a[i], t)  # noqa: E731
        return {
            "hparams": take(self.hparams),
            "params": take(self.params),
            "batch_stats": take(self.batch_stats),
            "epochs": take(self.epochs),
        }


def _given(v: object) -> float:
    """A float32 hyperparameter as the user wrote it (1e-4, not 9.999999747378752e-05): numpy's
    shortest float32 repr, read back as a Python float."""
    return float(str(np.float32(v)))


def ranked_rows(hp: Hparams, epochs: Mapping[str, Any]) -> list[dict]:
    """One row per run, the best first: its index in the sweep (the run axis of `epochs`),
    hparams as given, final-epoch loss and accuracies, the first/last-layer gradient ratio of
    epoch 1, and whether the run hit a NaN/Inf. Best: highest final test accuracy
    (classification: the records hold accuracies) or lowest final test loss; diverged runs last."""
    ep = {k: np.asarray(v) for k, v in epochs.items()}
    rows = []
    for i in range(len(hp.seed)):
        row = {
            "run": i,
            "seed": int(hp.seed[i]),
            "lr": _given(hp.lr[i]),
            "weight_scale": _given(hp.weight_scale[i]),
            "clip_value": _given(hp.clip_value[i]),
        }
        for k in ("loss", "accuracy", "test_loss", "test_accuracy"):
            if k in ep:
                row[k] = float(ep[k][i, -1])
        if "grad_norm" in ep:
            g = ep["grad_norm"][i, 0]
            row["grad_first_over_last"] = float(g[0] / g[-1]) if g[-1] > 0 else float("nan")
        row["diverged"] = bool(np.any(ep["nonfinite_step"][i] >= 0)) or not np.isfinite(row["loss"])
        rows.append(row)
    key = "test_accuracy" if "test_accuracy" in rows[0] else "test_loss"
    key = key if key in rows[0] else "loss"
    sign = -1.0 if key.endswith("accuracy") else 1.0

    def rank(r: dict) -> tuple:
        v = r[key]
        return (r["diverged"], not np.isfinite(v), sign * v if np.isfinite(v) else 0.0)

    rows.sort(key=rank)
    for j, r in enumerate(rows):
        r["best"] = j == 0 and not r["diverged"]
    return rows


def ranked_table(rows: Sequence[dict], given: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """`ranked_rows` as display cells (the CLI's table, a notebook's): the best run's mark, the
    `given` columns as written, the measured ones to 3 digits, ok / diverged."""
    measured = [
        c for c in ("loss", "accuracy", "test_loss", "test_accuracy", "grad_first_over_last") if c in rows[0]
    ]
    head = ["", *given, *measured, "status"]
    cells = [
        ["*" if r["best"] else "", *(f"{r[c]:g}" for c in given), *(f"{r[c]:.3g}" for c in measured)]
        + ["diverged" if r["diverged"] else "ok"]
        for r in rows
    ]
    return head, cells
