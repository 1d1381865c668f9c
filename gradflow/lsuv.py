"""Layer-sequential unit-variance (LSUV) initialization (Mishkin & Matas 2016, "All you need is a good init").

Data-dependent, on any model's layer chain (`gradflow.nn.chain`): with a batch x,
  1. pre-initialize every layer's kernels with orthonormal matrices (Saxe et al. 2014; a conv
     kernel (..., c_in, c_out) as the (prod(...) c_in, c_out) matrix it multiplies by);
  2. for each layer in order, measure the variance v of the layer's output on x and rescale its
     kernels W <- W / sqrt(v) until |v - 1| < tol, at most `max_iters` times per layer. Later
     layers see the already-rescaled earlier ones: every measurement runs the whole chain.
Biases are left as they are, so v is not exactly quadratic in the scale; hence the loop. Layers
without a kernel (pooling, an "output" remainder, a cut marker's stretch) are left alone.

Which variance (`measure`); v is the variance of all entries of the batch's outputs together,
as in the paper (one number per layer, not one per unit):
- "dense" (default): the output of the layer's one kernel-bearing module (a Dense or Conv),
  which is what the paper's reference implementation normalizes. For a user model cut at its
  Dense/Conv submodules (the default cuts) this is the layer's output itself. For a gradflow
  block it is the pre-activation z_l = W_l h_{l-1} + b_l, or, in a residual block, the branch
  W_l phi(h_{l-1}) + b_l before the ReZero/SkipInit multiplier (0 at init, so the branch is
  what can be scaled). A layer with several kernels needs "layer" (or finer cuts).
- "layer": the layer's output h_l (for a gradflow block phi(z_l)); every kernel of the layer is
  scaled by the same factor, v^(-1/(2m)) per step for m kernels. For a bounded activation this target is a bad idea: Var(tanh(z))
  < 1 for every finite z, and reaches 0.9 only at a pre-activation scale of about 8 (deep in
  the chaotic phase), after about 16 iterations from scale 1; with `max_iters=10` it does not
  converge (a warning says so).

By default the chain is the whole model (`layers=WHOLE`): for an `MLPStack` embed, blocks[1..L], head.
Not supported, by design: norm="batch"/"layer" (the block is invariant to its kernel's scale, so
there is nothing for LSUV to set) and residual="fixup" (Fixup is itself an initialization:
dense2 = 0 makes the branch identically zero, and an orthonormal dense2 would undo it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from jax.typing import ArrayLike

from gradflow.nn.chains import (
    WHOLE,
    Segment,
    kernel_paths,
    layer_key,
    layer_variables,
    subtree,
    walk,
    with_layer_variables,
    with_subtree,
)
from gradflow.nn.chains import chain as make_chain
from gradflow.nn.conv import ConvStack
from gradflow.nn.mlp import MLPStack

MEASURES = ("dense", "layer")
SUPPORTED_RESIDUALS = (None, "plain", "rezero", "skipinit")


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """What LSUV did to one layer.

    Attributes:
      name: the chain's layer name (`Chain.names`: a stack's block "blocks[3]"-style, a
        linen submodule's path such as "Conv_0").
      var_init: output variance in the variables passed in.
      var_before: output variance after the orthonormal pre-init, before any rescaling
        (earlier layers already processed).
      var_after: output variance in the returned variables.
      iterations: rescalings applied (<= max_iters).
      scale: the factor by which the orthonormal kernel was multiplied.
      converged: |var_after - 1| < tol.
    """

    name: str
    var_init: float
    var_before: float
    var_after: float
    iterations: int
    scale: float
    converged: bool


@dataclasses.dataclass(frozen=True)
class LSUVReport:
    """Per-layer statistics of an `lsuv` run, in layer order."""

    layers: tuple[LayerStats, ...]
    tol: float
    max_iters: int
    measure: str

    @property
    def converged(self) -> bool:
        """True when every layer ended within tol of unit variance."""
        return all(s.converged for s in self.layers)

    def __str__(self) -> str:
        width = max([9] + [len(s.name) for s in self.layers])
        rows = [f"LSUV (measure={self.measure}, tol={self.tol}, max_iters={self.max_iters})"]
        rows.append(
            f"{'layer':>{width}} {'var init':>10} {'var before':>10} {'var after':>10} {'iters':>5} {'scale':>8}"
        )
        for s in self.layers:
            rows.append(
                f"{s.name:>{width}} {s.var_init:10.3g} {s.var_before:10.3g} {s.var_after:10.4f} "
                f"{s.iterations:5d} {s.scale:8.4g}{'' if s.converged else '  (not converged)'}"
            )
        return "\n".join(rows)


def _check(model: Any, variables: Any, x: ArrayLike, tol: float, max_iters: int, measure: str) -> jax.Array:
    if isinstance(model, MLPStack | ConvStack):
        if model.norm is not None:
            raise ValueError(
                f"lsuv needs norm=None, got norm={model.norm!r}: a normalized block is invariant to its kernel's scale"
            )
        if model.residual not in SUPPORTED_RESIDUALS:
            raise ValueError(
                f"lsuv supports residual in {SUPPORTED_RESIDUALS}, got {model.residual!r} "
                "(Fixup is an initialization of its own)"
            )
    if measure not in MEASURES:
        raise ValueError(f"measure={measure!r} is not one of {MEASURES}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be positive and finite, got {tol}")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 0:
        raise ValueError(f"max_iters must be an integer >= 0, got {max_iters!r}")
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[0] < 2:
        raise ValueError(
            f"x must be a batch of at least 2 examples (batch axis first) to estimate a variance, got shape {x.shape}"
        )
    try:
        jax.eval_shape(model.apply, variables, x)
    except (TypeError, ValueError, flax_errors.FlaxError) as e:
        raise ValueError(f"x of shape {x.shape} does not fit the model ({type(e).__name__}: {e})") from None
    return x


def _orthonormal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A Haar orthonormal matrix reshaped to `shape`: the kernel (..., fan_out) as the matrix
    (prod(...), fan_out), with orthonormal columns if it is tall, else orthonormal rows (as
    `jax.nn.initializers.orthogonal`).

    Written by hand only to stay on the host: jax's QR and sampler cost seconds of XLA
    compile on CPU for every new shape, numpy's nothing.
    """
    n_in, n_out = math.prod(shape[:-1]), shape[-1]
    q, r = np.linalg.qr(rng.standard_normal((max(n_in, n_out), min(n_in, n_out))))
    q = q * np.sign(np.diagonal(r))[None, :]  # Haar measure (Mezzadri 2007)
    return (q.T if n_in < n_out else q).reshape(shape)


@functools.partial(jax.jit, static_argnames=("model", "layers", "owners"))
def _variances(
    model: Any, variables: Any, x: jax.Array, layers: tuple[str, ...] | str | None, owners: tuple
) -> jax.Array:
    """The measured output variance of every layer of the chain (one compiled program per model).

    owners[s]: None to measure segment s's layer outputs, or the module path (as seen inside
    the segment's step) whose output is measured instead.
    """
    c = make_chain(model, variables, x, layers=layers, check=False)

    def observe(step, shared, p, h, owner):
        if owner is None:
            h = step(shared, p, h)
            return h, jnp.var(h)
        seen = []

        def record(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and tuple(context.module.path) == owner:
                seen.append(y)
            return y

        with nn.intercept_methods(record):
            h = step(shared, p, h)
        return h, jnp.var(seen[-1])

    observers = tuple(functools.partial(observe, owner=owner) for owner in owners)
    _, out = walk(*c.parts(), c.h0, observe=observers)
    return jnp.concatenate(out)


def lsuv(
    model: Any,
    variables: Any,
    x: ArrayLike,
    *,
    layers: Sequence[str] | None = None,
    tol: float = 0.1,
    max_iters: int = 10,
    key: jax.Array | None = None,
    measure: str = "dense",
    orthonormal: bool = True,
) -> tuple[Any, LSUVReport]:
    """LSUV initialization of any model's layers (Mishkin & Matas 2016); see the module docstring.

    Args:
      model: a gradflow `MLPStack` (norm=None, residual not "fixup") or any model
        `gradflow.nn.chain` cuts (a linen module; its kernels are "kernel" params).
      variables: its variables (from `model.init`); not modified.
      x: a batch of inputs as the model takes it, batch axis first, at least 2 examples (the
        paper uses one minibatch).
      layers: the layers to process, as in `gradflow.nn.chain`. Default: the whole model
        (`gradflow.nn.chains.WHOLE`: an adapted model's default cuts; an `MLPStack`'s input
        projection, blocks and head; name the parts to leave the head out, see `MLPStack.chain`).
      tol: stop rescaling a layer once |Var(output) - 1| < tol.
      max_iters: at most this many rescalings per layer (0: orthonormal pre-init only).
      key: for the orthonormal draws; None uses jax.random.key(0).
      measure: "dense" (the output of the layer's kernel-bearing module) or "layer" (the
        layer's output); see the module docstring.
      orthonormal: pre-initialize kernels with orthonormal matrices (the paper's step 1);
        False rescales the given kernels.

    Returns:
      (variables, report): the new variables (kernels replaced, everything else as given)
      and an `LSUVReport` with per-layer variances before/after and iterations used. A
      warning is raised if some layer did not reach tol within max_iters.

    Raises:
      ValueError: unsupported model, x that does not fit the model or is not a batch of at
        least 2, bad tol/max_iters/measure, a layer with several kernels under "dense", or a
        layer whose output variance is 0 or not finite (it cannot be rescaled to 1).
    """
    x = _check(model, variables, x, tol, max_iters, measure)
    layers = WHOLE if layers is None else layer_key(layers)
    c = make_chain(model, variables, x, layers=layers, check=False)
    todo, owners = [], []  # (index, segment, i, kernel paths) per layer to rescale
    index = 0
    for seg in c.segments:
        own = layer_variables(variables, seg, 0) if seg.param_path is not None else None
        kernels = kernel_paths(own) if own is not None else []
        if measure == "dense" and len(kernels) > 1:
            raise ValueError(
                f"layer {seg.names[0]!r} has {len(kernels)} kernels ({', '.join('/'.join(k) for k in kernels)}): "
                "measure='dense' needs one kernel-bearing module per layer; cut at those modules "
                "(layers=[...]) or use measure='layer'"
            )
        sub = kernels[0][:-1] if kernels else ()
        owners.append(seg.scope + sub if measure == "dense" and sub else None)
        todo += [(index + i, seg, i, kernels) for i in range(seg.depth) if kernels]
        index += seg.depth
    if not todo:
        raise ValueError(f"{type(model).__name__}'s layers {c.layers} have no kernels for lsuv to rescale")
    owners = tuple(owners)

    def variances(v: Any) -> np.ndarray:
        return np.asarray(_variances(model, v, x, layers, owners))

    # the orthonormal draws run on the host: a numpy generator seeded by the key's bits
    key = jax.random.key(0) if key is None else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
    var_init = variances(variables)
    out = variables
    trace: list[tuple[int, str, float, int, float]] = []  # index, name, var_before, iterations, scale
    for index, seg, i, kernels in todo:
        own = layer_variables(out, seg, i)
        if orthonormal:
            for path in kernels:
                k = subtree(own, path)
                own = with_subtree(own, path, jnp.asarray(_orthonormal(rng, k.shape), k.dtype))
        base = own

        def scaled(scale: float, out=out, seg: Segment = seg, i: int = i, base=base, kernels=kernels) -> Any:
            new = base
            for path in kernels:
                new = with_subtree(new, path, subtree(base, path) * scale)
            return with_layer_variables(out, seg, i, new)

        # the paper's loop for one layer: W <- W / sqrt(v) until |v - 1| < tol. A layer of m
        # kernels in series scales its output variance as scale^(2m) (exactly, for homogeneous
        # activations without biases), so each kernel takes the m-th root of the paper's step;
        # the full step would overshoot to 1/v and oscillate there.
        scale, iters = 1.0, 0
        v = v0 = float(variances(scaled(scale))[index])
        while True:
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(
                    f"lsuv: output variance of {seg.names[i]} is {v}; it cannot be rescaled to 1"
                )
            if abs(v - 1.0) < tol or iters >= max_iters:
                break
            scale /= v ** (0.5 / len(kernels))
            iters += 1
            v = float(variances(scaled(scale))[index])
        out = scaled(scale)
        trace.append((index, seg.names[i], v0, iters, scale))

    var_after = variances(out)
    stats = tuple(
        LayerStats(
            name, float(var_init[j]), vb, float(var_after[j]), it, sc, abs(float(var_after[j]) - 1.0) < tol
        )
        for j, name, vb, it, sc in trace
    )
    report = LSUVReport(stats, tol, max_iters, measure)
    if not report.converged:
        bad = ", ".join(s.name for s in stats if not s.converged)
        warnings.warn(
            f"lsuv: {bad} did not reach |Var - 1| < {tol} within {max_iters} iterations "
            f"(measure={measure!r}); see the report",
            stacklevel=2,
        )
    return out, report
