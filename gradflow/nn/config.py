"""`StackConfig`: a frozen, validated description of a gradflow stack, for configs and the CLI."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from gradflow import activations, initializers
from gradflow._checks import check_choice, check_int, check_real
from gradflow.nn.conv import ConvStack
from gradflow.nn.mlp import _MODULE_ACTIVATIONS, MLPStack
from gradflow.nn.recurrent import GRUStack, LSTMStack, RNNStack

KINDS = ("mlp", "conv", "rnn", "lstm", "gru")
RECURRENT = ("rnn", "lstm", "gru")
_CRITICAL = ("critical", "critical_delta_orthogonal")


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """A stack: `StackConfig(...).build()` returns the linen module. Each field means one thing.

    Attributes:
      kind: "mlp" (`MLPStack`), "conv" (a one-stage 1-D `ConvStack` with circular padding over
        the input's features as a sequence of one channel: MNIST-1D's 40 samples), "rnn",
        "lstm" or "gru" (recurrent stacks).
      depth: number of blocks of an MLP or conv stack (>= 1; not read by recurrent stacks).
      seq_len: time steps a recurrent stack is unrolled for where gradflow makes the data (the
        adding problem's T, the spectra input's length; >= 1; not read by MLPs).
      width: the hidden state's size (an MLP's width, a conv stack's channels, a recurrent
        cell's hidden units; >= 1).
      kernel_size: the conv stack's kernel size (odd, >= 1; only read by "conv").
      activation: a name from `gradflow.activations.names()` (MLP, conv and RNN), or "prelu" /
        "rrelu" as modules (MLP and conv).
      init: kernel initializer, a name from `gradflow.initializers.names()`.
      gain: multiplier of the kernel initializer's standard deviation (sigma_w for "gaussian",
        the gain of the variance-scaling and (delta-)orthogonal initializers); None for 1. Not
        for the critical ones, whose sigma_w is the critical one.
      sigma_b: standard deviation of the biases at initialization, N(0, sigma_b^2) (0: zero
        biases); "critical" (and "critical_delta_orthogonal", conv kernels only) puts sigma_w on
        the order-to-chaos line for this sigma_b.
      norm: None, "batch" or "layer" (MLP, conv).
      residual: None, "plain", "rezero", "skipinit" or "fixup" (MLP, conv).
      dropout_rate: in [0, 1) (MLP, conv).
      num_outputs: outputs of the head (10 classes for MNIST-1D; 1 for the adding problem).
    """

    kind: str = "mlp"
    depth: int = 20
    seq_len: int = 100
    width: int = 64
    kernel_size: int = 3
    activation: str = "tanh"
    init: str = "lecun_normal"
    gain: float | None = None
    sigma_b: float = 0.0
    norm: str | None = None
    residual: str | None = None
    dropout_rate: float = 0.0
    num_outputs: int = 10

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        for name in ("depth", "seq_len", "width", "kernel_size", "num_outputs"):
            check_int(name, getattr(self, name), 1)
        # prelu / rrelu are modules (a learned slope, a random one in training): the feed-forward
        # blocks build them, the recurrent cells take registry functions only
        module_activations = _MODULE_ACTIVATIONS if self.kind in ("mlp", "conv") else ()
        check_choice(
            "activation", self.activation, list(dict.fromkeys([*activations.names(), *module_activations]))
        )
        check_choice("init", self.init, initializers.names())
        if self.gain is not None:
            check_real("gain", self.gain, lo=0.0, lo_open=True)
            if self.init in _CRITICAL:
                raise ValueError(
                    f"gain does not apply to init={self.init!r} (its sigma_w is the critical one)"
                )
        check_real("sigma_b", self.sigma_b, lo=0.0)
        if "delta_orthogonal" in self.init and self.kind != "conv":
            raise ValueError(
                f"init={self.init!r} is for conv kernels: use kind='conv', not kind={self.kind!r}"
            )
        self.build()  # the module checks its own fields (norm, residual, dropout_rate, ...)

    @property
    def recurrent(self) -> bool:
        """Whether the stack is recurrent (its input a sequence (B, T, D))."""
        return self.kind in RECURRENT

    def kernel_init(self) -> initializers.Initializer:
        """The configured kernel initializer."""
        if self.init == "gaussian":
            return initializers.get("gaussian", sigma_w=1.0 if self.gain is None else self.gain)
        if self.init in _CRITICAL:
            return initializers.get(self.init, activation=self.activation, sigma_b=self.sigma_b)
        return (
            initializers.get(self.init) if self.gain is None else initializers.get(self.init, gain=self.gain)
        )

    def bias_init(self) -> initializers.Initializer:
        """The configured bias initializer: N(0, sigma_b^2), zeros for sigma_b = 0."""
        return nn.initializers.zeros if self.sigma_b == 0 else nn.initializers.normal(self.sigma_b)

    def build(self) -> nn.Module:
        """The linen module."""
        if self.kind == "mlp":
            return MLPStack(
                depth=self.depth,
                width=self.width,
                activation=self.activation,
                kernel_init=self.kernel_init(),
                bias_init=self.bias_init(),
                norm=self.norm,
                residual=self.residual,
                dropout_rate=self.dropout_rate,
                num_outputs=self.num_outputs,
            )
        if self.kind == "conv":
            return ConvStack(
                depth=self.depth,
                channels=self.width,
                kernel_size=self.kernel_size,
                spatial_dims=1,
                add_channel=True,
                activation=self.activation,
                kernel_init=self.kernel_init(),
                bias_init=self.bias_init(),
                norm=self.norm,
                residual=self.residual,
                dropout_rate=self.dropout_rate,
                num_outputs=self.num_outputs,
            )
        common = {
            "hidden": self.width,
            "num_outputs": self.num_outputs,
            "kernel_init": self.kernel_init(),
            "bias_init": self.bias_init(),
        }
        if self.kind == "rnn":
            return RNNStack(activation=self.activation, **common)
        return (LSTMStack if self.kind == "lstm" else GRUStack)(**common)
