"""Many training runs in one compiled call: `jit(vmap(run))` over seeds and hyperparameters.

A run is a pure function `run(hparams, data) -> (state, per-epoch metrics)` (purejaxrl style):
initialization, then the epoch loop every trainer shares (`gradflow.train.loop.train_epochs`:
an outer `lax.scan` over epochs, per-epoch summaries and test metrics). What can vary inside
one vmapped call (`gradflow.train.hparams.Hparams`, one value per run) is numeric:

- seed: initialization, shuffling and dropout (`run_keys(seed)`, as `train` uses);
- lr: the peak learning rate, passed as `make_optimizer(cfg.optim, lr=lr)` (closure, not state);
- weight_scale: multiplies every kernel of the blocks after initialization (`scale_kernels`),
  so a model whose `kernel_init` has variance sigma_w^2 / fan_in runs at
  (weight_scale * sigma_w)^2 / fan_in;
- clip_value: the threshold of `cfg.optim.clip` ("value", "global_norm", "adaptive"), passed
  as `make_optimizer(cfg.optim, clip_value=...)` (ignored when `cfg.optim.clip` is None).

What changes the program (activation, depth, width, optimizer kind, task, epochs, batch size)
cannot be vmapped: `sweep_points` groups the points by structure (model equality and
`TrainConfig.structure()`, the config with seed, lr and clip_value blanked) and runs one vmapped
call per group. The compiled
call is cached per structure, so a second sweep of the same structure does not recompile.

Devices. With more than one device (`jax.devices()`, every process's after
`jax.distributed.initialize`), the run axis is sharded over `gradflow.distributed`'s 1-D batch
mesh, the data replicated, the runs padded to a multiple of the device count (the padding is
dropped from the results), each process supplying only its own devices' shards and every process
receiving all results. So the same call runs multi-host: start every process with
`gradflow.distributed.initialize()` before anything else touches jax, then call `sweep` with the
same arguments on every process.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gradflow import distributed
from gradflow.optim import make_optimizer
from gradflow.train.hparams import Hparams, check_hparams, scale_kernels
from gradflow.train.layers import layout
from gradflow.train.loop import train_epochs
from gradflow.train.results import SweepResult
from gradflow.train.state import TrainConfig, TrainState, check_data, init_state, init_variables, run_keys

Data = tuple[Any, Any, Any, Any]
_AXIS = "runs"  # the vmap axis of `sweep`


def make_run(
    model: nn.Module, cfg: TrainConfig, *, axis_name: str | None = None
) -> Callable[[Hparams, Data], tuple[TrainState, dict]]:
    """The whole training run as a pure function (vmap it over `Hparams`).

    Args:
      model: the linen module (fixed structure).
      cfg: the training config; seed, optim.lr and optim.clip_value come from the hparams.
      axis_name: the name of the `jax.vmap` axis over runs, if any (see `make_train_step`):
        with it, the recording steps and the non-finite locator stay real branches under vmap.

    Returns:
      `run(hparams, (x_train, y_train, x_test, y_test), variables=None) -> (state, epochs)` with
      scalar hparams; `epochs` holds `summarize_epoch`'s entries with a leading axis
      cfg.epochs, plus test_loss / test_accuracy when test data are given (not None).
      `variables` (a model's {"params", "batch_stats"}) replaces the initialization from the
      seed; the seed still draws the shuffles and dropout masks, and weight_scale applies.
    """

    def run(hp: Hparams, data: Data, variables: Any = None) -> tuple[TrainState, dict]:
        x, y, x_test, y_test = data
        init_key, data_key = run_keys(hp.seed)
        tx = make_optimizer(cfg.optim, lr=hp.lr, clip_value=hp.clip_value)
        state = init_state(model, tx, init_key, x[: cfg.batch_size], variables)
        lay = layout(model, {"params": state.params, "batch_stats": state.batch_stats}, x[: cfg.batch_size])
        params = scale_kernels(state.params, hp.weight_scale, lay)
        state = state._replace(params=params, opt_state=tx.init(params))
        return train_epochs(model, tx, cfg, state, data, data_key, axis_name=axis_name)

    return run


@functools.lru_cache(maxsize=16)
def _compiled_run(
    model: nn.Module, cfg: TrainConfig, devices: tuple | None, compiler_options: tuple = ()
) -> Callable:
    """The jitted `vmap(run)` of a structure; cached, so sweeps that differ only in their
    hparams (and the data, of the same shapes) compile once. `devices`: shard over them, or None;
    `compiler_options`: XLA options as sorted (name, value) pairs."""
    run = make_run(model, cfg, axis_name=_AXIS)

    def vrun(hp, data, variables):
        state, epochs = jax.vmap(run, in_axes=(0, None, None), axis_name=_AXIS)(hp, data, variables)
        return state.params, state.batch_stats, epochs

    options = dict(compiler_options) or None
    if devices is None:
        return jax.jit(vrun, compiler_options=options)
    sharding = NamedSharding(distributed.mesh(devices), P(distributed.AXIS))
    return jax.jit(vrun, out_shardings=sharding, compiler_options=options)


def sweep(
    model: nn.Module,
    cfg: TrainConfig,
    data: Data,
    hparams: Hparams,
    *,
    shard: bool | None = None,
    init_variables: Any = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Train S runs of one structure in one `jit(vmap(run))` call.

    Args:
      model: the linen module.
      cfg: the training config (seed, optim.lr, optim.clip_value are taken from `hparams`).
      data: (x_train (N, ...), y_train, x_test, y_test); the test pair may be (None, None).
      hparams: `Hparams` of arrays of shape (S,) (see `grid`).
      shard: shard the run axis over `jax.devices()`; None shards when there are several.
      init_variables: start every run from these variables ({"params": ..., optionally
        "batch_stats": ...}, no run axis: e.g. an LSUV-initialized or pretrained model, or an
        initialization shared with other measurements) instead of initializing from each
        run's seed; weight_scale still multiplies the blocks' kernels, and the seed still
        draws the shuffles and dropout masks.
      compiler_options: XLA compiler options of the compiled call (`jax.jit`'s), e.g.
        {"xla_backend_optimization_level": 1} for short runs whose time is mostly compilation.

    Returns:
      A `SweepResult`.
    """
    hp = Hparams(
        seed=np.asarray(hparams.seed, np.int32),
        lr=np.asarray(hparams.lr, np.float32),
        weight_scale=np.asarray(hparams.weight_scale, np.float32),
        clip_value=np.asarray(hparams.clip_value, np.float32),
    )
    S = hp.seed.shape[0]
    if any(np.shape(a) != (S,) for a in hp):
        raise ValueError(f"hparams fields must all have shape (S,), got {[np.shape(a) for a in hp]}")
    check_hparams(hparams, cfg)  # as given: a seed of 1.5 is refused, not cast to 1
    check_data(model, cfg, data)
    x, y, x_test, y_test = (None if a is None else np.asarray(a) for a in data)
    variables = None
    if init_variables is not None:
        if "params" not in init_variables:
            raise ValueError(f"init_variables needs a 'params' entry, got keys {list(init_variables)}")
        variables = {k: init_variables[k] for k in ("params", "batch_stats") if k in init_variables}
        _check_variables(model, variables, x[: cfg.batch_size])
    devices = jax.devices()
    if shard is None:
        shard = len(devices) > 1
    options = tuple(sorted((compiler_options or {}).items()))
    vrun = _compiled_run(model, cfg.structure(), tuple(devices) if shard else None, options)
    if shard:
        m = distributed.mesh(devices)
        hp_pad, _ = distributed.pad(hp, m.size)
        data_in = distributed.put((x, y, x_test, y_test), m, batched=False)
        outputs = vrun(
            distributed.put(hp_pad, m, batched=True), data_in, distributed.put(variables, m, batched=False)
        )
    else:
        data_in = tuple(None if a is None else jnp.asarray(a) for a in (x, y, x_test, y_test))
        outputs = vrun(Hparams(*(jnp.asarray(a) for a in hp)), data_in, variables)
    params, batch_stats, epochs = distributed.gather(outputs, S)
    lay = layout(model, jax.tree.map(lambda a: a[0], {"params": params, "batch_stats": batch_stats}), x[:1])
    return SweepResult(
        hparams=hp,
        params=params,
        batch_stats=batch_stats,
        epochs=epochs,
        layer_names=lay.names,
        diagnostic_layers=lay.layer_names,
        omitted=dict(lay.omitted),
        num_devices=len(devices) if shard else 1,
    )


def _check_variables(model: nn.Module, variables: dict, x: np.ndarray) -> None:
    """Raise a ValueError naming the first leaf of `variables` that `model.init` would not make."""
    want = jax.eval_shape(lambda: init_variables(model, jax.random.key(0), x))
    want = {k: want[k] for k in variables if k in want}
    got_leaves = jax.tree_util.tree_leaves_with_path(variables)
    want_leaves = jax.tree_util.tree_leaves_with_path(want)
    if [p for p, _ in got_leaves] != [p for p, _ in want_leaves]:
        raise ValueError(
            "init_variables do not have the model's structure: got "
            f"{[jax.tree_util.keystr(p) for p, _ in got_leaves][:6]}..., expected "
            f"{[jax.tree_util.keystr(p) for p, _ in want_leaves][:6]}..."
        )
    for (path, g), (_, w) in zip(got_leaves, want_leaves, strict=True):
        if np.shape(g) != w.shape:
            raise ValueError(
                f"init_variables{jax.tree_util.keystr(path)} has shape {np.shape(g)}, the model's is {w.shape}"
            )


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One run of `sweep_points`: a model, its config (seed, optim.lr, optim.clip_value vary
    freely within a group) and the blocks' kernel multiplier."""

    model: nn.Module
    cfg: TrainConfig
    weight_scale: float = 1.0


def sweep_points(points: Sequence[SweepPoint], data: Data, *, shard: bool | None = None) -> list[dict]:
    """Run arbitrary points: grouped by structure, one vmapped (and sharded) `sweep` per group.

    Args:
      points: the runs.
      data: as for `sweep`.
      shard: as for `sweep`.

    Returns:
      One dict per point, in order: `SweepResult.point(i)` plus "group" (the group index).
    """
    groups: list[tuple[SweepPoint, list[int]]] = []
    for i, p in enumerate(points):
        for head, members in groups:
            if head.model == p.model and head.cfg.structure() == p.cfg.structure():
                members.append(i)
                break
        else:
            groups.append((p, [i]))
    out: list[dict | None] = [None] * len(points)
    for g, (head, members) in enumerate(groups):
        hp = Hparams(
            seed=np.asarray([points[i].cfg.seed for i in members], np.int32),
            lr=np.asarray([points[i].cfg.optim.lr for i in members], np.float32),
            weight_scale=np.asarray([points[i].weight_scale for i in members], np.float32),
            clip_value=np.asarray([points[i].cfg.optim.clip_value for i in members], np.float32),
        )
        result = sweep(head.model, head.cfg, data, hp, shard=shard)
        for j, i in enumerate(members):
            out[i] = {**result.point(j), "group": g}
    return out  # type: ignore[return-value]
