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
from gradflow.train.diagnostics import layout
from gradflow.train.hparams import Hparams, check_hparams, scale_kernels
from gradflow.train.loop import train_epochs
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


@dataclasses.dataclass
class SweepResult:
    """Results of `sweep`, run axis first.

    Attributes:
      hparams: the `Hparams` run, each (S,).
      params: final parameters, every leaf with a leading axis S.
      batch_stats: final BatchNorm statistics ({} without BatchNorm), leading axis S.
      epochs: per-epoch summaries, each (S, epochs, ...) (see `make_run`).
      layer_names: the layer order of `nonfinite_layer`.
      diagnostic_layers: the layers of the per-layer diagnostics' last axis.
      omitted: per-layer diagnostics not recorded for this model, name -> reason.
      num_devices: devices the sweep axis was sharded over (1: unsharded).
    """

    hparams: Hparams
    params: Any
    batch_stats: Any
    epochs: dict[str, np.ndarray]
    layer_names: list[str]
    diagnostic_layers: list[str]
    omitted: dict[str, str]
    num_devices: int

    def rows(self) -> list[dict]:
        """One row per run, the best first (`ranked_rows`)."""
        return ranked_rows(self.hparams, self.epochs)

    def _repr_html_(self) -> str:
        """In Jupyter: the runs best first (up to 16) and their epoch-1 per-layer gradient norms."""
        from gradflow import _html, plots

        rows = self.rows()
        head, cells = ranked_table(rows[:16], ("run", "seed", "lr", "weight_scale", "clip_value"))
        caption = f"sweep of {len(rows)} runs on {self.num_devices} device(s), best first" + (
            f" (the first 16 of {len(rows)})" if len(rows) > 16 else ""
        )
        out = _html.table(head, cells, caption)
        if "grad_norm" in self.epochs:
            curves = {
                f"run {r['run']}: lr={r['lr']:g} seed={r['seed']}": np.asarray(
                    self.epochs["grad_norm"][r["run"], 0]
                )
                for r in rows[:8]
            }
            fig = plots.grad_norm_profiles(curves, None, title="per-layer gradient norms, epoch 1 (best 8)")
            out += _html.figure(fig)
        return out

    def point(self, i: int) -> dict:
        """Run i's hparams, params, batch_stats and epochs (leading axis removed)."""
        take = lambda t: jax.tree.map(lambda a: a[i], t)  # noqa: E731
        return {
            "hparams": take(self.hparams),
            "params": take(self.params),
            "batch_stats": take(self.batch_stats),
            "epochs": take(self.epochs),
        }


def _given(v: object) -> float:
    """A float32 hyperparameter as the user wrote it (1e-4, not 9.999999747378752e-05): numpy's
    shortest float32 repr, read back as a Python float."""
    return float(str(np.float32(v)))


def ranked_rows(hp: Hparams, epochs: Mapping[str, Any]) -> list[dict]:
    """One row per run, the best first: its index in the sweep (the run axis of `epochs`),
    hparams as given, final-epoch loss and accuracies, the first/last-layer gradient ratio of
    epoch 1, and whether the run hit a NaN/Inf. Best: highest final test accuracy
    (classification: the records hold accuracies) or lowest final test loss; diverged runs last."""
    ep = {k: np.asarray(v) for k, v in epochs.items()}
    rows = []
    for i in range(len(hp.seed)):
        row = {
            "run": i,
            "seed": int(hp.seed[i]),
            "lr": _given(hp.lr[i]),
            "weight_scale": _given(hp.weight_scale[i]),
            "clip_value": _given(hp.clip_value[i]),
        }
        for k in ("loss", "accuracy", "test_loss", "test_accuracy"):
            if k in ep:
                row[k] = float(ep[k][i, -1])
        if "grad_norm" in ep:
            g = ep["grad_norm"][i, 0]
            row["grad_first_over_last"] = float(g[0] / g[-1]) if g[-1] > 0 else float("nan")
        row["diverged"] = bool(np.any(ep["nonfinite_step"][i] >= 0)) or not np.isfinite(row["loss"])
        rows.append(row)
    key = "test_accuracy" if "test_accuracy" in rows[0] else "test_loss"
    key = key if key in rows[0] else "loss"
    sign = -1.0 if key.endswith("accuracy") else 1.0

    def rank(r: dict) -> tuple:
        v = r[key]
        return (r["diverged"], not np.isfinite(v), sign * v if np.isfinite(v) else 0.0)

    rows.sort(key=rank)
    for j, r in enumerate(rows):
        r["best"] = j == 0 and not r["diverged"]
    return rows


def ranked_table(rows: Sequence[dict], given: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """`ranked_rows` as display cells (the CLI's table, a notebook's): the best run's mark, the
    `given` columns as written, the measured ones to 3 digits, ok / diverged."""
    measured = [
        c for c in ("loss", "accuracy", "test_loss", "test_accuracy", "grad_first_over_last") if c in rows[0]
    ]
    head = ["", *given, *measured, "status"]
    cells = [
        ["*" if r["best"] else "", *(f"{r[c]:g}" for c in given), *(f"{r[c]:.3g}" for c in measured)]
        + ["diverged" if r["diverged"] else "ok"]
        for r in rows
    ]
    return head, cells


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
