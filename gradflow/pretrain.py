"""Greedy layer-wise pretraining of an `MLPStack` as stacked (denoising) autoencoders, then fine-tuning.

The procedure of Hinton et al. (2006) and Bengio et al. (2007), with autoencoders as the
layer-wise learners (Vincent et al. 2008 for the denoising variant). Layers are trained one
at a time, bottom up; layer l sees the output of the already pretrained layers < l on the
training set, computed once with those layers frozen, and learns to reconstruct it:

    h_l = f_l(h_{l-1})                                  (encoder: the layer itself)
    r_l = g_l(f_l(c(h_{l-1})))                          (g_l: a fresh decoder)
    loss_l = mean over batch and units of (r_l - h_{l-1})^2

with c the corruption of a denoising autoencoder (identity when `noise == 0`): "mask" zeroes
each entry with probability `noise`, "gaussian" adds N(0, noise^2). The decoder is
g(z) = psi(z W' + c): W' the transposed encoder kernel (`tied=True`, the default, as in
Vincent et al. 2008) or a fresh LeCun-normal kernel, c a fresh zero bias, and psi, with
`decoder_activation="mirror"` (default), the activation that produced the layer's input
(identity for the embed and block 1, the stack's activation for blocks 2..L); it is
discarded after its layer.

Why "mirror" and tied weights: for a sigmoid stack in its near-linear regime, reconstructing
h through sigmoid(W^T sigmoid(W h + b) + c) needs W^T W ~ 16 I (each sigmoid contributes a
slope 1/4), i.e. a per-layer gain sigmoid'(0) * 4 = 1, the critical scale. With a linear
decoder, tied or untied, deep sigmoid stacks kept the vanishing profile of Glorot
initialization in trial runs (see experiments/pretraining.py).

Which layers: the model's layer chain (`gradflow.nn.chain`), bottom up, every layer with a
kernel except the one producing the model's output (the supervised layer, left as given). An
`MLPStack` runs as its whole chain embed, blocks[1..L], head (`layers=WHOLE`, the default; the
head is the supervised layer; naming only the blocks keeps the input projection, see
`MLPStack.chain`). Its input projection is a plain linear
`Dense(width)` (no activation), trained as a *linear* autoencoder of the input x (with width >= input dim it can reconstruct x
exactly, so it mostly sets a well-conditioned projection); each block is its own dense +
activation (the block's parameters sliced from the stacked depth axis). Any linen model cut at
its Dense layers works the same way; its decoders are linear ("mirror" knows the activation
only of gradflow's blocks), and a layer whose input or output is not flat (a conv) is decoded
from and to its flattened state, with tied=False (a tied decoder needs one Dense kernel). Rows
of the returned loss arrays follow the greedy order (`PretrainResult.layers`).

Compilation: a scanned run of layers (gradflow's blocks) is pretrained by one `lax.scan` over
its depth axis (its carry the training-set representation h_{l-1}, its outputs the pretrained
slices, which stack back where the model keeps them), each layer's optimisation a `lax.scan`
over minibatch steps; the whole procedure is one jitted call whose compile time does not grow
with depth. Minibatches are drawn uniformly with replacement; the randomness of greedy layer g
(decoder init, batches, corruption) derives from `fold_in(key(cfg.seed), g)`, so it does not
depend on the depth or on `num_layers`.

Supported: `MLPStack` with norm=None and residual=None (plain blocks), and linen models whose
layers hold kernels; dropout is off during pretraining (the encoder runs deterministically).
Fine-tuning: `finetune` runs the ordinary trainer (`gradflow.train.make_train_epoch`) from the
given parameters, since `gradflow.train.fit` always initializes its own.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from gradflow._autoencoder import LayerFit as LayerFit
from gradflow._autoencoder import pretrain_layer as pretrain_layer
from gradflow._checks import check_bool, check_choice, check_int, check_real
from gradflow.nn.chains import (
    WHOLE,
    Chain,
    builds_chain,
    kernel_paths,
    layer_key,
    layer_map,
    layer_variables,
    subtree,
    with_layer_variables,
)
from gradflow.nn.chains import chain as make_chain
from gradflow.nn.mlp import MLPStack
from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train.diagnostics import entry_norms
from gradflow.train.layers import activation_fn, layout
from gradflow.train.loop import train_epochs
from gradflow.train.state import TrainConfig, TrainState, check_data, init_state, run_keys
from gradflow.train.step import task_loss

CORRUPTIONS = ("mask", "gaussian")
DECODER_ACTIVATIONS = ("mirror", "linear")
Params = Any
Data = tuple[Any, Any, Any, Any]


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Hyperparameters of greedy layer-wise autoencoder pretraining.

    Attributes:
      steps_per_layer: optimizer steps for each layer, >= 1.
      batch_size: examples per step, >= 1 (drawn with replacement from the training set).
      optim: the optimizer of every layer (`gradflow.optim.make_optimizer`; a fresh state
        per layer).
      noise: corruption level of a denoising autoencoder, >= 0 (0: a plain autoencoder);
        for "mask" the drop probability, < 1.
      corruption: "mask" (zero each input entry with probability `noise`) or "gaussian"
        (add N(0, noise^2) noise).
      tied: decoder kernel = the encoder kernel transposed (plus its own bias), as in
        Vincent et al. (2008); not for "maxout" blocks, whose kernel is (W, pieces * W).
      decoder_activation: "mirror" (the decoder ends in the activation that produced the
        layer's input: the stack's activation after a gradflow block, so for blocks 2..L;
        linear elsewhere: the embed and block 1, whose inputs are x and the linear embed's
        output, any layer of an adapted model, and after the module activations "prelu",
        "rrelu", "maxout") or "linear" (always linear).
      seed: seed of the decoders' initialization, the minibatches and the corruption.
    """

    steps_per_layer: int = 500
    batch_size: int = 128
    optim: OptimConfig = OptimConfig("adam", 1e-3)
    noise: float = 0.0
    corruption: str = "mask"
    tied: bool = True
    decoder_activation: str = "mirror"
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("PretrainConfig.steps_per_layer", self.steps_per_layer, 1)
        check_int("PretrainConfig.batch_size", self.batch_size, 1)
        if not isinstance(self.optim, OptimConfig):
            raise ValueError(f"PretrainConfig.optim must be an OptimConfig, got {self.optim!r}")
        check_choice("PretrainConfig.corruption", self.corruption, CORRUPTIONS)
        hi = 1.0 if self.corruption == "mask" else math.inf
        check_real(f"PretrainConfig.noise (corruption={self.corruption!r})", self.noise, lo=0.0, hi=hi)
        check_bool("PretrainConfig.tied", self.tied)
        check_choice("PretrainConfig.decoder_activation", self.decoder_activation, DECODER_ACTIVATIONS)
        check_int("PretrainConfig.seed", self.seed, 0)


class PretrainResult(NamedTuple):
    """What `pretrain` returns; loss rows are the greedy layers in order, NaN if not pretrained.

    Attributes:
      params: the model's parameters with the pretrained layers written back (the
        supervised layer and any layer not pretrained unchanged); pass them to `finetune`.
      losses: (G, steps_per_layer) minibatch reconstruction losses (MLPStack: G = L + 1,
        row 0 the embed, row l block l).
      loss_before, loss_after: (G,) full-data reconstruction MSE before and after.
      input_var: (G,) each layer's input variance (see `LayerFit`), with the pretrained
        lower layers.
      layers: the greedy layers' names (the chain's), one per row.
    """

    params: Params
    losses: jax.Array
    loss_before: jax.Array
    loss_after: jax.Array
    input_var: jax.Array
    layers: tuple[str, ...] = ()


def _blank_seed(cfg: Any) -> Any:
    """`cfg` (a `PretrainConfig` or `TrainConfig`) with its seed, which the jitted program takes as
    a traced argument, blanked: the static part that keys jit's cache, so no seed recompiles."""
    return dataclasses.replace(cfg, seed=0)


def check_supported(model: Any) -> None:
    """Raise a ValueError unless `pretrain` handles `model` (a plain `MLPStack` or a linen module)."""
    if isinstance(model, MLPStack):
        if model.norm is not None:
            raise ValueError(
                f"pretrain supports plain stacks only: norm must be None, got norm={model.norm!r}"
            )
        if model.residual is not None:
            raise ValueError(
                f"pretrain supports plain stacks only: residual must be None, got residual={model.residual!r}"
            )
    elif not isinstance(model, nn.Module) or builds_chain(model):
        raise ValueError(
            f"pretrain needs an MLPStack or a linen model with Dense layers, got {type(model).__name__}"
        )


def _greedy(c: Chain) -> list[tuple[int, int, int]]:
    """(segment, layer in segment, greedy index) of every layer to pretrain, bottom up."""
    last = c.depth if c.readout is not None else c.depth - 1  # the supervised layer stays
    out, index = [], 0
    for s, seg in enumerate(c.segments):
        for i in range(seg.depth):
            if seg.param_path is not None and index < last:
                out.append((s, i, len(out)))
            index += 1
    return out


@functools.partial(jax.jit, static_argnames=("model", "layers", "cfg"))
def _pretrain(
    model: Any,
    layers: tuple[str, ...] | str | None,
    params: Params,
    x: jax.Array,
    cfg: PretrainConfig,
    seed: jax.Array,
    num_layers: jax.Array,
) -> PretrainResult:
    # `cfg` is static with seed=0; the seed and num_layers are traced, so neither recompiles.
    root = jax.random.key(seed)
    variables = {"params": params}
    c = make_chain(model, variables, x, layers=layers, check=False)
    greedy = {(s, i): g for s, i, g in _greedy(c)}
    stack_phi = activation_fn(model) if builds_chain(model) else None
    phi = stack_phi if cfg.decoder_activation == "mirror" else None
    nan = jnp.full((), jnp.nan, x.dtype)
    blank = (jnp.full((cfg.steps_per_layer,), jnp.nan, x.dtype), nan, nan, nan)
    curves = lambda fit: (fit.losses, fit.loss_before, fit.loss_after, fit.input_var)  # noqa: E731

    def fit_or_keep(encode, own, h, g, out_fn):
        def fit(own):
            f = pretrain_layer(encode, own, h, cfg, jax.random.fold_in(root, g), output_fn=out_fn)
            return f.params, curves(f)

        return lax.cond(g < num_layers, fit, lambda own: (own, blank), own)

    h, rows = c.h0, []
    for s, seg in enumerate(c.segments):
        if seg.stacked and (s, 0) in greedy:  # a scanned run: pretrain it in one scan over depth
            first = greedy[(s, 0)]

            def layer(h, xs, seg=seg, first=first):
                p, i = xs

                def block_map(own, h, p=p):
                    return seg.step(seg.shared, {**p, "params": own}, h)

                # mirror: the input of a block after the first is phi(.) of the block before
                out_fn = None if phi is None else (lambda z, i=i: jnp.where(i > 0, phi(z), z))
                own, row = fit_or_keep(block_map, p["params"], h, first + i, out_fn)
                return block_map(own, h), (own, row)

            h, (owns, seg_rows) = lax.scan(layer, h, (seg.params, jnp.arange(seg.depth)))
            variables = with_layer_variables(variables, seg, None, owns)
            rows += [tuple(r[i] for r in seg_rows) for i in range(seg.depth)]
            continue
        for i in range(seg.depth):
            if (s, i) not in greedy:
                h = seg.step(seg.shared, seg.layer_params(i), h)
                continue
            encode = layer_map(variables, seg, i)
            own, row = fit_or_keep(encode, layer_variables(variables, seg, i), h, greedy[(s, i)], None)
            variables = with_layer_variables(variables, seg, i, own)
            rows.append(row)
            h = encode(own, h)
    losses, before, after, var = (jnp.stack(r) for r in zip(*rows))
    return PretrainResult(variables["params"], losses, before, after, var)


def pretrain(
    model: Any,
    params: Params,
    x: ArrayLike,
    cfg: PretrainConfig,
    *,
    layers: Sequence[str] | None = None,
    num_layers: int | None = None,
) -> PretrainResult:
    """Greedy layer-wise autoencoder pretraining of `model`'s layers, bottom up (module docstring).

    Args:
      model: a plain `MLPStack` (norm=None, residual=None) or a linen model with Dense layers.
      params: its "params" collection (e.g. `model.init(key, x)["params"]`).
      x: the training inputs, shape (N, ...) as the model takes them, N >= cfg.batch_size
        (labels are not used).
      cfg: the pretraining config.
      layers: the layers, as in `gradflow.nn.chain` (default: the whole model, `WHOLE`; the
        layer producing the output is the supervised one and stays. `MLPStack`: its input
        projection and blocks are pretrained; naming only the blocks keeps the projection).
      num_layers: pretrain only the lowest `num_layers` layers of the greedy order (MLPStack:
        embed = layer 0, block l = layer l), in [1, G]; None pretrains all. Higher layers
        are returned unchanged (bit for bit) and their loss rows are NaN. One compiled
        program serves every `num_layers` and every `cfg.seed`.

    Returns:
      A `PretrainResult`; its `params` go to `finetune` (or any trainer that takes params).
    """
    check_supported(model)
    if cfg.tied and isinstance(model, MLPStack) and model.activation == "maxout":
        raise ValueError("PretrainConfig.tied=True needs a square block kernel; activation='maxout' has none")
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"pretrain needs a batch of inputs x of shape (N, ...), got shape {x.shape}")
    if x.shape[0] < cfg.batch_size:
        raise ValueError(f"PretrainConfig.batch_size={cfg.batch_size} exceeds the {x.shape[0]} examples")
    if not bool(jnp.all(jnp.isfinite(x))):
        raise ValueError("pretrain: x holds NaN/Inf values")
    layers = WHOLE if layers is None else layer_key(layers)
    variables = {"params": params}
    c = make_chain(model, variables, x[: cfg.batch_size], layers=layers, check=False)
    greedy = _greedy(c)
    if not greedy:
        raise ValueError(
            f"{type(model).__name__} has no layer below its output to pretrain (layers {c.layers})"
        )
    for s, i, _ in greedy:
        seg = c.segments[s]
        kernels = kernel_paths(layer_variables(variables, seg, i))
        shapes = [jnp.shape(subtree(layer_variables(variables, seg, i), k)) for k in kernels]
        if len(kernels) != 1 or (cfg.tied and len(shapes[0]) != 2):
            raise ValueError(
                f"layer {seg.names[i]!r} has kernels of shapes {shapes}: pretraining needs one kernel per "
                "layer, and PretrainConfig.tied=True a Dense (2-D) one; cut at the Dense/Conv modules "
                "or use tied=False"
            )
    total = len(greedy)
    num_layers = total if num_layers is None else num_layers
    if not (isinstance(num_layers, int) and 1 <= num_layers <= total):
        raise ValueError(
            f"num_layers must be an integer in [1, {total}] (the greedy layers), got {num_layers!r}"
        )
    static = _blank_seed(cfg)
    result = _pretrain(model, layers, params, x, static, jnp.int32(cfg.seed), jnp.int32(num_layers))
    return result._replace(layers=tuple(c.segments[s].names[i] for s, i, _ in greedy))


@functools.partial(jax.jit, static_argnames=("model", "task"))
def layer_grad_norms(
    model: nn.Module, params: Params, x: ArrayLike, y: ArrayLike, task: str = "classification"
) -> jax.Array:
    """Per-layer gradient norms ||dL/dtheta_l|| of the task loss on (x, y), evaluation mode.

    Args:
      model: a gradflow stack or any model `gradflow.nn.chain` can cut.
      params: its parameters.
      x: a batch of inputs (B, D); y: its labels (B,) or targets.
      task: "classification" or "regression" (`gradflow.train.step.task_loss`).

    Returns:
      (L + 2,) norms in the order of `gradflow.train.layout(...).names`: embed, blocks 1..L, head.
    """

    def loss(p):
        return task_loss(model.apply({"params": p}, jnp.asarray(x)), jnp.asarray(y), task)[0]

    grads = jax.grad(loss)(params)
    return entry_norms(layout(model, {"params": params}, x), grads)


def finetune(model: nn.Module, params: Params, cfg: TrainConfig, data: Data) -> tuple[TrainState, dict]:
    """Train `model` from `params` with the ordinary trainer; the whole run is one jitted scan.

    The same steps, batches (`epoch_batches` with `run_keys(cfg.seed)`) and dropout keys as
    `gradflow.train.fit` with this `cfg`, but starting from the given parameters (a fresh
    optimizer state) and without records on disk. Models without BatchNorm only.

    Args:
      model: the linen module (static).
      params: the starting parameters (e.g. `pretrain(...).params`).
      cfg: the training config (static).
      data: (x_train, y_train, x_test, y_test); the test pair may be (None, None).

    Returns:
      (final state, epochs): `epochs` holds `gradflow.train.loop.summarize_epoch`'s entries with a
      leading axis cfg.epochs, plus test_loss / test_accuracy with test data. One compiled
      program serves every `cfg.seed`.
    """
    check_data(model, cfg, tuple(data))
    static = _blank_seed(cfg)
    return _finetune(model, params, static, tuple(data), jnp.int32(cfg.seed))


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _finetune(
    model: nn.Module, params: Params, cfg: TrainConfig, data: Data, seed: jax.Array
) -> tuple[TrainState, dict]:
    x, y, x_test, y_test = data
    x, y = jnp.asarray(x), jnp.asarray(y)
    tx = make_optimizer(cfg.optim)
    init_key, data_key = run_keys(seed)
    state = init_state(model, tx, init_key, x[: cfg.batch_size])
    state = state._replace(params=params, opt_state=tx.init(params))
    return train_epochs(model, tx, cfg, state, (x, y, x_test, y_test), data_key)
