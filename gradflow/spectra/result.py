"""The result of a spectra computation: log singular values over depth, statistics, I/O, plots."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class SpectraResult:
    """Log singular values (natural log, sorted descending) of a Jacobian product at each depth.

    Attributes:
      depths: (D,) 1-based layer indices l.
      log_singular_values: (D, k) log sigma_i of J_l (forward) or G_l (backward); -inf = exactly 0.
      direction: "forward" (J_l = d h_l / d h_0) or "backward" (G_l = d h_L / d h_l).
      layers: (D,) names of the layers, from the model's layer chain (default "1", "2", ...).
      widths: (D,) the state size N_l of each layer (default: unknown, -1).
      method: the engine that computed them: "exact" (every value) or "topk" (the k largest).
    """

    depths: np.ndarray
    log_singular_values: np.ndarray
    direction: str = "forward"
    layers: tuple[str, ...] | None = None
    widths: np.ndarray | None = None
    method: str = "exact"

    def __post_init__(self):
        object.__setattr__(self, "depths", np.asarray(self.depths))
        object.__setattr__(self, "log_singular_values", np.asarray(self.log_singular_values))
        names = tuple(str(l) for l in self.depths) if self.layers is None else tuple(self.layers)
        object.__setattr__(self, "layers", names)
        widths = np.full(len(self.depths), -1) if self.widths is None else np.asarray(self.widths)
        object.__setattr__(self, "widths", widths.astype(np.int64))
        if len(names) != len(self.depths) or widths.shape != self.depths.shape:
            raise ValueError(f"layers and widths need one entry per depth ({len(self.depths)})")
        if self.method not in ("exact", "topk"):
            raise ValueError(f"method must be 'exact' or 'topk' (the engine that ran), got {self.method!r}")
        if self.log_singular_values.ndim != 2 or self.log_singular_values.shape[0] != self.depths.shape[0]:
            raise ValueError(
                f"log_singular_values must be (len(depths), k); got {self.log_singular_values.shape} "
                f"for {self.depths.shape[0]} depths"
            )

    @property
    def log_max(self) -> np.ndarray:
        """log sigma_max per depth."""
        return self.log_singular_values[:, 0]

    @property
    def log_min(self) -> np.ndarray:
        """log sigma_min per depth (of the k kept)."""
        return self.log_singular_values[:, -1]

    @property
    def log_spread(self) -> np.ndarray:
        """log(sigma_max / sigma_min) per depth."""
        return self.log_max - self.log_min

    @property
    def log_mean_sq(self) -> np.ndarray:
        """log mean_i sigma_i^2 per depth (the mean-field quantity chi_1^l), overflow-free."""
        x = 2.0 * self.log_singular_values
        m = np.max(x, axis=1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        with np.errstate(divide="ignore"):
            return (m[:, 0] + np.log(np.mean(np.exp(x - m), axis=1))).astype(np.float64)

    @property
    def isometry_gap(self) -> np.ndarray:
        """Distance from isometry: RMS of log sigma_i per depth (0 iff every sigma_i = 1)."""
        return np.sqrt(np.mean(self.log_singular_values**2, axis=1))

    def summary(self) -> dict[str, np.ndarray]:
        """Every per-depth statistic in one dict (for tables, JSON and the atlas)."""
        return {
            "depth": self.depths,
            "log_max": self.log_max,
            "log_min": self.log_min,
            "log_mean_sq": self.log_mean_sq,
            "log_spread": self.log_spread,
            "isometry_gap": self.isometry_gap,
        }

    def table(self, max_rows: int = 12) -> str:
        """A plain-text table of the summary at up to `max_rows` depths."""
        idx = np.unique(np.linspace(0, len(self.depths) - 1, min(max_rows, len(self.depths))).astype(int))
        named = self.layers != tuple(str(l) for l in self.depths)
        w = max([5, *(len(n) for n in self.layers)]) if named else 0
        head = f"{'depth':>6} " + (f"{'layer':<{w}} {'width':>6} " if named else "")
        head += f"{'log smax':>10} {'log smin':>10} {'log mean s2':>12} {'log spread':>11} {'iso gap':>8}"
        rows = [head]
        for i in idx:
            layer = f"{self.layers[i]:<{w}} {self.widths[i]:>6d} " if named else ""
            rows.append(
                f"{self.depths[i]:>6d} {layer}{self.log_max[i]:>10.3f} {self.log_min[i]:>10.3f} "
                f"{self.log_mean_sq[i]:>12.3f} {self.log_spread[i]:>11.3f} {self.isometry_gap[i]:>8.3f}"
            )
        return "\n".join(rows)

    def _repr_html_(self) -> str:
        """In Jupyter: the summary at up to 12 depths and the figure of `plot`."""
        from gradflow import _html

        idx = np.unique(np.linspace(0, len(self.depths) - 1, min(12, len(self.depths))).astype(int))
        head = ["depth", "layer", "width", "log smax", "log smin", "log mean s2", "log spread", "iso gap"]
        rows = [
            [int(self.depths[i]), self.layers[i], int(self.widths[i]) if self.widths[i] >= 0 else "?"]
            + [
                f"{v[i]:.3f}"
                for v in (self.log_max, self.log_min, self.log_mean_sq, self.log_spread, self.isometry_gap)
            ]
            for i in idx
        ]
        k = self.log_singular_values.shape[1]
        caption = (
            f"{self.direction} Jacobian spectra, {self.method} ({k} values per layer), natural log; "
            f"{len(self.depths)} layers"
        )
        return _html.table(head, rows, caption) + _html.figure(self.plot())

    def save(self, path: str | pathlib.Path) -> None:
        """Write to `.npz` (depths, log_singular_values, direction, layers, widths)."""
        np.savez(
            path,
            depths=self.depths,
            log_singular_values=self.log_singular_values,
            direction=self.direction,
            layers=np.asarray(self.layers, dtype=str),
            widths=self.widths,
            method=self.method,
        )

    @classmethod
    def load(cls, path: str | pathlib.Path) -> SpectraResult:
        """Read a result written by `save`."""
        path = pathlib.Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no spectra file at {path}")
        with np.load(path, allow_pickle=False) as z:
            return cls(
                depths=z["depths"],
                log_singular_values=z["log_singular_values"],
                direction=str(z["direction"]),
                layers=tuple(str(n) for n in z["layers"]) if "layers" in z else None,
                widths=z["widths"] if "widths" in z else None,
                method=str(z["method"]) if "method" in z else "exact",
            )

    def plot(
        self, path: str | pathlib.Path | None = None, *, at: tuple[int, ...] | None = None, title: str = ""
    ):
        """Heatmap of log sigma over depth, and the density of log sigma at chosen depths.

        Returns the matplotlib figure; writes it to `path` if given.
        """
        import matplotlib

        if path is not None:
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
        finite = np.where(np.isfinite(self.log_singular_values), self.log_singular_values, np.nan)
        lo, hi = np.nanmin(finite), np.nanmax(finite)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 80)
        hist = np.stack([np.histogram(row[np.isfinite(row)], bins=bins)[0] for row in finite])
        extent = (bins[0], bins[-1], self.depths[-1] + 0.5, self.depths[0] - 0.5)
        im = ax0.imshow(np.log1p(hist), aspect="auto", extent=extent, cmap="magma")
        ax0.set(
            xlabel="ln sigma (natural log)",
            ylabel="layer",
            title=title or f"{self.direction} Jacobian spectra",
        )
        if self.layers != tuple(str(l) for l in self.depths):  # a chain's rows: named by layer
            every = max(1, -(-len(self.depths) // 20))
            ax0.set_yticks(
                self.depths[::every], [self.layers[i] for i in range(0, len(self.depths), every)], fontsize=7
            )
        fig.colorbar(im, ax=ax0, label="log(1 + count)")
        chosen = at or tuple(
            sorted({int(self.depths[0]), int(self.depths[len(self.depths) // 2]), int(self.depths[-1])})
        )
        for l in chosen:
            i = int(np.searchsorted(self.depths, l))
            row = finite[i][np.isfinite(finite[i])]
            ax1.hist(
                row, bins=40, density=True, histtype="step", label=f"{self.layers[i]} (l = {self.depths[i]})"
            )
        ax1.set(xlabel="ln sigma (natural log)", ylabel="density", title="spectrum density at chosen depths")
        ax1.legend()
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig
