"""gradflow: a JAX toolkit for the science of vanishing and exploding gradients."""

import importlib as _importlib

from gradflow import activations as activations
from gradflow import check as check
from gradflow import data as data
from gradflow import distributed as distributed
from gradflow import initializers as initializers
from gradflow import lsuv as lsuv
from gradflow import nn as nn
from gradflow import numerics as numerics
from gradflow import optim as optim
from gradflow import pretrain as pretrain
from gradflow import progress as progress
from gradflow import signal as signal
from gradflow import spectra as spectra
from gradflow import store as store
from gradflow import theory as theory
from gradflow import train as train

__version__ = "0.1.0"

__all__ = [
    "activations",
    "check",
    "data",
    "distributed",
    "initializers",
    "lsuv",
    "nn",
    "numerics",
    "optim",
    "plots",
    "pretrain",
    "progress",
    "signal",
    "spectra",
    "store",
    "theory",
    "train",
]

_LAZY = ("plots",)  # imported on first use: matplotlib adds about half a second to `import gradflow`


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"gradflow.{name}")
    raise AttributeError(f"module 'gradflow' has no attribute {name!r}")
