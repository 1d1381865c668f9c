"""The pure training step, the epoch as one `lax.scan`, evaluation and per-epoch batching.

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
from gradflow.train.state import TrainConfig, TrainState

Metrics = dict[str, jax.Array]
Batch = tuple[jax.Array, jax.Array]
LAYER_DIAGNOSTICS = dg.LAYER_DIAGNOSTICS


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


def _variables(params: Any, batch_stats: Any, perturbations: Any = None) -> dict:
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
    phi = dg.activation_fn(model)
    cache: dict = {}
    train_kw = {"train": True} if takes_train(model) else {}

    def layout(params, batch_stats, x) -> dg.Layout:
        # The model's layers, asked of its chain once per input shape (structure only).
        key = ("layout", x.shape, x.dtype)
        if key not in cache:
            cache[key] = dg.layout(model, _variables(params, batch_stats), x)
        return cache[key]

    def apply(params, batch_stats, x, key, perturbations=None, sow=False):
        mutable = (["batch_stats"] if batch_stats else []) + (["intermediates"] if sow else [])
        variables = _variables(params, batch_stats, perturbations)
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
                _variables(params, batch_stats),
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
                    _variables(params, batch_stats),
                    x,
                    rngs={"dropout": key},
                    mutable=mutable,
                    **train_kw,
                )
            else:

                def create(params, batch_stats, x, key):
                    mutable = ["perturbations"] + (["batch_stats"] if batch_stats else [])
                    _, new = model.apply(
                        _variables(params, batch_stats), x, rngs={"dropout": key}, mutable=mutable, **train_kw
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
        return out, dg.blank_diagnostics(layout(state.params, state.batch_stats, x))

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
            state_grads = _perturbed(lay, pgrads, dg.STATE)
            preact_grads = _perturbed(lay, pgrads, dg.PREACT) if lay.preact else None
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


def _sown(lay: dg.Layout, intermediates: Any) -> list[jax.Array] | None:
    """The pre-activations sown by a stack's blocks, one (L_i, B, ..., W) per sown entry, or None."""
    if not lay.preact:
        return None
    return [_layered(intermediates[k][dg.PREACT][0], stacked) for k, stacked in lay.sown]


def _perturbed(lay: dg.Layout, grads: Any, name: str) -> list[jax.Array] | None:
    """The gradients of the blocks' perturbation `name`, one (L_i, B, ...) per sown entry, or None."""
    if not lay.sown:
        return None
    return [_layered(grads[k][name], stacked) for k, stacked in lay.sown]


def _layered(a: jax.Array, stacked: bool) -> jax.Array:
    """`a` with a leading layer axis (an unscanned block's array gets one of length 1)."""
    return a if stacked else a[None]


def make_train_epoch(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    cfg: TrainConfig,
    *,
    axis_name: str | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """One epoch as one `lax.scan` of `make_train_step` over stacked batches.

    With `cfg.on_nonfinite == "stop"` the scan carries a `done` flag, set at the first
    non-finite step; later steps are no-ops (their metrics have active=False).

    Args:
      model, optimizer, cfg, axis_name: as for `make_train_step`.

    Returns:
      `train_epoch(state, (x_NxBxD, y_NxB), done=False) -> (state, metrics)`, N the number of
      batches; every metric gains a leading axis N, plus `active` (the step ran) and `done`
      (the run is stopped after this step). Pass `metrics["done"][-1]` as the next epoch's
      `done`. Pure; jit it outside.
    """
    step_fn = make_train_step(model, optimizer, cfg, axis_name=axis_name)
    stop = cfg.on_nonfinite == "stop"

    def train_epoch(state: TrainState, batches: Batch, done: ArrayLike = False) -> tuple[TrainState, Metrics]:
        def body(carry, batch):
            state, done = carry
            state, m = step_fn(state, batch, done)
            new_done = (done | ~m["finite"]) if stop else done
            return (state, new_done), {**m, "active": ~done, "done": new_done}

        (state, _), metrics = lax.scan(body, (state, jnp.asarray(done, bool)), batches)
        return state, metrics

    return train_epoch


def summarize_epoch(metrics: Metrics) -> Metrics:
    """Per-epoch summary of the stacked step metrics of `make_train_epoch`; pure, vmappable.

    Args:
      metrics: step metrics with leading axis N (steps of the epoch).

    Returns:
      loss, accuracy (classification): means over the active finite steps; steps (active
      steps); skipped (active non-finite steps); done; nonfinite_step, nonfinite_layer,
      nonfinite_kind of the first non-finite step (-1 / 0 if none); and for each per-layer
      diagnostic its mean over the recorded finite steps, shape (L,) (NaN if none).
    """
    active = metrics["active"]
    ok = active & metrics["finite"]
    bad = active & ~metrics["finite"]

    def mean_over(mask, v):
        m = jnp.reshape(mask, mask.shape + (1,) * (v.ndim - 1))
        count = jnp.sum(mask)
        total = jnp.sum(jnp.where(m, v, 0), axis=0)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), jnp.nan)

    first = jnp.argmax(bad)
    has_bad = jnp.any(bad)
    out = {
        "loss": mean_over(ok, metrics["loss"]),
        "steps": jnp.sum(active).astype(jnp.int32),
        "skipped": jnp.sum(bad).astype(jnp.int32),
        "done": metrics["done"][-1],
        "nonfinite_step": jnp.where(has_bad, metrics["step"][first], -1).astype(jnp.int32),
        "nonfinite_layer": jnp.where(has_bad, metrics["nonfinite_layer"][first], -1).astype(jnp.int32),
        "nonfinite_kind": jnp.where(has_bad, metrics["nonfinite_kind"][first], 0).astype(jnp.int32),
    }
    if "accuracy" in metrics:
        out["accuracy"] = mean_over(ok, metrics["accuracy"])
    if "recorded" in metrics:
        rec = ok & metrics["recorded"]
        for name in (*dg.LAYER_DIAGNOSTICS, "grad_norm_global"):
            if name in metrics:
                out[name] = mean_over(rec, metrics[name])
    return out


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def evaluate(model: nn.Module, state: TrainState, x: ArrayLike, y: ArrayLike, cfg: TrainConfig) -> Metrics:
    """Loss (and accuracy for classification) in evaluation mode (no dropout; BatchNorm's
    running statistics), on the whole of x at once.

    Args:
      model: the linen module (static; hashed).
      state: the train state.
      x: inputs, shape (N, ...).
      y: labels (N,) or targets.
      cfg: the training config (static; `task`).

    Returns:
      {"loss": (), "accuracy": ()} (accuracy for classification only).
    """
    kw = {"train": False} if takes_train(model) else {}
    out = model.apply(_variables(state.params, state.batch_stats), jnp.asarray(x), **kw)
    loss, extra = task_loss(out, jnp.asarray(y), cfg.task)
    return {"loss": loss, **extra}


@functools.partial(jax.jit, static_argnames=("batch_size",))
def epoch_batches(
    x: ArrayLike, y: ArrayLike, data_key: jax.Array, epoch: ArrayLike, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """Epoch `epoch`'s batches: a permutation drawn from `fold_in(data_key, epoch)`, remainder dropped.

    A pure function of (data_key, epoch), so a resumed run sees the same batches.

    Args:
      x: inputs (N, ...); y: labels or targets (N, ...).
      data_key: the run's data key (`run_keys(seed)[1]`).
      epoch: epoch index (int or int32 tracer).
      batch_size: examples per batch (static).

    Returns:
      (x_NbxBx..., y_NbxB...), Nb = N // batch_size.
    """
    x, y = jnp.asarray(x), jnp.asarray(y)
    n = x.shape[0]
    nb = n // batch_size
    perm = jax.random.permutation(jax.random.fold_in(data_key, epoch), n)[: nb * batch_size]
    xb = jnp.take(x, perm, axis=0).reshape((nb, batch_size) + x.shape[1:])
    yb = jnp.take(y, perm, axis=0).reshape((nb, batch_size) + y.shape[1:])
    return xb, yb
