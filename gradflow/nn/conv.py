"""Deep convolutional stacks, 1-D and 2-D, scanned over depth within each stage.

`ConvStack` = Conv(channels[0]) input map -> stage 1 -> [strided down block -> stage s] ... ->
global average pool (or, with `pool=False`, flatten) -> Dense(num_outputs) head. A stage is
`depth` identical conv `Block`s (the MLP block with nn.Conv for nn.Dense, so the same plain /
norm / residual / dropout variants and the same pre-activation and state hooks for the trainer's
diagnostics), their parameters stacked on a depth axis and walked by one `nn.scan`: compile time
does not grow with depth. A down block between stages is one plain (unscanned) block whose conv
has stride `stride` and the next stage's channels.

Padding "circular" makes every conv layer block circulant, so its singular values are those of
the per-frequency channel matrices of the kernel's FFT (`gradflow.spectra.conv_spectra`, exact at
any depth for linear stacks), and the mean-field variance map of the stack is that of an MLP
with fan-in k^d C (Xiao et al. 2018): `initializers.critical` and `delta_orthogonal` apply as
they are. Padding "same" (zeros) breaks translation invariance at the borders; its spectra come
from the general chain engine.

Inputs are (B, *spatial, C) or (*spatial, C) with len(spatial) = `spatial_dims`; with
`add_channel=True`, (B, *spatial) or (*spatial) and one input channel is added (MNIST-1D's (B, 40)
sequences as a 1-D conv stack's input). Norms act on the channel axis at each position
(BatchNorm over the batch and positions, LayerNorm over the channels).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gradflow._checks import check_choice, check_int
from gradflow.nn.chains import Chain, Segment, provides_chain
from gradflow.nn.mlp import (
    Block,
    _BlockStep,
    _chain_parts,
    _check_block_options,
    _dense_segment,
)

PADDINGS = ("circular", "same")
_SCANNED = {"params": 0, "batch_stats": 0, "perturbations": 0, "intermediates": 0}


class ConvStack(nn.Module):
    """Deep CNN: conv input map -> stages of `depth` scanned conv `Block`s -> pool -> Dense head.

    Attributes:
      depth: blocks per stage.
      channels: the channels of each stage (an int: one stage); stage s > 1 is entered by a
        down block of stride `stride` with channels[s - 1] outputs.
      kernel_size: k, the same along every spatial axis (odd, so that "same" is centred).
      spatial_dims: 1 (sequences) or 2 (images).
      padding: "circular" or "same" (zeros).
      stride: the down blocks' stride (>= 2); with "circular" it must divide the spatial size
        entering each down block.
      add_channel: inputs carry no channel axis; one is added.
      pool: the head averages over the spatial axes, then Dense; False: it flattens positions and
        channels, then Dense (a readout that keeps position: at initialization a delta-orthogonal
        stack mixes no positions, so a pooled head would see position-wise features only).
      activation, kernel_init, bias_init, norm, residual, dropout_rate, num_outputs,
        input_init, head_init, bn_momentum, maxout_pieces, unroll: as in `MLPStack`
        (kernel initializers see conv kernels (*kernel, C_in, C_out): fan_in = k^d C_in).

    Call: `model.apply(variables, x, train=...)`, as an `MLPStack`.
    """

    depth: int
    channels: int | tuple[int, ...] = 16
    kernel_size: int = 3
    spatial_dims: int = 2
    padding: str = "circular"
    stride: int = 2
    add_channel: bool = False
    pool: bool = True
    activation: str | Callable = "tanh"
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    norm: str | None = None
    residual: str | None = None
    dropout_rate: float = 0.0
    num_outputs: int | None = 10
    input_init: Callable = nn.initializers.lecun_normal()
    head_init: Callable = nn.initializers.lecun_normal()
    bn_momentum: float = 0.9
    maxout_pieces: int = 2
    unroll: int = 1

    def __post_init__(self):
        for name in ("depth", "kernel_size", "maxout_pieces", "unroll"):
            check_int(f"ConvStack.{name}", getattr(self, name), 1)
        check_int("ConvStack.stride", self.stride, 2)
        check_choice("ConvStack.spatial_dims", self.spatial_dims, (1, 2))
        check_choice("ConvStack.padding", self.padding, PADDINGS)
        if not self.stages:
            raise ValueError("ConvStack.channels must name at least one stage")
        for c in self.stages:
            check_int("ConvStack.channels", c, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"ConvStack.kernel_size must be odd (a centred kernel), got {self.kernel_size}")
        if self.num_outputs is not None:
            check_int("ConvStack.num_outputs", self.num_outputs, 1)
        _check_block_options(self)
        super().__post_init__()

    @property
    def stages(self) -> tuple[int, ...]:
        """The channels of each stage."""
        return (self.channels,) if isinstance(self.channels, int) else tuple(self.channels)

    @nn.nowrap
    def block_fields(
        self, stage: int, *, train: bool = False, noise: bool | None = None, down: bool = False, **overrides
    ) -> dict:
        """The fields of stage `stage`'s conv `Block` (1-based; `down`: the down block entering it)."""
        fields = dict(
            width=self.stages[stage - 1],
            activation=self.activation,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            norm=self.norm,
            residual=None if down else self.residual,
            dropout_rate=self.dropout_rate,
            depth=self.depth,
            use_batch_stats=train,
            deterministic=not (train if noise is None else noise),
            bn_momentum=self.bn_momentum,
            maxout_pieces=self.maxout_pieces,
            kernel_size=(self.kernel_size,) * self.spatial_dims,
            padding=self.padding.upper(),
            strides=self.stride if down else 1,
        )
        return {**fields, **overrides}

    @nn.nowrap
    def _input(self, x: jax.Array) -> jax.Array:
        """x with its channel axis, after checking its rank and spatial sizes."""
        x = jnp.asarray(x)
        if self.add_channel:
            x = x[..., None]
        d = self.spatial_dims
        if x.ndim not in (d + 1, d + 2):
            want = f"(B, {'*spatial' if d > 1 else 'L'}{'' if self.add_channel else ', C'})"
            raise ValueError(
                f"ConvStack(spatial_dims={d}, add_channel={self.add_channel}) takes inputs of shape "
                f"{want}, with or without the batch axis; got {x.shape[: x.ndim - self.add_channel]}"
            )
        size = x.shape[x.ndim - 1 - d : x.ndim - 1]
        for s in range(1, len(self.stages) + 1):
            if min(size) < self.kernel_size:
                raise ValueError(
                    f"ConvStack: kernel_size={self.kernel_size} is larger than the spatial size {size} "
                    f"of stage {s}; use kernel_size <= {min(size)} or fewer stages"
                )
            if s < len(self.stages):
                if self.padding == "circular" and any(n % self.stride for n in size):
                    raise ValueError(
                        f"ConvStack: stride={self.stride} does not divide the spatial size {size} entering "
                        f"stage {s + 1} (circular padding needs it to); use a stride dividing {size}"
                    )
                size = tuple(-(-n // self.stride) for n in size)
        return x

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        h = self._input(x)
        kernel = (self.kernel_size,) * self.spatial_dims
        h = nn.Conv(
            self.stages[0], kernel, padding=self.padding.upper(), kernel_init=self.input_init, name="embed"
        )(h)
        for s in range(1, len(self.stages) + 1):
            if s > 1:
                h = Block(**self.block_fields(s, train=train, down=True), name=f"down{s}")(h)[0]
            h = self._scanned(self.depth)(**self.block_fields(s, train=train), name=f"stage{s}")(h, None)[0]
        if self.num_outputs is None:
            return h
        return nn.Dense(self.num_outputs, kernel_init=self.head_init, name="head")(
            _readout(h, self.spatial_dims, self.pool)
        )

    @nn.nowrap
    def _scanned(self, length: int) -> Any:
        return nn.scan(
            Block,
            variable_axes=_SCANNED,
            split_rngs={"params": True, "dropout": True},
            length=length,
            unroll=self.unroll,
        )

    @nn.nowrap
    def layer_names(self) -> tuple[str, ...]:
        """The parts between the input map and the head, in order: "stage1", "down2", "stage2", ..."""
        names = []
        for s in range(1, len(self.stages) + 1):
            names += ([f"down{s}"] if s > 1 else []) + [f"stage{s}"]
        return tuple(names)

    @provides_chain
    @nn.nowrap
    def chain(
        self, variables: Any, x: jax.Array, *, train: bool = False, layers: Sequence[str] | None = None
    ) -> Chain:
        """The stack as a layer chain (see `gradflow.nn.chain`): each stage one scanned segment.

        layers: as in `MLPStack.chain`, with "blocks" standing for every stage and down block:
        default ("blocks",): the layers are "stage1[1]" .. "stage1[L]", "down2", "stage2[1]", ...,
        h0 = embed(x) and `readout` the pool and head; "embed" and "head" make those layers too.
        """
        parts = _chain_parts(layers, self.num_outputs is not None, "ConvStack")
        self._input(x)  # its rank and spatial sizes
        if train and self.norm == "batch" and x.ndim < self.spatial_dims + 2 - self.add_channel:
            raise ValueError(f"chain(train=True) with BatchNorm needs a batch x, got shape {x.shape}")
        params = variables["params"]
        kernel = (self.kernel_size,) * self.spatial_dims
        embed = _ConvInput(
            nn.Conv(self.stages[0], kernel, padding=self.padding.upper(), parent=None), self.add_channel
        )
        segments = []
        if "embed" in parts:
            segments.append(_dense_segment(embed, params, "embed"))
            h0 = x
        else:
            h0 = embed(None, {"params": params["embed"]}, x)
        batch = train and self.norm == "batch"
        for name in self.layer_names():
            stage, down = int(name.removeprefix("down").removeprefix("stage")), name.startswith("down")
            own = {"params": params[name]}
            if variables.get("batch_stats"):
                own["batch_stats"] = variables["batch_stats"][name]
            if down:  # one unscanned block: its variables as a segment of one
                own = jax.tree.map(lambda a: a[None], own)
            block = Block(
                **self.block_fields(stage, train=train, noise=False, down=down, dropout_rate=0.0), parent=None
            )
            names = (name,) if down else tuple(f"{name}[{l}]" for l in range(1, self.depth + 1))
            segments.append(
                Segment(
                    step=_BlockStep(block, batch=batch),
                    shared=None,
                    params=own,
                    names=names,
                    param_path=(name,),
                    stacked=not down,
                )
            )
        readout = None
        if self.num_outputs is not None:
            head = _Head(nn.Dense(self.num_outputs, parent=None), self.spatial_dims, self.pool)
            if "head" in parts:
                segments.append(_dense_segment(head, params, "head"))
            else:
                readout = lambda h: head(None, {"params": params["head"]}, h)  # noqa: E731
        return Chain(segments=tuple(segments), h0=h0, readout=readout)


@dataclasses.dataclass(frozen=True)
class _ConvInput:
    """The input map as a chain step: x (channel axis added if the stack adds one) -> embed(x)."""

    conv: nn.Conv
    add_channel: bool

    def __call__(self, _: Any, v: Any, x: jax.Array) -> jax.Array:
        return self.conv.apply(v, x[..., None] if self.add_channel else x)


def _readout(h: jax.Array, spatial_dims: int, pool: bool) -> jax.Array:
    """(..., *spatial, C) -> (..., C), the mean over positions; or, without `pool`, flattened."""
    if pool:
        return jnp.mean(h, axis=tuple(range(h.ndim - 1 - spatial_dims, h.ndim - 1)))
    return h.reshape(h.shape[: h.ndim - 1 - spatial_dims] + (-1,))


@dataclasses.dataclass(frozen=True)
class _Head:
    """The head as a chain step: pool (or flatten), then Dense."""

    dense: nn.Dense
    spatial_dims: int
    pool: bool

    def __call__(self, _: Any, v: Any, h: jax.Array) -> jax.Array:
        return self.dense.apply(v, _readout(h, self.spatial_dims, self.pool))
