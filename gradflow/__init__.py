"""gradflow: a JAX toolkit for the science of vanishing and exploding gradients."""

from gradflow import activations as activations
from gradflow import initializers as initializers

__version__ = "0.1.0"
