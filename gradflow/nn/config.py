"""`StackConfig`: a frozen, validated description of a gradflow stack, for configs and the CLI."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from gradflow import activations, initializers
from gradflow.nn.mlp import NORMS, RESIDUALS, MLPStack
from gradflow.nn.recurrent import GRUStack, LSTMStack, RNNStack

KINDS = ("mlp", "rnn", "lstm", "gru")


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """A stack: `StackConfig(...).build()` returns the linen module.

    Attributes:
      kind: "mlp" (`MLPStack`), "rnn", "lstm" or "gru" (recurrent stacks; depth is then the
        sequence length of the data they are used with, and width their hidden size).
      depth: number of blocks of an MLP (>= 1).
      width: hidden width (>= 1).
      activation: a name from `gradflow.activations.names()` (MLP and RNN).
      init: kernel initializer, a name from `gradflow.initializers.names()`.
      init_scale: sigma_w for "gaussian", the gain for the variance-scaling and orthogonal
        initializers, sigma_b for "critical"; None for the initializer's default.
      norm: None, "batch" or "layer" (MLP).
      residual: None, "plain", "rezero", "skipinit" or "fixup" (MLP).
      dropout_rate: in [0, 1) (MLP).
      num_outputs: outputs of the head (10 classes for MNIST-1D; 1 for the adding problem).
    """

    kind: str = "mlp"
    depth: int = 20
    width: int = 64
    activation: str = "tanh"
    init: str = "lecun_normal"
    init_scale: float | None = None
    norm: str | None = None
    residual: str | None = None
    dropout_rate: float = 0.0
    num_outputs: int = 10

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")
        for name in ("depth", "width", "num_outputs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.activation not in activations.names():
            raise ValueError(
                f"activation={self.activation!r} is unknown; known: {', '.join(activations.names())}"
            )
        if self.init not in initializers.names():
            raise ValueError(f"init={self.init!r} is unknown; known: {', '.join(initializers.names())}")
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {NORMS}")
        if self.residual not in RESIDUALS:
            raise ValueError(f"residual={self.residual!r} is not one of {RESIDUALS}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")

    def kernel_init(self) -> initializers.Initializer:
        """The configured kernel initializer."""
        if self.init == "gaussian":
            return initializers.get("gaussian", sigma_w=1.0 if self.init_scale is None else self.init_scale)
        if self.init == "critical":
            return initializers.get("critical", activation=self.activation, sigma_b=self.init_scale or 0.0)
        return (
            initializers.get(self.init)
            if self.init_scale is None
            else initializers.get(self.init, gain=self.init_scale)
        )

    def build(self) -> nn.Module:
        """The linen module."""
        if self.kind == "mlp":
            return MLPStack(
                depth=self.depth,
                width=self.width,
                activation=self.activation,
                kernel_init=self.kernel_init(),
                norm=self.norm,
                residual=self.residual,
                dropout_rate=self.dropout_rate,
                num_outputs=self.num_outputs,
            )
        common = {"hidden": self.width, "num_outputs": self.num_outputs, "kernel_init": self.kernel_init()}
        if self.kind == "rnn":
            return RNNStack(activation=self.activation, **common)
        return (LSTMStack if self.kind == "lstm" else GRUStack)(**common)
