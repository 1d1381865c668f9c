"""Gradient-health diagnostics computed inside the jitted step: per-layer norms, ratios,
activation statistics, and the location of the first NaN/Inf.

Layers. For an `MLPStack`-shaped parameter tree (top-level "embed", "blocks", "head") the
per-layer diagnostics are over the `L` blocks (`blocks` leaves carry a leading depth axis), so
each is an array of shape (L,). Non-finite values are located on the full layer list

    0 = embed,  1 .. L = blocks 1 .. L,  L + 1 = head.

Any other parameter tree (e.g. the recurrent stacks) is split into its top-level entries in
creation order (computation order for linen modules), and "layer" means one of those.

Recorded quantities (`step_diagnostics`; names as in the step's metrics):

- grad_norm (L,): ||dL/dtheta_l||, over all parameter leaves of block l.
- preact_grad_norm (L,): ||dL/dz_l||, over the batch and units, z_l the input of block l's
  activation (flax `perturb`, see `gradflow.nn.mlp.Block`); L is the batch-mean loss.
- update_ratio (L,): ||u_l|| / ||theta_l||, u_l the update actually applied.
- weight_norm (L,): ||theta_l||.
- preact_mean, preact_var (L,): mean and variance of z_l over the batch and units.
- saturated (L,): fraction of entries of z_l with |phi'(z)| < 0.01 (sigmoid/tanh saturation;
  for ReLU the inactive entries).
- dead (L,): fraction of units with |phi'(z)| < 0.01 for every example of the batch (dead
  ReLUs; fully saturated sigmoid/tanh units count too).
- grad_norm_global (): ||dL/dtheta|| over the whole tree.

The activation statistics are NaN for module activations ("prelu", "rrelu") and "maxout",
whose derivative is not an elementwise function of z alone. All norms use
`gradflow.numerics.stable_norm` per leaf slice and combine the slices' norms stably, so
gradient norms far below 1e-19 do not underflow to 0 in float32.

Non-finite location (`locate_nonfinite`): the first place in the order the computation runs.
Forward, layers 0 .. L + 1: a layer's parameters ("param"), then its output ("activation":
layer 0 is the input x, blocks their pre-activations z_l, the head its logits); then the loss
("loss", reported at the head, L + 1); then backward, layers L + 1 .. 0 (the highest layer with
a non-finite gradient, "gradient"); then the new parameters after the update ("update", lowest
layer). A NaN planted in block l's weights is thus reported as (l, "param"), although every
gradient below it is NaN too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from gradflow import activations
from gradflow.numerics import stable_norm

NONFINITE_KINDS = ("none", "param", "activation", "loss", "gradient", "update")
SATURATION_THRESHOLD = 0.01
_MODULE_ACTIVATIONS = ("prelu", "rrelu", "maxout")


def is_stack(params: Any) -> bool:
    """True for an `MLPStack`-shaped tree (a "blocks" entry with a leading depth axis)."""
    return isinstance(params, Mapping) and "blocks" in params


def layer_names(params: Any) -> list[str]:
    """Names of the layers in the order used by `locate_nonfinite` (index = position)."""
    if is_stack(params):
        depth = _depth(params["blocks"])
        rest = [k for k in params if k not in ("embed", "blocks", "head")]
        pre = ["embed"] if "embed" in params else []
        post = ["head"] if "head" in params else []
        return pre + [f"blocks[{l}]" for l in range(1, depth + 1)] + post + rest
    return list(params) if isinstance(params, Mapping) else ["params"]


def num_layers(params: Any) -> int:
    """Length of the per-layer diagnostics: the blocks of a stack, else the top-level entries."""
    if is_stack(params):
        return _depth(params["blocks"])
    return len(params) if isinstance(params, Mapping) else 1


def blank_diagnostics(n: int, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """NaN-filled diagnostics (the values of a step that records none)."""
    names = ("grad_norm", "weight_norm", "update_ratio", "preact_grad_norm")
    names += ("preact_mean", "preact_var", "saturated", "dead")
    out = {name: jnp.full((n,), jnp.nan, dtype) for name in names}
    return {**out, "grad_norm_global": jnp.full([], jnp.nan, dtype)}


def _depth(blocks: Any) -> int:
    return int(jax.tree_util.tree_leaves(blocks)[0].shape[0])


def _row_norms(x: jax.Array) -> jax.Array:
    """`stable_norm` of each row of a 2-D array: one fused reduction for all rows."""
    return jax.vmap(stable_norm)(x)


def _flat(leaves: list, rows: int) -> jax.Array:
    # One (rows, P) array of all leaves: a single reduction over it compiles to a handful of
    # fusions, where one reduction per leaf (x 3 trees x every check) made the recording step's
    # compile time grow with the number of leaves.
    return jnp.concatenate([jnp.reshape(x, (rows, -1)) for x in leaves], axis=1)


def tree_norm(tree: Any) -> jax.Array:
    """Stable Euclidean norm over all leaves of `tree` (scalar)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.zeros([])
    return stable_norm(_flat(leaves, 1))


def stacked_norms(tree: Any) -> jax.Array:
    """Per-slice norms of a tree whose leaves share a leading axis of length L: shape (L,)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return _row_norms(_flat(leaves, leaves[0].shape[0]))


def layer_norms(params: Any) -> jax.Array:
    """Per-layer norms: (L,) over the blocks of a stack, else one per top-level entry."""
    if is_stack(params):
        return stacked_norms(params["blocks"])
    if isinstance(params, Mapping):
        return jnp.stack([tree_norm(params[k]) for k in params])
    return tree_norm(params)[None]


def tree_finite(tree: Any) -> jax.Array:
    """True iff every element of every leaf is finite (scalar bool).

    One reduction per leaf, not one over the concatenated leaves: this runs on every training
    step, and the concatenation's copy made the step measurably slower at small widths.
    """
    out = jnp.array(True)
    for leaf in jax.tree_util.tree_leaves(tree):
        out = out & jnp.all(jnp.isfinite(leaf))
    return out


def layer_finite(params: Any) -> jax.Array:
    """Per-layer finiteness in the order of `layer_names`: bool array (n_layers,)."""
    if is_stack(params):
        blocks = params["blocks"]
        leaves = jax.tree_util.tree_leaves(blocks)
        per_block = jnp.all(jnp.isfinite(_flat(leaves, leaves[0].shape[0])), axis=1)
        pre = [tree_finite(params["embed"])[None]] if "embed" in params else []
        post = [tree_finite(params["head"])[None]] if "head" in params else []
        rest = [tree_finite(params[k])[None] for k in params if k not in ("embed", "blocks", "head")]
        return jnp.concatenate(pre + [per_block] + post + rest)
    if isinstance(params, Mapping):
        return jnp.stack([tree_finite(params[k]) for k in params])
    return tree_finite(params)[None]


def activation_fn(model: Any) -> Callable | None:
    """The elementwise activation of a stack (`model.activation`), or None if there is none."""
    act = getattr(model, "activation", None)
    if act is None or (isinstance(act, str) and act in _MODULE_ACTIVATIONS):
        return None
    return activations.get(act) if isinstance(act, str) else act


def activation_stats(z_LxBxW: jax.Array, phi: Callable | None) -> dict[str, jax.Array]:
    """Pre-activation statistics per layer.

    Args:
      z_LxBxW: pre-activations, shape (L, B, ..., W) (units on the last axis).
      phi: the elementwise activation, or None (saturation statistics are then NaN).

    Returns:
      preact_mean, preact_var, saturated, dead: each of shape (L,).
    """
    L = z_LxBxW.shape[0]
    flat = z_LxBxW.reshape(L, -1)
    out = {"preact_mean": jnp.mean(flat, axis=1), "preact_var": jnp.var(flat, axis=1)}
    if phi is None:
        nan = jnp.full((L,), jnp.nan, z_LxBxW.dtype)
        return {**out, "saturated": nan, "dead": nan}
    _, dphi = jax.jvp(phi, (z_LxBxW,), (jnp.ones_like(z_LxBxW),))
    flat_sat = (jnp.abs(dphi) < SATURATION_THRESHOLD).reshape(L, -1, z_LxBxW.shape[-1])  # (L, B*..., W)
    out["saturated"] = jnp.mean(flat_sat, axis=(1, 2))
    out["dead"] = jnp.mean(jnp.all(flat_sat, axis=1), axis=1)
    return out


def step_diagnostics(
    params: Any,
    grads: Any,
    updates: Any,
    preact_grads: jax.Array | None,
    preacts: jax.Array | None,
    phi: Callable | None,
) -> dict[str, jax.Array]:
    """The per-layer diagnostics of one step (see the module docstring for names and shapes).

    Args:
      params: parameters before the step.
      grads: their gradients (same tree).
      updates: the optimizer's updates (same tree).
      preact_grads: dL/dz, shape (L, B, ..., W), or None (the entry is then NaN).
      preacts: z, shape (L, B, ..., W), or None (activation statistics are then NaN).
      phi: the elementwise activation or None.

    Returns:
      A dict of arrays: per-layer ones (n,) and grad_norm_global ().
    """
    grad_norm = layer_norms(grads)
    weight_norm = layer_norms(params)
    n = grad_norm.shape[0]
    nan = jnp.full((n,), jnp.nan, grad_norm.dtype)
    update_norm = layer_norms(updates)
    out = {
        "grad_norm": grad_norm,
        "weight_norm": weight_norm,
        "update_ratio": update_norm / weight_norm,
        "grad_norm_global": tree_norm(grads),
    }
    if preact_grads is not None and preact_grads.shape[0] == n:
        out["preact_grad_norm"] = jax.vmap(stable_norm)(preact_grads.reshape(n, -1))
    else:
        out["preact_grad_norm"] = nan
    if preacts is not None and preacts.shape[0] == n:
        out.update(activation_stats(preacts, phi))
    else:
        out.update(preact_mean=nan, preact_var=nan, saturated=nan, dead=nan)
    return out


def locate_nonfinite(
    params: Any,
    x: jax.Array,
    preacts: jax.Array | None,
    logits: jax.Array,
    loss: jax.Array,
    grads: Any,
    new_params: Any,
) -> tuple[jax.Array, jax.Array]:
    """Where a NaN/Inf first appears, in the order the computation runs (module docstring).

    Args:
      params: parameters before the step.
      x: the input batch, shape (B, ...).
      preacts: block pre-activations (L, B, ..., W), or None when not recorded.
      logits: the model output, shape (B, ...).
      loss: the scalar loss.
      grads: gradients (tree of params).
      new_params: parameters after the update.

    Returns:
      (layer, kind): int32 scalars; layer indexes `layer_names(params)` (-1 if all finite),
      kind indexes `NONFINITE_KINDS` (0 = "none").
    """
    param_ok = layer_finite(params)
    n = param_ok.shape[0]
    act_ok = jnp.ones((n,), bool)
    if is_stack(params):
        has_embed = "embed" in params
        first_block = 1 if has_embed else 0
        if has_embed:
            act_ok = act_ok.at[0].set(tree_finite(x))
        if preacts is not None:
            L = preacts.shape[0]
            block_ok = jnp.all(jnp.isfinite(preacts.reshape(L, -1)), axis=1)
            act_ok = act_ok.at[first_block : first_block + L].set(block_ok)
        depth = _depth(params["blocks"])
        out_index = first_block + depth if "head" in params else first_block + depth - 1
    else:
        act_ok = act_ok.at[0].set(tree_finite(x))
        out_index = n - 1
    act_ok = act_ok.at[out_index].set(act_ok[out_index] & tree_finite(logits))
    grad_ok = layer_finite(grads)
    new_ok = layer_finite(new_params)
    idx = jnp.arange(n)
    big = jnp.int32(n)

    def first(bad):  # lowest index with bad, else n
        return jnp.min(jnp.where(bad, idx, big)).astype(jnp.int32)

    fwd_bad = ~param_ok | ~act_ok
    fwd = first(fwd_bad)
    bwd = jnp.max(jnp.where(~grad_ok, idx, -1)).astype(jnp.int32)
    upd = first(~new_ok)
    loss_bad = ~jnp.isfinite(loss)
    layer = jnp.where(
        fwd < n,
        fwd,
        jnp.where(loss_bad, out_index, jnp.where(bwd >= 0, bwd, jnp.where(upd < n, upd, -1))),
    ).astype(jnp.int32)
    fwd_kind = jnp.where(~param_ok[jnp.minimum(fwd, n - 1)], 1, 2)
    kind = jnp.where(
        fwd < n,
        fwd_kind,
        jnp.where(loss_bad, 3, jnp.where(bwd >= 0, 4, jnp.where(upd < n, 5, 0))),
    ).astype(jnp.int32)
    return layer, kind
