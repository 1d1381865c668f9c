"""Layer-sequential unit-variance (LSUV) initialization (Mishkin & Matas 2016, "All you need is a good init").

Data-dependent: with a batch x,
  1. pre-initialize every kernel with an orthonormal matrix (Saxe et al. 2014);
  2. for each layer in order (embed, blocks 1..L, head), measure the variance v of the
     layer's output on x and rescale its kernel W <- W / sqrt(v) until |v - 1| < tol, at
     most `max_iters` times per layer. Later layers see the already-rescaled earlier ones:
     the input of layer l is recomputed from the final layer l - 1.
Biases are left as they are, so v is not exactly quadratic in the scale; hence the loop.

Which variance (`measure`); v is the variance of all B x fan_out entries together, as in
the paper (one number per layer, not one per unit):
- "dense" (default): the output of the Dense layer being rescaled, z_l = W_l a + b_l. For a
  plain block this is the pre-activation (a = h_{l-1}); for a residual block it is the
  branch W_l phi(h_{l-1}) + b_l, before the ReZero/SkipInit multiplier (which is 0 at
  init, so the branch is what can be scaled). This is what the paper's reference
  implementation normalizes (the convolution / inner-product layer's output).
- "block": the walked state h_l = phi(z_l) of a plain block (`model.chain(...).states()`);
  for residual blocks identical to "dense" (h_l - h_{l-1} is the branch). For a bounded
  activation this target is a bad idea: Var(tanh(z)) < 1 for every finite z, and it reaches
  0.9 only at a pre-activation scale of about 8 (deep in the chaotic phase), after about 16
  iterations from scale 1; with `max_iters=10` it does not converge (a warning says so).
The embed and head are plain Dense layers: their output is measured under either measure.

Supported stacks: `gradflow.nn.MLPStack` with norm=None and residual in (None, "plain",
"rezero", "skipinit"), blocks' kernels at variables["params"]["blocks"]["dense"]["kernel"]
stacked on axis 0. Not supported, by design: norm="batch"/"layer" (the block is invariant
to its kernel's scale, so there is nothing for LSUV to set) and residual="fixup" (Fixup is
itself an initialization: dense2 = 0 makes the branch identically zero, and an orthonormal
dense2 would undo it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gradflow.nn.mlp import Block, MLPStack

MEASURES = ("dense", "block")
SUPPORTED_RESIDUALS = (None, "plain", "rezero", "skipinit")


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """What LSUV did to one layer.

    Attributes:
      name: "embed", "block 1" .. "block L", or "head".
      var_init: output variance in the variables passed in.
      var_before: output variance after the orthonormal pre-init, before any rescaling
        (earlier layers already processed).
      var_after: output variance in the returned variables (a fresh chain).
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
        rows = [f"LSUV (measure={self.measure}, tol={self.tol}, max_iters={self.max_iters})"]
        rows.append(
            f"{'layer':>9} {'var init':>10} {'var before':>10} {'var after':>10} {'iters':>5} {'scale':>8}"
        )
        for s in self.layers:
            rows.append(
                f"{s.name:>9} {s.var_init:10.3g} {s.var_before:10.3g} {s.var_after:10.4f} "
                f"{s.iterations:5d} {s.scale:8.4g}{'' if s.converged else '  (not converged)'}"
            )
        return "\n".join(rows)


def _check(model: Any, variables: Any, x: ArrayLike, tol: float, max_iters: int, measure: str) -> jax.Array:
    if not isinstance(model, MLPStack):
        raise ValueError(f"lsuv supports gradflow.nn.MLPStack, got {type(model).__name__}")
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
    if not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"max_iters must be an integer >= 0, got {max_iters!r}")
    try:
        kernel = variables["params"]["blocks"]["dense"]["kernel"]
        d_in = variables["params"]["embed"]["kernel"].shape[0]
    except (KeyError, TypeError):
        raise ValueError(
            "variables must hold params/embed/kernel and params/blocks/dense/kernel (an MLPStack's init)"
        ) from None
    if kernel.ndim != 3 or kernel.shape[0] != model.depth:
        raise ValueError(
            f"blocks' dense kernel must have shape ({model.depth}, fan_in, fan_out), got {kernel.shape}"
        )
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(
            f"x must be a batch of shape (B, {d_in}) (the embed's input dimension), got {x.shape}"
        )
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 examples to estimate a variance, got {x.shape[0]}")
    return x


def _orthonormal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Haar orthonormal matrices of shape (..., fan_in, fan_out): orthonormal columns if
    fan_in >= fan_out, else orthonormal rows (as `jax.nn.initializers.orthogonal`).

    Written by hand only to stay on the host: jax's QR and sampler cost seconds of XLA
    compile on CPU for every new shape, numpy's nothing.
    """
    *batch, n_in, n_out = shape
    q, r = np.linalg.qr(rng.standard_normal((*batch, max(n_in, n_out), min(n_in, n_out))))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]  # Haar measure (Mezzadri 2007)
    return np.swapaxes(q, -1, -2) if n_in < n_out else q


def _with(params: dict, path: tuple[str, ...], value: Any) -> dict:
    """A copy of the nested dict `params` with params[path] = value."""
    head, *rest = path
    return {**params, head: _with(params[head], tuple(rest), value) if rest else value}


class _Compiled(NamedTuple):
    variances: Callable  # (variables, x) -> per-layer output variances (embed, blocks, [head])
    embed_var: Callable  # (variables, embed kernel, x) -> Var(h0)
    block: Callable  # (layer variables, h_{l-1}) -> (h_l, measured output)
    head_var: Callable  # (variables, head kernel, x, h_L) -> Var(head output)


@functools.lru_cache(maxsize=16)
def _compiled(model: MLPStack, measure: str, include_head: bool) -> _Compiled:
    """The jitted pieces of `lsuv` for one model, cached so repeated calls do not recompile."""
    block = Block(**model.block_fields(train=False, noise=False, dropout_rate=0.0), parent=None)

    def block_fn(v_l, h):
        h_next, state = block.apply(
            v_l,
            h,
            capture_intermediates=lambda mdl, method: mdl.name == "dense" and method == "__call__",
            mutable=["intermediates"],
        )
        h_next = h_next[0]
        if measure == "block" and model.residual is None:
            return h_next, h_next
        return h_next, state["intermediates"]["dense"]["__call__"][0]

    def variances(variables, x):
        c = model.chain(variables, x)
        (hs,) = c.states()
        inputs = jnp.concatenate([c.h0[None], hs[:-1]], axis=0)  # h_0 .. h_{L-1}
        _, outs = jax.vmap(block_fn)(c.segments[0].params, inputs)
        out = [jnp.var(c.h0)[None], jnp.var(outs.reshape(outs.shape[0], -1), axis=1)]
        if include_head:
            out.append(jnp.var(c.readout(hs[-1]))[None])
        return jnp.concatenate(out)

    def embed_var(variables, k, x):
        params = _with(variables["params"], ("embed", "kernel"), k)
        return jnp.var(model.chain({**variables, "params": params}, x).h0)

    def head_var(variables, k, x, h):
        params = _with(variables["params"], ("head", "kernel"), k)
        return jnp.var(model.chain({**variables, "params": params}, x).readout(h))

    return _Compiled(jax.jit(variances), jax.jit(embed_var), jax.jit(block_fn), jax.jit(head_var))


def lsuv(
    model: MLPStack,
    variables: Any,
    x: ArrayLike,
    *,
    tol: float = 0.1,
    max_iters: int = 10,
    key: jax.Array | None = None,
    measure: str = "dense",
    include_head: bool = True,
    orthonormal: bool = True,
) -> tuple[Any, LSUVReport]:
    """LSUV initialization of an `MLPStack` (Mishkin & Matas 2016); see the module docstring.

    Args:
      model: an `MLPStack` with norm=None and residual in (None, "plain", "rezero", "skipinit").
      variables: its variables (from `model.init`); not modified.
      x: a batch of inputs, shape (B, D_in), B >= 2 (the paper uses one minibatch).
      tol: stop rescaling a layer once |Var(output) - 1| < tol.
      max_iters: at most this many rescalings per layer (0: orthonormal pre-init only).
      key: for the orthonormal draws; None uses jax.random.key(0).
      measure: "dense" (the rescaled Dense layer's output: the pre-activation, or the branch
        of a residual block) or "block" (the state h_l of a plain block).
      include_head: also pre-init and rescale the head (when the model has one).
      orthonormal: pre-initialize kernels with orthonormal matrices (the paper's step 1);
        False rescales the given kernels.

    Returns:
      (variables, report): the new variables (kernels replaced, everything else as given)
      and an `LSUVReport` with per-layer variances before/after and iterations used. A
      warning is raised if some layer did not reach tol within max_iters.

    Raises:
      ValueError: unsupported model, malformed variables, x not of shape (B, D_in) with
        B >= 2, bad tol/max_iters/measure, or a layer whose output variance is 0 or not
        finite (it cannot be rescaled to 1).
    """
    x = _check(model, variables, x, tol, max_iters, measure)
    include_head = include_head and model.num_outputs is not None and "head" in variables["params"]
    # the orthonormal draws run on the host: a numpy generator seeded by the key's bits
    key = jax.random.key(0) if key is None else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    rng = np.random.default_rng(np.asarray(key, np.uint32).ravel().tolist())
    fns = _compiled(model, measure, include_head)
    var_init = [float(v) for v in fns.variances(variables, x)]
    params = variables["params"]
    trace: list[tuple[str, float, int, float]] = []  # name, var_before, iterations, scale

    def rescale(name: str, kernel: jax.Array, output_var) -> jax.Array:
        """The paper's loop for one layer: W <- W / sqrt(v) until |v - 1| < tol."""
        scale, iters = 1.0, 0
        v = v0 = float(output_var(kernel))
        while True:
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"lsuv: output variance of {name} is {v}; it cannot be rescaled to 1")
            if abs(v - 1.0) < tol or iters >= max_iters:
                break
            scale /= math.sqrt(v)
            iters += 1
            v = float(output_var(kernel * scale))
        trace.append((name, v0, iters, scale))
        return kernel * scale

    # embed: h0 = x W + b, measured through the chain
    embed_k = params["embed"]["kernel"]
    if orthonormal:
        embed_k = jnp.asarray(_orthonormal(rng, embed_k.shape), embed_k.dtype)

    embed_k = rescale("embed", embed_k, lambda k: fns.embed_var(variables, k, x))
    params = _with(params, ("embed", "kernel"), embed_k)

    # blocks, in order; the input of block l is h_{l-1} of the already-rescaled stack
    c = model.chain({**variables, "params": params}, x)
    kernels = params["blocks"]["dense"]["kernel"]
    if orthonormal:
        kernels = jnp.asarray(_orthonormal(rng, kernels.shape), kernels.dtype)
    h, new = c.h0, []
    for l in range(1, model.depth + 1):
        v_l = c.segments[0].layer_params(l - 1)

        def block_var(k, v_l=v_l, h=h):
            return jnp.var(fns.block(_with(v_l, ("params", "dense", "kernel"), k), h)[1])

        k_l = rescale(f"block {l}", kernels[l - 1], block_var)
        new.append(k_l)
        h = fns.block(_with(v_l, ("params", "dense", "kernel"), k_l), h)[0]
    params = _with(params, ("blocks", "dense", "kernel"), jnp.stack(new))

    if include_head:
        head_k = params["head"]["kernel"]
        if orthonormal:
            head_k = jnp.asarray(_orthonormal(rng, head_k.shape), head_k.dtype)

        head_k = rescale("head", head_k, lambda k: fns.head_var({**variables, "params": params}, k, x, h))
        params = _with(params, ("head", "kernel"), head_k)

    out = {**variables, "params": params}
    var_after = [float(v) for v in fns.variances(out, x)]
    layers = tuple(
        LayerStats(name, vi, vb, va, it, sc, abs(va - 1.0) < tol)
        for (name, vb, it, sc), vi, va in zip(trace, var_init, var_after)
    )
    report = LSUVReport(layers, tol, max_iters, measure)
    if not report.converged:
        bad = ", ".join(s.name for s in layers if not s.converged)
        warnings.warn(
            f"lsuv: {bad} did not reach |Var - 1| < {tol} within {max_iters} iterations "
            f"(measure={measure!r}); see the report",
            stacklevel=2,
        )
    return out, report
