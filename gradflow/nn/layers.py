"""Learnable and stochastic activations as linen modules: PReLU, RReLU, Maxout."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gradflow import activations


class PReLU(nn.Module):
    """Parametric ReLU (He et al. 2015): x if x >= 0 else a * x with a learnable slope a.

    Attributes:
      per_channel: one slope per feature (last axis) if True, one shared slope if False.
      init_slope: the slopes' initial value (0.25 in the paper).
    """

    per_channel: bool = True
    init_slope: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (x.shape[-1],) if self.per_channel else ()
        slope = self.param("slope", nn.initializers.constant(self.init_slope), shape, jnp.float32)
        slope = slope.astype(x.dtype).reshape((1,) * (x.ndim - 1) + shape) if shape else slope.astype(x.dtype)
        return jnp.where(x >= 0, x, slope * x)


class RReLU(nn.Module):
    """Randomized leaky ReLU (Xu et al. 2015) drawing its slopes from the 'dropout' PRNG stream.

    In training (`deterministic=False`) every negative element gets a slope from U(lower, upper);
    in evaluation the slope is (lower + upper) / 2.
    """

    lower: float = 1.0 / 8.0
    upper: float = 1.0 / 3.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deterministic:
            return activations.rrelu(x, lower=self.lower, upper=self.upper, train=False)
        key = self.make_rng("dropout")
        return activations.rrelu(x, key=key, lower=self.lower, upper=self.upper, train=True)


class Maxout(nn.Module):
    """A maxout layer (Goodfellow et al. 2013): `features` outputs, each the max of `num_pieces`
    affine pieces: Dense(features * num_pieces) followed by `activations.maxout`."""

    features: int
    num_pieces: int = 2
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    bias_init: nn.initializers.Initializer = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        z = nn.Dense(self.features * self.num_pieces, kernel_init=self.kernel_init, bias_init=self.bias_init)(
            x
        )
        return activations.maxout(z, self.num_pieces)
