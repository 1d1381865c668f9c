"""The run loop: epochs of the jitted scan, records on disk as they happen, exact resume.

`fit(model, cfg, data, run_dir=...)` writes under `run_dir`:

- `config.json`: the run's identity: the `TrainConfig`, the model's fields, a hash of the
  initial variables (the initializers and seed) and a fingerprint of the data (shapes, dtypes,
  SHA-256), written once; a resumed run must have the same, else a ValueError naming what
  differs (`gradflow.store.RunStore`);
- `metrics.jsonl`: one JSON line per epoch (append-only, flushed and fsync'ed at once): the
  epoch summary (`gradflow.train.loop.summarize_epoch`: loss, accuracy, per-layer diagnostics
  as lists, skipped steps, the first non-finite step and its layer), the test metrics and the
  wall time;
- `checkpoints/<epoch>/`: an orbax checkpoint of the `TrainState` (plus the stop flag) at the
  end of each epoch, the last two kept; written after the epoch's metrics line.

Resume: with `resume=True` (default) and a checkpoint in `run_dir`, the run restores the
latest one, drops the metrics lines of later epochs (an epoch whose checkpoint never landed is
redone) and goes on. Batches are a pure function of (seed, epoch) (`epoch_batches`) and
dropout keys of (seed, step), so the resumed run computes exactly what the uninterrupted run
computes: same final parameters, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gradflow._interrupt import deferred_interrupt
from gradflow.optim import make_optimizer
from gradflow.store import RunStore, fingerprint
from gradflow.train.diagnostics import NONFINITE_KINDS
from gradflow.train.layers import layout
from gradflow.train.loop import evaluate, make_epoch
from gradflow.train.results import TrainResult, grad_ratio
from gradflow.train.state import TrainConfig, TrainState, check_data, init_state, run_keys

Data = tuple[Any, Any, Any, Any]


def _jsonable(v: Any) -> Any:
    a = np.asarray(v)
    if a.ndim == 0:
        return a.item()
    return a.tolist()


def _model_dict(model: nn.Module) -> dict:
    skip = {"parent", "name"}
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in skip}
    plain = lambda v: v if isinstance(v, str | int | float | bool) or v is None else repr(v)  # noqa: E731
    out = {k: re.sub(r" at 0x[0-9a-fA-F]+", "", str(plain(v))) for k, v in fields.items()}
    return {"type": type(model).__name__, **out}


class _Store:
    """A run directory: config.json and metrics.jsonl (`gradflow.store.RunStore`, shared with
    the atlas) and the orbax checkpoints of the `TrainState`."""

    def __init__(self, run_dir: Path, config: dict, resume: bool):
        clear = ("checkpoints", "corrupt-checkpoints")
        self.runs = RunStore(run_dir, config, on_mismatch="error", fresh=not resume, clear=clear)
        self.manager = self._manager()

    def _manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True, enable_async_checkpointing=False)
        return ocp.CheckpointManager((self.runs.dir / "checkpoints").absolute(), options=options)

    @staticmethod
    def _tree(state: TrainState, done: Any) -> dict:
        state = state._replace(key=jax.random.key_data(state.key))
        leaves = jax.tree_util.tree_leaves(state)
        return {"leaves": {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}, "done": jnp.asarray(done)}

    def save(self, epoch: int, state: TrainState, done: bool) -> None:
        self.manager.save(epoch, args=ocp.args.StandardSave(self._tree(state, done)))
        self.manager.wait_until_finished()

    def restore(self, template: TrainState) -> tuple[TrainState, bool, int, list[dict]] | None:
        target = self._tree(template, False)
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), target)
        restored = None
        for epoch in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(epoch, args=ocp.args.StandardRestore(abstract))
                break
            except Exception as e:  # a truncated or half-deleted checkpoint: set it aside, go back one
                aside = self.runs.dir / "corrupt-checkpoints" / str(epoch)
                aside.parent.mkdir(exist_ok=True)
                self.manager.close()
                shutil.rmtree(aside, ignore_errors=True)
                shutil.move(str(self.runs.dir / "checkpoints" / str(epoch)), str(aside))
                self.manager = self._manager()
                warnings.warn(
                    f"checkpoint of epoch {epoch} in {self.runs.dir} is unreadable ({type(e).__name__}); "
                    f"moved to {aside}, resuming from an earlier one",
                    stacklevel=3,
                )
        if restored is None:  # nothing finished: records of epochs without a checkpoint are redone
            self.runs.rewrite("metrics", [])
            return None
        raw = template._replace(key=jax.random.key_data(template.key))
        treedef = jax.tree_util.tree_structure(raw)
        leaves = [restored["leaves"][k] for k in sorted(restored["leaves"])]
        state = jax.tree_util.tree_unflatten(treedef, leaves)
        state = state._replace(
            key=jax.random.wrap_key_data(state.key, impl=jax.random.key_impl(template.key))
        )
        # an epoch whose checkpoint never landed is redone: its record goes
        history = [r for r in self.runs.records("metrics") if r["epoch"] <= epoch]
        self.runs.rewrite("metrics", history)
        return state, bool(restored["done"]), int(epoch), history

    def append(self, record: dict) -> None:
        self.runs.append("metrics", record)

    def close(self) -> None:
        self.manager.close()
        self.runs.close()


def _record(epoch: int, summary: dict, names: list[str], seconds: float) -> dict:
    rec: dict[str, Any] = {"epoch": epoch}
    rec.update({k: _jsonable(v) for k, v in summary.items() if not k.startswith("test_")})
    layer = rec["nonfinite_layer"]
    rec["nonfinite_layer_name"] = names[layer] if layer >= 0 else None
    rec["nonfinite_kind"] = NONFINITE_KINDS[rec["nonfinite_kind"]]
    rec.update({k: _jsonable(v) for k, v in summary.items() if k.startswith("test_")})
    rec["seconds"] = seconds
    return rec


def _health(rec: dict) -> str:
    ratio = grad_ratio(rec)
    return "" if ratio is None else f" | grad first/last {ratio:.2e}"


class _Progress:
    def __init__(self, enabled: bool, total: int, start: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("epoch"),
                MofNCompleteColumn(),
                BarColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
            )
            self.bar.start()
            self.task = self.bar.add_task("", total=total, completed=start)

    def update(self, rec: dict) -> None:
        if self.bar is not None:
            text = f"loss {rec['loss']:.4g}{_health(rec)}"
            if rec["skipped"]:
                text += f" | skipped {rec['skipped']}"
            self.bar.update(self.task, advance=1, description=text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


@functools.partial(jax.jit, static_argnames=("model", "cfg"))
def _run_epoch(
    state: TrainState,
    data: Data,
    data_key: jax.Array,
    epoch: Any,
    done: Any,
    lr: Any,
    clip_value: Any,
    *,
    model: nn.Module,
    cfg: TrainConfig,
):
    # Cached on (model, cfg.structure(one_epoch=True)): lr and clip_value are arguments, seed
    # and epochs unused here, so runs that differ only in those share one compiled epoch.
    tx = make_optimizer(cfg.optim, lr=lr, clip_value=clip_value)
    return make_epoch(model, tx, cfg)(state, data, data_key, epoch, done)


def fit(
    model: nn.Module,
    cfg: TrainConfig,
    data: Data,
    *,
    run_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool | None = None,
    callback: Callable[[int, dict], None] | None = None,
    tensorboard: bool = False,
) -> TrainResult:
    """Train `model` for `cfg.epochs` epochs (one jitted `lax.scan` per epoch).

    Args:
      model: a linen module, `model.apply(variables, x, train=...)`.
      cfg: the training config (optimizer in `cfg.optim`).
      data: (x_train (N, ...), y_train (N, ...), x_test, y_test), numpy or jax arrays; the test
        pair may be (None, None).
      run_dir: where to write config.json, metrics.jsonl and checkpoints; None writes nothing.
      resume: continue from the latest checkpoint in `run_dir` if there is one; False starts
        over, deleting the previous records.
      progress: rich progress bar (loss, first/last-layer gradient-norm ratio); None shows it
        only when stdout is a terminal.
      callback: called as callback(epoch, record) after each epoch's record and checkpoint are
        on disk (e.g. to stop a run from outside).
      tensorboard: also write each record as TensorBoard events under `run_dir/tensorboard`
        (`gradflow.train.tensorboard`; needs `run_dir` and tensorboardX).

    A first Ctrl-C (SIGINT, main thread) does not raise: the epoch in flight finishes, is
    recorded and checkpointed, and `fit` returns with `interrupted=True` (a loop over runs
    should check it); a second Ctrl-C raises KeyboardInterrupt at once.

    Returns:
      A `TrainResult`.
    """
    check_data(model, cfg, data)
    if tensorboard and run_dir is None:
        raise ValueError("tensorboard=True writes under run_dir: give a run_dir")
    if tensorboard:
        from gradflow.train.tensorboard import _summary_writer

        _summary_writer()  # a missing tensorboardX is named before anything is written or trained
    x_train, y_train, x_test, y_test = data
    x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
    # lr and clip_value enter as arguments (traced), as in a sweep run.
    lr, clip_value = jnp.float32(cfg.optim.lr), jnp.float32(cfg.optim.clip_value)
    tx = make_optimizer(cfg.optim, lr=lr, clip_value=clip_value)
    init_key, data_key = run_keys(cfg.seed)
    state = init_state(model, tx, init_key, x_train[: cfg.batch_size])
    lay = layout(model, {"params": state.params, "batch_stats": state.batch_stats}, x_train[: cfg.batch_size])
    names = lay.names
    static = cfg.structure(one_epoch=True)
    epoch_fn = functools.partial(_run_epoch, lr=lr, clip_value=clip_value, model=model, cfg=static)
    has_test = x_test is not None
    x_test = jnp.asarray(x_test) if has_test else None
    y_test = jnp.asarray(y_test) if has_test else None
    arrays = (x_train, y_train, x_test, y_test)

    history: list[dict] = []
    start, done = 0, False
    store = None
    if run_dir is not None:
        # the run's identity: everything that changes its result. The initial variables stand
        # for the model's initializers (whose callables have no portable name) and the seed.
        config = {
            "train": cfg.to_dict(),
            "model": _model_dict(model),
            "init": fingerprint({"params": state.params, "batch_stats": state.batch_stats})["sha256"],
            "data": fingerprint([x_train, y_train, x_test, y_test]),
            "layers": list(lay.layer_names),  # the names of the records' per-layer entries
        }
        store = _Store(Path(run_dir), config, resume)
        restored = store.restore(state) if resume else None
        if restored is not None:
            state, done, last, history = restored
            start = last + 1
    events = None
    if tensorboard:
        from gradflow.train.tensorboard import EventWriter

        events = EventWriter(run_dir, lay.layer_names, history)  # rewritten from the records kept
    if progress is None:
        progress = sys.stdout.isatty()
    bar = _Progress(progress, cfg.epochs, start)
    # Ctrl-C stops at the next epoch boundary, after that epoch's record and checkpoint (one
    # epoch is one compiled scan, so it cannot stop between steps); a second one stops at once.
    with deferred_interrupt() as stop:
        try:
            for epoch in range(start, cfg.epochs):
                if done:
                    break
                if stop.requested:
                    break
                t0 = time.perf_counter()
                state, summary = epoch_fn(state, arrays, data_key, epoch, done)
                summary = jax.device_get(summary)
                done = bool(summary["done"])
                rec = _record(epoch, summary, names, time.perf_counter() - t0)
                history.append(rec)
                if store is not None:
                    store.append(rec)
                    store.save(epoch, state, done)
                if events is not None:
                    events.write(rec)
                bar.update(rec)
                if callback is not None:
                    callback(epoch, rec)
        finally:
            bar.close()
            if events is not None:
                events.close()
            if store is not None:
                store.close()
    interrupted = stop.requested and not done and (not history or history[-1]["epoch"] < cfg.epochs - 1)

    nonfinite = None
    for rec in history:
        if rec["nonfinite_step"] >= 0:
            nonfinite = {
                "epoch": rec["epoch"],
                "step": rec["nonfinite_step"],
                "layer": rec["nonfinite_layer"],
                "layer_name": rec["nonfinite_layer_name"],
                "kind": rec["nonfinite_kind"],
            }
            break
    test = {}
    if has_test:
        test = {
            k: float(v) for k, v in jax.device_get(evaluate(model, state, x_test, y_test, static)).items()
        }
    return TrainResult(
        state=state,
        history=history,
        test=test,
        stopped=done,
        nonfinite=nonfinite,
        layer_names=names,
        diagnostic_layers=lay.layer_names,
        omitted=dict(lay.omitted),
        run_dir=Path(run_dir) if run_dir is not None else None,
        interrupted=interrupted,
    )
