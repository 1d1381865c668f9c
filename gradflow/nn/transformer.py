"""Transformer stacks: token embedding (or a linear input map) -> `depth` scanned blocks -> head.

A block's state is the token matrix h of shape (T, D) (with a batch axis in front in training).
Its two branches are multi-head self-attention and a two-layer MLP, each placed by `ln`:

- ln="pre":  h' = h + s * f(LN(h))        (Xiong et al. 2020: gradients stay flat over depth)
- ln="post": h' = LN(h + s * f(h))        (the original Transformer: the last layers' gradients grow)
- ln=None:   h' = h + s * f(h)

with s = `branch_scale` (e.g. 1 / sqrt(depth), Noci et al. 2022). `residual=False` replaces the
stream by the branch (h' = s * f(LN(h)) for pre-LN), the pure-attention net of Dong et al. 2021
whose tokens collapse to rank one; `activation=None` drops the MLP (attention-only blocks).
Blocks are stacked on a depth axis and walked by one `nn.scan`, so compile time does not grow
with depth. The chain's layers are the blocks (N = T D per block; the spectra's default method
"auto" runs topk past `spectra.AUTO_EXACT_SIZE` values); the trainer sees each block's output and, with an MLP, its activation's input.

Inputs: integer tokens (B, T) or (T,) with `vocab_size` (nn.Embed), or features (B, T, D_in) or
(T, D_in) with `vocab_size=None` (a Dense input map); a learned positional table of `max_len`
rows is added. The head (with `num_outputs`) is a final LayerNorm (pre-LN), the mean over tokens
and a Dense layer; with `pool=False` the Dense layer acts on every token (B, T, num_outputs): a
per-token loss, as in language modelling or translation, where Xiong et al. 2020 measured it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gradflow import activations
from gradflow._checks import check_choice, check_int, check_real
from gradflow.nn.chains import Chain, Segment, provides_chain
from gradflow.nn.mlp import PREACT, STATE, _BlockStep, _chain_parts, _dense_segment, _ModuleStep

LN_PLACEMENTS = ("pre", "post", None)


class TransformerBlock(nn.Module):
    """One block of a `TransformerStack` (see the module docstring). Signature fits `nn.scan`."""

    width: int
    heads: int
    mlp_ratio: int = 4
    activation: str | None = "gelu"
    ln: str | None = "pre"
    residual: bool = True
    branch_scale: float = 1.0
    kernel_init: Callable = nn.initializers.lecun_normal()

    def _branch(self, h: jax.Array, f: Callable, name: str) -> jax.Array:
        x = nn.LayerNorm(name=f"{name}_norm")(h) if self.ln == "pre" else h
        y = self.branch_scale * f(x)
        out = h + y if self.residual else y
        return nn.LayerNorm(name=f"{name}_norm")(out) if self.ln == "post" else out

    def _attention(self, x: jax.Array) -> jax.Array:
        attend = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, kernel_init=self.kernel_init, name="attention"
        )
        return attend(x, x, sow_weights=True)  # "intermediates"/.../"attention_weights" when mutable

    def _mlp(self, x: jax.Array) -> jax.Array:
        z = nn.Dense(self.mlp_ratio * self.width, kernel_init=self.kernel_init, name="fc1")(x)
        if not self.is_initializing():
            z = self.perturb(PREACT, z)
        self.sow("intermediates", PREACT, z)
        return nn.Dense(self.width, kernel_init=self.kernel_init, name="fc2")(
            activations.get(self.activation)(z)
        )

    @nn.compact
    def __call__(self, h: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        h = self._branch(h, self._attention, "attention")
        if self.activation is not None:
            h = self._branch(h, self._mlp, "mlp")
        return (h if self.is_initializing() else self.perturb(STATE, h)), None


class TransformerStack(nn.Module):
    """A Transformer of `depth` scanned `TransformerBlock`s (see the module docstring).

    Attributes:
      depth, width, heads: blocks, model width D and attention heads (heads must divide D).
      vocab_size: token inputs (nn.Embed) if set; None: float features through a Dense map.
      max_len: rows of the learned positional table (the longest sequence).
      mlp_ratio: the MLP's hidden width over D.
      activation: the MLP's activation (a registry name); None: attention-only blocks.
      ln: "pre", "post" or None.
      residual: skip connections around both branches.
      branch_scale: s multiplying each branch (1.0; 1 / sqrt(depth) for a scaled residual).
      num_outputs: head width; None returns the last block's (B, T, D) tokens.
      pool: the head averages the tokens (B, num_outputs); False: per token (B, T, num_outputs).
      kernel_init, input_init, head_init: initializers of the blocks, the input map, the head.
      unroll: `nn.scan` unroll factor.
    """

    depth: int
    width: int = 32
    heads: int = 4
    vocab_size: int | None = None
    max_len: int = 128
    mlp_ratio: int = 4
    activation: str | None = "gelu"
    ln: str | None = "pre"
    residual: bool = True
    branch_scale: float = 1.0
    num_outputs: int | None = 10
    pool: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    input_init: Callable = nn.initializers.lecun_normal()
    head_init: Callable = nn.initializers.lecun_normal()
    unroll: int = 1

    def __post_init__(self):
        for name in ("depth", "width", "heads", "max_len", "mlp_ratio", "unroll"):
            check_int(f"TransformerStack.{name}", getattr(self, name), 1)
        if self.width % self.heads:
            raise ValueError(
                f"TransformerStack: heads={self.heads} does not divide width={self.width}; "
                f"use a head count among {[h for h in range(1, self.width + 1) if self.width % h == 0]}"
            )
        if self.vocab_size is not None:
            check_int("TransformerStack.vocab_size", self.vocab_size, 1)
        if self.num_outputs is not None:
            check_int("TransformerStack.num_outputs", self.num_outputs, 1)
        check_choice("TransformerStack.ln", self.ln, LN_PLACEMENTS)
        if self.activation is not None:
            check_choice("TransformerStack.activation", self.activation, activations.names())
        check_real("TransformerStack.branch_scale", self.branch_scale, lo=0.0, lo_open=True)
        super().__post_init__()

    @nn.nowrap
    def block_fields(self) -> dict:
        """The fields of this stack's `TransformerBlock`."""
        return dict(
            width=self.width,
            heads=self.heads,
            mlp_ratio=self.mlp_ratio,
            activation=self.activation,
            ln=self.ln,
            residual=self.residual,
            branch_scale=self.branch_scale,
            kernel_init=self.kernel_init,
        )

    @nn.nowrap
    def _check_input(self, x: jax.Array) -> None:
        tokens = self.vocab_size is not None
        if tokens and (x.ndim not in (1, 2) or not jnp.issubdtype(x.dtype, jnp.integer)):
            raise ValueError(
                f"TransformerStack(vocab_size={self.vocab_size}) takes integer tokens (B, T) or (T,), "
                f"got {x.dtype} of shape {x.shape}"
            )
        if not tokens and (x.ndim not in (2, 3) or not jnp.issubdtype(x.dtype, jnp.floating)):
            raise ValueError(
                f"TransformerStack(vocab_size=None) takes float features (B, T, D_in) or (T, D_in), "
                f"got {x.dtype} of shape {x.shape}"
            )
        length = x.shape[-1] if tokens else x.shape[-2]
        if length > self.max_len:
            raise ValueError(
                f"TransformerStack: a sequence of {length} tokens is longer than the positional table "
                f"(max_len={self.max_len}); use sequences of at most {self.max_len} or a larger max_len"
            )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train  # no BatchNorm or dropout: the same map in training and evaluation
        x = jnp.asarray(x)
        self._check_input(x)
        h = _Input(self.width, self.vocab_size, self.max_len, self.input_init, name="embed")(x)
        blocks = nn.scan(
            TransformerBlock,
            variable_axes={"params": 0, "perturbations": 0, "intermediates": 0},
            split_rngs={"params": True},
            length=self.depth,
            unroll=self.unroll,
        )
        h, _ = blocks(**self.block_fields(), name="blocks")(h, None)
        if self.num_outputs is None:
            return h
        return self._head(name="head")(h)

    @nn.nowrap
    def _head(self, **kw: Any) -> nn.Module:
        return _Head(self.num_outputs, self.ln == "pre", self.pool, self.head_init, **kw)

    @provides_chain
    @nn.nowrap
    def chain(
        self, variables: Any, x: jax.Array, *, train: bool = False, layers: Sequence[str] | None = None
    ) -> Chain:
        """The stack as a layer chain: the blocks as one scanned segment (as `MLPStack.chain`:
        default h0 = embed(x) and the head as readout; "embed" (float inputs only) and "head"
        make them layers)."""
        del train
        parts = _chain_parts(layers, self.num_outputs is not None, "TransformerStack")
        x = jnp.asarray(x)
        self._check_input(x)
        if "embed" in parts and self.vocab_size is not None:
            raise ValueError(
                'TransformerStack: "embed" cannot be a layer of a token model (its input is integers)'
            )
        params = variables["params"]
        embed = _ModuleStep(_Input(self.width, self.vocab_size, self.max_len, self.input_init, parent=None))
        segments = []
        if "embed" in parts:
            segments.append(_dense_segment(embed, params, "embed"))
            h0 = x
        else:
            h0 = embed(None, {"params": params["embed"]}, x)
        block = TransformerBlock(**self.block_fields(), parent=None)
        names = tuple(f"blocks[{l}]" for l in range(1, self.depth + 1))
        segments.append(
            Segment(
                step=_BlockStep(block, batch=False),
                shared=None,
                params={"params": params["blocks"]},
                names=names,
                param_path=("blocks",),
                stacked=True,
            )
        )
        readout = None
        if self.num_outputs is not None:
            head = _ModuleStep(self._head(parent=None))
            if "head" in parts:
                segments.append(_dense_segment(head, params, "head"))
            else:
                readout = lambda h: head(None, {"params": params["head"]}, h)  # noqa: E731
        return Chain(segments=tuple(segments), h0=h0, readout=readout)


class _Input(nn.Module):
    """Tokens -> nn.Embed, or features -> Dense; plus the learned positional table."""

    width: int
    vocab_size: int | None
    max_len: int
    init: Callable

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.vocab_size is not None:
            h = nn.Embed(self.vocab_size, self.width, name="tokens")(x)
        else:
            h = nn.Dense(self.width, kernel_init=self.init, name="dense")(x)
        table = self.param("positions", nn.initializers.normal(0.02), (self.max_len, self.width))
        return h + jnp.broadcast_to(table[: h.shape[-2]], h.shape)


class _Head(nn.Module):
    """Final LayerNorm (pre-LN stacks), mean over tokens (if `pool`), Dense."""

    features: int
    final_norm: bool
    pool: bool
    init: Callable

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        if self.final_norm:
            h = nn.LayerNorm(name="norm")(h)
        return nn.Dense(self.features, kernel_init=self.init, name="dense")(
            jnp.mean(h, axis=-2) if self.pool else h
        )
