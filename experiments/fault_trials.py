"""kill -9 at random points of a short training run: every rerun ends where an uninterrupted run ends.

A run directory (`gradflow.train.fit(..., run_dir=)`) is written by one process at a time and
must survive a SIGKILL anywhere. Each trial trains a small BatchNorm + dropout MLP (6 epochs of
5 steps) into a fresh directory, killing the training process with SIGKILL one or more times,
each rerun resuming the last; then one last rerun finishes. The kill points:

- "metrics":    while epoch e's line of metrics.jsonl is half written (a torn last line);
- "between":    after epoch e's metrics line, before its checkpoint;
- "checkpoint": a timer fires SIGKILL `delay` seconds into orbax's write of epoch e's
  checkpoint (uniform in [0, 0.1] s: some land inside the write, some just after it);
- "time":       the parent kills the process `delay` seconds after starting it (uniform in
  [0, 8] s: during start-up, the resume's rewrite of the records, compilation or training; a
  process that finished first is let be). Always the last kill of a trial.

Claims, checked after every trial against an uninterrupted run of the same config:

1. the finished parameters, BatchNorm statistics and step count are bit-identical;
2. metrics.jsonl holds each epoch once, in order, with the uninterrupted run's losses;
3. records and checkpoints agree: the latest checkpoint is the last epoch, and after every kill
   no complete record is duplicated (a record of an epoch whose checkpoint never landed is
   dropped by the resume and redone).

A second writer is refused while the first holds the directory, naming its pid, and the lock
of a killed writer is taken over (`two_writers`).

Run: `python experiments/fault_trials.py [--trials N] [--seed S] [--out DIR]` (N = 20 by
default: 4.5 minutes on an idle 2-core CPU machine, 52 kills). Prints one line per trial and a summary, and writes
result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import jax
import numpy as np

POINTS = ("metrics", "between", "checkpoint", "time")
EPOCHS = 6
KEEP = 2  # checkpoints orbax keeps (gradflow.train.run)


def build():
    """The run every trial makes: (model, TrainConfig, data)."""
    import jax.numpy as jnp

    from gradflow.nn import MLPStack
    from gradflow.optim import OptimConfig
    from gradflow.train import TrainConfig

    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (200, 8))
    y = jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1)
    model = MLPStack(depth=3, width=16, activation="relu", norm="batch", dropout_rate=0.1, num_outputs=3)
    cfg = TrainConfig(
        epochs=EPOCHS, batch_size=32, seed=3, diagnostics_every=0, optim=OptimConfig("adam", 3e-3)
    )
    return model, cfg, (x[:160], y[:160], x[160:], y[160:])


def _child(run_dir: str, point: str, epoch: int, delay: float) -> None:
    """Train into run_dir (resuming), with SIGKILL planted at (point, epoch); "hold" sleeps after
    epoch `epoch` (a writer that keeps the directory)."""
    from gradflow import store
    from gradflow.train import fit, run

    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731 - no cleanup, no flush
    append, save = store.RunStore.append, run._Store.save

    def torn_append(self, name, record):
        if point == "metrics" and name == "metrics" and record["epoch"] == epoch:
            line = json.dumps(record) + "\n"
            with (self.dir / "metrics.jsonl").open("a") as f:
                f.write(line[: len(line) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        append(self, name, record)

    def killed_save(self, e, state, done):
        if e == epoch and point == "between":
            die()
        if e == epoch and point == "checkpoint":
            threading.Timer(delay, die).start()
            save(self, e, state, done)
            time.sleep(60)  # the timer fires after the write: the kill lands just after it
            return
        save(self, e, state, done)

    store.RunStore.append, run._Store.save = torn_append, killed_save

    def report(e, record):
        print(f"epoch {e}", flush=True)
        if point == "hold" and e == epoch:
            time.sleep(600)

    model, cfg, data = build()
    fit(model, cfg, data, run_dir=run_dir, callback=report)


def _spawn(run_dir, point: str, epoch: int, delay: float = 0.0) -> subprocess.Popen:
    args = [sys.executable, __file__, "--child", str(run_dir), point, str(epoch), str(delay)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_epoch(proc: subprocess.Popen, epoch: int) -> None:
    """Read the child's stdout until it reports `epoch`; a RuntimeError if it exits first."""
    for line in proc.stdout:
        if line.strip() == f"epoch {epoch}":
            return
    proc.kill()
    raise RuntimeError(f"the training process ended before epoch {epoch}: {proc.stderr.read()[-3000:]}")


def kill_once(run_dir, point: str, epoch: int, delay: float = 0.0) -> dict:
    """Run the training process into run_dir until the planted SIGKILL; what it left on disk."""
    proc = _spawn(run_dir, point, epoch, delay)
    if point == "time":
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=300)
    killed = proc.returncode == -signal.SIGKILL
    if not killed and not (point == "time" and proc.returncode == 0):
        raise RuntimeError(
            f"the training process exited {proc.returncode}, not killed: {proc.stderr.read()[-3000:]}"
        )
    disk = on_disk(run_dir)
    if point == "checkpoint":  # where in orbax's save (write, then removal of old steps) it landed
        if epoch not in disk["checkpoints"]:
            disk["phase"] = "writing"
        elif disk["unfinished"] or len(disk["checkpoints"]) > KEEP:
            disk["phase"] = "removing old steps"
        else:
            disk["phase"] = "after the save"
    return {"killed": killed, **disk}


def on_disk(run_dir) -> dict:
    """Complete metrics records (epochs), whether the last line is torn, the finished checkpoints
    (step directories with orbax's _CHECKPOINT_METADATA) and any others (an unfinished write,
    `<step>.orbax-checkpoint-tmp-*`, or a step directory half removed)."""
    run_dir = pathlib.Path(run_dir)
    text = (run_dir / "metrics.jsonl").read_text() if (run_dir / "metrics.jsonl").exists() else ""
    lines = text.split("\n")
    ckpt = run_dir / "checkpoints"
    names = sorted(os.listdir(ckpt)) if ckpt.exists() else []
    finished = lambda n: (ckpt / n / "_CHECKPOINT_METADATA").exists()  # noqa: E731
    return {
        "records": [json.loads(s)["epoch"] for s in lines[:-1]],
        "torn": lines[-1] != "",
        "checkpoints": sorted(int(n) for n in names if n.isdigit() and finished(n)),
        "unfinished": sorted(n for n in names if not (n.isdigit() and finished(n))),
    }


def uninterrupted():
    from gradflow.train import fit

    model, cfg, data = build()
    return fit(model, cfg, data)


def finish(run_dir):
    """The last rerun, in this process: the run to its end."""
    import warnings

    from gradflow.train import fit

    model, cfg, data = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(model, cfg, data, run_dir=run_dir)
    return result, [str(w.message) for w in caught]


def compare(result, whole, run_dir) -> dict:
    """Claims 1-3 for a finished run against the uninterrupted one."""
    same = lambda a, b: all(  # noqa: E731
        np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
    disk = on_disk(run_dir)
    losses = [
        json.loads(s)["loss"] for s in (pathlib.Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    return {
        "bit_identical": bool(
            same(result.state.params, whole.state.params)
            and same(result.state.batch_stats, whole.state.batch_stats)
            and int(result.state.step) == int(whole.state.step)
        ),
        "records_in_order": disk["records"] == list(range(EPOCHS)) and not disk["torn"],
        "same_losses": losses == [h["loss"] for h in whole.history],
        "records_agree_with_checkpoints": disk["checkpoints"][-1:] == [EPOCHS - 1] and not disk["unfinished"],
    }


def trial(run_dir, plan: list[tuple[str, int, float]], whole) -> dict:
    """Kill the run at each (point, epoch, delay) of `plan` in turn, each rerun resuming the last;
    then finish it and compare with `whole`. After every kill the complete records must be
    0, 1, .., k once each (a resume dropped any record past its checkpoint)."""
    kills = []
    for point, epoch, delay in plan:
        disk = kill_once(run_dir, point, epoch, delay)
        disk["clean_records"] = disk["records"] == list(range(len(disk["records"])))
        kills.append({"point": point, "epoch": epoch, "delay": round(delay, 4), **disk})
    result, warned = finish(run_dir)
    return {"kills": kills, "warnings": warned, **compare(result, whole, run_dir)}


def random_plan(rng: random.Random) -> list[tuple[str, int, float]]:
    """One to three planted kills at random points and increasing epochs (each rerun gets
    further), then, in half the trials, a kill at a random time."""
    epochs = sorted(rng.sample(range(EPOCHS), rng.randint(1, 3)))
    plan = []
    for e in epochs:
        point = rng.choice(POINTS[:3])
        plan.append((point, e, rng.uniform(0.0, 0.1) if point == "checkpoint" else 0.0))
    if rng.random() < 0.5:
        plan.append(("time", 0, rng.uniform(0.0, 8.0)))
    return plan


def two_writers(run_dir, whole) -> dict:
    """A writer holding run_dir; a second one is refused naming its pid; once the first is killed,
    its lock is taken over and the run finishes to the uninterrupted result."""
    from gradflow.train import fit

    holder = _spawn(run_dir, "hold", 1)
    _wait_for_epoch(holder, 1)
    model, cfg, data = build()
    try:
        fit(model, cfg, data, run_dir=run_dir)
        refused = ""
    except ValueError as e:
        refused = str(e)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    result, _ = finish(run_dir)
    return {"refused": refused, "holder_pid": holder.pid, **compare(result, whole, run_dir)}


def run(trials: int = 20, seed: int = 0, out=None, verbose: bool = True) -> dict:
    rng = random.Random(seed)
    whole = uninterrupted()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gradflow-faults-") as tmp:
        for i in range(trials):
            plan = random_plan(rng)
            row = {"plan": plan, **trial(pathlib.Path(tmp) / f"t{i}", plan, whole)}
            rows.append(row)
            if verbose:
                kills = ", ".join(
                    f"time@{k['delay']:.1f}s" if k["point"] == "time" else f"{k['point']}@{k['epoch']}"
                    for k in row["kills"]
                )
                ok = all(row[k] for k in ("bit_identical", "records_in_order", "same_losses"))
                print(f"trial {i:3d}  kills: {kills:45s}  {'ok' if ok else 'FAILED'}", flush=True)
        writers = two_writers(pathlib.Path(tmp) / "writers", whole)
    phases = [k["phase"] for r in rows for k in r["kills"] if k["point"] == "checkpoint"]
    summary = {
        "trials": trials,
        "kills": sum(len(r["kills"]) for r in rows),
        "kills_by_point": {p: sum(k["point"] == p for r in rows for k in r["kills"]) for p in POINTS},
        "checkpoint_kills_by_phase": {p: phases.count(p) for p in sorted(set(phases))},
        "time_kills_before_the_end": sum(
            k["killed"] for r in rows for k in r["kills"] if k["point"] == "time"
        ),
        "bit_identical": sum(r["bit_identical"] for r in rows),
        "records_in_order": sum(r["records_in_order"] and r["same_losses"] for r in rows),
        "records_agree_with_checkpoints": sum(r["records_agree_with_checkpoints"] for r in rows),
        "clean_records_after_every_kill": sum(all(k["clean_records"] for k in r["kills"]) for r in rows),
        "second_writer_refused": bool(re.search(rf"pid {writers['holder_pid']}\b", writers["refused"])),
        "after_the_holder_was_killed": writers["bit_identical"] and writers["records_in_order"],
    }
    result = {"summary": summary, "trials": rows, "two_writers": writers}
    if out is not None:
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    if verbose:
        print(json.dumps(summary, indent=2))
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="number of random trials (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plans")
    parser.add_argument("--out", default="runs/fault_trials", help="output directory")
    parser.add_argument(
        "--child", nargs=4, metavar=("RUN_DIR", "POINT", "EPOCH", "DELAY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        run_dir, point, epoch, delay = args.child
        _child(run_dir, point, int(epoch), float(delay))
        return
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    run(args.trials, args.seed, args.out)


if __name__ == "__main__":
    main()
