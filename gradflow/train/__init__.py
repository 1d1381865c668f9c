"""Training: state, pure step with in-jit diagnostics, the epoch loop, run with records and
resume, vmapped sweeps.

The public surface is `__all__`: what users (the README, experiments, examples, the CLI) call.
The rest is imported from its submodule: `state`, `step`, `diagnostics`, `loop` (the epoch loop),
`run` (`fit`), `hparams`, `sweep`, `results`, `tensorboard`.
"""

from gradflow.train.diagnostics import NONFINITE_KINDS as NONFINITE_KINDS
from gradflow.train.hparams import Hparams as Hparams
from gradflow.train.hparams import grid as grid
from gradflow.train.layers import Layout as Layout
from gradflow.train.layers import layout as layout
from gradflow.train.loop import epoch_batches as epoch_batches
from gradflow.train.loop import evaluate as evaluate
from gradflow.train.loop import make_train_epoch as make_train_epoch
from gradflow.train.results import SweepResult as SweepResult
from gradflow.train.results import TrainResult as TrainResult
from gradflow.train.run import fit as fit
from gradflow.train.state import TrainConfig as TrainConfig
from gradflow.train.state import TrainState as TrainState
from gradflow.train.state import init_state as init_state
from gradflow.train.state import init_variables as init_variables
from gradflow.train.state import run_keys as run_keys
from gradflow.train.step import make_train_step as make_train_step
from gradflow.train.sweep import SweepPoint as SweepPoint
from gradflow.train.sweep import sweep as sweep
from gradflow.train.sweep import sweep_points as sweep_points

__all__ = [
    "NONFINITE_KINDS",
    "Layout",
    "layout",
    "Hparams",
    "grid",
    "epoch_batches",
    "evaluate",
    "make_train_epoch",
    "SweepResult",
    "TrainResult",
    "fit",
    "TrainConfig",
    "TrainState",
    "init_state",
    "init_variables",
    "run_keys",
    "make_train_step",
    "SweepPoint",
    "sweep",
    "sweep_points",
]
