"""The commands that compute: `gradflow spectra`, `gradflow train` and `gradflow sweep`, with
what they write and print (the sweep's ranked table and its CSV).

Each `run_<name>(cmd) -> int` takes its parsed dataclass (`gradflow.cli.config`) and returns the
exit code; a bad value raises ValueError, which `gradflow.cli.app.main` prints as exit code 2.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

from gradflow.cli.config import INPUTS, Spectra, Sweep, Train
from gradflow.cli.inputs import _dataset, _examples, _user_input, _writable, load_model
from gradflow.train.state import TrainConfig

_SWEEP_FILES = ("results.json", "results.csv", "epochs.npz", "grad_norms.png")  # of a finished sweep


def _user_spectra(cmd: Spectra):
    import flax.linen as nn
    import jax

    from gradflow import spectra

    model = load_model(cmd.user_model)
    shape = _user_input(cmd)
    key = jax.random.key(cmd.seed)
    x = jax.random.normal(jax.random.fold_in(key, 1), shape)
    variables = model.init(key, x) if isinstance(model, nn.Module) else None
    return spectra.model_spectra(
        model,
        variables,
        x,
        layers=cmd.layers,
        depths=cmd.depths,
        method=cmd.method,
        k=cmd.k,
        direction=cmd.direction,
    ), {"user_model": cmd.user_model, "input_shape": list(shape)}


def run_spectra(cmd: Spectra) -> int:
    import jax
    import numpy as np

    from gradflow import data, spectra

    _writable(cmd.out)

    for name, value, allowed in (
        ("method", cmd.method, spectra.METHODS),
        ("direction", cmd.direction, ("forward", "backward")),
        ("input", cmd.input, INPUTS),
    ):
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not one of {allowed}")
    if cmd.user_model is not None:
        res, described = _user_spectra(cmd)
    else:
        model = cmd.model.build()
        key = jax.random.key(cmd.seed)
        recurrent = cmd.model.recurrent
        if cmd.input == "mnist1d":
            x = np.asarray(data.mnist1d(seed=cmd.seed, num_samples=100).x_train[:1])
        elif cmd.input == "digits":
            x = np.asarray(data.digits(seed=cmd.seed).x_train[:1])
        else:
            x = np.asarray(jax.random.normal(key, (1, 40)))
        if recurrent:  # the 40 samples of the signal as a sequence, tiled to seq_len steps
            x = np.resize(x[0], cmd.model.seq_len)[None, :, None]
        else:
            x = _examples(cmd.model, x, cmd.input)
        variables = model.init(key, x)
        res = spectra.model_spectra(
            model, variables, x[0], depths=cmd.depths, method=cmd.method, k=cmd.k, direction=cmd.direction
        )
        described = dataclasses.asdict(cmd.model)
    out = pathlib.Path(cmd.out)
    out.mkdir(parents=True, exist_ok=True)
    res.save(out / "spectra.npz")
    res.plot(out / "spectra.png")
    summary = {k: np.asarray(v).tolist() for k, v in res.summary().items()}
    (out / "summary.json").write_text(
        json.dumps(
            {"model": described, "layers": list(res.layers), "method": res.method, **summary}, indent=2
        )
    )
    print(res.table())
    if res.method == "topk" and cmd.method == "auto":
        print(
            f"states of {int(res.widths.max())} values: the {res.log_singular_values.shape[1]} largest singular values (topk)"
        )
    print(f"wrote {out / 'spectra.npz'}, {out / 'spectra.png'}, {out / 'summary.json'}")
    return 0


def run_train(cmd: Train) -> int:
    import numpy as np

    from gradflow import plots, train
    from gradflow._checks import check_choice

    check_choice("--log", cmd.log, (None, "tensorboard"))
    _writable(cmd.out)
    ds, task = _dataset(cmd.dataset, cmd.num_samples, cmd.model, cmd.train.seed)
    if cmd.user_model is not None:
        model, shape = load_model(cmd.user_model), _user_input(cmd)
        n = int(np.prod(ds.x_train.shape[1:]))
        if int(np.prod(shape)) != n:
            raise ValueError(
                f"--input-shape {shape} has {int(np.prod(shape))} entries; a {cmd.dataset} example has {n}"
            )
        reshape = lambda a: a.reshape((a.shape[0], *shape))  # noqa: E731
        ds = dataclasses.replace(ds, x_train=reshape(ds.x_train), x_test=reshape(ds.x_test))
    else:
        model = dataclasses.replace(
            cmd.model, num_outputs=1 if task == "regression" else ds.num_classes
        ).build()
    cfg = dataclasses.replace(cmd.train, task=task)
    result = train.fit(
        model,
        cfg,
        (ds.x_train, ds.y_train, ds.x_test, ds.y_test),
        run_dir=cmd.out,
        resume=cmd.resume,
        tensorboard=cmd.log == "tensorboard",
    )
    plots.train_run_figures(result.history, cmd.out, result.diagnostic_layers)
    if result.interrupted:
        last = result.history[-1]["epoch"] if result.history else -1
        print(
            f"interrupted: epochs 0..{last} are recorded and checkpointed in {cmd.out}; "
            "run the same command again to resume from there",
            file=sys.stderr,
        )
        return 130
    print(json.dumps({"test": result.test, "stopped": result.stopped, "nonfinite": result.nonfinite}))
    return 1 if result.stopped else 0


# the TrainConfig fields that a sweep's grid gives per run, and the flag that gives them
_GRID_FIELDS = (
    ("lr", "--train.optim.lr", "learning rates", "--lr"),
    ("clip_value", "--train.optim.clip-value", "clipping thresholds", "--clip-value"),
)


def _refuse_unread(cmd: Sweep) -> None:
    """Refuse a --train.optim.lr or --train.optim.clip-value other than its default: the sweep's
    grid (--lr, --clip-value) replaces them, so they would be silently ignored. (--train.seed is
    read: it seeds the data.)"""
    default = Sweep.train.optim
    for field, flag, what, instead in _GRID_FIELDS:
        value = getattr(cmd.train.optim, field)
        if value != getattr(default, field):
            raise ValueError(f"{flag} {value:g} is not read by a sweep; give the {what} with {instead}")


def run_sweep(cmd: Sweep) -> int:
    import jax
    import numpy as np

    from gradflow import distributed, plots, store, train
    from gradflow._interrupt import deferred_interrupt
    from gradflow.train.hparams import check_hparams
    from gradflow.train.results import ranked_rows

    _refuse_unread(cmd)
    if cmd.runs_per_call is not None and cmd.runs_per_call < 1:
        raise ValueError(f"--runs-per-call must be >= 1, got {cmd.runs_per_call}")
    _writable(cmd.out)
    ds, task = _dataset(cmd.dataset, cmd.num_samples, cmd.model, cmd.train.seed)
    model = dataclasses.replace(cmd.model, num_outputs=1 if task == "regression" else ds.num_classes).build()
    cfg = dataclasses.replace(cmd.train, task=task)
    hp = train.grid(cfg, seeds=cmd.seeds, lr=cmd.lr, weight_scale=cmd.weight_scale, clip_value=cmd.clip_value)
    S = len(hp.seed)
    per_call = min(cmd.runs_per_call or S, S)
    calls = [(i, min(i + per_call, S)) for i in range(0, S, per_call)]
    check_hparams(hp, cfg)  # the whole grid, before the first call trains
    arrays = (ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    config = {k: v for k, v in dataclasses.asdict(cmd).items() if k not in ("out", "fresh", "hosts")}
    config = {"command": "sweep", **config, "data": store.fingerprint(arrays)}
    runs = distributed.writer_store(
        cmd.out, config, "calls", on_mismatch="error", fresh=cmd.fresh, clear=_SWEEP_FILES
    )
    done = {r["call"] for r in runs.done}
    if done and distributed.is_writer():  # a rerun says what it skips (once, not per process)
        rest = len(calls) - len(done)
        print(
            f"{len(done)} of {len(calls)} calls already in {cmd.out}: "
            + (f"training the other {rest}" if rest else "nothing to train")
        )

    t0, trained_calls = time.perf_counter(), []
    # Ctrl-C stops after the call in flight, which is kept (one call is one compiled program);
    # process 0's Ctrl-C decides for every process, so that all stop after the same call
    with deferred_interrupt() as stop:
        try:
            for k, (lo, hi) in enumerate(calls):
                if k in done:
                    continue
                if trained_calls and distributed.broadcast_json(stop.requested):
                    break
                started = time.perf_counter()
                # the last call padded to the others' size (its last run repeated): no second compile
                part, _ = distributed.pad(train.Hparams(*(a[lo:hi] for a in hp)), per_call)
                res = train.sweep(model, cfg, arrays, part)
                epochs_k = {key: np.asarray(v)[: hi - lo] for key, v in res.epochs.items()}
                runs.save_arrays(f"call{k}", **epochs_k)
                record = {"call": k, "runs": [lo, hi], "devices": res.num_devices}
                runs.append("calls", {**record, "seconds": time.perf_counter() - t0})
                trained_calls.append(k)
                if len(calls) > 1:
                    took = time.perf_counter() - started
                    left = len(calls) - len(done) - len(trained_calls)
                    # the first call compiles; the others take about as long as the one before
                    eta = f"; about {left * took:.0f} s left" if left else ""
                    print(f"call {k + 1}/{len(calls)}: runs {lo}..{hi - 1} in {took:.1f} s{eta}", flush=True)
        finally:
            runs.close()
    seconds = time.perf_counter() - t0
    missing = [k for k in range(len(calls)) if k not in done and k not in trained_calls]
    if missing:
        print(
            f"interrupted: {len(calls) - len(missing)} of {len(calls)} calls are kept in {cmd.out}; "
            "run the same command again to train the rest",
            file=sys.stderr,
        )
        return 130
    trained = sum(hi - lo for k, (lo, hi) in enumerate(calls) if k not in done)
    if not distributed.is_writer():
        print(f"process {jax.process_index()}: {trained} runs in {seconds:.1f} s; process 0 writes {cmd.out}")
        return 0
    out = pathlib.Path(cmd.out)
    kept = []
    for k in range(len(calls)):
        with np.load(out / "arrays" / f"call{k}.npz") as z:
            kept.append({key: z[key] for key in z.files})
    epochs = {key: np.concatenate([z[key] for z in kept]) for key in kept[0]}
    np.savez_compressed(out / "epochs.npz", **epochs)
    rows = ranked_rows(hp, epochs)
    summary = {"seconds": seconds, "trained": trained, "runs": rows}  # seconds: this invocation's
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    _write_csv(out / "results.csv", rows)
    grads = epochs.get("grad_norm")
    curves = {  # each row's own run (the rows are sorted best first)
        f"lr={r['lr']:g} scale={r['weight_scale']:g} seed={r['seed']}": grads[r["run"], 0]
        for r in rows
        if grads is not None
    }
    plots.grad_norm_profiles(curves, out / "grad_norms.png", title="per-layer gradient norms, first epoch")
    _print_sweep_table(rows, cfg)
    reused = f" ({S - trained} kept from an earlier run)" if trained < S else ""
    print(
        f"{S} runs{reused}: {trained} trained in {seconds:.1f} s; wrote {out}/results.csv, results.json, epochs.npz"
    )
    return 0


def _write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _print_sweep_table(rows: list[dict], cfg: TrainConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from gradflow.train.results import ranked_table

    given = ["seed", "lr", *(["weight_scale"] if len({r["weight_scale"] for r in rows}) > 1 else [])]
    given += ["clip_value"] if cfg.optim.clip is not None else []
    head, cells = ranked_table(rows, given)
    table = Table(title="sweep, best first (grad_first_over_last: layer 1 / last layer, epoch 1)")
    for i, c in enumerate(head):
        table.add_column(c, justify="right" if 0 < i < len(head) - 1 else "left")
    for row in cells:
        table.add_row(*row)
    Console(width=160).print(table)
