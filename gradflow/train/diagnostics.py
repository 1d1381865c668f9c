"""Gradient-health diagnostics computed inside the jitted step: per-layer norms, ratios,
activation statistics, and the location of the first NaN/Inf.

Layers come from the model's layer chain (`gradflow.nn.chain`), summarized as a `Layout`
(`gradflow.train.layers`);
nothing here reads a model's parameter names. The per-layer diagnostics are over the chain's
layers that own parameters: an `MLPStack`'s L blocks (stacked on their depth axis), a user's
linen model's submodules ("conv1", "stage2/block1", ...). Where the chain's layers share their
parameters (a recurrent cell through time) they are over the top-level parameter entries
(the cell's and the readout's). Non-finite values are located on the top-level entries in the order their
modules run, a stacked entry expanded to its layers: for an MLPStack

    0 = embed,  1 .. L = blocks 1 .. L,  L + 1 = head.

Recorded quantities (`step_diagnostics`; names as in the step's metrics), each (n,) over the
n per-layer rows (`Layout.layer_names`):

- grad_norm: ||dL/dtheta_l||, over all parameter leaves of layer l.
- update_ratio: ||u_l|| / ||theta_l||, u_l the update actually applied (0 for a layer with no
  parameters of its own).
- weight_norm: ||theta_l||.
- state_grad_norm: ||dL/dh_l||, over the batch and units, h_l layer l's output: by zero
  perturbations added to every cut's output through the same interception that cuts the model
  (stacks: flax `perturb` on each block's output); L is the batch-mean loss.
- preact_grad_norm: ||dL/dz_l||, z_l the input of block l's activation (gradflow's stacks
  with an activation: their blocks `perturb` and `sow` it under the name `PREACT`; a
  Transformer block's is its MLP's hidden layer).
- preact_mean, preact_var: mean and variance of z_l over the batch and units.
- saturated: fraction of entries of z_l with |phi'(z)| < 0.01 (sigmoid/tanh saturation; for
  ReLU the inactive entries).
- dead: fraction of units with |phi'(z)| < 0.01 for every example of the batch (dead ReLUs;
  fully saturated sigmoid/tanh units count too).
- grad_norm_global (): ||dL/dtheta|| over the whole tree.

A diagnostic a model cannot give is left out of the metrics, never filled with NaN, and
`Layout.omitted` (also `TrainResult.omitted`, `SweepResult.omitted`) says why: the activation
statistics need a known elementwise activation and its input (gradflow's MLP, conv and
Transformer stacks with an activation function; not "prelu", "rrelu", "maxout"), and state gradients need layers with parameters of
their own. All norms use `gradflow.numerics.stable_norm` per leaf slice and combine the
slices' norms stably, so gradient norms far below 1e-19 do not underflow to 0 in float32.

Non-finite location (`locate_nonfinite`): the first place in the order the computation runs.
Forward, layers 0 .. L + 1: a layer's parameters ("param"), then its output ("activation":
layer 0 is the input x, blocks their pre-activations z_l, the head its logits); then the loss
("loss", reported at the head, L + 1); then backward, layers L + 1 .. 0 (the highest layer with
a non-finite gradient, "gradient"); then the new parameters after the update ("update", lowest
layer). A NaN planted in block l's weights is thus reported as (l, "param"), although every
gradient below it is NaN too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradflow.nn.chains import subtree
from gradflow.numerics import stable_norm
from gradflow.train.layers import Layout

NONFINITE_KINDS = ("none", "param", "activation", "loss", "gradient", "update")
SATURATION_THRESHOLD = 0.01


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


def layer_norms(lay: Layout, params: Any) -> jax.Array:
    """Per-layer norms of a params-shaped tree, shape (lay.num_layers,)."""
    out = []
    for path, _, stacked in lay.layers:
        sub = subtree(params, path)
        out.append(stacked_norms(sub) if stacked else tree_norm(sub)[None])
    return jnp.concatenate(out)


def entry_norms(lay: Layout, tree: Any) -> jax.Array:
    """Per-layer norms in the order of `lay.names` (a stacked entry per slice): (len(lay.names),)."""
    out = [
        stacked_norms(tree[key]) if stacked else tree_norm(tree[key])[None] for key, _, stacked in lay.entries
    ]
    return jnp.concatenate(out)


def tree_finite(tree: Any) -> jax.Array:
    """True iff every element of every leaf is finite (scalar bool).

    One reduction per leaf, not one over the concatenated leaves: this runs on every training
    step, and the concatenation's copy made the step measurably slower at small widths.
    """
    out = jnp.array(True)
    for leaf in jax.tree_util.tree_leaves(tree):
        out = out & jnp.all(jnp.isfinite(leaf))
    return out


def layer_finite(lay: Layout, params: Any) -> jax.Array:
    """Per-layer finiteness in the order of `lay.names`: bool array (len(lay.names),)."""
    out = []
    for key, _, stacked in lay.entries:
        if stacked:
            leaves = jax.tree_util.tree_leaves(params[key])
            out.append(jnp.all(jnp.isfinite(_flat(leaves, leaves[0].shape[0])), axis=1))
        else:
            out.append(tree_finite(params[key])[None])
    return jnp.concatenate(out)


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
    lay: Layout,
    params: Any,
    grads: Any,
    updates: Any,
    state_grads: list[jax.Array] | None,
    preact_grads: list[jax.Array] | None,
    preacts: list[jax.Array] | None,
    phi: Callable | None,
) -> dict[str, jax.Array]:
    """The per-layer diagnostics of one step (see the module docstring for names and shapes).

    Args:
      lay: the model's `Layout`.
      params: parameters before the step.
      grads: their gradients (same tree).
      updates: the optimizer's updates (same tree).
      state_grads: dL/dh_l, one (L_i, B, ...) array per part (a stack's sown entries; an adapted
        model's cuts, L_i = 1), whose layers are the rows in order; or None where omitted.
      preact_grads: dL/dz, one (L_i, B, ..., W) array per sown entry, or None where omitted.
      preacts: z, one (L_i, B, ..., W) array per sown entry, or None where omitted.
      phi: the elementwise activation or None.

    Returns:
      A dict of arrays: per-layer ones (lay.num_layers,) for each of `lay.diagnostics()`, and
      grad_norm_global ().
    """
    grad_norm = layer_norms(lay, grads)
    weight_norm = layer_norms(lay, params)
    update_norm = layer_norms(lay, updates)
    out = {
        "grad_norm": grad_norm,
        "weight_norm": weight_norm,
        # a layer without parameters of its own (a reshape, a pooling) moves by nothing: 0
        "update_ratio": jnp.where(
            weight_norm > 0, update_norm / jnp.where(weight_norm > 0, weight_norm, 1), 0.0
        ),
        "grad_norm_global": tree_norm(grads),
    }
    rows = lambda parts: jnp.concatenate([_row_norms(g.reshape(g.shape[0], -1)) for g in parts])  # noqa: E731
    if state_grads is not None:
        out["state_grad_norm"] = rows(state_grads)
    if preact_grads is not None:
        out["preact_grad_norm"] = rows(preact_grads)
    if preacts is not None:
        stats = [activation_stats(z, phi) for z in preacts]
        out.update({k: jnp.concatenate([st[k] for st in stats]) for k in stats[0]})
    wanted = set(lay.diagnostics()) | {"grad_norm_global"}
    return {k: v for k, v in out.items() if k in wanted}


def locate_nonfinite(
    lay: Layout,
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
      lay: the model's `Layout` (its `names` are the layers located).
      params: parameters before the step.
      x: the input batch, shape (B, ...).
      preacts: pre-activations, one (L_i, B, ..., W) array per sown entry, or None when not recorded.
      logits: the model output, shape (B, ...).
      loss: the scalar loss.
      grads: gradients (tree of params).
      new_params: parameters after the update.

    Returns:
      (layer, kind): int32 scalars; layer indexes `lay.names` (-1 if all finite), kind
      indexes `NONFINITE_KINDS` (0 = "none").
    """
    param_ok = layer_finite(lay, params)
    n = param_ok.shape[0]
    act_ok = jnp.ones((n,), bool).at[0].set(tree_finite(x))
    at, sown = 0, dict(zip([k for k, _ in lay.sown], preacts or (), strict=False))
    for key, names, _ in lay.entries:
        if key in sown:
            z = sown[key]
            L = z.shape[0]
            act_ok = act_ok.at[at : at + L].set(
                act_ok[at : at + L] & jnp.all(jnp.isfinite(z.reshape(L, -1)), axis=1)
            )
        at += len(names)
    out_index = n - 1
    act_ok = act_ok.at[out_index].set(act_ok[out_index] & tree_finite(logits))
    grad_ok = layer_finite(lay, grads)
    new_ok = layer_finite(lay, new_params)
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
