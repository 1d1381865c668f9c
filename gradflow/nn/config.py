"""`StackConfig`: a frozen, validated description of a gradflow stack, for configs and the CLI."""

from __future__ import annotations

import dataclasses

import flax.linen as nn

from gradflow import activations, initializers
from gradflow._checks import check_choice, check_int, check_real
from gradflow.nn.conv import ConvStack
from gradflow.nn.mlp import _MODULE_ACTIVATIONS, MLPStack
from gradflow.nn.recurrent import GRUStack, LSTMStack, RNNStack
from gradflow.nn.transformer import TransformerStack

KINDS = ("mlp", "conv", "transformer", "rnn", "lstm", "gru")
RECURRENT = ("rnn", "lstm", "gru")
_CRITICAL = ("critical", "critical_delta_orthogonal")
LN = ("pre", "post", "none")
# The fields only one kind reads (None: not given; that kind's default applies) and the kind.
_CONV_FIELDS = ("spatial_dims", "padding", "stages", "stride", "pool")
_TRANSFORMER_FIELDS = ("heads", "ln", "skip", "mlp", "tokens")
# A Transformer reads an example as TOKENS tokens when `tokens` is not given: the atlas reads an
# MNIST-1D signal with this constant too (`gradflow.atlas.measure`: 40 samples as 8 tokens of 5),
# which also cuts a digits image's 64 pixels into its 8 rows.
TOKENS = 8


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """A stack: `StackConfig(...).build()` returns the linen module. Each field means one thing.

    Attributes:
      kind: "mlp" (`MLPStack`), "conv" (`ConvStack`: one input channel added, an example's
        features as a sequence (MNIST-1D's 40 samples) or, 2-D, a square image (digits' 8 x 8)),
        "transformer" (`TransformerStack` on float tokens: an example's features cut into
        `tokens` tokens), "rnn", "lstm" or "gru" (recurrent stacks).
      depth: number of blocks of an MLP, a Transformer or each stage of a conv stack (>= 1; not
        read by recurrent stacks).
      seq_len: time steps a recurrent stack is unrolled for where gradflow makes the data (the
        adding problem's T, the spectra input's length; >= 1; only read by recurrent stacks).
      width: the hidden state's size (an MLP's width, a conv stack's first-stage channels, a
        Transformer's model width D, a recurrent cell's hidden units; >= 1).
      kernel_size: the conv stack's kernel size (odd, >= 1; only read by "conv").
      activation: a name from `gradflow.activations.names()` (MLP, conv, RNN, a Transformer's
        MLP), or "prelu" / "rrelu" as modules (MLP and conv).
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
      spatial_dims: conv only: 1 (sequences) or 2 (square images); None: 1.
      padding: conv only: "circular" or "same" (zeros); None: "circular".
      stages: conv only: the channels of the stages after the first, each entered by a down
        block of stride `stride` (width 8, stages 16 32: stages of 8, 16 and 32 channels); None:
        one stage.
      stride: conv only, with stages: the down blocks' stride (>= 2); None: 2.
      pool: conv only: the head averages over positions (False: flattens them); None: True.
      heads: transformer only: attention heads (dividing width); None: 4.
      ln: transformer only: LayerNorm placement, "pre", "post" or "none"; None: "pre".
      skip: transformer only: skip connections around both branches (False: each branch
        replaces the stream, Dong et al. 2021's pure-attention net with mlp False); None: True.
      mlp: transformer only: each block has its MLP branch (False: attention-only); None: True.
      tokens: transformer only: the tokens T an example's values are cut into (dividing them;
        also the positional table's length); None: `TOKENS` = 8, the atlas's.

    A field that the chosen kind does not read is refused, naming it: the kind-only fields above
    when given (not None), the others when they differ from their defaults.
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
    spatial_dims: int | None = None
    padding: str | None = None
    stages: tuple[int, ...] | None = None
    stride: int | None = None
    pool: bool | None = None
    heads: int | None = None
    ln: str | None = None
    skip: bool | None = None
    mlp: bool | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        for name in ("depth", "seq_len", "width", "kernel_size", "num_outputs"):
            check_int(name, getattr(self, name), 1)
        self._refuse_other_kinds_fields()
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
        if self.ln is not None:
            check_choice("ln", self.ln, LN)
        if self.tokens is not None:
            check_int("tokens", self.tokens, 1)
        for c in self.stages or ():
            check_int("stages", c, 1)
        if self.stride is not None and not self.stages:
            raise ValueError(
                f"stride={self.stride} applies to the down blocks between stages; give stages "
                "(e.g. --model.stages 16 32) or leave stride out"
            )
        self.build()  # the module checks its own fields (norm, residual, dropout_rate, ...)

    def _refuse_other_kinds_fields(self) -> None:
        """A field that the chosen kind does not read is refused, naming it, rather than ignored."""
        own = {"conv": _CONV_FIELDS, "transformer": _TRANSFORMER_FIELDS}.get(self.kind, ())
        for names, kind in ((_CONV_FIELDS, "conv"), (_TRANSFORMER_FIELDS, "transformer")):
            given = [n for n in names if n not in own and getattr(self, n) is not None]
            if given:
                raise ValueError(
                    f"{given[0]}={getattr(self, given[0])!r} applies to kind='{kind}' only, "
                    f"not kind={self.kind!r}; leave it out"
                )
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        read_by = {
            "kernel_size": ("conv",),
            "seq_len": RECURRENT,
            "depth": ("mlp", "conv", "transformer"),
            "norm": ("mlp", "conv"),
            "residual": ("mlp", "conv"),
            "dropout_rate": ("mlp", "conv"),
        }
        for name, kinds in read_by.items():
            if self.kind not in kinds and getattr(self, name) != defaults[name]:
                hint = {
                    ("transformer", "norm"): " (a Transformer's LayerNorm placement is ln)",
                    ("transformer", "residual"): " (a Transformer's skip connections are skip)",
                }.get((self.kind, name), "")
                raise ValueError(
                    f"{name}={getattr(self, name)!r} does not apply to kind={self.kind!r} "
                    f"(only to {', '.join(repr(k) for k in kinds)}){hint}; leave it out"
                )
        if self.kind == "transformer":
            if self.sigma_b != 0:
                raise ValueError(
                    f"sigma_b={self.sigma_b!r} does not apply to kind='transformer' (its biases start at "
                    "zero); leave it out"
                )
            if self.mlp is False and self.activation != defaults["activation"]:
                raise ValueError(
                    f"activation={self.activation!r} is the MLP branch's: attention-only blocks "
                    "(mlp=False) have none; leave it out"
                )

    @property
    def num_tokens(self) -> int:
        """The tokens a Transformer cuts an example into: `tokens`, else `TOKENS`."""
        return TOKENS if self.tokens is None else self.tokens

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
                channels=(self.width, *(self.stages or ())),
                kernel_size=self.kernel_size,
                spatial_dims=1 if self.spatial_dims is None else self.spatial_dims,
                padding="circular" if self.padding is None else self.padding,
                stride=2 if self.stride is None else self.stride,
                pool=True if self.pool is None else self.pool,
                add_channel=True,
                activation=self.activation,
                kernel_init=self.kernel_init(),
                bias_init=self.bias_init(),
                norm=self.norm,
                residual=self.residual,
                dropout_rate=self.dropout_rate,
                num_outputs=self.num_outputs,
            )
        if self.kind == "transformer":
            return TransformerStack(
                depth=self.depth,
                width=self.width,
                heads=4 if self.heads is None else self.heads,
                max_len=self.num_tokens,
                activation=None if self.mlp is False else self.activation,
                ln=None if self.ln == "none" else (self.ln or "pre"),
                residual=self.skip is not False,
                kernel_init=self.kernel_init(),
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
