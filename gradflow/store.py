"""The run store: one run directory's config, append-only JSON-lines records and arrays on disk.

What the trainer (`gradflow.train.run`) and the atlas (`gradflow.atlas.run`) both keep, written
so that a crash or a second writer loses no finished result and a rerun never hands back
another run's:

- `config.json` names the run. A directory holding another config is refused
  (`on_mismatch="error"`, the trainer) or started over (`"restart"`, the atlas), never mixed.
- `<name>.jsonl` logs are append-only, one record per line, flushed and fsync'ed as each record
  is written. A line torn by a crash mid-write is dropped when the log is read (the file is cut
  back to its last complete record), so the next run redoes that record instead of failing.
- arrays (`save_arrays`) and rewritten logs go to a temporary file first and are renamed into
  place, so a reader sees the old file or the new one, never half of one.
- one writer at a time: the store holds an exclusive lock on `run_dir/.lock` (`fcntl.flock`,
  released by `close` or when the process ends); a second store on the same directory raises
  a ValueError naming it instead of interleaving its records.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np

try:  # POSIX; elsewhere the store runs without the one-writer lock
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MISMATCH = ("error", "restart")


class RunStore:
    """A run directory (see the module docstring).

    Args:
      run_dir: the directory (created).
      config: the run's JSON-able config; compared with the stored one.
      on_mismatch: "error" (a directory of another run raises) or "restart" (its logs, arrays
        and config are removed and this run starts afresh).
      fresh: start afresh whatever is stored (the logs, arrays and config are removed).
      clear: further paths under run_dir (files or folders) removed when starting afresh.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: dict,
        *,
        on_mismatch: str = "error",
        fresh: bool = False,
        clear: tuple[str, ...] = (),
    ):
        if on_mismatch not in MISMATCH:
            raise ValueError(f"on_mismatch must be one of {MISMATCH}, got {on_mismatch!r}")
        self.dir = pathlib.Path(run_dir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.dir / ".lock", "a")  # noqa: SIM115 - held until close()
        except OSError as e:
            raise ValueError(f"cannot write the run directory {str(self.dir)!r}: {e}") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self._lock.close()
                raise ValueError(
                    f"run directory {str(self.dir)!r} is in use by another process; wait for it "
                    "or use another directory"
                ) from None
        config = json.loads(json.dumps(config))  # as it reads back from disk
        path = self.dir / "config.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        if stored is not None and stored != config and not fresh:
            if on_mismatch == "error":
                self.close()
                raise ValueError(
                    f"run_dir {str(self.dir)!r} holds a run with another config; use a new run_dir "
                    f"or start afresh to overwrite.\nstored: {stored}\nnew:    {config}"
                )
            fresh = True
        if fresh:
            for p in [*self.dir.glob("*.jsonl"), path, self.dir / "arrays", *(self.dir / c for c in clear)]:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        if not path.exists():
            _atomic_write(path, lambda f: f.write((json.dumps(config, indent=2) + "\n").encode()))

    def records(self, name: str) -> list[dict]:
        """The complete records of log `name` (a torn last line is dropped and cut from the file)."""
        path = self.dir / f"{name}.jsonl"
        out, good = _read(path)
        if path.exists() and good < path.stat().st_size:
            with path.open("r+b") as f:
                f.truncate(good)
        return out

    def append(self, name: str, record: dict) -> None:
        """Append one record to log `name`, on disk when this returns."""
        with (self.dir / f"{name}.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self, name: str, records: list[dict]) -> None:
        """Replace log `name` by `records` (atomically)."""
        text = "".join(json.dumps(r) + "\n" for r in records).encode()
        _atomic_write(self.dir / f"{name}.jsonl", lambda f: f.write(text))

    def save_arrays(self, name: str, **arrays: Any) -> pathlib.Path:
        """Write `arrays/<name>.npz` (compressed, atomically); returns its path."""
        path = self.dir / "arrays" / f"{name}.npz"
        path.parent.mkdir(exist_ok=True)
        _atomic_write(path, lambda f: np.savez_compressed(f, **arrays))
        return path

    def close(self) -> None:
        """Release the directory (the lock)."""
        if not self._lock.closed:
            self._lock.close()


def read_records(run_dir: str | os.PathLike, name: str) -> list[dict]:
    """The complete records of log `name` in `run_dir`, read-only (a torn last line is skipped)."""
    return _read(pathlib.Path(run_dir) / f"{name}.jsonl")[0]


def load_arrays(run_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array a store saved under `run_dir/arrays`, all files' keys merged."""
    arrays: dict[str, np.ndarray] = {}
    for f in sorted((pathlib.Path(run_dir) / "arrays").glob("*.npz")):
        with np.load(f) as z:
            arrays.update({k: z[k] for k in z.files})
    return arrays


def _read(path: pathlib.Path) -> tuple[list[dict], int]:
    """(records, bytes of complete lines) of a JSON-lines file; stops at the first torn line."""
    if not path.exists():
        return [], 0
    out, good = [], 0
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break  # the last line, cut short by a crash: redone by the next run
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            break
        if record is not None:
            out.append(record)
        good += len(line)
    return out, good


def _atomic_write(path: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
