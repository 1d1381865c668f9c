"""Per-layer singular-value spectra of Jacobian products, in log space, for any layer chain.

For a chain of layer maps h_l = f_l(h_{l-1}), l = 1..L (`gradflow.nn.chain`: any model; or
`jacobian_spectra`'s step(params[l], h) with stacked params), with A_l = d h_l / d h_{l-1}
(N_l x N_{l-1}; state sizes may change from layer to layer) at the chain's own states:
- forward products  J_l = A_l ... A_1 = d h_l / d h_0,
- backward products G_l = A_L ... A_{l+1} = d h_L / d h_l (what a gradient reaching layer l went
  through; G_L = I). Its singular values are those of G_l^T = A_{l+1}^T ... A_L^T, walked from the top.

Engines (each in its own file, with its method, papers and accuracy limits):
- "exact" (`_exact.py`): every singular value, the product carried in log-scaled form and
  re-factored at every layer (QR + LQ, then one-sided Jacobi at the requested depths).
- "topk" (`_topk.py`): the k largest, matrix-free, by a block recursion refined by a
  LOBPCG-style block iteration on J^T J.
- "auto" (the default): "exact" while the rows it carries (the rank bound of the products: the
  smallest state so far forward, the output size backward) are at most `AUTO_EXACT_SIZE`, else
  "topk" with k = `AUTO_K` (unless k is given); the result's `.method` says which ran.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow.nn.chains import Chain, Segment, inputs, layer_variables, walk
from gradflow.nn.chains import chain as make_chain
from gradflow.spectra._exact import _apply_rows, _exact_jit, _Unshared
from gradflow.spectra._topk import _topk
from gradflow.spectra.result import SpectraResult

Step = Callable[[Any, jax.Array], jax.Array]
METHODS = ("auto", "exact", "topk")
DIRECTIONS = ("forward", "backward")

# method="auto": the exact engine carries N rows and re-factors them at every layer, O(N^3) per
# layer (a 2048-wide state costs ~1 s a layer on one CPU core, a 4096-wide one ~8 s); past
# AUTO_EXACT_SIZE it switches to topk with AUTO_K values (a Transformer block's T x D state, a
# wide CNN's H x W x C).
AUTO_EXACT_SIZE = 2048
AUTO_K = 32


def _depth_of(params: Any) -> int:
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("params must be a pytree with at least one leaf (leading axis = depth)")
    depth = int(jnp.shape(leaves[0])[0]) if jnp.ndim(leaves[0]) else 0
    for leaf in leaves:
        if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != depth:
            raise ValueError(
                f"every params leaf needs the same leading depth axis; got shapes "
                f"{[jnp.shape(x) for x in leaves]}"
            )
    if depth < 1:
        raise ValueError("params has a depth axis of length 0")
    return depth


def _check_depths(depths: Sequence[int] | None, depth: int) -> np.ndarray:
    if depths is None:
        return np.arange(1, depth + 1)
    raw = np.asarray(depths).reshape(-1)
    if raw.size and not np.all(np.equal(np.mod(raw, 1), 0)):
        raise ValueError(f"depths must be integer layer indices in 1..{depth}, got {list(raw)}")
    d = raw.astype(np.int64)
    if d.size == 0 or d.min() < 1 or d.max() > depth:
        raise ValueError(f"depths must be layer indices in 1..{depth}, got {list(depths)}")
    return np.unique(d)


def _user_chain(step: Step, params: Any, h0: jax.Array) -> Chain:
    depth = _depth_of(params)
    h0 = jnp.asarray(h0)
    p0 = jax.tree.map(lambda a: a[0], params)
    try:
        out = jax.eval_shape(step, p0, h0)
    except Exception as e:  # a dot_general or flax shape error deep inside the step: name h0
        raise ValueError(
            f"step(params[l], h) fails on h0 of shape {h0.shape} ({type(e).__name__}: {e}); "
            "h0 must be a state the step takes"
        ) from None
    if getattr(out, "shape", None) != h0.shape:
        raise ValueError(
            f"step maps h0 of shape {h0.shape} to {getattr(out, 'shape', type(out).__name__)}: a walk's "
            "step must return a state of its input's shape (chain layers of other shapes with gradflow.nn.chain)"
        )
    seg = Segment(
        step=_Unshared(step), shared=None, params=params, names=tuple(map(str, range(1, depth + 1)))
    )
    return Chain(segments=(seg,), h0=h0)


def jacobian_spectra(
    step: Step,
    params: Any,
    h0: jax.Array,
    *,
    depths: Sequence[int] | None = None,
    method: str = "auto",
    k: int | None = None,
    direction: str = "forward",
    oversample: int | None = None,
    refine: int = 50,
    key: jax.Array | None = None,
    tol: float | None = None,
) -> SpectraResult:
    """Log singular values of J_l = d h_l / d h_0 (or G_l = d h_L / d h_l) at every requested depth.

    Args:
      step: (params_l, h) -> h, pure; h may have any shape (it is flattened: N = h0.size).
      params: pytree whose leaves share a leading depth axis of length L.
      h0: the input state of layer 1.
      depths: 1-based layer indices (default: all 1..L). For "backward", l means G_l = d h_L / d h_l.
      method: "exact" (all N singular values), "topk" (matrix-free, the k largest) or "auto"
        (exact up to `AUTO_EXACT_SIZE` state values, topk with k = `AUTO_K` past it).
      k: number of singular values kept (default: all for exact, `AUTO_K` for auto's topk;
        required for topk).
      direction: "forward" (J_l) or "backward" (G_l).
      oversample, refine, key: topk only: extra block rows (default max(2, k // 4)), the
        most block-iteration rounds at each requested depth (it stops once the top k log
        sigma move by < 1e-5), and the PRNG key of the random start block.
      tol: Jacobi convergence tolerance on pair cosines (default 8 N eps).

    Returns:
      SpectraResult with `.depths` (len D) and `.log_singular_values` (D, k), natural log, sorted
      descending; -inf marks an exactly zero singular value (e.g. dead ReLU units).
    """
    return chain_spectra(
        _user_chain(step, params, h0),
        depths=depths,
        method=method,
        k=k,
        direction=direction,
        oversample=oversample,
        refine=refine,
        key=key,
        tol=tol,
    )


def _check_finite_parameters(c: Chain) -> None:
    """Raise naming the first layer whose parameters hold a NaN/Inf (host-side, before compiling).

    Renormalization reads a non-finite row as a zero one, so NaN weights would otherwise come
    out as log sigma = -inf, which means an exactly zero singular value.
    """
    for seg in c.segments:
        if seg.params is not None:
            leaves = [np.asarray(a) for a in jax.tree_util.tree_leaves(seg.params)]
            if leaves and jnp.issubdtype(leaves[0].dtype, jnp.floating):
                ok = np.all([np.isfinite(a.reshape(seg.depth, -1)).all(axis=1) for a in leaves], axis=0)
                if not ok.all():
                    raise ValueError(
                        f"layer {seg.names[int(np.argmin(ok))]!r} has non-finite parameters (NaN/Inf)"
                    )
        shared = seg.shared
        if seg.params is None and seg.param_path is not None:  # an adapted model's layer
            shared = layer_variables(shared[0], seg, 0)
        floats = [
            np.asarray(a)
            for a in jax.tree_util.tree_leaves(shared)
            if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating)
        ]
        if any(not np.isfinite(a).all() for a in floats):
            where = seg.names[0] if seg.depth == 1 else f"{seg.names[0]} .. {seg.names[-1]}"
            raise ValueError(f"non-finite parameters (NaN/Inf) in the variables of layer {where!r}")


def chain_spectra(
    c: Chain,
    *,
    depths: Sequence[int] | None = None,
    method: str = "auto",
    k: int | None = None,
    direction: str = "forward",
    oversample: int | None = None,
    refine: int = 50,
    key: jax.Array | None = None,
    tol: float | None = None,
) -> SpectraResult:
    """`jacobian_spectra` of any layer chain (`gradflow.nn.chain`): states may change size.

    Row l of the result is J_l = d h_l / d h_0 (forward) or G_l = d h_L / d h_l (backward), its
    log singular values sorted descending and padded with -inf past the rank bound: the
    smallest state size the product passes through (min N_0 .. N_l forward, min N_l .. N_L
    backward). The exact engine carries that many rows, so a backward product through a
    10-way classifier costs 10 vjps per layer at any width. Options as in `jacobian_spectra`;
    `depths` index the chain's layers (1-based).
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {DIRECTIONS}")
    h0 = c.h0
    if not jnp.issubdtype(h0.dtype, jnp.floating):
        raise ValueError(f"h0 must be floating point, got dtype {h0.dtype}")
    if not bool(jnp.all(jnp.isfinite(h0))):
        raise ValueError("h0 contains non-finite values")
    for seg in c.segments:
        if seg.params is not None and seg.depth > 1:
            _depth_of(seg.params)
    _check_finite_parameters(c)
    depth = c.depth
    wanted = _check_depths(depths, depth)
    sizes = c.state_sizes()
    if direction == "forward":
        bound = int(np.minimum.accumulate(sizes)[1 : int(wanted.max()) + 1].max())
    else:
        bound = int(sizes[-1])
    if method == "auto":  # by the rows the exact engine would carry: a backward product through a
        # classifier carries (output size) rows at any width, and stays exact
        method = "topk" if bound > AUTO_EXACT_SIZE else "exact"
        if method == "topk" and k is None:
            k = min(AUTO_K, bound)
    if k is None:
        if method == "topk":
            raise ValueError("method='topk' needs k (the number of leading singular values)")
        k = bound
    if not (isinstance(k, int | np.integer) and 1 <= k <= bound):
        raise ValueError(f"k must be an integer in 1..{bound} (the rank bound of the products), got {k!r}")
    if oversample is not None and oversample < 0:
        raise ValueError(f"oversample must be >= 0 (extra block rows for topk), got {oversample}")

    steps, shared, params = c.parts()
    if method == "exact":
        record = np.zeros(depth, bool)
        record[wanted - 1] = True
        bounds = dict(hi=int(wanted.max())) if direction == "forward" else dict(lo=int(wanted.min()))
        logs = _exact_jit(steps, shared, params, h0, record, direction=direction, tol=tol, **bounds)
        logs = logs[wanted - 1]
    else:
        key = jax.random.key(0) if key is None else key
        logs = _topk(c, wanted, direction, k, oversample, refine, key, tol)
    return SpectraResult(
        depths=wanted,
        log_singular_values=np.asarray(logs)[:, :k],
        direction=direction,
        layers=tuple(c.layers[l - 1] for l in wanted),
        widths=sizes[wanted],
        method=method,
    )


def lyapunov_exponents(step: Step, params: Any, h0: jax.Array, *, k: int | None = None) -> jax.Array:
    """Per-layer Lyapunov exponents of the walk: lim (1/L) log sigma_i(J_L), sorted descending.

    The Benettin et al. (1980) QR method: Q_0 = I[:, :k]; A_l Q_{l-1} = Q_l R_l (Householder QR);
    lambda_i = (1/L) sum_l log |(R_l)_ii|. For recurrent walks these are the exponents per time step.

    Args:
      step, params, h0: as in `jacobian_spectra`.
      k: how many leading exponents (default: all N).

    Returns:
      (k,) array, sorted descending; -inf for directions the map annihilates.
    """
    h0 = jnp.asarray(h0)
    if not bool(jnp.all(jnp.isfinite(h0))):
        raise ValueError("h0 contains non-finite values")
    _check_finite_parameters(_user_chain(step, params, h0))  # also checks the depth axis
    n = int(h0.size)
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the state size), got {k}")
    return _lyapunov(_Unshared(step), params, h0, k=k)


@functools.partial(jax.jit, static_argnames=("step3", "k"))
def _lyapunov(step3: Step, params: Any, h0: jax.Array, *, k: int) -> jax.Array:
    """`lyapunov_exponents`; module-level, so equal steps reuse the program."""
    depth = jax.tree_util.tree_leaves(params)[0].shape[0]
    _, (points,) = walk(((step3, depth),), (None,), (params,), h0, observe=inputs)

    def body(carry, xs):
        q, acc = carry
        p, h = xs
        y = _apply_rows(step3, None, p, h, q.T, False).T  # (n, k) = A_l Q
        q, r = jnp.linalg.qr(y)
        return (q, acc + jnp.log(jnp.abs(jnp.diagonal(r)))), None

    q0 = jnp.eye(h0.size, k, dtype=h0.dtype)
    (_, acc), _ = lax.scan(body, (q0, jnp.zeros(k, h0.dtype)), (params, points))
    return jnp.sort(acc / points.shape[0])[::-1]


def model_spectra(
    model: Any,
    variables: Any,
    x: jax.Array,
    *,
    layers: Sequence[str] | None = None,
    train: bool = False,
    depths: Sequence[int] | None = None,
    **options: Any,
) -> SpectraResult:
    """Per-layer spectra of any model: a gradflow stack, a linen or nnx module, a cut-marked function.

    The model is cut into a layer chain by `gradflow.nn.chain` (see there for how layers are
    found, and the skip-connection check); the result's rows are the chain's layers, named in
    `.layers` with their state sizes in `.widths`.

    Args:
      model: any model `gradflow.nn.chain` accepts.
      variables: its variables (params, and batch_stats if any).
      x: one input as the model takes it (a batch of one is fine); with `train=True` for
        BatchNorm, a batch (the batch map, examples coupled).
      layers: the cut points (module paths or cut-marker names); a gradflow stack: which of
        its parts are layers (`MLPStack.chain`), as in `gradflow.nn.chain`.
      train: BatchNorm batch statistics instead of running averages.
      depths: 1-based indices into the chain's layers (default: all).
      **options: method, k, direction, oversample, refine, key, tol, as in `jacobian_spectra`.

    Returns:
      SpectraResult; forward rows are d h_l / d x (stacks: d h_l / d h_0, h_0 = embed(x)),
      backward rows d y / d h_l (stacks: d h_L / d h_l).
    """
    c = make_chain(model, variables, x, layers=layers, train=train)
    return chain_spectra(c, depths=depths, **options)
