"""gradflow: a JAX toolkit for the science of vanishing and exploding gradients."""

from gradflow import activations as activations
from gradflow import check as check
from gradflow import data as data
from gradflow import initializers as initializers
from gradflow import lsuv as lsuv
from gradflow import nn as nn
from gradflow import numerics as numerics
from gradflow import optim as optim
from gradflow import pretrain as pretrain
from gradflow import spectra as spectra
from gradflow import theory as theory
from gradflow import train as train

__version__ = "0.1.0"

__all__ = [
    "activations",
    "check",
    "data",
    "initializers",
    "lsuv",
    "nn",
    "numerics",
    "optim",
    "pretrain",
    "spectra",
    "theory",
    "train",
]
