"""The epoch loop every trainer shares: one epoch, and `cfg.epochs` of them as one `lax.scan`.

An epoch (`make_epoch`) is `make_train_epoch` (one `lax.scan` of `make_train_step` over the
epoch's batches), its summary (`summarize_epoch`) and, when test data are given, the test
metrics (`evaluate`). The single run (`gradflow.train.run`: one jitted epoch at a time, for its
records, checkpoints and Ctrl-C), the vmapped sweep (`gradflow.train.sweep`: `train_epochs`)
and fine-tuning after pretraining (`gradflow.pretrain.finetune`: `train_epochs`) all run it;
none of them imports another. Each epoch's batches come from
`epoch_batches(x, y, data_key, epoch, batch_size)`, a pure function of (key, epoch), so a
resumed or repeated run sees the same batches.
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

from gradflow.nn.chains import takes_train
from gradflow.train.layers import LAYER_DIAGNOSTICS
from gradflow.train.state import TrainConfig, TrainState
from gradflow.train.step import Batch, Metrics, make_train_step, model_variables, task_loss

Data = tuple[Any, Any, Any, Any]


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
        for name in (*LAYER_DIAGNOSTICS, "grad_norm_global"):
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
    out = model.apply(model_variables(state.params, state.batch_stats), jnp.asarray(x), **kw)
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


def make_epoch(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    cfg: TrainConfig,
    *,
    axis_name: str | None = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """One epoch of training from its batching to its summary (pure; jit it outside).

    Args:
      model, optimizer, cfg, axis_name: as for `make_train_step`.

    Returns:
      `epoch(state, (x_train, y_train, x_test, y_test), data_key, epoch, done) -> (state,
      summary)`: epoch `epoch`'s batches (`epoch_batches`) through `make_train_epoch`, then
      `summarize_epoch`'s entries, plus test_loss / test_accuracy when x_test is not None.
      `summary["done"]` is the next epoch's `done`.
    """
    epoch_fn = make_train_epoch(model, optimizer, cfg, axis_name=axis_name)

    def epoch(
        state: TrainState, data: Data, data_key: jax.Array, epoch: ArrayLike, done: ArrayLike
    ) -> tuple[TrainState, Metrics]:
        x, y, x_test, y_test = data
        state, metrics = epoch_fn(state, epoch_batches(x, y, data_key, epoch, cfg.batch_size), done)
        summary = summarize_epoch(metrics)
        if x_test is not None:
            test = evaluate(model, state, x_test, y_test, cfg)
            summary.update({f"test_{k}": v for k, v in test.items()})
        return state, summary

    return epoch


def train_epochs(
    model: nn.Module,
    tx: optax.GradientTransformation,
    cfg: TrainConfig,
    state: TrainState,
    data: Data,
    data_key: jax.Array,
    *,
    axis_name: str | None = None,
) -> tuple[TrainState, dict]:
    """`cfg.epochs` epochs of `make_epoch` from `state` as one `lax.scan` (pure; jit it outside).

    Returns the final state and `make_epoch`'s summaries with a leading epoch axis.
    """
    epoch_fn = make_epoch(model, tx, cfg, axis_name=axis_name)

    def body(carry, epoch):
        state, done = carry
        state, summary = epoch_fn(state, data, data_key, epoch, done)
        return (state, summary["done"]), summary

    (state, _), epochs = lax.scan(body, (state, jnp.asarray(False)), jnp.arange(cfg.epochs))
    return state, epochs
