"""The training state (one pytree) and the training config (one frozen dataclass).

`TrainState` holds everything a step reads and writes: parameters, BatchNorm statistics,
optimizer state, the step count and the run's dropout key. It is a `NamedTuple`, so it is a
pytree: `jax.vmap` over a sweep axis, `jax.sharding` and orbax checkpoints all take it as is.

Keys of a run are a pure function of `TrainConfig.seed` (`run_keys`): the initialization key,
and the data key from which epoch e's shuffle is drawn (`jax.random.fold_in(data_key, e)`);
the dropout key of step t is `jax.random.fold_in(state.key, t)`. A resumed run therefore
replays exactly the batches and dropout masks of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from gradflow._checks import check_choice, check_int
from gradflow.optim import OptimConfig

TASKS = ("classification", "regression")
ON_NONFINITE = ("stop", "skip")


class TrainState(NamedTuple):
    """Everything a training step reads and writes; one pytree.

    Attributes:
      params: the model's "params" collection.
      batch_stats: the "batch_stats" collection ({} for models without BatchNorm).
      opt_state: the optax state.
      step: int32 scalar, the number of steps taken (skipped steps included).
      key: typed PRNG key; step t's dropout key is `fold_in(key, t)`.
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of a training run (the model is described by its own module fields).

    Attributes:
      task: "classification" (softmax cross-entropy on integer labels, plus accuracy) or
        "regression" (mean squared error).
      epochs: number of passes over the training set, >= 1.
      batch_size: examples per step, >= 1; each epoch takes floor(n / batch_size) steps over
        a fresh permutation (the remainder is dropped).
      seed: the run's seed; initialization, shuffling and dropout derive from it.
      diagnostics_every: record the per-layer diagnostics every k steps (steps with
        step % k == 0); 0 turns them off (non-finite detection stays on, every step).
      on_nonfinite: "stop" (the run ends at the first step with a NaN/Inf; the update is not
        applied and later steps are no-ops) or "skip" (that step's update is not applied, the
        step is counted in `skipped`, training goes on).
      optim: the optimizer config (`gradflow.optim.make_optimizer`).
    """

    task: str = "classification"
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    diagnostics_every: int = 1
    on_nonfinite: str = "stop"
    optim: OptimConfig = OptimConfig("adam", 1e-3)

    def __post_init__(self) -> None:
        check_choice("TrainConfig.task", self.task, TASKS)
        check_int("TrainConfig.epochs", self.epochs, 1)
        check_int("TrainConfig.batch_size", self.batch_size, 1)
        check_int("TrainConfig.seed", self.seed, 0)
        check_int("TrainConfig.diagnostics_every", self.diagnostics_every, 0)
        check_choice("TrainConfig.on_nonfinite", self.on_nonfinite, ON_NONFINITE)
        if not isinstance(self.optim, OptimConfig):
            raise ValueError(f"TrainConfig.optim must be an OptimConfig, got {self.optim!r}")

    def structure(self, *, one_epoch: bool = False) -> TrainConfig:
        """This config with the fields that a compiled run takes as traced arguments blanked:
        seed, optim.lr and optim.clip_value (the per-run `Hparams`). Configs with equal
        structures compile to one program (the key of jit's and the sweep's caches).

        Args:
          one_epoch: also blank `epochs`, which a program of one epoch never reads.
        """
        optim = dataclasses.replace(self.optim, lr=1.0, clip_value=1.0)
        blank = {"seed": 0, "optim": optim} | ({"epochs": 1} if one_epoch else {})
        return dataclasses.replace(self, **blank)

    def to_dict(self) -> dict:
        """A JSON-able dict (callables, e.g. a custom `decay_mask`, become their repr)."""

        def plain(v):
            if isinstance(v, str | int | float | bool) or v is None:
                return v
            return repr(v)

        optim = {k: plain(v) for k, v in dataclasses.asdict(self.optim).items()}
        top = {f.name: plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "optim"}
        return {**top, "optim": optim}


def run_keys(seed: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """The (init_key, data_key) of a run with this seed (an int or an int32 tracer)."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def init_variables(model: nn.Module, key: jax.Array, x_example: ArrayLike) -> Any:
    """The model's variables as `init_state(model, _, key, x_example)` draws them; pure.

    Args:
      model: a linen module.
      key: the run's init key (`run_keys(seed)[0]`); its first split draws the parameters.
      x_example: an input batch (only its shape and dtype matter).
    """
    params_key, _ = jax.random.split(key)
    return model.init({"params": params_key, "dropout": params_key}, x_example)


# jit: eager (op-by-op) init of a scanned stack is several times slower than compiling it.
_init_variables = jax.jit(init_variables, static_argnums=0)


def init_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    key: jax.Array,
    x_example: ArrayLike,
    variables: Any = None,
) -> TrainState:
    """Initialize the model and the optimizer.

    Args:
      model: a linen module called as `model.apply(variables, x, train=...)`.
      optimizer: the optax transformation the state is for.
      key: typed PRNG key; split into the parameter key and the run's dropout key.
      x_example: an input batch, shape (B, ...) (only its shape and dtype matter).
      variables: start from these ({"params", optionally "batch_stats"}) instead of drawing
        them (`init_variables`); the dropout key is split from `key` all the same.

    Returns:
      A `TrainState` at step 0.
    """
    _, dropout_key = jax.random.split(key)
    if variables is None:
        variables = _init_variables(model, key, jnp.asarray(x_example))
    params = variables["params"]
    return TrainState(
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=optimizer.init(params),
        step=jnp.zeros([], jnp.int32),
        key=dropout_key,
    )


def check_data(model: nn.Module, cfg: TrainConfig, data: tuple) -> None:
    """Validate (x_train, y_train, x_test, y_test) at the training API boundary, before compiling.

    Raises a ValueError naming the array and what is wrong: an empty or missing training set,
    lengths that differ, fewer examples than `cfg.batch_size`, NaN/Inf inputs (or regression
    targets), inputs whose shape does not fit the model, and for classification labels that are
    not integers of shape (N,) (or (N, *positions) for per-position logits) in [0, number of
    model outputs). The test pair may be (None, None).
    """
    import numpy as np

    x, y, x_test, y_test = data
    if x is None or y is None:
        raise ValueError("x_train and y_train are required")
    if (x_test is None) != (y_test is None):
        raise ValueError("pass both x_test and y_test, or neither")
    pairs = [("train", np.asarray(x), np.asarray(y))]
    if x_test is not None:
        pairs.append(("test", np.asarray(x_test), np.asarray(y_test)))
    for split, xs, ys in pairs:
        if xs.ndim == 0 or len(xs) == 0:
            raise ValueError(f"x_{split} is empty (shape {xs.shape})")
        if ys.ndim == 0 or len(ys) != len(xs):
            raise ValueError(f"y_{split} has shape {ys.shape}, but x_{split} holds {len(xs)} examples")
        bad = [name for name, a in ((f"x_{split}", xs), (f"y_{split}", ys)) if a.dtype.kind == "f"]
        for name in bad:
            a = xs if name[0] == "x" else ys
            if not np.isfinite(a).all():
                i = int(np.argmin(np.isfinite(a).reshape(len(a), -1).all(axis=1)))
                raise ValueError(f"{name} holds NaN/Inf (first at example {i})")
    _, xs, _ = pairs[0]
    if len(xs) < cfg.batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} exceeds the {len(xs)} training examples")
    if len(pairs) > 1 and pairs[1][1].shape[1:] != xs.shape[1:]:
        raise ValueError(f"x_test's examples have shape {pairs[1][1].shape[1:]}, x_train's {xs.shape[1:]}")
    try:
        out = jax.eval_shape(
            lambda v, x: model.apply(v, x), jax.eval_shape(model.init, jax.random.key(0), xs[:1]), xs[:1]
        )
    except Exception as e:  # flax / jax shape errors: name the input instead
        raise ValueError(
            f"x_train's examples of shape {xs.shape[1:]} do not fit the model ({type(e).__name__}: {e})"
        ) from None
    if cfg.task != "classification":
        want = (1, *pairs[0][2].shape[1:])
        if tuple(out.shape) not in (want, (*want, 1)) and not (out.shape == (1, 1) and len(want) == 1):
            raise ValueError(
                f"the model's output for one example of x_train has shape {tuple(out.shape)}, which does "
                f"not match the targets y_train (one of shape {want[1:]})"
            )
        return
    positions = tuple(out.shape[1:-1])  # () for one label per example; (T,) for one per token
    if len(out.shape) < 2:
        raise ValueError(
            f"the model's output for one example of x_train has shape {tuple(out.shape)}; classification "
            f"needs logits of shape (batch, classes) or (batch, *positions, classes) (x_train's examples "
            f"have shape {xs.shape[1:]})"
        )
    classes = int(out.shape[-1])
    for split, _, ys in pairs:
        if ys.shape[1:] != positions or ys.dtype.kind not in "iu":
            want = "(N,)" if not positions else f"(N, {', '.join(map(str, positions))})"
            raise ValueError(
                f"y_{split} must hold integer class labels of shape {want} for classification (the "
                f"model's logits for one example are {tuple(out.shape)}), got {ys.dtype} of shape {ys.shape}"
            )
        lo, hi = int(ys.min()), int(ys.max())
        if lo < 0 or hi >= classes:
            raise ValueError(
                f"y_{split} holds labels in [{lo}, {hi}], outside [0, {classes}) (the model's {classes} outputs)"
            )
