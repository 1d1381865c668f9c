"""Progress for long scripts: `stage` (a block of work, with its elapsed time) and `track` (a loop).

The experiments and `make demo` report what they are doing through these two calls, so that no
phase of a long run is silent:

    with progress.stage("compiling and measuring 5 nets", verbose=verbose):
        ...
    for seed in progress.track(range(seeds), "seeds", verbose=verbose):
        ...

On a terminal (or in Jupyter) both draw one rich live display (a row per stage or loop: a bar,
pulsing for a stage, the elapsed time and, for a loop of known length, `k/n` and an ETA once the
first item is done) and leave one line per finished stage or loop with its elapsed time.
Elsewhere (a log file, a pipe) they print plain lines: a stage when it starts and when it ends,
a loop after each item with the elapsed time and ETA. `verbose=False` prints nothing. Stages and
loops nest (a stage inside a loop is one more row of the same display). The default console is
rich's global one, which other rich output (`gradflow.train.fit`'s epoch bar) shares.

`train.fit`'s epoch bar (`gradflow/train/run.py`) and the atlas's bar (`gradflow/atlas/runner.py`)
are their own, with their own columns (loss, atlas labels); they could be built on `track`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich import get_console
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

T = TypeVar("T")

_live: Progress | None = None  # the one live display while a stage or loop runs on a terminal


class _Count(ProgressColumn):
    """`k/n` for a loop, nothing for a stage (rich's MofNCompleteColumn shows `0/?`)."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}")


class _Eta(ProgressColumn):
    """`eta 0:01:23` once an item of a loop is done; nothing before or for a stage."""

    def render(self, task: Task) -> Text:
        if task.total is None or task.completed == 0 or task.finished:
            return Text("")
        return Text(f"eta {_clock(_left(task.elapsed or 0.0, task.completed, task.total))}")


def _left(elapsed: float, done: float, total: float) -> float:
    """Seconds left of a loop at the mean time per item so far."""
    return elapsed / done * (total - done)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds:.0f} s ({_clock(seconds)})"


@contextlib.contextmanager
def _display(console: Console) -> Iterator[Progress | None]:
    """The live display on a terminal (shared by nested calls), None elsewhere."""
    global _live
    if _live is not None:
        yield _live
        return
    if not console.is_terminal and not console.is_jupyter:
        yield None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=10),
        _Count(),
        TimeElapsedColumn(),
        _Eta(),
        console=console,
        transient=True,  # the finished lines stay, the bar goes
    )
    _live = bar
    try:
        with bar:
            yield bar
    finally:
        _live = None


def _say(console: Console, text: str) -> None:
    console.print(text, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def stage(description: str, *, verbose: bool = True, console: Console | None = None) -> Iterator[None]:
    """Report a block of work: what it is while it runs, and its elapsed time when done.

    Args:
      description: what the block does, e.g. "compiling and training 4 nets".
      verbose: False prints nothing.
      console: where to print; None is a rich Console on stdout (a terminal draws a live
        spinner, anything else gets plain lines).

    Prints `<description> ...` when the block starts (a live row on a terminal) and
    `<description>: <seconds> s` when it ends; a block that raises prints
    `<description>: failed after <seconds> s`.
    """
    if not verbose:
        yield
        return
    console = console or get_console()
    start = time.perf_counter()
    with _display(console) as bar:
        if bar is None:
            _say(console, f"{description} ...")
        else:
            task = bar.add_task(description, total=None)
        ok = False
        try:
            yield
            ok = True
        finally:
            seconds = time.perf_counter() - start
            if bar is not None:
                bar.remove_task(task)
            out = bar.console if bar is not None else console
            _say(
                out,
                f"{description}: {_seconds(seconds)}"
                if ok
                else f"{description}: failed after {_seconds(seconds)}",
            )


def track(
    iterable: Iterable[T],
    description: str,
    *,
    total: int | None = None,
    verbose: bool = True,
    console: Console | None = None,
) -> Iterator[T]:
    """Yield the items of `iterable`, reporting each one's completion with the elapsed time and ETA.

    Args:
      iterable: the loop's items (configurations, seeds, epochs).
      description: what one item is, e.g. "seeds" or "tanh depth 50: epochs".
      total: the number of items; None takes `len(iterable)` where it has one.
      verbose: False yields the items and prints nothing.
      console: as for `stage`.

    On a terminal: a live bar `<description> ━━━ k/n 0:00:12 eta 0:00:30` (the ETA from the mean
    time per finished item), then `<description>: n done in <seconds> s`. Elsewhere one line per
    item, `<description>: k/n, <seconds> s elapsed, eta <h:mm:ss>`.
    """
    if not verbose:
        yield from iterable
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    console = console or get_console()
    start = time.perf_counter()
    done = 0
    with _display(console) as bar:
        if bar is not None:
            task = bar.add_task(description, total=total)
        try:
            for item in iterable:
                yield item
                done += 1
                seconds = time.perf_counter() - start
                if bar is not None:
                    bar.advance(task)
                else:
                    eta = "" if total in (None, done) else f", eta {_clock(_left(seconds, done, total))}"
                    of = "" if total is None else f"/{total}"
                    _say(console, f"{description}: {done}{of}, {_seconds(seconds)} elapsed{eta}")
        finally:
            if bar is not None:
                bar.remove_task(task)
                seconds = time.perf_counter() - start
                _say(bar.console, f"{description}: {done} done in {_seconds(seconds)}")
