"""The layer-walking interface: any stack as a sequence of maps h_l = f_l(h_{l-1}).

Every gradflow stack has a method

    walk(variables, x, *, train=False) -> LayerWalk

returning the maps of its repeated part (the blocks of a feed-forward stack, the transition
through time of a recurrent one) in one form:

    h_l = walk.step(walk.layer(l), h_{l-1}),   l = 1 .. walk.depth,   starting from walk.h0,

where `walk.params` is a pytree whose leaves all have a leading axis of length `depth`
(per-layer weights for feed-forward stacks; the inputs x_t fed in at each time step for
recurrent stacks, whose shared weights are closed over by `step`). `step` is pure and
jit/vmap/grad-able, so the spectra engine (`gradflow.spectra`), per-layer gradient norms and
layer-wise pretraining walk any stack without knowing which one it is.

States are flat vectors for a single example: h0 has shape (width,) (recurrent: the flat
carry, (2 * hidden,) = [c; h] for an LSTM). Passing a batch x of shape (B, ...) gives h0 of
shape (B, width); a step then maps the whole batch at once.

BatchNorm couples the examples of a batch. The interface handles it in two documented ways:
- `train=False` (default): per-example maps with BatchNorm's running statistics frozen
  (evaluation mode). Each example's map is independent of the rest of the batch.
- `train=True`: the full batch map. x must be a batch (B, ...); h_l is (B, width) and each
  step normalises with the statistics of the batch it is given, so d h_L / d h_0 is the
  (B * width) x (B * width) Jacobian of the batch map, coupling included.
Dropout and RReLU noise are always off in a walk: a walk is a deterministic map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
from jax import lax


@dataclasses.dataclass(frozen=True)
class LayerWalk:
    """A stack as maps h_l = step(params[l], h_{l-1}); see the module docstring.

    Attributes:
      step: (params_l, h) -> h, pure.
      params: pytree, every leaf with leading axis `depth`.
      h0: the state entering layer 1.
      readout: optional map from the last state to the stack's output (e.g. the head).
    """

    step: Callable[[Any, jax.Array], jax.Array]
    params: Any
    h0: jax.Array
    readout: Callable[[jax.Array], jax.Array] | None = None

    @property
    def depth(self) -> int:
        leaves = jax.tree_util.tree_leaves(self.params)
        if not leaves:
            raise ValueError("LayerWalk.params has no leaves; cannot infer depth")
        return int(leaves[0].shape[0])

    def layer(self, l: int) -> Any:
        """The parameters of layer l (1-based, as in h_l = f_l(h_{l-1}))."""
        if not 1 <= l <= self.depth:
            raise ValueError(f"layer index must be in 1..{self.depth}, got {l}")
        return jax.tree_util.tree_map(lambda a: a[l - 1], self.params)

    def states(self) -> jax.Array:
        """All states h_1 .. h_L stacked, shape (depth, *h0.shape), by one lax.scan."""
        _, hs = lax.scan(lambda h, p: (self.step(p, h),) * 2, self.h0, self.params)
        return hs

    def final(self) -> jax.Array:
        """h_L, by one lax.scan."""
        h, _ = lax.scan(lambda h, p: (self.step(p, h), None), self.h0, self.params)
        return h


class Walkable(Protocol):
    """A stack exposing the layer-walking interface."""

    def walk(self, variables: Any, x: jax.Array, *, train: bool = False) -> LayerWalk: ...
