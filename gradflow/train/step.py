"""The pure training step: one optimizer update with its finiteness check and diagnostics.

`make_train_step(model, optimizer, cfg)` returns `train_step(state, batch) -> (state, metrics)`:
pure, jit it outside. One step is the hand-written flax + optax step (value_and_grad, optimizer
update, apply_updates, BatchNorm statistics through `mutable=["batch_stats"]`, dropout key
`fold_in(state.key, state.step)`) plus:

- a finiteness check of the loss, the gradients and the new parameters, every step; a step
  that fails it does not apply its update (parameters, BatchNorm statistics and optimizer
  state are kept; `step` still advances) and reports where the NaN/Inf first appeared
  (`gradflow.train.diagnostics.locate_nonfinite`, under `lax.cond`: run only on such a step; it
  recomputes the forward pass to see the pre-activations). The optimizer state is gated by
  the loss and gradient check alone, which is known before the optimizer runs, so the
  keep-or-replace select fuses into the optimizer's own loops (no extra pass over the Adam
  moments); the one case this lets through is finite gradients whose update overflows the
  parameters to Inf: the parameters are kept, the optimizer state takes that step;
- the per-layer diagnostics (`gradflow.train.diagnostics.step_diagnostics`) on steps with
  step % k == 0, NaN on the other steps (`recorded` says which). Recording and plain steps are
  two code paths chosen by `lax.cond`: a plain step is the hand-written step plus the check; a
  recording step takes the gradient with respect to each block's pre-activation from the same
  backward pass, through flax's `perturb` ("perturbations" collection of zeros), and the
  pre-activations from `sow` ("intermediates"). With `diagnostics_every=0` only the plain path
  is compiled; with 1 only the recording one.

Under `jax.vmap` a `lax.cond` on a per-run predicate runs both branches. Sweeps pass the vmap
axis name (`axis_name`): the recording predicate is then taken from the shared step count
(`lax.pmax`) and the locator runs when any run of the axis has a non-finite step (`lax.psum`), so
both stay real branches.

Metrics of a step (a dict of arrays; per-layer entries have shape (L,)): loss, accuracy
(classification), step, finite, skipped (update not applied), nonfinite_layer,
nonfinite_kind, recorded, and the diagnostics named in `gradflow.train.diagnostics`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.typing import ArrayLike

from gradflow.nn.chains import cut_shapes, perturbed_apply, takes_train
from gradflow.train import diagnostics as dg
from gradflow.train import layers as ly
from gradflow.train.state import TrainConfig, TrainState

Metrics = dict[str, jax.Array]
Batch = tuple[jax.Array, jax.Array]


def task_loss(out: jax.Array, y: jax.Array, task: str) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The batch-mean loss of `task` and its extra metrics.

    Args:
      out: model output; (B, ..., C) logits for classification, (B, ...) for regression.
      y: (B, ...) integer labels, or regression targets with out's number of elements.
      task: "classification" (softmax cross-entropy, accuracy) or "regression" (MSE).

    Returns:
      (loss, {"accuracy": ...}) for classification, (loss, {}) for regression.
    """
    if task == "classification":
        loss = optax.softmax_cross_entropy_with_integer_labels(out, y.astype(jnp.int32)).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(out, axis=-1) == y)}
    return jnp.mean((out - jnp.reshape(y, out.shape).astype(out.dtype)) ** 2), {}


def model_variables(params: Any, batch_stats: Any, perturbations: Any = None) -> dict:
    """The variables `model.apply` takes: params, and the collections that are not empty."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    if perturbations:
        variables["perturbations"] = perturbations
    return variables


def _shared(value: jax.Array, axis_name: str | None, reduce: Callable) -> jax.Array:
    """`value`, reduced over the vmap axis `axis_name` if there is one (an unbatched scalar)."""
    return value if axis_name is None else reduce(value, axis_name)


def make_train_step(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    cfg: TrainConfig,
    *,
    axis_name: str | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The pure training step of `model` under `optimizer` (see the module docstring).

    Args:
      model: a linen module, `model.apply(variables, x, train=True)` (`train` only where its
        `__call__` takes one): a gradflow stack or any model `gradflow.nn.chain` can cut.
      optimizer: an optax transformation (e.g. `make_optimizer(cfg.optim)`).
      cfg: the training config (`task`, `diagnostics_every`; `on_nonfinite` acts in the epoch).
      axis_name: the name of the `jax.vmap` axis the step is mapped over, if any (runs of a
        sweep). Branch choices (recording step, non-finite location) are then made once for
        the whole axis (`lax.pmax` / `lax.psum`), so they stay real branches; without it a
        vmapped `lax.cond` on a per-run predicate runs both branches.

    Returns:
      `train_step(state, (x_BxD, y_B), done=False) -> (state, metrics)`; pure, jit it outside.
      `done=True` makes the step a no-op on the state (the stopped runs of an epoch).
    """
    k = cfg.diagnostics_every
    phi = ly.activation_fn(model)
    cache: dict = {}
    train_kw = {"train": True} if takes_train(model) else {}

    def layout(params, batch_stats, x) -> ly.Layout:
        # The model's layers, asked of its chain once per input shape (structure only).
        key = ("layout", x.shape, x.dtype)
        if key not in cache:
            cache[key] = ly.layout(model, model_variables(params, batch_stats), x)
        return cache[key]

    def apply(params, batch_stats, x, key, perturbations=None, sow=False):
        mutable = (["batch_stats"] if batch_stats else []) + (["intermediates"] if sow else [])
        variables = model_variables(params, batch_stats, perturbations)
        return model.apply(variables, x, rngs={"dropout": key}, mutable=mutable, **train_kw)

    def plain_loss(params, batch_stats, x, y, key):
        out, new_vars = apply(params, batch_stats, x, key)
        loss, extra = task_loss(out, y, cfg.task)
        return loss, (new_vars, extra)

    def diag_loss(params, perturbations, batch_stats, x, y, key):
        lay = layout(params, batch_stats, x)
        if lay.cuts is not None:  # an adapted model: perturb every cut's output by interception
            mutable = ["batch_stats"] if batch_stats else []
            out, new_vars = perturbed_apply(
                model,
                lay.cuts,
                perturbations,
                model_variables(params, batch_stats),
                x,
                rngs={"dropout": key},
                mutable=mutable,
                **train_kw,
            )
        else:  # a gradflow stack: its blocks perturb and sow (flax `perturb`, `sow`)
            out, new_vars = apply(params, batch_stats, x, key, perturbations, sow=True)
        loss, extra = task_loss(out, y, cfg.task)
        return loss, (new_vars, extra)

    def zero_perturbations(params, batch_stats, x, key):
        # The perturbations' shapes for this input shape, traced once (an extra abstract apply).
        lay = layout(params, batch_stats, x)
        cache_key = ("perturbations", x.shape, x.dtype)
        if cache_key not in cache:
            if lay.cuts is not None:
                mutable = ["batch_stats"] if batch_stats else []
                cache[cache_key] = cut_shapes(
                    model,
                    lay.cuts,
                    model_variables(params, batch_stats),
                    x,
                    rngs={"dropout": key},
                    mutable=mutable,
                    **train_kw,
                )
            else:

                def create(params, batch_stats, x, key):
                    mutable = ["perturbations"] + (["batch_stats"] if batch_stats else [])
                    _, new = model.apply(
                        model_variables(params, batch_stats),
                        x,
                        rngs={"dropout": key},
                        mutable=mutable,
                        **train_kw,
                    )
                    return new.get("perturbations", {})

                cache[cache_key] = jax.eval_shape(create, params, batch_stats, x, key)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache[cache_key])

    def update(state, loss, grads, done):
        # Gated by the check that can be made before the optimizer runs (loss and gradients
        # finite, run not stopped): a scalar known up front, so XLA fuses these selects into
        # the update's own elementwise loops rather than a further pass over the state.
        ok = jnp.isfinite(loss) & dg.tree_finite(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        opt_state = _where(ok & ~done, opt_state, state.opt_state)
        return ok, updates, optax.apply_updates(state.params, updates), opt_state

    def plain_step(state, x, y, key, done):
        (loss, (new_vars, extra)), grads = jax.value_and_grad(plain_loss, has_aux=True)(
            state.params, state.batch_stats, x, y, key
        )
        ok, _, params, opt_state = update(state, loss, grads, done)
        out = (ok, loss, extra, grads, params, new_vars.get("batch_stats", state.batch_stats), opt_state)
        if k == 0:
            return out, {}
        return out, ly.blank_diagnostics(layout(state.params, state.batch_stats, x))

    def diag_step(state, x, y, key, done):
        lay = layout(state.params, state.batch_stats, x)
        perts = zero_perturbations(state.params, state.batch_stats, x, key)
        grad_fn = jax.value_and_grad(diag_loss, argnums=(0, 1), has_aux=True)
        (loss, (new_vars, extra)), (grads, pgrads) = grad_fn(
            state.params, perts, state.batch_stats, x, y, key
        )
        ok, updates, params, opt_state = update(state, loss, grads, done)
        preacts = _sown(lay, new_vars.get("intermediates", {}))
        if lay.cuts is not None:
            state_grads, preact_grads = [g[None] for g in pgrads], None
        else:
            state_grads = _perturbed(lay, pgrads, ly.STATE)
            preact_grads = _perturbed(lay, pgrads, ly.PREACT) if lay.preact else None
        diagnostics = dg.step_diagnostics(
            lay, state.params, grads, updates, state_grads, preact_grads, preacts, phi
        )
        out = (ok, loss, extra, grads, params, new_vars.get("batch_stats", state.batch_stats), opt_state)
        return out, diagnostics

    def locate(params, batch_stats, x, key, loss, grads, new_params):
        # Run only on a non-finite step: the forward is recomputed to see the pre-activations.
        lay = layout(params, batch_stats, x)
        out, new_vars = apply(params, batch_stats, x, key, sow=True)
        preacts = _sown(lay, new_vars.get("intermediates", {}))
        return dg.locate_nonfinite(lay, params, x, preacts, out, loss, grads, new_params)

    def no_nonfinite(*_):
        return jnp.int32(-1), jnp.int32(0)

    def train_step(state: TrainState, batch: Batch, done: ArrayLike = False) -> tuple[TrainState, Metrics]:
        x, y = batch
        key = jax.random.fold_in(state.key, state.step)
        if k == 0:
            path, recorded = plain_step, None
        elif k == 1:
            path, recorded = diag_step, jnp.asarray(True)
        else:
            recorded = (_shared(state.step, axis_name, lax.pmax) % k) == 0
            path = functools.partial(lax.cond, recorded, diag_step, plain_step)
        done = jnp.asarray(done, bool)
        (ok, loss, extra, grads, params, batch_stats, opt_state), diagnostics = path(state, x, y, key, done)
        finite = ok & dg.tree_finite(params)
        keep = finite & ~done
        new_state = TrainState(
            params=_where(keep, params, state.params),
            batch_stats=_where(keep, batch_stats, state.batch_stats),
            opt_state=opt_state,  # gated by the loss and gradient check inside `update`
            step=jnp.where(done, state.step, state.step + 1),
            key=state.key,
        )
        bad = _shared((~finite & ~done).astype(jnp.int32), axis_name, lax.psum) > 0
        ops = (state.params, state.batch_stats, x, key, loss, grads, params)
        layer, kind = lax.cond(bad, locate, no_nonfinite, *ops)
        metrics: Metrics = {
            "loss": loss,
            **extra,
            "step": state.step,
            "finite": finite,
            "skipped": ~finite,
            "nonfinite_layer": layer,
            "nonfinite_kind": kind,
        }
        if recorded is not None:
            metrics["recorded"] = recorded
            metrics.update(diagnostics)
        return new_state, metrics

    return train_step


def _where(pred: ArrayLike, on_true: Any, on_false: Any) -> Any:
    """`on_true` where the scalar `pred` holds, else `on_false`, leaf by leaf."""
    return jax.tree.map(lambda u, v: jnp.where(pred, u, v), on_true, on_false)


def _sown(lay: ly.Layout, intermediates: Any) -> list[jax.Array] | None:
    """The pre-activations sown by a stack's blocks, one (L_i, B, ..., W) per sown entry, or None."""
    if not lay.preact:
        return None
    return [_layered(intermediates[k][ly.PREACT][0], stacked) for k, stacked in lay.sown]


def _perturbed(lay: ly.Layout, grads: Any, name: str) -> list[jax.Array] | None:
    """The gradients of the blocks' perturbation `name`, one (L_i, B, ...) per sown entry, or None."""
    if not lay.sown:
        return None
    return [_layered(grads[k][name], stacked) for k, stacked in lay.sown]


def _layered(a: jax.Array, stacked: bool) -> jax.Array:
    """`a` with a leading layer axis (an unscanned block's array gets one of length 1)."""
    return a if stacked else a[None]
