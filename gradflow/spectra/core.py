"""Per-layer singular-value spectra of Jacobian products, in log space, for any layer chain.

For a chain of layer maps h_l = f_l(h_{l-1}), l = 1..L (`gradflow.nn.chain`: any model; or
`jacobian_spectra`'s step(params[l], h) with stacked params), with A_l = d h_l / d h_{l-1}
(N_l x N_{l-1}; state sizes may change from layer to layer) at the chain's own states:
- forward products  J_l = A_l ... A_1 = d h_l / d h_0,
- backward products G_l = A_L ... A_{l+1} = d h_L / d h_l (what a gradient reaching layer l went
  through; G_L = I). Its singular values are those of G_l^T = A_{l+1}^T ... A_L^T, walked from the top.

Method ("exact"): the product is carried as M V = C^T diag(exp(s)) for an orthogonal V (unknown,
never needed): C has near-unit rows, s natural-log scales. Each layer applies A_l to the rows of C
with `jax.linearize` + `vmap` (no N x N Jacobian is materialised), then re-factors the result in
log-scaled form (`_jacobi`): two Householder QRs (QR with the rows sorted by scale, then LQ of the
graded triangular factor: Drmac & Veselic 2008) leave a column-graded triangular matrix with
nearly orthogonal rows, which is all the next layer needs. A layer into a smaller state drops the rows past its size
(the product's rank bound; QR of an N_l x m block with N_l < m), so the rows carried are
min(N_0 .. N_l) forward and min(N_l .. N_L) backward: a backward product through a 10-way
classifier is 10 rows at any width. At a requested depth one-sided Jacobi
sweeps then orthogonalize those rows until a Gram product shows every cosine below `tol`
(banded sweeps where that product puts the pairs above `tol` near the diagonal, as it does deep in
a product); log sigma = sorted s. Layers that are not requested cost the two QRs only, and layers
no requested product contains are not walked. Nothing is formed at
the scale of the product, so sigma = 1e-600 or 1e+600 is as accurate as sigma = 1, and the Jacobi
step keeps high relative accuracy for the smallest singular values (Demmel & Veselic 1992) where
SVD of the accumulated product loses everything below eps * sigma_max.

Accuracy: the error in log sigma_i grows like eps * sum_l cond(A_l) (rounding in each factor), not
like the spread of the product: spreads of 1e60 or 1e600 are resolved in float32. What no working
precision can resolve is a singular value below eps * ||A_l|| of a single, intrinsically
ill-conditioned factor (e.g. LayerNorm's near-null direction): run under float64
(`jax.enable_x64`, float64 params and h0) to see those; the engine follows the dtype of h0.

Method ("auto", the default): "exact" while the rows it carries (the rank bound of the products:
the smallest state so far forward, the output size backward) are at most `AUTO_EXACT_SIZE`, else
"topk" with k = `AUTO_K` (unless k is given); the result's `.method` says which ran.

Method ("topk"): the same recursion on k + oversample rows (default 2k) from a random orthonormal
block (J_l X_0 instead of J_l), followed at each requested depth by subspace iteration through
J_l^T J_l (vjp back down, jvp up, all in log-scaled form) until the top k settle, i.e.
matrix-free: memory O((k + oversample) N + L N), never N x N. On a chain whose state sizes
change, the block has at most as many rows as the smallest state the product passes through
(the rank bound), and a one-layer segment that changes the size is applied outside any loop.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow.nn.chains import Chain, Segment, layer_variables
from gradflow.nn.chains import chain as make_chain
from gradflow.spectra import _jacobi
from gradflow.spectra.result import SpectraResult

Step = Callable[[Any, jax.Array], jax.Array]
METHODS = ("auto", "exact", "topk")
DIRECTIONS = ("forward", "backward")

# method="auto": the exact engine carries N rows and re-factors them at every layer, O(N^3) per
# layer (a 2048-wide state costs ~1 s a layer on one CPU core, a 4096-wide one ~8 s); past
# AUTO_EXACT_SIZE it switches to topk with AUTO_K values (a Transformer block's T x D state, a
# wide CNN's H x W x C), where the chain allows it (one segment of equal-size states).
AUTO_EXACT_SIZE = 2048
AUTO_K = 32


@dataclasses.dataclass(frozen=True)
class _Unshared:
    """A user's step(params_l, h) as a chain step (shared, params_l, h): equal steps hash equal."""

    step: Step

    def __call__(self, shared: Any, p: Any, h: jax.Array) -> jax.Array:
        return self.step(p, h)


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


def _states(step: Step, shared: Any, params: Any, h0: jax.Array, depth: int) -> tuple[jax.Array, jax.Array]:
    """(h_out, inputs): the inputs of a segment's layers, (depth, *h0.shape), and its output."""
    if depth == 1:
        p = None if params is None else jax.tree.map(lambda a: a[0], params)
        return step(shared, p, h0), h0[None]
    return lax.scan(lambda h, p: (step(shared, p, h), h), h0, params, length=depth)


def _apply_rows(step: Step, shared: Any, p: Any, h: jax.Array, c: jax.Array, transpose: bool) -> jax.Array:
    """Rows of c mapped by A = d step(shared, p, .)/dh at h (or by A^T); states flattened."""
    f = lambda v: step(shared, p, v.reshape(h.shape)).reshape(-1)  # noqa: E731
    if transpose:
        _, vjp = jax.vjp(f, h.reshape(-1))
        return jax.vmap(lambda v: vjp(v)[0])(c)
    _, jvp = jax.linearize(f, h.reshape(-1))
    return jax.vmap(jvp)(c)


def _walk_layers(apply, xs, length, c, s, record, *, tol, width):
    """Carry the log-scaled product (rows c, scales s) through `length` layers, in walk order.

    apply(x, c) maps the rows c by layer x's A (or A^T); xs holds one x per layer (leading axis
    `length`). Each layer re-factors: QR + LQ (`_jacobi.precondition`), which also drops the rows
    past the new state size where that is smaller (the rank bound); recorded layers add Jacobi
    sweeps and read out sorted log sigma, padded with -inf to `width`. Unrecorded rows are NaN.
    Returns (c, s) and the (length, width) rows.
    """

    def readout(c, s):
        c, s, _ = _jacobi.orthogonalize(c, s, tol=tol)
        pad = jnp.full((width - s.shape[0],), -jnp.inf, s.dtype)
        return c, s, jnp.concatenate([jnp.sort(s)[::-1], pad])

    def skip(c, s):
        return c, s, jnp.full((width,), jnp.nan, s.dtype)

    def body(carry, xs):
        c, s = carry
        x, rec = xs
        q, c, s = _jacobi.precondition(apply(x, c), s)
        if record is None:  # every layer wanted: no branch to compile
            c, s, logs = readout(c, s)
        else:  # a real branch even under vmap: the mask is never batched
            c, s, logs = lax.cond(rec, readout, skip, c, s)
        return (c @ q.T, s), logs

    if length == 1:
        first = jax.tree.map(lambda a: a[0], (xs, record))
        carry, logs = body((c, s), first)
        return carry, logs[None]
    return lax.scan(body, (c, s), (xs, record), length=length)


class _Piece(NamedTuple):
    """Consecutive layers of one segment as a walk takes them (reversed for a backward walk)."""

    step: Step
    shared: Any
    params: Any  # sliced to the piece's layers
    inputs: jax.Array  # (layers, *state shape): each layer's input state
    record: jax.Array | None  # the piece's slice of `record`
    square: bool  # one layer whose output has its input's size


def _walk_pieces(pieces, c, s, *, transpose, tol, width):
    """Walk consecutive `_Piece`s; returns (c, s) and each piece's (layers, width) rows.

    A piece of several layers is one scan. A run of square one-layer pieces whose inputs have one
    shape (the unscanned blocks of a user's Transformer or of one ResNet stage) is one scan as
    well, over a `lax.switch` between the layers' maps: the QR and Jacobi steps, most of what
    such a chain compiles, are then compiled once per run, not once per layer.
    """
    runs: list[list[_Piece]] = []
    for piece in pieces:
        prev = runs[-1][-1] if runs else None
        if (
            piece.square
            and prev is not None
            and prev.square
            and (prev.inputs.shape, prev.inputs.dtype) == (piece.inputs.shape, piece.inputs.dtype)
        ):
            runs[-1].append(piece)
        else:
            runs.append([piece])
    rows = []
    for run in runs:
        if len(run) == 1:
            step, sh, p, pts, rec, _ = run[0]
            apply = lambda x, c, step=step, sh=sh: _apply_rows(step, sh, x[0], x[1], c, transpose)  # noqa: E731
            (c, s), logs = _walk_layers(apply, (p, pts), pts.shape[0], c, s, rec, tol=tol, width=width)
            rows.append(logs)
            continue
        branches = [
            functools.partial(
                _apply_rows,
                pc.step,
                pc.shared,
                jax.tree.map(lambda a: a[0], pc.params),
                pc.inputs[0],
                transpose=transpose,
            )
            for pc in run
        ]
        rec = None if run[0].record is None else jnp.concatenate([pc.record for pc in run])
        apply = lambda i, c, branches=branches: lax.switch(i, branches, c)  # noqa: E731
        (c, s), logs = _walk_layers(apply, jnp.arange(len(run)), len(run), c, s, rec, tol=tol, width=width)
        rows += list(jnp.split(logs, len(run)))
    return (c, s), rows


def _slice(tree: Any, lo: int, hi: int, reverse: bool = False) -> Any:
    return jax.tree.map(lambda a: a[lo:hi][::-1] if reverse else a[lo:hi], tree)


def _inputs(steps, shared, params, h0, upto: int | None = None) -> tuple[list[jax.Array], jax.Array]:
    """The forward pass: each segment's layer inputs, (depth, *state shape), and the last output,
    over the segments that begin before layer `upto` (default: all)."""
    points, h, at = [], h0, 0
    for (step, depth), sh, p in zip(steps, shared, params, strict=True):
        if upto is not None and at >= upto:
            break
        h, pts = _states(step, sh, p, h, depth)
        points.append(pts)
        at += depth
    return points, h


_inputs_jit = jax.jit(_inputs, static_argnames=("steps", "upto"))


def _exact(steps, shared, params, h0, record, *, direction, tol, lo=1, hi=None):
    """Log singular values of the chain's products, (L, W): row l - 1 is J_l or G_l, -inf padded.

    steps: static ((step, depth), ...) per segment; shared, params: their traced parts.
    record: (L,) bool, the layers whose spectrum is wanted (other rows NaN), or None for all
    (no branch compiled: `log_singular_values`). Only the layers the
    wanted products contain are walked: forward layers 1 .. hi (J_hi the deepest wanted),
    backward layers L .. lo + 1 (G_lo the shallowest wanted; A_1 only ever feeds G_0).
    """
    L = sum(d for _, d in steps)
    hi = L if hi is None else hi
    # The forward pass: the input of every layer (up to layer hi going forward), per segment.
    points, h = _inputs(steps, shared, params, h0, upto=hi if direction == "forward" else None)
    sizes = [int(np.prod(pts.shape[1:])) for pts in points for _ in range(pts.shape[0])]
    sizes.append(int(np.prod(h.shape)))  # sizes[j] = N_j, the size of h_j
    # The walked layers, as pieces of segments: (step, shared, params, inputs, a, b, first), the
    # segment's layers a .. b - 1 (0-based within it), `first` the global 0-based index of a.
    first_walked = 0 if direction == "forward" else lo
    last_walked = hi if direction == "forward" else L
    pieces, at = [], 0
    for (step, depth), sh, p, pts in zip(steps, shared, params, points, strict=False):
        a, b = max(first_walked, at), min(last_walked, at + depth)
        if a < b:
            pieces.append((step, sh, p, pts, a - at, b - at, a))
        at += depth
    dtype = h0.dtype
    if direction == "forward":
        bounds = np.minimum.accumulate(sizes[: hi + 1])  # rank bound of J_l: min(N_0 .. N_l)
        width = int(bounds[1:].max())
        walk = [  # walking A_{j+1} gives row J_{j+1}
            _Piece(
                step,
                sh,
                _slice(p, a, b),
                pts[a:b],
                None if record is None else record[g : g + b - a],
                b - a == 1 and sizes[g] == sizes[g + 1],
            )
            for step, sh, p, pts, a, b, g in pieces
        ]
        c, s = jnp.eye(sizes[0], dtype=dtype), jnp.zeros(sizes[0], dtype)
        _, rows = _walk_pieces(walk, c, s, transpose=False, tol=tol, width=width)
        return jnp.concatenate([*rows, jnp.full((L - hi, width), jnp.nan, dtype)])
    # Backward: G_l^T = A_{l+1}^T ... A_L^T from the top; walking A_{j+1}^T (0-based j) turns the
    # product into G_j^T, row j - 1, with min(N_j .. N_L) rows.
    width = sizes[L]
    walk = [
        _Piece(
            step,
            sh,
            _slice(p, a, b, reverse=True),
            pts[a:b][::-1],
            None if record is None else record[g - 1 : g - 1 + b - a][::-1],
            b - a == 1 and sizes[g] == sizes[g + 1],
        )
        for step, sh, p, pts, a, b, g in reversed(pieces)
    ]
    c, s = jnp.eye(sizes[L], dtype=dtype), jnp.zeros(sizes[L], dtype)
    _, rows = _walk_pieces(walk, c, s, transpose=True, tol=tol, width=width)
    rows = [logs[::-1] for logs in rows]
    top = (
        jnp.zeros(width, dtype)
        if record is None
        else jnp.where(record[L - 1], jnp.zeros(width, dtype), jnp.nan)
    )
    unwanted = jnp.full((lo - 1, width), jnp.nan, dtype)
    return jnp.concatenate([unwanted, *reversed(rows), top[None]])


_exact_jit = jax.jit(_exact, static_argnames=("steps", "direction", "tol", "lo", "hi"))


def log_singular_values(
    step: Step, params: Any, h0: jax.Array, *, direction: str = "forward", tol: float | None = None
) -> jax.Array:
    """The pure core of `jacobian_spectra(method="exact")`, for use under `jit` and `vmap`.

    Returns (L, N) log singular values, sorted descending: row l - 1 is J_l (forward) or G_l
    (backward; the last row is G_L = I). No argument checks: use `jacobian_spectra` at API
    boundaries and this under `jax.vmap` over inputs, seeds or configurations.
    """
    depth = jax.tree_util.tree_leaves(params)[0].shape[0]
    steps, shared, ps = ((_Unshared(step), depth),), (None,), (params,)
    return _exact(steps, shared, ps, jnp.asarray(h0), None, direction=direction, tol=tol)


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
      oversample, refine, key: topk only: extra block columns (default k: the block is 2k
        wide), the most subspace-iteration rounds at each requested depth (it stops once the
        top k log sigma move by < 1e-5), and the PRNG key of the random start block.
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


def _state_sizes(c: Chain) -> np.ndarray:
    """N_0 .. N_L: the sizes of the chain's states (by shape only)."""
    shapes = jax.eval_shape(c.states)
    sizes = [int(np.prod(c.h0.shape))]
    for hs in shapes:
        sizes += [int(np.prod(hs.shape[1:]))] * int(hs.shape[0])
    return np.asarray(sizes)


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
    sizes = _state_sizes(c)
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
        raise ValueError(f"oversample must be >= 0 (extra block columns for topk), got {oversample}")

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


def _layers(step3, shared, params, points, c, s, n_steps, transpose, down, tol=None):
    """Apply n_steps layers of the walk to the rows of a log-scaled block (dynamic trip count).

    Returns orthonormal rows and the log singular values of the block's product (Jacobi once, at
    the end; each layer only re-factors).

    Up (down=False): layers 0 .. n_steps-1 in walk order, each by A (or A^T if transpose).
    Down (down=True): the adjoint of that, layers n_steps-1 .. 0, each by A^T (or A).
    """

    def body(t, carry):
        c, s = carry
        i = jnp.where(down, n_steps - 1 - t, t)
        p = jax.tree_util.tree_map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), params)
        h = lax.dynamic_index_in_dim(points, i, keepdims=False)
        return _jacobi.carry_step(_apply_rows(step3, shared, p, h, c, transpose != down), s)

    c, s = lax.fori_loop(0, n_steps, body, (c, s))
    return _jacobi.qr_step(c, s, tol=tol)  # orthonormal rows, exp(s) the singular values


def _topk(c: Chain, wanted, direction, k, oversample, refine, key, tol):
    """Block recursion from a random orthonormal start, refined by subspace iteration on J^T J,
    along the chain's segments (widths may change between them)."""
    steps, shared, params = c.parts()
    points, _ = _inputs_jit(steps, shared, params, c.h0)
    sizes = _state_sizes(c)
    L = int(sizes.shape[0]) - 1
    ends = np.cumsum([d for _, d in steps])  # layer index (1-based) of each segment's last layer
    forward = direction == "forward"
    dtype = c.h0.dtype
    # Depths in walk order, each started from the previous one's block where the shapes allow:
    # the input-side singular directions of a product settle as it deepens (Oseledets), so a
    # deeper depth starts nearer its answer (tanh, N = 1024, depth 32: 8 rounds instead of 10).
    order = sorted((int(l) for l in wanted), reverse=not forward)
    logs, x = {}, None
    for l in order:
        if not forward and l == L:  # G_L = I
            logs[l] = jnp.zeros(k, dtype)
            continue
        if forward:  # layers 1 .. l: segments 0 .. last, the last one's first n layers
            last = int(np.searchsorted(ends, l))
            segs, n = tuple(range(last + 1)), l - (int(ends[last - 1]) if last else 0)
            path = sizes[: l + 1]
        else:  # layers L .. l + 1, top down: segments from the top to the one holding l + 1
            last = int(np.searchsorted(ends, l + 1))
            segs, n = tuple(range(len(steps) - 1, last - 1, -1)), int(ends[last]) - l
            path = sizes[l:]
        m = min(int(path.min()), k + (k if oversample is None else oversample))
        n_in = int(sizes[0] if forward else sizes[L])
        if x is None or x.shape[0] != m:  # (its rows are not sorted: no subset of them is kept)
            x = jnp.linalg.qr(jax.random.normal(key, (n_in, m), dtype))[0].T  # (m, n_in) orthonormal
        walk = [  # each walked segment in walk order: its steps, params and input states
            (
                steps[i][0],
                shared[i],
                params[i] if forward else _slice(params[i], None, None, True),
                points[i] if forward else points[i][::-1],
            )
            for i in segs
        ]
        depths = tuple(steps[i][1] for i in segs)
        logs[l], x = _topk_path(
            tuple(w[0] for w in walk),
            tuple(w[1] for w in walk),
            tuple(w[2] for w in walk),
            tuple(w[3] for w in walk),
            x,
            jnp.int32(n),
            depths=depths,
            k=k,
            transpose=not forward,
            refine=refine,
            tol=tol,
        )
    out = [
        jnp.concatenate([logs[int(l)][:k], jnp.full((k - min(k, logs[int(l)].shape[0]),), -jnp.inf, dtype)])
        for l in wanted
    ]
    return jnp.stack(out)


@functools.partial(
    jax.jit, static_argnames=("steps", "depths", "k", "transpose", "refine", "tol", "refine_tol")
)
def _topk_path(
    steps, shared, params, points, x0, n_last, *, depths, k, transpose, refine, tol, refine_tol=1e-5
):
    """Top log singular values of the product along one walk path, from the start block x0 (m, N).

    The path is segments in walk order (`steps`, `shared`, `params` and input `points` of each,
    reversed for a backward walk; `depths` theirs): every layer of all but the last and the
    first `n_last` layers of the last. Module-level and jitted on the steps (cached like
    `_exact_jit`), so another depth in the same last segment, input or set of variables of the
    same shapes reuses the compiled program. Returns the m log singular values, sorted
    descending, and the final right singular block (the start for a deeper depth).
    """
    counts = (*depths[:-1], n_last)
    zeros = jnp.zeros(x0.shape[0], points[0].dtype)

    def segment(step3, sh, p, pts, depth, n, c, s, down):
        if depth == 1:  # one layer, whose state may change size: no loop (its carry would)
            y = _apply_rows(step3, sh, jax.tree.map(lambda a: a[0], p), pts[0], c, transpose != down)
            return _jacobi.qr_step(y, s, tol=tol)
        return _layers(step3, sh, p, pts, c, s, n, transpose, down, tol)

    path = list(zip(steps, shared, params, points, depths, counts, strict=True))

    def up(x):
        c, s = x, zeros
        for piece in path:
            c, s = segment(*piece, c, s, False)
        return c, s

    def down(u):
        c, s = u, zeros
        for piece in reversed(path):
            c, s = segment(*piece, c, s, True)
        return c, s

    top = lambda s: jnp.sort(s)[::-1][:k]  # noqa: E731

    def cond(state):
        return (state[3] > refine_tol) & (state[4] < refine)

    def body(state):
        # Subspace iteration on J^T J: left singular directions U (the rows, orthonormal, their
        # dead rows zeroed) go down through J^T; the resulting right directions come back up.
        c, s, _, _, it = state
        u = jnp.where(jnp.isfinite(s)[:, None], c, 0.0)
        x, _ = down(u)
        c2, s2 = up(x)
        return c2, s2, x, jnp.max(jnp.abs(top(s2) - top(s))), it + 1

    c, s = up(x0)
    state = (c, s, x0, jnp.asarray(jnp.inf, zeros.dtype), 0)
    _, s, x, _, _ = lax.while_loop(cond, body, state)
    return jnp.sort(s)[::-1], x


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
    _, points = _states(step3, None, params, h0, depth)

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
