"""The atlas's grid: its axes, `AtlasConfig`, the configurations (`cases`) and their weight scales
and mean-field predictions."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax.numpy as jnp

from gradflow import theory
from gradflow._checks import check_choice, check_subset
from gradflow.theory import quadrature

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "elu", "selu", "gelu")


INITS = ("naive_small", "naive_large", "glorot", "he", "orthogonal", "critical")


ARCHS = ("plain", "batchnorm", "layernorm", "rezero")


CELLS = ("rnn", "rnn_orthogonal", "lstm", "lstm_chrono", "gru")


NETS = ("cnn_delta_orthogonal", "cnn_gaussian", "transformer_pre_ln", "transformer_post_ln", "attention_only")
"""Conv and attention nets of the atlas: a 1-D circular tanh CNN at the edge of chaos (sigma_w = 1,
sigma_b = 0) with delta-orthogonal or Gaussian kernels (Xiao et al. 2018); pre-LN and post-LN
Transformers (Xiong et al. 2020); pure attention without skips or MLPs (Dong et al. 2021)."""


GRIDS = ("default", "full")


_ARCH_FIELDS = {
    "plain": {},
    "batchnorm": {"norm": "batch"},
    "layernorm": {"norm": "layer"},
    "rezero": {"residual": "rezero"},
}


@dataclasses.dataclass(frozen=True)
class AtlasConfig:
    """What the atlas measures.

    Attributes:
      grid: "default" (a curated grid that covers every value of every axis and finishes in a
        few minutes on a 2-core CPU) or "full" (the whole cross product of the axes below: a
        GPU-sized run).
      activations, inits, archs, depths: the axes of the feed-forward grid (depths also the
        nets'); activations=()
        leaves the feed-forward part out.
      cells, seq_lens: recurrent cells (through time, on adding-problem sequences) and lengths;
        cells=() leaves the recurrent part out.
      nets: conv and attention nets (`NETS`) on MNIST-1D, at the middle depth (full grid: every
        depth); nets=() leaves them out. (`gradflow atlas` leaves out the parts whose axes a
        command line does not name when it names another part's.)
      width: hidden width of the MLPs (and of the recurrent cells).
      epochs, batch_size, lr, train_samples: the short training run (Adam) on MNIST-1D;
        epochs=0 measures at initialization only.
      spectra_batch: batch size of the BatchNorm batch map whose Jacobian is measured.
      seed: seed of data, initialization and shuffling.
    """

    grid: str = "default"
    activations: tuple[str, ...] = ACTIVATIONS
    inits: tuple[str, ...] = INITS
    archs: tuple[str, ...] = ARCHS
    depths: tuple[int, ...] = (10, 50, 200)
    cells: tuple[str, ...] = CELLS
    seq_lens: tuple[int, ...] = (200,)
    nets: tuple[str, ...] = NETS
    width: int = 32
    epochs: int = 2
    batch_size: int = 50
    lr: float = 1e-3
    train_samples: int = 2000
    spectra_batch: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("grid", self.grid, GRIDS)
        if not self.activations and not self.cells and not self.nets:
            raise ValueError("activations, cells and nets are all empty: the grid has no configuration")
        if self.activations:
            check_subset("activations", self.activations, ACTIVATIONS)
        check_subset("inits", self.inits, INITS)
        check_subset("archs", self.archs, ARCHS)
        if self.cells:
            check_subset("cells", self.cells, CELLS)
        if self.nets:
            check_subset("nets", self.nets, NETS)
        for name in ("depths", "seq_lens"):
            values = getattr(self, name)
            if not values or any(int(v) < 2 for v in values):
                raise ValueError(f"{name} must be a non-empty list of integers >= 2, got {values}")
        if int(self.epochs) < 0:
            raise ValueError(f"epochs must be >= 0 (0 skips training), got {self.epochs}")
        for name in ("width", "batch_size", "train_samples", "spectra_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.train_samples < 10 * self.batch_size // 8:
            raise ValueError(f"train_samples={self.train_samples} leaves no full batch of {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class Case:
    """One feed-forward configuration."""

    activation: str
    init: str
    arch: str
    depth: int

    @property
    def name(self) -> str:
        return f"{self.activation}-{self.init}-{self.arch}-L{self.depth}"


@dataclasses.dataclass(frozen=True)
class RecurrentCase:
    """One recurrent configuration (gradients through time)."""

    cell: str
    seq_len: int

    @property
    def name(self) -> str:
        return f"{self.cell}-T{self.seq_len}"


@dataclasses.dataclass(frozen=True)
class NetCase:
    """One conv or attention net (`NETS`) at one depth."""

    net: str
    depth: int

    @property
    def name(self) -> str:
        return f"{self.net}-L{self.depth}"


class Cases(NamedTuple):
    """The configurations of a grid, by part."""

    feedforward: list[Case]
    recurrent: list[RecurrentCase]
    nets: list[NetCase]


def cases(cfg: AtlasConfig) -> Cases:
    """The configurations of `cfg`'s grid (feed-forward, recurrent, nets), less the `skipped` ones."""
    rec = [RecurrentCase(c, int(t)) for c in cfg.cells for t in cfg.seq_lens]
    depths = sorted(int(d) for d in cfg.depths)
    net_depths = depths if cfg.grid == "full" else [depths[len(depths) // 2]]
    nets = [NetCase(n, d) for d in net_depths for n in cfg.nets]
    return Cases([c for c in _grid(cfg) if unavailable(c) is None], rec, nets)


def skipped(cfg: AtlasConfig) -> list[tuple[str, str]]:
    """(name, reason) of the configurations of `cfg`'s grid that cannot be built."""
    return [(c.name, why) for c in _grid(cfg) if (why := unavailable(c)) is not None]


def _grid(cfg: AtlasConfig) -> list[Case]:
    if cfg.grid == "full":
        return [
            Case(a, i, arch, int(d))
            for arch in cfg.archs
            for a in cfg.activations
            for d in cfg.depths
            for i in cfg.inits
        ]
    # The default grid (18 compiled programs, one per group of `_groups`): every activation x
    # Gaussian init at the middle depth, orthogonal for tanh and relu; the classic cases at the
    # other depths; BatchNorm, LayerNorm and ReZero for relu/He at the deepest.
    depths = sorted(int(d) for d in cfg.depths)
    mid, deep = depths[len(depths) // 2], depths[-1]
    ff: list[Case] = [
        Case(a, i, "plain", mid)
        for a in cfg.activations
        for i in cfg.inits
        if i != "orthogonal" or a in ("tanh", "relu")
    ]
    classic = [("sigmoid", "naive_small"), ("sigmoid", "glorot"), ("tanh", "orthogonal")]
    classic += [("relu", "he"), ("relu", "glorot"), ("relu", "naive_large")]
    ff += [Case(a, i, "plain", d) for d in depths if d != mid for a, i in classic]
    ff += [Case("relu", "he", arch, deep) for arch in ("batchnorm", "layernorm", "rezero")]
    keep = [c for c in ff if c.activation in cfg.activations and c.init in cfg.inits and c.arch in cfg.archs]
    return list(dict.fromkeys(keep))


def unavailable(case: Case) -> str | None:
    """Why a configuration of the grid cannot be built (None if it can): an initialization at the
    edge of chaos for an activation that has none at sigma_b = 0 (gelu: `theory.critical_sigma_w`)."""
    if case.init in ("critical", "orthogonal") and not math.isfinite(_critical(case.activation)):
        return (
            f"{case.activation} has no edge of chaos at sigma_b = 0 (chi_1 at the fixed point jumps across 1; "
            "see theory.critical_sigma_w)"
        )
    return None


@functools.cache
def _critical(activation: str) -> float:
    return quadrature.precise(theory.critical_sigma_w, activation, 0.0)


def sigma_w(activation: str, init: str, width: int) -> float:
    """The weight scale sigma_w (Var W = sigma_w^2 / fan_in) of an initialization at `width`.

    naive_small / naive_large: N(0, 0.01^2) and N(0, 1) whatever the width (the classic naive
    choices); glorot: 2 / (fan_in + fan_out) = 1 / width for square layers; he: 2 / fan_in;
    critical and orthogonal: the order-to-chaos value chi_1 = 1 at sigma_b = 0
    (`theory.critical_sigma_w` in float64; orthogonal weights are scaled by it; nan where there
    is none, and `cases` leaves such configurations out).
    """
    if init == "naive_small":
        return 0.01 * math.sqrt(width)
    if init == "naive_large":
        return math.sqrt(width)
    if init == "glorot":
        return 1.0
    if init == "he":
        return math.sqrt(2.0)
    return _critical(activation)


def mean_field_rate(case: Case, width: int, h0_mean_square: float | None = None) -> float | None:
    """Predicted log mean squared singular value of J_l per layer (None where no theory applies).

    Plain stacks: (1/L) sum_l log chi_l along the length map's trajectory from the blocks' input
    (q_1 = sigma_w^2 * mean(h_0^2), `theory.length_trajectory`) when `h0_mean_square` is given,
    else log chi_1 at the fixed point. The trajectory is what a finite-depth net sees: at a
    marginal fixed point (tanh's edge of chaos at sigma_b = 0 is q* = 0, approached like 1 / l)
    the fixed point's 0 is never reached.
    """
    if case.arch == "rezero":
        return 0.0  # alpha = 0 at init: every block is the identity
    if case.arch == "layernorm":
        return None
    if case.arch == "batchnorm":
        rate = math.log(quadrature.precise(theory.batchnorm_gradient_growth, case.activation))
    elif h0_mean_square is None:
        sw = sigma_w(case.activation, case.init, width)
        rate = math.log(quadrature.precise(theory.chi1, case.activation, sw, 0.0))
    else:
        sw = sigma_w(case.activation, case.init, width)
        with quadrature.x64():
            _, chi = theory.length_trajectory(case.activation, sw, 0.0, sw**2 * h0_mean_square, case.depth)
            rate = float(jnp.mean(jnp.log(chi)))
    return 0.0 if abs(rate) < 1e-9 else rate  # 0 within the float64 quadrature's accuracy
