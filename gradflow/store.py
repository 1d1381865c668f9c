"""The run store: one run directory's config, append-only JSON-lines records and arrays on disk.

What the trainer (`gradflow.train.run`) and the atlas (`gradflow.atlas.run`) both keep, written
so that a crash or a second writer loses no finished result and a rerun never hands back
another run's:

- `config.json` names the run. A directory holding another config is refused
  (`on_mismatch="error"`: the trainer, the sweep and the atlas, whose `--fresh` starts over) or
  started over (`"restart"`), never mixed.
- `<name>.jsonl` logs are append-only, one record per line, flushed and fsync'ed as each record
  is written. A last line torn by a crash mid-write is dropped with a warning when the log is
  read (the writer cuts the file back to its last complete record), so the next run redoes that
  record instead of failing; a bad line elsewhere is damage and raises naming file and line.
- arrays (`save_arrays`) and rewritten logs go to a temporary file first and are renamed into
  place, so a reader sees the old file or the new one, never half of one.
- one writer at a time: the store holds an exclusive lock on `run_dir/.lock` (`fcntl.flock`,
  released by `close` or when the process ends, so a dead writer's lock is no obstacle); a
  second store on the same directory raises a ValueError naming the holder's pid instead of
  interleaving its records.
- a directory holding run files but no config.json is refused: nothing says whose they are.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Any

import numpy as np

from gradflow._checks import check_choice

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
        check_choice("on_mismatch", on_mismatch, MISMATCH)
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
                holder = (self.dir / ".lock").read_text().strip() or "unknown"
                raise ValueError(
                    f"run directory {str(self.dir)!r} is in use by another process (pid {holder}); "
                    "wait for it or use another directory"
                ) from None
            # the holder's pid, for the message above; a dead holder's lock is released by the
            # kernel with its process, so a stale lock file is simply taken over
            self._lock.truncate(0)
            self._lock.write(f"{os.getpid()}\n")
            self._lock.flush()
        config = json.loads(json.dumps(config))  # as it reads back from disk
        path = self.dir / "config.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        held = [p.name for p in self.dir.iterdir() if not p.name.startswith(".") and p.name != "config.json"]
        if stored is None and held and not fresh:
            self.close()
            raise ValueError(
                f"run_dir {str(self.dir)!r} holds {', '.join(sorted(held))} but no config.json, so "
                "nothing says which run they belong to; use a new run_dir or start afresh"
            )
        if stored is not None and stored != config and not fresh:
            if on_mismatch == "error":
                self.close()
                raise ValueError(
                    f"run_dir {str(self.dir)!r} holds a run with another config "
                    f"({'; '.join(_differences(stored, config))}); use a new run_dir or start afresh"
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


def fingerprint(tree: Any) -> dict:
    """What identifies arrays in a run's config: the shapes, dtypes and a SHA-256 of the bytes of
    every leaf of `tree` (arrays, or None for an absent one), in tree order."""
    import jax

    leaves = jax.tree_util.tree_leaves(tree)
    digest = hashlib.sha256()
    shapes = []
    for leaf in leaves:
        a = np.ascontiguousarray(np.asarray(leaf))
        shapes.append(f"{a.dtype}{list(a.shape)}")
        digest.update(f"{a.dtype}{a.shape}".encode())
        digest.update(a.tobytes())
    return {"arrays": shapes, "sha256": digest.hexdigest()}


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
    """(records, bytes of complete lines) of a JSON-lines file.

    A torn last line (a crash mid-write) is not a record: it is skipped with a warning. A bad
    line anywhere else is damage, not a crash, and raises naming the file and the line.
    """
    if not path.exists():
        return [], 0
    lines = path.read_bytes().splitlines(keepends=True)
    out, good = [], 0
    for i, line in enumerate(lines, start=1):
        try:
            record = json.loads(line) if line.strip() else None
            torn = not line.endswith(b"\n")
        except json.JSONDecodeError:
            record, torn = None, True
        if torn:
            if i < len(lines):
                raise ValueError(f"{path}: line {i} is not a JSON record (the file is damaged)")
            warnings.warn(f"{path}: dropped a torn last line (a write cut short): it is redone", stacklevel=3)
            break
        if record is not None:
            out.append(record)
        good += len(line)
    return out, good


def _differences(old: Any, new: Any, path: str = "") -> list[str]:
    """The first few paths where two JSON values differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _differences(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out[:4]
    return [] if old == new else [f"{path or 'config'}: stored {old!r}, now {new!r}"]


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
