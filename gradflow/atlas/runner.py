"""Running the atlas: every group measured (compiles in a small thread pool), each row and array
written to the run store as it is produced, a rerun skipping what is already there.

On several processes (`gradflow.distributed`) every process measures every group, in one order
(one worker), each group's runs and spectra sharded over all their devices; process 0 alone
opens the store and writes, and tells the others which rows are done."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import data, distributed, store
from gradflow._interrupt import deferred_interrupt
from gradflow.atlas.grid import AtlasConfig, Case, Cases, NetCase, RecurrentCase, cases, unavailable
from gradflow.atlas.measure import _InitCache, _measure_group, _measure_net, _measure_recurrent


def _workers() -> int:
    """Groups measured concurrently: one per CPU core (at most 4), or GRADFLOW_ATLAS_WORKERS; one
    in a multi-process run, whose processes must launch their programs in the same order."""
    if jax.process_count() > 1:
        return 1
    env = os.environ.get("GRADFLOW_ATLAS_WORKERS")
    return max(1, int(env)) if env else max(1, min(4, os.cpu_count() or 1))


def _groups(ff: list[Case]) -> list[list[Case]]:
    """Cases that share a compiled program: same activation, arch, depth and weight family."""
    out: dict[tuple, list[Case]] = {}
    for c in ff:
        out.setdefault((c.activation, c.arch, c.depth, c.init == "orthogonal"), []).append(c)
    return list(out.values())


def _wait(future: concurrent.futures.Future) -> bool:
    """Wait up to 0.2 s for `future` (so a Ctrl-C is seen within that), True if it is done."""
    return not concurrent.futures.wait([future], timeout=0.2).not_done


def _group_name(group: list[Case]) -> str:
    """The arrays file of a group, named by what its configurations share: tanh-plain-L50-gaussian."""
    c = group[0]
    return f"{c.activation}-{c.arch}-L{c.depth}-{'orthogonal' if c.init == 'orthogonal' else 'gaussian'}"


# what `report.build` writes beside the records: stale once the records are removed
_REPORT_FILES = ("report.html", "report.md", "summary.json") + tuple(
    f"{n}.png" for n in ("atlas_map", "jacobian_growth", "gradient_norms", "recurrent")
)


def run(
    cfg: AtlasConfig,
    out: str | pathlib.Path = "runs/atlas",
    *,
    progress: bool | None = None,
    on_row: Callable[[dict], None] | None = None,
    only: tuple[Sequence[Case], Sequence[RecurrentCase], Sequence[NetCase]] | None = None,
    fresh: bool = False,
) -> list[dict]:
    """Measure every configuration of `cfg`, writing results as it goes, and return the rows.

    Writes `out/config.json`, appends one JSON line per configuration to `out/results.jsonl`,
    and saves per-group arrays to `out/arrays/<group>.npz` (per-layer log singular values, the
    conv and attention nets' of the last block only, and per-layer gradient norms; a group's
    file is named by what its configurations share, e.g. `tanh-plain-L50-gaussian.npz`; recurrent
    cells and nets have one file each, named as their rows). Rows already in results.jsonl for the same config are reused; a directory
    holding another grid's results is refused (its finished rows are never dropped) unless
    `fresh`, which removes them first. `only` replaces the grid by explicit (feed-forward,
    recurrent, net) cases.

    Ctrl-C stops within a fraction of a second of the current wait: every finished
    configuration is written (also those of groups that finished ahead of grid order), the
    groups not started are dropped, and KeyboardInterrupt is raised; a rerun continues. Groups
    still compiling run on in their threads (`gradflow atlas` exits without waiting for them).
    A group that raises is handled the same way: the finished groups are written and its error
    is raised at once, with a note naming the group's configurations.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    config = dataclasses.asdict(cfg)
    if only is not None:
        only = Cases(*(list(part) for part in only))
        config["only"] = [c.name for part in only for c in part]
    runs = distributed.writer_store(
        out, config, "results", on_mismatch="error", fresh=fresh, clear=_REPORT_FILES
    )
    done = {row["name"]: row for row in runs.done}

    try:
        ff, rec, nets = cases(cfg) if only is None else only
        for c in ff:
            if (why := unavailable(c)) is not None:
                raise ValueError(f"configuration {c.name} cannot be built: {why}")
        groups = _groups(ff)
        ds = data.mnist1d(seed=cfg.seed, num_samples=int(cfg.train_samples / 0.8))
        if progress is None:
            import sys

            progress = sys.stdout.isatty()
        rows: list[dict] = []
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            disable=not progress,
        )
        names = [c.name for c in (*ff, *rec, *nets)]
        kept = sum(name in done for name in names)
        if kept and distributed.is_writer():  # a rerun says what it skips (once, not per process)
            rest = f"measuring the other {len(names) - kept}" if kept < len(names) else "nothing to do"
            print(f"{kept} of {len(names)} configurations already in {out}: {rest}", flush=True)
        with bar:
            first = "compiling and measuring" if kept < len(names) else "reading"
            task = bar.add_task(f"atlas: {first}", total=len(names))

            def emit(row: dict) -> None:
                rows.append(row)
                if row["name"] not in done:
                    runs.append("results", row)
                if on_row is not None:
                    on_row(row)
                bar.update(task, advance=1, description=f"atlas: {row['name']} -> {row['label']}")

            def keep(group: list[Case], future: concurrent.futures.Future) -> None:
                try:
                    group_rows, arrays = future.result()
                except Exception as e:
                    e.add_note(f"while measuring the atlas group {', '.join(c.name for c in group)}")
                    raise
                runs.save_arrays(_group_name(group), **arrays)
                for row in group_rows:
                    emit(row)

            # XLA compiles one program per group and most of the atlas's time is compilation, which
            # releases the GIL: groups run in a small thread pool so every core compiles. Results
            # are emitted (and written) in grid order as each group finishes.
            todo = [(i, g) for i, g in enumerate(groups) if not all(c.name in done for c in g)]
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=_workers())
            futures: dict[int, concurrent.futures.Future] = {}

            def keep_finished() -> None:
                # every group that finished (out of grid order: a rerun finds them by name); the
                # ones not started are dropped, the ones compiling are left behind
                for i, f in futures.items():
                    if f.done() and f.exception() is None:
                        keep(groups[i], f)

            with deferred_interrupt() as stop:
                try:
                    inits = _InitCache(cfg.seed, jnp.asarray(ds.x_train[: cfg.batch_size]))
                    futures.update({i: pool.submit(_measure_group, g, cfg, ds, inits) for i, g in todo})
                    for i, group in enumerate(groups):
                        if i not in futures:
                            for c in group:
                                emit(done[c.name])
                            continue
                        while not _wait(futures[i]) and not stop.requested:
                            pass
                        if stop.requested:
                            break
                        keep(group, futures.pop(i))
                    for case in (*rec, *nets):
                        if stop.requested:
                            break
                        if case.name in done:
                            emit(done[case.name])
                            continue
                        if isinstance(case, RecurrentCase):
                            row, arrays = _measure_recurrent(case, cfg)
                        else:
                            row, arrays = _measure_net(case, cfg, ds)
                        runs.save_arrays(case.name, **arrays)
                        emit(row)
                    if stop.requested:
                        keep_finished()
                        n = len({r["name"] for r in rows} | set(done))
                        raise KeyboardInterrupt(f"atlas interrupted: {n} configurations kept in {out}")
                except Exception:
                    keep_finished()  # a group failed: raise at once, without waiting for the others
                    raise
                finally:
                    # the groups still compiling run on in their threads; nothing waits for them
                    pool.shutdown(wait=False, cancel_futures=True)
        return rows
    finally:
        runs.close()


def load_rows(out: str | pathlib.Path) -> list[dict]:
    """The rows of a finished (or interrupted) atlas run in `out`."""
    path = pathlib.Path(out) / "results.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"no atlas results at {path} (run `gradflow atlas --out {out}` first)")
    return store.read_records(out, "results")


def load_arrays(out: str | pathlib.Path) -> dict[str, np.ndarray]:
    """Every per-configuration array of an atlas run, keyed "<name>/log_sv" and "<name>/grad_norm"."""
    return store.load_arrays(out)
