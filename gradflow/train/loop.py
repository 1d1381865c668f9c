"""The epoch loop every trainer shares: `cfg.epochs` epochs of `make_train_epoch` as one `lax.scan`.

The single run (`gradflow.train.run`), the vmapped sweep (`gradflow.train.sweep`) and fine-tuning
after pretraining (`gradflow.pretrain.finetune`) all run this loop; none of them imports another.
Each epoch's batches come from `epoch_batches(x, y, data_key, epoch, batch_size)`, a pure function
of (key, epoch), so a resumed or repeated run sees the same batches; test metrics are computed
after every epoch when test data are given.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from gradflow.train.state import TrainConfig, TrainState
from gradflow.train.step import epoch_batches, evaluate, make_train_epoch, summarize_epoch

Data = tuple[Any, Any, Any, Any]


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
    """`cfg.epochs` epochs from `state` as one `lax.scan` (pure; jit it outside).

    Returns the final state and `summarize_epoch`'s entries with a leading epoch axis, plus
    test_loss / test_accuracy when test data are given.
    """
    x, y, x_test, y_test = data
    epoch_fn = make_train_epoch(model, tx, cfg, axis_name=axis_name)

    def body(carry, epoch):
        state, done = carry
        state, metrics = epoch_fn(state, epoch_batches(x, y, data_key, epoch, cfg.batch_size), done)
        summary = summarize_epoch(metrics)
        if x_test is not None:
            test = evaluate(model, state, x_test, y_test, cfg)
            summary.update({f"test_{k}": v for k, v in test.items()})
        return (state, summary["done"]), summary

    (state, _), epochs = lax.scan(body, (state, jnp.asarray(False)), jnp.arange(cfg.epochs))
    return state, epochs
