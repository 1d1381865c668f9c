"""What varies between the runs of one compiled sweep: `Hparams`, their grid and their checks.

A sweep's runs share their structure (`TrainConfig.structure()`: the model and the config with
seed, optim.lr and optim.clip_value blanked) and differ in `Hparams`, one number per run and
field, that enter the compiled run as traced arguments: the seed, the learning rate, the
clipping threshold and `weight_scale`, a multiplier of the layers' kernels after initialization
(`scale_kernels`), so a model whose `kernel_init` has variance sigma_w^2 / fan_in runs at
(weight_scale * sigma_w)^2 / fan_in.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.typing import ArrayLike

from gradflow.nn.chains import kernel_paths
from gradflow.train.layers import Layout
from gradflow.train.state import TrainConfig


class Hparams(NamedTuple):
    """Per-run numeric hyperparameters; in a sweep each field has shape (S,).

    Attributes:
      seed: int32 seeds.
      lr: float32 peak learning rates.
      weight_scale: float32 multipliers of the blocks' kernels at init.
      clip_value: float32 clipping thresholds (used when `cfg.optim.clip` is set).
    """

    seed: Any
    lr: Any
    weight_scale: Any
    clip_value: Any


def grid(
    cfg: TrainConfig,
    *,
    seeds: Sequence[int] | None = None,
    lr: Sequence[float] | None = None,
    weight_scale: Sequence[float] | None = None,
    clip_value: Sequence[float] | None = None,
) -> Hparams:
    """The Cartesian product of the given values (defaults: the config's own), seeds varying fastest.

    Returns:
      `Hparams` of numpy arrays of shape (S,), S the product of the lengths.
    """
    axes = [
        list(lr if lr is not None else [cfg.optim.lr]),
        list(weight_scale if weight_scale is not None else [1.0]),
        list(clip_value if clip_value is not None else [cfg.optim.clip_value]),
        list(seeds if seeds is not None else [cfg.seed]),
    ]
    rows = list(itertools.product(*axes))
    col = lambda i, dt: np.asarray([r[i] for r in rows], dt)  # noqa: E731
    return Hparams(
        seed=col(3, np.int32),
        lr=col(0, np.float32),
        weight_scale=col(1, np.float32),
        clip_value=col(2, np.float32),
    )


def check_hparams(hp: Hparams, cfg: TrainConfig) -> None:
    """Raise a ValueError naming the first bad field of `hp` (lr finite and > 0, weight_scale
    finite, seeds integers >= 0, clip_value > 0 when clipping), before anything trains."""
    rules = {  # name: (values, which are fine, what is required)
        "lr": (hp.lr, lambda a: np.isfinite(a) & (a > 0), "finite and > 0"),
        "weight_scale": (hp.weight_scale, np.isfinite, "finite"),
        "seed": (np.asarray(hp.seed), lambda a: (a >= 0) & (a == np.round(a)), "integers >= 0"),
    }
    if cfg.optim.clip is not None:
        # inf is a threshold too: no clipping (the unclipped arm of a clipping sweep)
        rules["clip_value"] = (hp.clip_value, lambda a: a > 0, "> 0 (inf: no clipping)")
    for name, (values, ok, required) in rules.items():
        values = np.asarray(values)
        bad = values[~ok(values)]
        if bad.size:
            raise ValueError(f"hparams.{name} must be {required}, got {bad.tolist()}")


def scale_kernels(params: Any, scale: ArrayLike, lay: Layout | None = None) -> Any:
    """Multiply the kernels of the model's layers by `scale` (what `Hparams.weight_scale` does):
    the kernels (`gradflow.nn.chains.kernel_paths`) under `lay.layers` (a stack's blocks; every
    layer of an adapted model; every entry of a recurrent stack), or every kernel of `params`
    without a layout."""
    # kernel_paths names keys as strings; a layout's paths may hold an nnx list's integer keys
    under = None if lay is None else [tuple(map(str, path)) for path, _, _ in lay.layers]
    chosen = {p for p in kernel_paths(params) if under is None or any(p[: len(u)] == u for u in under)}

    def scaled(path, leaf):
        return leaf * scale if tuple(str(getattr(k, "key", k)) for k in path) in chosen else leaf

    return jax.tree_util.tree_map_with_path(scaled, params)
