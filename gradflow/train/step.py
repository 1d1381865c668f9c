"""The pure training step, the epoch as one `lax.scan`, evaluation and per-epoch batching.

`make_train_step(model, optimizer, cfg)` returns `train_step(state, batch) -> (state, metrics)`:
pure, jit it outside. One step is the hand-written flax + optax step (value_and_grad, optimizer
update, apply_updates, BatchNorm statistics through `mutable=["batch_stats"]`, dropout key
`fold_in(state.key, state.step)`) plus:

- a finiteness check of the loss, the gradients and the new parameters, every step; a step
  that fails it does not apply its update (parameters, BatchNorm statistics and optimizer
  state are kept; `step` still advances) and reports where the NaN/Inf first appeared
  (`gradflow.train.diagnostics.locate_nonfinite`, run only on such a step, under `lax.cond`);
- the per-layer diagnostics (`gradflow.train.diagnostics.step_diagnostics`) under
  `lax.cond(step % k == 0)`, NaN on the other steps (`recorded` says which). The gradient with
  respect to each block's pre-activation comes from the same backward pass, through flax's
  `perturb` ("perturbations" collection of zeros); the pre-activations from `sow`
  ("intermediates"). With `diagnostics_every=0` neither collection is used.

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

from gradflow.train import diagnostics as dg
from gradflow.train.state import TrainConfig, TrainState

Metrics = dict[str, jax.Array]
Batch = tuple[jax.Array, jax.Array]
LAYER_DIAGNOSTICS = (
    "grad_norm",
    "preact_grad_norm",
    "update_ratio",
    "weight_norm",
    "preact_mean",
    "preact_var",
    "saturated",
    "dead",
)


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


def make_train_step(
    model: nn.Module, optimizer: optax.GradientTransformation, cfg: TrainConfig
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure training step of `model` under `optimizer` (see the module docstring).

    Args:
      model: a linen module, `model.apply(variables, x, train=True)`.
      optimizer: an optax transformation (e.g. `make_optimizer(cfg.optim)`).
      cfg: the training config (`task`, `diagnostics_every`; `on_nonfinite` acts in the epoch).

    Returns:
      `train_step(state, (x_BxD, y_B)) -> (state, metrics)`; pure, jit it outside.
    """
    k = cfg.diagnostics_every
    diag = k > 0
    phi = dg.activation_fn(model)

    def loss_fn(params, perturbations, batch_stats, x, y, key):
        mutable = (["batch_stats"] if batch_stats else []) + (["intermediates"] if diag else [])
        out, new_vars = model.apply(
            _variables(params, batch_stats, perturbations),
            x,
            train=True,
            rngs={"dropout": key},
            mutable=mutable,
        )
        loss, extra = task_loss(out, y, cfg.task)
        return loss, (out, new_vars, extra)

    grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

    def zero_perturbations(params, batch_stats, x, key):
        def shapes(params, batch_stats, x, key):
            mutable = ["perturbations"] + (["batch_stats"] if batch_stats else [])
            _, new = model.apply(
                _variables(params, batch_stats), x, train=True, rngs={"dropout": key}, mutable=mutable
            )
            return new.get("perturbations", {})

        struct = jax.eval_shape(shapes, params, batch_stats, x, key)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), struct)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        x, y = batch
        key = jax.random.fold_in(state.key, state.step)
        perts = zero_perturbations(state.params, state.batch_stats, x, key) if diag else {}
        (loss, (out, new_vars, extra)), (grads, pgrads) = grad_fn(
            state.params, perts, state.batch_stats, x, y, key
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        batch_stats = new_vars.get("batch_stats", state.batch_stats)
        finite = jnp.isfinite(loss) & dg.tree_finite(grads) & dg.tree_finite(params)
        new_state = select_state(
            finite, TrainState(params, batch_stats, opt_state, state.step + 1, state.key), state
        )._replace(step=state.step + 1)
        preacts = _first_sown(new_vars.get("intermediates", {}))
        preact_grads = _leaf(pgrads)

        def locate(_):
            return dg.locate_nonfinite(state.params, x, preacts, out, loss, grads, params)

        def all_finite(_):
            return jnp.int32(-1), jnp.int32(0)

        layer, kind = lax.cond(finite, all_finite, locate, None)
        metrics: Metrics = {
            "loss": loss,
            **extra,
            "step": state.step,
            "finite": finite,
            "skipped": ~finite,
            "nonfinite_layer": layer,
            "nonfinite_kind": kind,
        }
        if diag:

            def record(_):
                return dg.step_diagnostics(state.params, grads, updates, preact_grads, preacts, phi)

            def blank(_):
                return dg.blank_diagnostics(dg.num_layers(state.params))

            recorded = (state.step % k) == 0
            metrics["recorded"] = recorded
            metrics.update(lax.cond(recorded, record, blank, None))
        return new_state, metrics

    return train_step


def select_state(pred: ArrayLike, on_true: TrainState, on_false: TrainState) -> TrainState:
    """`on_true` where the scalar `pred` holds, else `on_false`, leaf by leaf (the key is shared)."""
    pick = lambda a, b: jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)  # noqa: E731
    return TrainState(
        params=pick(on_true.params, on_false.params),
        batch_stats=pick(on_true.batch_stats, on_false.batch_stats),
        opt_state=pick(on_true.opt_state, on_false.opt_state),
        step=jnp.where(pred, on_true.step, on_false.step),
        key=on_true.key,
    )


def _first_sown(intermediates: Any) -> jax.Array | None:
    """The sown pre-activations (L, B, ..., W) of a stack's blocks, or None."""
    try:
        return intermediates["blocks"]["preact"][0]
    except (KeyError, TypeError, IndexError):
        return None


def _leaf(tree: Any) -> jax.Array | None:
    """The perturbation gradient of the blocks' pre-activations, or None."""
    try:
        return tree["blocks"]["preact"]
    except (KeyError, TypeError):
        return None


def make_train_epoch(
    model: nn.Module, optimizer: optax.GradientTransformation, cfg: TrainConfig
) -> Callable[..., tuple[TrainState, Metrics]]:
    """One epoch as one `lax.scan` of `make_train_step` over stacked batches.

    With `cfg.on_nonfinite == "stop"` the scan carries a `done` flag, set at the first
    non-finite step; later steps are no-ops (`lax.cond`; their metrics have active=False).

    Args:
      model, optimizer, cfg: as for `make_train_step`.

    Returns:
      `train_epoch(state, (x_NxBxD, y_NxB), done=False) -> (state, metrics)`, N the number of
      batches; every metric gains a leading axis N, plus `active` (the step ran) and `done`
      (the run is stopped after this step). Pass `metrics["done"][-1]` as the next epoch's
      `done`. Pure; jit it outside.
    """
    step_fn = make_train_step(model, optimizer, cfg)
    stop = cfg.on_nonfinite == "stop"

    def train_epoch(state: TrainState, batches: Batch, done: ArrayLike = False) -> tuple[TrainState, Metrics]:
        def body(carry, batch):
            state, done = carry
            new_state, m = step_fn(state, batch)
            # A step after the stop runs but is discarded (a select, cheaper to compile than a cond).
            state = select_state(done, state, new_state)
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
        for name in (*LAYER_DIAGNOSTICS, "grad_norm_global"):
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
    out = model.apply(_variables(state.params, state.batch_stats), jnp.asarray(x), train=False)
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
