"""An optax chain built from a small frozen config.

`make_optimizer(cfg)` composes optax's own transformations with `optax.chain`, in this order::

    clip -> l1 (subgradient) -> l2 (coupled) -> scale_by_<optimizer> -> weight decay (decoupled)
         -> scale_by_learning_rate(schedule) -> l1 (proximal)

Non-finite steps are the trainer's business, in one place (`TrainConfig.on_nonfinite`: stop, or
skip the step's update and count it), not the optimizer's.

Regularizer conventions (w are the parameters selected by `decay_mask`, eta_t the learning
rate at step t, i.e. `make_schedule(cfg)(t)`; `u` below is the update, so w <- w + u):

- `l2` (coupled): the loss gains (l2 / 2) * ||w||^2, so the gradient gains l2 * w before the
  optimizer's scaling (and so enters momentum and Adam's moments). For SGD this is PyTorch's
  `weight_decay`.
- `weight_decay` (decoupled, Loshchilov & Hutter 2019): u = -eta_t * (scale_by_opt(g) + wd * w),
  the rule of `optax.adamw`; the decay is multiplied by the scheduled learning rate.
- `l1`, `l1_mode="subgradient"`: the gradient gains l1 * sign(w) (sign(0) = 0) before scaling.
- `l1`, `l1_mode="proximal"`: after the step, w <- sign(w) * max(|w| - eta_t * l1, 0), the
  proximal map of eta_t * l1 * ||w||_1 (ISTA; soft-thresholding sets small weights exactly to 0).

By default (`decay_mask="kernels"`) all three regularizers and the weight decay act only on
leaves with ndim >= 2 (kernels), never on biases, norm scales/offsets or other 1-D parameters.

The config is static Python, so `jax.jit` and `jax.vmap` go through the returned transformation.
To sweep learning rates with `vmap`, build the optimizer inside the mapped function with
`make_optimizer(cfg, lr=lr)`; see `make_optimizer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.typing import ArrayLike

from gradflow._checks import check_choice, check_int, check_real

Array = jax.Array
Schedule = Callable[[ArrayLike], Array]
MaskFn = Callable[[Any], Any]

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop")
CLIPS = (None, "value", "global_norm", "adaptive")
L1_MODES = ("subgradient", "proximal")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential")
DECAY_MASKS = ("kernels", "all")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Hyperparameters of the optax chain built by `make_optimizer`.

    Attributes:
      optimizer: one of "sgd", "momentum", "nesterov" (heavy-ball / Nesterov momentum with
        `momentum`), "adam", "adamw" (Adam with decoupled `weight_decay`; any optimizer accepts
        `weight_decay`), "rmsprop" (`optax.scale_by_rms(rms_decay, eps)`, no momentum).
      lr: peak learning rate, > 0.
      momentum: momentum coefficient of "momentum" and "nesterov", in [0, 1).
      b1, b2, eps: Adam's moment decays (in [0, 1)) and denominator epsilon (> 0); `eps` is
        also RMSprop's.
      rms_decay: RMSprop's squared-gradient decay, in [0, 1).
      clip: None, "value" (|g_i| <= clip_value), "global_norm" (||g||_2 <= clip_value over the
        whole tree) or "adaptive" (AGC, Brock et al. 2021: per unit ||g|| <= clip_value *
        max(||w||, 1e-3), `optax.adaptive_grad_clip`).
      clip_value: clipping threshold, or AGC's clipping factor; > 0 when `clip` is set.
      weight_decay: decoupled weight decay, >= 0 (see the module docstring).
      l2: coupled L2 coefficient, >= 0: the loss gains (l2 / 2) * ||w||^2.
      l1: L1 coefficient, >= 0: the loss gains l1 * ||w||_1.
      l1_mode: "subgradient" or "proximal" (see the module docstring).
      decay_mask: which leaves `weight_decay`, `l2` and `l1` act on: "kernels" (leaves with
        ndim >= 2), "all", or a callable mapping a pytree shaped like the parameters to a
        pytree of bools (as `optax.masked` takes).
      schedule: "constant"; "cosine" (lr * (1 + cos(pi * t / total_steps)) / 2, then 0);
        "warmup_cosine" (lr * t / warmup_steps for t < warmup_steps, then cosine from lr to 0
        over the remaining total_steps - warmup_steps steps); "exponential" (lr * decay_rate^t).
      warmup_steps: linear warmup length of "warmup_cosine"; must be 0 for other schedules.
      total_steps: schedule length (warmup included) of "cosine" and "warmup_cosine".
      decay_rate: per-step factor of "exponential", in (0, 1].
    """

    optimizer: str
    lr: float
    momentum: float = 0.9
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    rms_decay: float = 0.9
    clip: str | None = None
    clip_value: float = 1.0
    weight_decay: float = 0.0
    l2: float = 0.0
    l1: float = 0.0
    l1_mode: str = "subgradient"
    decay_mask: str | MaskFn = "kernels"
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int = 0
    decay_rate: float = 1.0

    def __post_init__(self) -> None:
        check_choice("OptimConfig.optimizer", self.optimizer, OPTIMIZERS)
        check_real("OptimConfig.lr", self.lr, lo=0.0, lo_open=True)
        check_real("OptimConfig.momentum", self.momentum, lo=0.0, hi=1.0)
        check_real("OptimConfig.b1", self.b1, lo=0.0, hi=1.0)
        check_real("OptimConfig.b2", self.b2, lo=0.0, hi=1.0)
        check_real("OptimConfig.eps", self.eps, lo=0.0, lo_open=True)
        check_real("OptimConfig.rms_decay", self.rms_decay, lo=0.0, hi=1.0)
        check_choice("OptimConfig.clip", self.clip, CLIPS)
        if self.clip is not None:
            check_real("OptimConfig.clip_value", self.clip_value, lo=0.0, lo_open=True)
        check_real("OptimConfig.weight_decay", self.weight_decay, lo=0.0)
        check_real("OptimConfig.l2", self.l2, lo=0.0)
        check_real("OptimConfig.l1", self.l1, lo=0.0)
        check_choice("OptimConfig.l1_mode", self.l1_mode, L1_MODES)
        if not callable(self.decay_mask):
            check_choice("OptimConfig.decay_mask", self.decay_mask, DECAY_MASKS + ("<callable>",))
        check_choice("OptimConfig.schedule", self.schedule, SCHEDULES)
        check_int("OptimConfig.warmup_steps", self.warmup_steps, lo=0)
        check_int("OptimConfig.total_steps", self.total_steps, lo=0)
        if self.schedule == "warmup_cosine":
            check_int("OptimConfig.warmup_steps", self.warmup_steps, lo=1)
            check_int("OptimConfig.total_steps", self.total_steps, lo=self.warmup_steps + 1)
        elif self.warmup_steps != 0:
            raise ValueError(
                f"OptimConfig.warmup_steps must be 0 unless schedule='warmup_cosine', "
                f"got {self.warmup_steps!r} with schedule={self.schedule!r}"
            )
        if self.schedule == "cosine":
            check_int("OptimConfig.total_steps", self.total_steps, lo=1)
        check_real("OptimConfig.decay_rate", self.decay_rate, lo=0.0, hi=1.0, lo_open=True, hi_open=False)


def _unit_schedule(cfg: OptimConfig) -> Schedule:
    """The schedule with peak 1; the learning rate multiplies it."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(1.0)
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(1.0, decay_steps=cfg.total_steps)
    if cfg.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, 1.0, warmup_steps=cfg.warmup_steps, decay_steps=cfg.total_steps
        )
    return optax.exponential_decay(1.0, transition_steps=1, decay_rate=cfg.decay_rate)


def make_schedule(cfg: OptimConfig, lr: ArrayLike | None = None) -> Schedule:
    """The learning-rate schedule eta_t of `cfg`: `lr` times a schedule whose peak is 1.

    Args:
      cfg: the optimizer config (`schedule`, `warmup_steps`, `total_steps`, `decay_rate`).
      lr: peak learning rate; defaults to `cfg.lr`. May be a scalar jax array, even a tracer
        (the schedule's shape never depends on it), so that it can be vmapped over.

    Returns:
      A function from the step count (int scalar) to the learning rate (float scalar).
    """
    peak = cfg.lr if lr is None else lr
    unit = _unit_schedule(cfg)
    return lambda count: peak * unit(count)


def decay_mask_fn(cfg: OptimConfig) -> MaskFn | None:
    """The mask of the leaves that `weight_decay`, `l2` and `l1` act on, as `optax.masked` takes.

    Args:
      cfg: the optimizer config (`decay_mask`).

    Returns:
      None for "all" (no masking); for "kernels" a function mapping a parameter-shaped pytree
      to a pytree of bools, True where the leaf has ndim >= 2; a user callable unchanged.
    """
    if callable(cfg.decay_mask):
        return cfg.decay_mask
    if cfg.decay_mask == "all":
        return None
    return lambda tree: jax.tree.map(lambda x: jnp.ndim(x) >= 2, tree)


def _masked(tx: optax.GradientTransformation, mask: MaskFn | None) -> optax.GradientTransformation:
    return tx if mask is None else optax.masked(tx, mask)


def _add_l1_subgradient(l1: float) -> optax.GradientTransformation:
    # Hand-written: optax has add_decayed_weights (the L2 gradient) but no L1 (sign) counterpart.
    return optax.stateless_with_tree_map(lambda g, w: g + jnp.asarray(l1, g.dtype) * jnp.sign(w))


class L1ProximalState(NamedTuple):
    """State of `l1_proximal`: the step count, to read the scheduled learning rate."""

    count: Array


def l1_proximal(l1: float, schedule: Schedule) -> optax.GradientTransformation:
    """Soft-thresholding after the step: w <- sign(w + u) * max(|w + u| - schedule(t) * l1, 0).

    It returns the update u' = prox(w + u) - w, so `optax.apply_updates` lands on the
    proximal point of schedule(t) * l1 * ||.||_1 at the plain step w + u (ISTA).

    Args:
      l1: the L1 coefficient (the loss gains l1 * ||w||_1).
      schedule: the learning rate eta_t as a function of the step count t.

    Returns:
      An `optax.GradientTransformation` that needs `params` in `update`.
    """

    # Hand-written: optax has no soft-thresholding (proximal L1) transformation.
    def init(params):
        del params
        return L1ProximalState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("l1_proximal needs `params` in update(updates, state, params)")
        threshold = schedule(state.count) * l1

        def prox(u, w):
            z = w + u
            t = jnp.asarray(threshold, z.dtype)
            return jnp.sign(z) * jnp.maximum(jnp.abs(z) - t, 0) - w

        updates = jax.tree.map(prox, updates, params)
        return updates, L1ProximalState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def _clip(cfg: OptimConfig, value: ArrayLike) -> optax.GradientTransformation:
    if cfg.clip == "value":
        return optax.clip(value)
    if cfg.clip == "global_norm":
        return optax.clip_by_global_norm(value)
    if cfg.clip == "adaptive":
        return optax.adaptive_grad_clip(value)
    return optax.identity()


def _scale_by_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    if cfg.optimizer == "sgd":
        return optax.identity()
    if cfg.optimizer in ("momentum", "nesterov"):
        return optax.trace(decay=cfg.momentum, nesterov=cfg.optimizer == "nesterov")
    if cfg.optimizer in ("adam", "adamw"):
        return optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    return optax.scale_by_rms(decay=cfg.rms_decay, eps=cfg.eps)


def make_optimizer(
    cfg: OptimConfig, lr: ArrayLike | None = None, clip_value: ArrayLike | None = None
) -> optax.GradientTransformation:
    """The optax chain described by `cfg` (see the module docstring for order and conventions).

    The learning rate enters only through `make_schedule(cfg, lr)`: `scale_by_learning_rate`
    and the proximal L1 threshold both read it. Passing `lr` (a float or a scalar jax array)
    overrides `cfg.lr` by closure, not through the optimizer state, so a learning-rate sweep
    is a `vmap` over a function that builds the optimizer inside::

        def run(lr):
            tx = make_optimizer(cfg, lr=lr)
            ...  # init, steps
        jax.vmap(run)(jnp.array([1e-3, 1e-2, 1e-1]))

    The optimizer state has the same tree for every lr (unlike `optax.inject_hyperparams`,
    which would store lr in it), and `cfg` stays a hashable static config. `clip_value`
    overrides `cfg.clip_value` the same way (a clipping-threshold sweep).

    Args:
      cfg: the optimizer config.
      lr: peak learning rate overriding `cfg.lr`; may be a tracer.
      clip_value: clipping threshold overriding `cfg.clip_value` (used when `cfg.clip` is
        set); may be a tracer.

    Returns:
      An `optax.GradientTransformation` (its `update` needs `params` when AGC, a regularizer
      or weight decay is on).
    """
    schedule = make_schedule(cfg, lr)
    mask = decay_mask_fn(cfg)
    parts: list[optax.GradientTransformation] = [
        _clip(cfg, cfg.clip_value if clip_value is None else clip_value)
    ]
    if cfg.l1 > 0 and cfg.l1_mode == "subgradient":
        parts.append(_masked(_add_l1_subgradient(cfg.l1), mask))
    if cfg.l2 > 0:
        parts.append(_masked(optax.add_decayed_weights(cfg.l2), mask))
    parts.append(_scale_by_optimizer(cfg))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    if cfg.l1 > 0 and cfg.l1_mode == "proximal":
        parts.append(_masked(l1_proximal(cfg.l1, schedule), mask))
    return optax.chain(*parts)
