"""One layer trained as a (denoising) autoencoder of its input: the learner of greedy pretraining.

    r = psi(f(c(h)) W' + b'),   loss = mean over batch and units of (r - h)^2

with f the layer (the encoder, trained), c the corruption of a denoising autoencoder
(Vincent et al. 2008; identity when `noise == 0`: "mask" zeroes each entry with probability
`noise`, "gaussian" adds N(0, noise^2)), W' the transposed encoder kernel (tied) or a fresh
LeCun-normal kernel, b' a fresh zero bias and psi the decoder's output activation. The decoder
works on the flattened state and is discarded by the caller. `gradflow.pretrain` runs it layer
by layer, bottom up (`pretrain`); `pretrain_layer` is public there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike

from gradflow.nn.chains import kernel_paths, subtree
from gradflow.optim import make_optimizer

if TYPE_CHECKING:
    from gradflow.pretrain import PretrainConfig

Params = Any
Encoder = Callable[[Params, jax.Array], jax.Array]


class LayerFit(NamedTuple):
    """What `pretrain_layer` returns.

    Attributes:
      params: the encoder's trained parameters (same tree as given).
      decoder: the trained decoder's parameters ({"kernel", "bias"}, or {"bias"} when tied).
      losses: (steps,) minibatch reconstruction loss before each update (corrupted input).
      loss_before, loss_after: () full-data reconstruction MSE of the clean input at the start
        (given encoder, fresh decoder) and at the end.
      input_var: () the input's variance per unit, averaged over units: the MSE of the best
        constant reconstruction, so loss / input_var is the fraction of variance unexplained.
    """

    params: Params
    decoder: Params
    losses: jax.Array
    loss_before: jax.Array
    loss_after: jax.Array
    input_var: jax.Array


def _corrupt(key: jax.Array, h: jax.Array, cfg: PretrainConfig) -> jax.Array:
    if cfg.noise == 0:
        return h
    if cfg.corruption == "mask":
        return jnp.where(jax.random.bernoulli(key, 1.0 - cfg.noise, h.shape), h, 0.0).astype(h.dtype)
    return h + cfg.noise * jax.random.normal(key, h.shape, h.dtype)


def _kernel(params: Params) -> jax.Array:
    """The encoder's one kernel (a Dense's own, or a block's dense layer's)."""
    (path,) = kernel_paths(params)
    return subtree(params, path)


def _decode(decoder: Params, enc_params: Params, z: jax.Array, tied: bool, shape: tuple) -> jax.Array:
    """psi-less decoder z W' + c on the flattened state, reshaped to the input's shape."""
    kernel = _kernel(enc_params).T if tied else decoder["kernel"]
    return (z.reshape(z.shape[0], -1) @ kernel + decoder["bias"][None, :]).reshape(shape)


def _identity(z: jax.Array) -> jax.Array:
    return z


def pretrain_layer(
    encode: Encoder,
    params: Params,
    h_NxD: ArrayLike,
    cfg: PretrainConfig,
    key: jax.Array,
    *,
    output_fn: Callable[[jax.Array], jax.Array] | None = None,
) -> LayerFit:
    """Train one layer as an autoencoder of its input `h_NxD`; pure, jit it outside.

    Args:
      encode: the layer, `encode(params, h_BxD) -> z_BxW`.
      params: its parameters (the encoder's; only these and the decoder's are trained).
      h_NxD: the layer's input on the whole training set, shape (N, D) (or (N, ...), decoded
        flat), N >= batch_size.
      cfg: the pretraining config (`steps_per_layer`, `batch_size`, `optim`, `noise`,
        `corruption`, `tied`; `seed` is not read: the key is given).
      key: typed PRNG key of this layer, split into the decoder's init key and a data key;
        step t's batch and corruption come from `fold_in(data_key, t)`.
      output_fn: the decoder's output activation, r = output_fn(z W' + c); None: linear.

    Returns:
      A `LayerFit`.
    """
    h = jnp.asarray(h_NxD)
    n, d = h.shape[0], math.prod(h.shape[1:])
    width = math.prod(jax.eval_shape(encode, params, h[:1]).shape[1:])
    dec_key, data_key = jax.random.split(key)
    decoder = {"bias": jnp.zeros((d,), h.dtype)}
    if not cfg.tied:
        decoder["kernel"] = nn.initializers.lecun_normal()(dec_key, (width, d), h.dtype)
    tx = make_optimizer(cfg.optim)
    out_fn = _identity if output_fn is None else output_fn

    def loss_fn(theta, x_in, target):
        z = encode(theta["encoder"], x_in)
        recon = out_fn(_decode(theta["decoder"], theta["encoder"], z, cfg.tied, x_in.shape))
        return jnp.mean((recon - target) ** 2)

    def step(carry, t):
        theta, opt_state = carry
        idx_key, noise_key = jax.random.split(jax.random.fold_in(data_key, t))
        batch = h[jax.random.randint(idx_key, (cfg.batch_size,), 0, n)]
        loss, grads = jax.value_and_grad(loss_fn)(theta, _corrupt(noise_key, batch, cfg), batch)
        updates, opt_state = tx.update(grads, opt_state, theta)
        return (optax.apply_updates(theta, updates), opt_state), loss

    theta0 = {"encoder": params, "decoder": decoder}
    (theta, _), losses = lax.scan(step, (theta0, tx.init(theta0)), jnp.arange(cfg.steps_per_layer))
    return LayerFit(
        params=theta["encoder"],
        decoder=theta["decoder"],
        losses=losses,
        loss_before=loss_fn(theta0, h, h),
        loss_after=loss_fn(theta, h, h),
        input_var=jnp.mean(jnp.var(h, axis=0)),
    )
