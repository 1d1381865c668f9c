"""Deep feed-forward stacks: plain, BatchNorm / LayerNorm, residual (plain, ReZero, SkipInit, Fixup).

`MLPStack` = input projection -> `depth` identical blocks -> output head. The blocks' parameters
are stacked on a leading depth axis and the forward pass is one `nn.scan` over depth, so the
compiled program (and its compile time) does not grow with depth.

Block definitions (h is the block input, width W):

- plain (residual=None):  h' = dropout(phi(norm(W h + b)))
- residual="plain":       h' = h + dropout(W phi(norm(h)) + b)            (pre-activation, He et al. 2016b)
- residual="rezero":      h' = h + alpha * dropout(W phi(norm(h)) + b),  alpha = 0 at init (Bachlechner et al. 2020)
- residual="skipinit":    the same zero-initialised scalar branch multiplier, meant for stacks without
                          normalization (De & Smith 2020); in an MLP the two coincide at init.
- residual="fixup":       h' = h + s * (W2 phi(W1 (h + a1) + a2) + a3) + a4 (Zhang et al. 2019): W1 drawn
                          from `kernel_init` and scaled by depth^(-1/(2m-2)) = depth^(-1/2) (m = 2 layers per
                          branch), W2 = 0, scalar biases a_i = 0 and multiplier s = 1; no normalization.

With He init and no normalization, the "plain" residual branch doubles the variance per block;
with BatchNorm on the branch Var(h_l) = Var(h_0) + l. ReZero, SkipInit and Fixup stacks are
exactly the identity map at initialization.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gradflow import activations
from gradflow._checks import check_choice, check_int, check_real
from gradflow.nn.chains import WHOLE, Chain, Segment, provides_chain
from gradflow.nn.layers import PReLU, RReLU

NORMS = (None, "batch", "layer")
# What a block exposes to the trainer (gradflow.train.diagnostics): its activation's input,
# sown to "intermediates" and perturbed in "perturbations" under PREACT, and its output,
# perturbed under STATE (dL/dh_l).
PREACT = "preact"
STATE = "state"
RESIDUALS = (None, "plain", "rezero", "skipinit", "fixup")
_MODULE_ACTIVATIONS = ("prelu", "rrelu")


def _check_activation(activation: str | Callable) -> None:
    if isinstance(activation, str) and activation not in _MODULE_ACTIVATIONS:
        activations.get(activation)  # raises a ValueError listing the known names
    elif not isinstance(activation, str) and not callable(activation):
        raise ValueError(f"activation must be a registry name or a callable, got {activation!r}")


def _check_block_options(stack: Any) -> None:
    """The block options an MLP or conv stack shares: norm, residual, activation, dropout."""
    check_choice("norm", stack.norm, NORMS)
    check_choice("residual", stack.residual, RESIDUALS)
    _check_activation(stack.activation)
    if stack.residual == "fixup" and stack.norm is not None:
        raise ValueError("residual='fixup' replaces normalization; use norm=None")
    check_real("dropout_rate", stack.dropout_rate, lo=0.0, hi=1.0)


class Block(nn.Module):
    """One block of an `MLPStack` (or, with `kernel_size`, of a `ConvStack`: nn.Conv for nn.Dense);
    see the module docstring for the maps. Signature fits `nn.scan`."""

    width: int
    activation: str | Callable = "tanh"
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    norm: str | None = None
    residual: str | None = None
    dropout_rate: float = 0.0
    depth: int = 1
    use_batch_stats: bool = False  # BatchNorm: batch statistics (training) vs running averages
    deterministic: bool = True  # dropout and RReLU noise off
    bn_momentum: float = 0.9
    maxout_pieces: int = 2
    # A conv block (`gradflow.nn.ConvStack`): its linear maps are nn.Conv with these, not nn.Dense.
    kernel_size: tuple[int, ...] | None = None
    padding: str = "CIRCULAR"
    strides: int = 1

    def _linear(self, features: int, init: Callable, name: str, use_bias: bool = True) -> nn.Module:
        if self.kernel_size is None:
            return nn.Dense(
                features, kernel_init=init, bias_init=self.bias_init, use_bias=use_bias, name=name
            )
        return nn.Conv(  # named "conv", "conv1", "conv2" where an MLP block has "dense", ...
            features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_init=init,
            bias_init=self.bias_init,
            use_bias=use_bias,
            name=name.replace("dense", "conv"),
        )

    def _phi(self, z: jax.Array) -> jax.Array:
        # The activation's input z (after normalization) is the block's pre-activation seen by
        # gradflow.train.diagnostics: `perturb` exposes dL/dz when a "perturbations" collection
        # is passed to `apply` (a no-op otherwise; skipped at init so `init` never creates it) and
        # `sow` records z when "intermediates" is mutable.
        if not self.is_initializing():
            z = self.perturb(PREACT, z)
        self.sow("intermediates", PREACT, z)
        if self.activation == "prelu":
            return PReLU(name="prelu")(z)
        if self.activation == "rrelu":
            return RReLU(deterministic=self.deterministic, name="rrelu")(z)
        if self.activation == "maxout":
            return activations.maxout(z, self.maxout_pieces)
        fn = activations.get(self.activation) if isinstance(self.activation, str) else self.activation
        return fn(z)

    def _out(self, h: jax.Array) -> jax.Array:
        # The block's output h_l, perturbed like the pre-activation: dL/dh_l for the trainer.
        return h if self.is_initializing() else self.perturb(STATE, h)

    def _norm(self, z: jax.Array) -> jax.Array:
        if self.norm == "batch":
            return nn.BatchNorm(
                use_running_average=not self.use_batch_stats, momentum=self.bn_momentum, name="norm"
            )(z)
        if self.norm == "layer":
            return nn.LayerNorm(name="norm")(z)
        return z

    def _drop(self, z: jax.Array) -> jax.Array:
        if self.dropout_rate > 0:
            return nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(z)
        return z

    @nn.compact
    def __call__(self, h: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        dense = lambda features, init=self.kernel_init, name="dense", use_bias=True: self._linear(  # noqa: E731
            features, init, name, use_bias
        )
        pieces = self.maxout_pieces if self.activation == "maxout" else 1
        if self.residual is None:
            z = self._drop(self._phi(self._norm(dense(self.width * pieces)(h))))
            return self._out(z), None
        if self.residual == "fixup":
            zero = nn.initializers.zeros
            a = [self.param(f"bias{i}", zero, ()) for i in range(4)]
            scale = self.param("scale", nn.initializers.ones, ())
            c = float(self.depth) ** -0.5  # depth^(-1/(2m-2)) with m = 2

            def w1_init(key, shape, dtype=jnp.float32):
                return c * self.kernel_init(key, shape, dtype)

            z = dense(self.width * pieces, w1_init, "dense1", use_bias=False)(h + a[0])
            z = self._phi(z + a[1])
            z = dense(self.width, zero, "dense2", use_bias=False)(self._drop(z) + a[2])
            return self._out(h + scale * z + a[3]), None
        z = self._drop(dense(self.width)(self._phi(self._norm(h))))
        if self.residual in ("rezero", "skipinit"):
            z = self.param("alpha", nn.initializers.zeros, ()) * z
        return self._out(h + z), None


class MLPStack(nn.Module):
    """Deep MLP: Dense(width) input projection -> `depth` scanned `Block`s -> Dense(num_outputs) head.

    Attributes:
      depth, width: number of blocks and their width.
      activation: registry name ("tanh"), a callable, or a module activation ("prelu", "rrelu";
        "maxout" with `maxout_pieces`).
      kernel_init, bias_init: initializers for the blocks (default LeCun normal, zeros).
      norm: None, "batch" or "layer".
      residual: None, "plain", "rezero", "skipinit" or "fixup".
      dropout_rate: dropout after each block's activation (residual: on the branch output).
      num_outputs: head width; None returns the last block's features.
      input_init, head_init: initializers of the input projection and head.
      unroll: `nn.scan` unroll factor (1 keeps compile time flat in depth).

    Call: `model.apply(variables, x_BxD, train=...)`; with norm="batch" and train=True pass
    `mutable=["batch_stats"]`; with dropout/RReLU in training pass `rngs={"dropout": key}`.
    """

    depth: int
    width: int
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
        for name in ("depth", "width", "maxout_pieces", "unroll"):
            check_int(f"MLPStack.{name}", getattr(self, name), 1)
        if self.num_outputs is not None:
            check_int("MLPStack.num_outputs", self.num_outputs, 1)
        _check_block_options(self)
        super().__post_init__()

    @nn.nowrap
    def block_fields(self, *, train: bool = False, noise: bool | None = None, **overrides) -> dict:
        """The fields of this stack's `Block`; `train` selects BatchNorm's batch statistics and
        `noise` (default: `train`) turns dropout and RReLU noise on."""
        fields = dict(
            width=self.width,
            activation=self.activation,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            norm=self.norm,
            residual=self.residual,
            dropout_rate=self.dropout_rate,
            depth=self.depth,
            use_batch_stats=train,
            deterministic=not (train if noise is None else noise),
            bn_momentum=self.bn_momentum,
            maxout_pieces=self.maxout_pieces,
        )
        return {**fields, **overrides}

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        h = nn.Dense(self.width, kernel_init=self.input_init, name="embed")(x)
        blocks = nn.scan(
            Block,
            variable_axes={"params": 0, "batch_stats": 0, "perturbations": 0, "intermediates": 0},
            split_rngs={"params": True, "dropout": True},
            length=self.depth,
            unroll=self.unroll,
        )
        h, _ = blocks(**self.block_fields(train=train), name="blocks")(h, None)
        if self.num_outputs is None:
            return h
        return nn.Dense(self.num_outputs, kernel_init=self.head_init, name="head")(h)

    @provides_chain
    @nn.nowrap
    def chain(
        self, variables: Any, x: jax.Array, *, train: bool = False, layers: Sequence[str] | None = None
    ) -> Chain:
        """The stack as a layer chain (see `gradflow.nn.chain`): the blocks as one scanned segment.

        layers: which parts are layers, any of "embed", "blocks", "head" with "blocks" among
        them. Default ("blocks",): the layers are "blocks[1]" .. "blocks[L]", h0 = embed(x) and
        `readout` is the head. With "embed", h0 = x and the embed is the first layer; with
        "head", the head is the last layer; `WHOLE` is all of them. `train=True` is the BatchNorm batch map (x must be
        a batch).
        """
        parts = _chain_parts(layers, self.num_outputs is not None, "MLPStack")
        if train and self.norm == "batch" and x.ndim < 2:
            raise ValueError(
                f"chain(train=True) with BatchNorm needs a batch x of shape (B, D), got {x.shape}"
            )
        params = variables["params"]
        embed = _ModuleStep(nn.Dense(self.width, parent=None))
        segments = []
        if "embed" in parts:
            segments.append(_dense_segment(embed, params, "embed"))
            h0 = x
        else:
            h0 = embed(None, {"params": params["embed"]}, x)
        layer_vars = {"params": params["blocks"]}
        if variables.get("batch_stats"):
            layer_vars["batch_stats"] = variables["batch_stats"]["blocks"]
        block = Block(**self.block_fields(train=train, noise=False, dropout_rate=0.0), parent=None)
        step = _BlockStep(block, batch=train and self.norm == "batch")
        names = tuple(f"blocks[{l}]" for l in range(1, self.depth + 1))
        segments.append(
            Segment(
                step=step, shared=None, params=layer_vars, names=names, param_path=("blocks",), stacked=True
            )
        )
        readout = None
        if self.num_outputs is not None:
            head = _ModuleStep(nn.Dense(self.num_outputs, parent=None))
            if "head" in parts:
                segments.append(_dense_segment(head, params, "head"))
            else:
                readout = functools.partial(head, None, {"params": params["head"]})
        return Chain(segments=tuple(segments), h0=h0, readout=readout)


def _chain_parts(layers: Sequence[str] | str | None, has_head: bool, what: str) -> tuple[str, ...]:
    """A stack's `layers` argument as the parts that are layers, in order (see `MLPStack.chain`)."""
    if layers == WHOLE:
        layers = ("embed", "blocks") + (("head",) if has_head else ())
    parts = ("blocks",) if layers is None else ((layers,) if isinstance(layers, str) else tuple(layers))
    wanted = tuple(p for p in ("embed", "blocks", "head") if p in parts)
    if "blocks" not in parts or wanted != parts or (not has_head and "head" in parts):
        heads = ', "head"' if has_head else ""
        raise ValueError(
            f'{what} layers must be, in order, a selection of "embed", "blocks"{heads} '
            f'containing "blocks"; got {layers!r}'
        )
    return parts


def _dense_segment(step: Any, params: Any, name: str) -> Segment:
    own = jax.tree.map(lambda a: a[None], {"params": params[name]})  # a one-layer segment
    return Segment(step=step, shared=None, params=own, names=(name,), param_path=(name,))


@dataclasses.dataclass(frozen=True)
class _ModuleStep:
    """A module applied on its own (a stack's embed or head) as a chain step (shared, its
    variables, h) -> h."""

    module: nn.Module

    def __call__(self, _: Any, v: Any, h: jax.Array) -> jax.Array:
        return self.module.apply(v, h)


@dataclasses.dataclass(frozen=True)
class _BlockStep:
    """One block as a chain step (shared, block variables, h) -> h; frozen, so equal stacks
    give equal steps and jitted consumers compile once."""

    block: Block
    batch: bool

    def __call__(self, _: Any, v: Any, h: jax.Array) -> jax.Array:
        if self.batch:
            return self.block.apply(v, h, mutable=["batch_stats"])[0][0]
        return self.block.apply(v, h)[0]
