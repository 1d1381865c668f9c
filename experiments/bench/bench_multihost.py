"""One 64-configuration sweep on 1 process x 8 devices, 2 x 4 and 4 x 2, side by side.

The same `train.sweep` (8 learning rates x 8 seeds of a tanh MLP on scikit-learn's digits) runs
on 8 CPU devices laid out as 1, 2 or 4 processes on this machine (`distributed.local_processes`:
loopback, gloo collectives). Each process times its sweep call (first call: compile and run;
steady: best of `--repeats` later calls), and, apart, the communication a sweep does: every
training step all-reduces two scalars over the run axis (the shared recording step, and whether
any run went non-finite, so that the trainer's `lax.cond`s stay real branches under vmap),
timed as 100 scalar all-reduces in one call; and at the end the results' all-gather to every
process (`distributed.gather`: the trained params and per-epoch records), timed on global
arrays of the same shapes. It prints the slowest process's figures per layout, their ratio to
1 x 8, and the largest relative difference of every layout's losses from 1 x 8's (0: the same
SPMD program).

    python experiments/bench/bench_multihost.py [--layouts 1x8 2x4 4x2] [--depth 8] [--width 32]
        [--epochs 3] [--repeats 3]

On one machine the processes share its cores, so a layout with more processes measures the
cost of the split (collectives, more XLA runtimes on the same cores), not a gain from more
hardware; on real hosts each process has its own.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np


def _problem(depth: int, width: int, epochs: int):
    from gradflow import data, train
    from gradflow.nn import MLPStack
    from gradflow.optim import OptimConfig

    ds = data.digits()
    model = MLPStack(depth=depth, width=width, activation="tanh", num_outputs=ds.num_classes)
    cfg = train.TrainConfig(epochs=epochs, batch_size=64, diagnostics_every=10, optim=OptimConfig("sgd", 0.1))
    hp = train.grid(cfg, seeds=range(8), lr=np.geomspace(0.01, 1.0, 8))  # 64 configurations
    return model, cfg, (ds.x_train, ds.y_train, ds.x_test, ds.y_test), hp


def _best(fn, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn` (results waited for), in seconds."""
    import jax

    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def worker(args: argparse.Namespace) -> None:
    """One process of a layout: initialize, time the sweep and the gather, write its figures."""
    from gradflow import distributed

    distributed.initialize()
    import jax

    from gradflow import train

    model, cfg, arrays, hp = _problem(args.depth, args.width, args.epochs)
    t0 = time.perf_counter()
    res = train.sweep(model, cfg, arrays, hp)
    first = time.perf_counter() - t0
    steady = _best(lambda: train.sweep(model, cfg, arrays, hp), args.repeats)
    results = (res.params, res.batch_stats, res.epochs)
    m = distributed.mesh()
    on_mesh = distributed.put(results, m, batched=True)  # the sweep's outputs, where they lie
    jax.block_until_ready(on_mesh)
    gather = _best(lambda: distributed.gather(on_mesh), args.repeats)
    nbytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(results))
    # every training step all-reduces scalars over the run axis (the shared recording step and
    # whether any run went non-finite, so that lax.cond stays a real branch): time 100 of them
    from jax import lax

    def reduces(c):
        return lax.fori_loop(0, 100, lambda i, c: c + lax.psum(c * 0 + 1.0, "runs"), c)

    fn = jax.jit(jax.vmap(reduces, axis_name="runs"))
    c = distributed.put(np.zeros(64, np.float32), m, batched=True)
    jax.block_until_ready(fn(c))
    allreduce = _best(lambda: fn(c), args.repeats) / 100
    steps = int(res.epochs["steps"][0].sum())
    record = dict(
        first=first,
        steady=steady,
        gather=gather,
        allreduce=allreduce,
        steps=steps,
        bytes=nbytes,
        devices=res.num_devices,
    )
    i = jax.process_index()
    pathlib.Path(args.worker, f"times{i}.json").write_text(json.dumps(record))
    if i == 0:
        np.save(pathlib.Path(args.worker, "loss.npy"), res.epochs["loss"])


def main(args: argparse.Namespace) -> None:
    from gradflow import distributed

    flags = [f"--{k}={getattr(args, k)}" for k in ("depth", "width", "epochs", "repeats")]
    rows, reference = [], None
    for layout in args.layouts:
        procs, devs = (int(v) for v in layout.split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            argv = [sys.executable, __file__, "--worker", tmp, *flags]
            with distributed.local_processes(argv, procs, devices_per_process=devs, stdout=tmp) as ps:
                codes = [p.wait(timeout=1800) for p in ps]
            if codes != [0] * procs:
                log = pathlib.Path(tmp, "process0.log").read_text()[-3000:]
                raise SystemExit(f"layout {layout}: exit codes {codes}\n{log}")
            times = [json.loads(pathlib.Path(tmp, f"times{i}.json").read_text()) for i in range(procs)]
            loss = np.load(pathlib.Path(tmp, "loss.npy"))
        reference = loss if reference is None else reference
        worst = {k: max(t[k] for t in times) for k in ("first", "steady", "gather", "allreduce")}
        same = float(np.max(np.abs(loss - reference) / np.maximum(np.abs(reference), 1e-6)))
        rows.append((layout, times[0]["devices"], worst, times[0]["bytes"], same))
    base = rows[0][2]
    steps = times[0]["steps"]
    print(
        f"64-configuration sweep, depth {args.depth} width {args.width}, {args.epochs} epochs of digits "
        f"({steps} steps, each with 2 scalar all-reduces over the run axis)"
    )
    print(
        f"{'layout':>7} {'devices':>7} {'first s':>8} {'steady s':>9} {'x ' + rows[0][0]:>7} "
        f"{'gather ms':>10} {'MB':>6} {'all-reduce ms':>14} {'x 2 x steps s':>14} {'max rel diff':>13}"
    )
    for layout, devices, t, nbytes, same in rows:
        print(
            f"{layout:>7} {devices:>7} {t['first']:8.2f} {t['steady']:9.3f} {t['steady'] / base['steady']:7.2f} "
            f"{1e3 * t['gather']:10.2f} {nbytes / 1e6:6.2f} {1e3 * t['allreduce']:14.3f} "
            f"{2 * steps * t['allreduce']:14.3f} {same:13.1e}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layouts", nargs="+", default=["1x8", "2x4", "4x2"])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a layout's process: its output dir
    a = parser.parse_args()
    for layout in a.layouts:
        parts = layout.split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            parser.error(f"--layouts: each must be PROCESSESxDEVICES like 2x4, got {layout!r}")
    worker(a) if a.worker else main(a)
