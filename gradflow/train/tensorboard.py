"""The trainer's records as TensorBoard events: what metrics.jsonl holds, where researchers look.

`fit(..., tensorboard=True)` (and `gradflow train --log tensorboard`) writes every epoch's record
to `run_dir/tensorboard/` after its metrics line and checkpoint are on disk, with the epoch as
TensorBoard's step:

- scalars: `loss`, `accuracy`, `test_loss`, `test_accuracy`, `grad_norm_global`, `steps`,
  `skipped`, `seconds` (those the record has);
- per-layer scalars `<diagnostic>/<layer>` for every per-layer diagnostic the record holds
  (`grad_norm`, `update_ratio`, `weight_norm`, `saturated`, `dead`, `preact_*`, `state_grad_norm`, ...),
  layers named as in the record with TensorBoard's tag characters (`blocks[3]` -> `blocks.3`,
  `stage1[0]` -> `stage1.0`; `layer_tag`), plus a histogram `layers/<diagnostic>` of that
  diagnostic across the layers.

The events are the records: on resume the directory is rewritten from the records kept, so an
epoch redone after a crash appears once. The writer is tensorboardX (no TensorFlow), an
optional extra: `pip install "gradflow[tensorboard]"`.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SCALARS = (
    "loss",
    "accuracy",
    "test_loss",
    "test_accuracy",
    "grad_norm_global",
    "steps",
    "skipped",
    "seconds",
)
SUBDIR = "tensorboard"


def layer_tag(name: str) -> str:
    """A layer's name in a TensorBoard tag: indices as `.i`, other characters TensorBoard refuses
    (anything but letters, digits, `_`, `-`, `.` and `/`) as `_`."""
    return re.sub(r"[^-/\w.]", "_", re.sub(r"\[(\d+)\]", r".\1", name))


def _summary_writer():
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ValueError(
            'TensorBoard logging needs tensorboardX: pip install "gradflow[tensorboard]" (or tensorboardX)'
        ) from None
    return SummaryWriter


class EventWriter:
    """TensorBoard events of one run's records under `run_dir/tensorboard` (see the module doc).

    Args:
      run_dir: the run directory.
      layers: the names of the records' per-layer entries, in order.
      records: the records already kept (a resumed run's): the directory is rewritten from them.
    """

    def __init__(self, run_dir: str | os.PathLike, layers: Sequence[str], records: Sequence[dict] = ()):
        writer = _summary_writer()  # a missing package is named before anything is removed
        self.dir = Path(run_dir) / SUBDIR
        shutil.rmtree(self.dir, ignore_errors=True)
        self.layers = [layer_tag(name) for name in layers]
        self.writer = writer(logdir=str(self.dir), flush_secs=10)
        for rec in records:
            self.write(rec, flush=False)
        self.writer.flush()

    def write(self, rec: dict, *, flush: bool = True) -> None:
        """One epoch's record, at step `rec["epoch"]`."""
        step = int(rec["epoch"])
        for k in SCALARS:
            v = rec.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, float(v), step)
        for k, v in rec.items():
            if not isinstance(v, list) or len(v) != len(self.layers) or not v:
                continue
            if not all(isinstance(a, (int, float)) for a in v):
                continue
            for name, a in zip(self.layers, v, strict=True):
                self.writer.add_scalar(f"{k}/{name}", float(a), step)
            finite = np.asarray([a for a in v if math.isfinite(a)], np.float64)
            if finite.size:
                self.writer.add_histogram(f"layers/{k}", finite, step)
        if flush:
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()
