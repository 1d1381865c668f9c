"""Recurrent stacks scanned over time: vanilla RNN, LSTM, GRU (flax.linen cells).

Each stack maps x of shape (B, T, D) to outputs through one recurrent layer of `hidden` units
(`nn.RNN` over the cell, i.e. a `lax.scan` over time) and a Dense head, applied to the last
step (`head="last"`, e.g. the adding problem) or to every step (`head="all"`, e.g. the copy task).

`chain(variables, x)` exposes the transition through time, s_t = step(x_t, s_{t-1}), on the flat
carry s ([c; h] for an LSTM), so that d s_T / d s_0 (gradients through time) is computed by the
same spectra engine as depth products. The cell's weights are shared across time (the segment's
`shared` part); its per-layer "parameters" are the inputs x_t fed in at each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gradflow import activations
from gradflow._checks import check_int
from gradflow.nn.chains import WHOLE, Chain, Segment, provides_chain

_HEADS = ("last", "all")


class _RecurrentStack(nn.Module):
    hidden: int
    num_outputs: int | None = 1
    head: str = "last"
    kernel_init: Callable = nn.initializers.lecun_normal()
    recurrent_kernel_init: Callable = nn.initializers.orthogonal()
    bias_init: Callable = nn.initializers.zeros

    def __post_init__(self):
        check_int(f"{type(self).__name__}.hidden", self.hidden, 1)
        if self.num_outputs is not None:
            check_int(f"{type(self).__name__}.num_outputs", self.num_outputs, 1)
        if self.head not in _HEADS:
            raise ValueError(f"head={self.head!r} is not one of {_HEADS}")
        super().__post_init__()

    @nn.nowrap
    def make_cell(self, name: str | None = None) -> nn.RNNCellBase:
        raise NotImplementedError

    @nn.nowrap
    def carry_size(self) -> int:
        return self.hidden

    @nn.nowrap
    def _flatten(self, carry: Any) -> jax.Array:
        return carry

    @nn.nowrap
    def _unflatten(self, s: jax.Array) -> Any:
        return s

    @nn.nowrap
    def cell_params(self, variables: Any) -> Any:
        """The cell's own params (a flax cell's: e.g. an LSTM's gates "hf", "hi", ...)."""
        return variables["params"]["cell"]

    @nn.nowrap
    def with_cell_params(self, variables: Any, cell: Any) -> Any:
        """A copy of `variables` with the cell's params replaced by `cell`."""
        return {**variables, "params": {**variables["params"], "cell": cell}}

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        if x.ndim != 3:
            raise ValueError(
                f"{type(self).__name__} expects x of shape (batch, time, features), got {x.shape}"
            )
        ys = nn.RNN(self.make_cell(name="cell"), name="rnn")(x)
        if self.head == "last":
            ys = ys[:, -1]
        if self.num_outputs is None:
            return ys
        return nn.Dense(self.num_outputs, name="head")(ys)

    @nn.nowrap
    @provides_chain
    def chain(
        self,
        variables: Any,
        x: jax.Array,
        *,
        train: bool = False,
        layers: Sequence[str] | None = None,
        s0: jax.Array | None = None,
    ) -> Chain:
        """The transition through time for one sequence x (T, D) (or a batch (B, T, D)), as one
        scanned segment of a layer chain: layers "t=1" .. "t=T", fed x_t; with head="last" the
        chain's `readout` is the head on s_T (the model's output).

        s0 (default zeros) is the flat initial carry.
        """
        del train  # recurrent cells have no train/eval difference here
        if layers not in (None, WHOLE):  # WHOLE: the time steps are the whole model
            raise ValueError(f"{type(self).__name__} has fixed layers (its time steps); pass layers=None")
        if x.ndim not in (2, 3):
            raise ValueError(
                f"chain expects x of shape (time, features) or (batch, time, features), got {x.shape}"
            )
        xs = jnp.moveaxis(x, -2, 0)  # time first: (T, [B,] D)
        if s0 is None:
            s0 = jnp.zeros((*x.shape[:-2], self.carry_size()), x.dtype)
        names = tuple(f"t={t}" for t in range(1, xs.shape[0] + 1))
        segment = Segment(
            step=_CellStep(self), shared={"params": variables["params"]["cell"]}, params=xs, names=names
        )
        readout = None
        if self.head == "last" and self.num_outputs is not None:
            head = nn.Dense(self.num_outputs, parent=None)
            head_vars = {"params": variables["params"]["head"]}
            # every flax cell's output is its hidden state h, the flat carry's tail
            readout = lambda s: head.apply(head_vars, s[..., -self.hidden :])  # noqa: E731
        return Chain(segments=(segment,), h0=s0, readout=readout)


@dataclasses.dataclass(frozen=True)
class _CellStep:
    """The cell as a chain step (cell variables, x_t, s) -> s on the flat carry; frozen, so equal
    stacks give equal steps and jitted consumers compile once."""

    stack: _RecurrentStack

    def __call__(self, cell_vars: Any, x_t: jax.Array, s: jax.Array) -> jax.Array:
        cell = self.stack.make_cell().clone(parent=None)
        carry, _ = cell.apply(cell_vars, self.stack._unflatten(s), x_t)
        return self.stack._flatten(carry)


class RNNStack(_RecurrentStack):
    """Vanilla RNN: h_t = phi(W_x x_t + W_h h_{t-1} + b) (flax `SimpleCell`); phi tanh or sigmoid (any name)."""

    activation: str | Callable = "tanh"

    @nn.nowrap
    def make_cell(self, name: str | None = None) -> nn.RNNCellBase:
        fn = activations.get(self.activation) if isinstance(self.activation, str) else self.activation
        return nn.SimpleCell(
            self.hidden,
            activation_fn=fn,
            kernel_init=self.kernel_init,
            recurrent_kernel_init=self.recurrent_kernel_init,
            bias_init=self.bias_init,
            name=name,
        )


class LSTMStack(_RecurrentStack):
    """LSTM (flax `LSTMCell`, Hochreiter & Schmidhuber 1997); the walked state is [c; h] (2 * hidden)."""

    @nn.nowrap
    def make_cell(self, name: str | None = None) -> nn.RNNCellBase:
        return nn.LSTMCell(
            self.hidden,
            kernel_init=self.kernel_init,
            recurrent_kernel_init=self.recurrent_kernel_init,
            bias_init=self.bias_init,
            name=name,
        )

    @nn.nowrap
    def carry_size(self) -> int:
        return 2 * self.hidden

    @nn.nowrap
    def _flatten(self, carry: Any) -> jax.Array:
        c, h = carry
        return jnp.concatenate([c, h], axis=-1)

    @nn.nowrap
    def _unflatten(self, s: jax.Array) -> Any:
        return s[..., : self.hidden], s[..., self.hidden :]


class GRUStack(_RecurrentStack):
    """GRU (flax `GRUCell`, Cho et al. 2014)."""

    @nn.nowrap
    def make_cell(self, name: str | None = None) -> nn.RNNCellBase:
        return nn.GRUCell(
            self.hidden,
            kernel_init=self.kernel_init,
            recurrent_kernel_init=self.recurrent_kernel_init,
            bias_init=self.bias_init,
            name=name,
        )
