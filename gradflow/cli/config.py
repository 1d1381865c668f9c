"""The `gradflow` command's subcommands as frozen dataclasses, one per subcommand.

tyro generates each subcommand's flags from its dataclass: the library's own configs nested in it
(`StackConfig` as --model.*, `TrainConfig` with its `OptimConfig` as --train.*, `AtlasConfig`'s
fields flat) beside the command's own fields, whose docstrings are their --help lines. The
configs validate themselves (`__post_init__`); the commands (`gradflow.cli.commands`,
`gradflow.cli.app`) check what only they know.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import tyro

from gradflow.atlas import AtlasConfig
from gradflow.nn.config import StackConfig
from gradflow.train.state import TrainConfig

Flat = tyro.conf.OmitArgPrefixes
DATASETS = ("mnist1d", "digits", "adding")
INPUTS = ("mnist1d", "digits", "random")


@dataclasses.dataclass(frozen=True)
class Hosts:
    """Several processes (hosts) as one run: start the same command on each; process 0 writes."""

    coordinator: str | None = None
    """host:port where process 0 listens, or 'auto' (the cluster's own detection: SLURM, Open MPI,
    Kubernetes); default: GRADFLOW_COORDINATOR, else a single process."""
    num_processes: int | None = None
    """processes in the run (default: GRADFLOW_NUM_PROCESSES)."""
    process_id: int | None = None
    """this process's id, 0..num_processes - 1 (default: GRADFLOW_PROCESS_ID)."""
    heartbeat_timeout_s: int = 100
    """a process silent this long is taken as dead, and the others end (rerun to resume)."""


@dataclasses.dataclass(frozen=True)
class Spectra:
    """Per-layer singular-value spectra of the input-output Jacobian of a stack at initialization."""

    model: StackConfig = StackConfig()
    depths: tuple[int, ...] | None = None
    """1-based layer indices (default: every layer; recurrent: every time step)."""
    method: str = "auto"
    """"exact" (every singular value, log space), "topk" (matrix-free) or "auto" (exact up to
    2048-value states, topk with k = 32 past them: a Transformer's T x D block states)."""
    k: int | None = None
    """number of singular values kept (required for topk; auto's topk: 32)."""
    direction: str = "forward"
    """"forward" (J_l = dh_l/dh_0) or "backward" (G_l = dh_L/dh_l)."""
    input: str = "mnist1d"
    """the input the Jacobian is taken at: an MNIST-1D example (40 values), a digits image (8 x 8:
    what a 2-D conv stack reads) or a standard normal vector of 40 values."""
    seed: int = 0
    out: str = "runs/spectra"
    """output directory: spectra.npz, spectra.png, summary.json."""
    user_model: str | None = None
    """your own model instead of --model.*: path/to/file.py:Name or package.module:Name (a linen
    Module class built with no arguments, or an instance); random normal input of --input-shape."""
    input_shape: tuple[int, ...] | None = None
    """the example input's shape for --user-model, batch axis included (e.g. 1 28 28 1)."""
    layers: tuple[str, ...] | None = None
    """--user-model: cut points by module path ("Conv_0", "stage2/block1"); default: top-level submodules."""


@dataclasses.dataclass(frozen=True)
class Train:
    """One training run with per-layer gradient diagnostics, records and checkpoints (resumable)."""

    model: StackConfig = StackConfig()
    train: TrainConfig = TrainConfig(epochs=5)
    dataset: str = "mnist1d"
    """mnist1d or digits (classification), adding (regression; recurrent stacks, T = model.seq_len).
    A conv stack reads an example as a sequence (spatial_dims 1) or a square image (2: digits'
    8 x 8), a Transformer as model.tokens float tokens (MNIST-1D's 40 samples as 8 tokens of 5)."""
    num_samples: int = 4000
    out: str = "runs/train"
    """run directory: config.json, metrics.jsonl, checkpoints, loss.png, grad_norms.png."""
    resume: bool = True
    """continue from the last checkpoint in `out` if there is one."""
    log: str | None = None
    """'tensorboard': also write every epoch's record as TensorBoard events under OUT/tensorboard
    (per-layer diagnostics as scalars and histograms; needs gradflow[tensorboard])."""
    user_model: str | None = None
    """your own linen model instead of --model.*: path/to/file.py:Name or package.module:Name; it
    must output one logit per class of --dataset."""
    input_shape: tuple[int, ...] | None = None
    """--user-model: the shape of one example (the data are reshaped to it, e.g. 40 1 for a 1-D conv)."""


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A grid of seeds x learning rates x weight scales x clipping thresholds, vmapped in one call."""

    model: StackConfig = StackConfig()
    train: TrainConfig = TrainConfig(epochs=5)
    dataset: str = "mnist1d"
    num_samples: int = 4000
    seeds: tuple[int, ...] = (0,)
    """each run's seed: its initialization, shuffling and dropout. --train.seed seeds only the data
    (MNIST-1D's generation, digits' train/test split, the adding problem's sequences)."""
    lr: tuple[float, ...] = (1e-3,)
    """peak learning rates (a sweep reads these; --train.optim.lr is refused)."""
    weight_scale: tuple[float, ...] = (1.0,)
    """multipliers of the blocks' kernels after initialization."""
    clip_value: tuple[float, ...] = (1.0,)
    """clipping thresholds (used when --train.optim.clip is set; --train.optim.clip-value is refused)."""
    runs_per_call: int | None = None
    """train the grid in compiled calls of this many runs (one compile serves them all), each
    call's records kept in --out as it ends, so a rerun after a crash or a dead host trains only
    the calls not yet kept; default: the whole grid in one call."""
    out: str = "runs/sweep"
    fresh: bool = False
    """start over: discard the calls kept in --out (another grid's are refused without it)."""
    hosts: Annotated[Hosts, Flat] = Hosts()


@dataclasses.dataclass(frozen=True)
class Atlas:
    """The vanishing/exploding atlas: spectra, gradients and short training over a grid -> report.html."""

    config: Annotated[AtlasConfig, Flat] = AtlasConfig()
    full: bool = False
    """run the full cross product of the axes (GPU-sized) instead of the default grid."""
    out: str = "runs/atlas"
    fresh: bool = False
    """start over: remove this directory's earlier atlas results (another grid's are refused otherwise)."""
    progress: bool | None = None
    """progress bar (default: when stdout is a terminal)."""
    hosts: Annotated[Hosts, Flat] = Hosts()


@dataclasses.dataclass(frozen=True)
class Report:
    """Rebuild the figures and report of a finished (or interrupted) atlas or train run."""

    run_dir: tyro.conf.Positional[str]
