"""The exact engine: every singular value of a layer chain's Jacobian products, log-scaled.

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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow.nn.chains import inputs, walk
from gradflow.spectra import _jacobi

Step = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class _Unshared:
    """A user's step(params_l, h) as a chain step (shared, params_l, h): equal steps hash equal."""

    step: Step

    def __call__(self, shared: Any, p: Any, h: jax.Array) -> jax.Array:
        return self.step(p, h)


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
    h, points = walk(steps, shared, params, h0, observe=inputs, upto=hi if direction == "forward" else None)
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
        route = [  # walking A_{j+1} gives row J_{j+1}
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
        _, rows = _walk_pieces(route, c, s, transpose=False, tol=tol, width=width)
        return jnp.concatenate([*rows, jnp.full((L - hi, width), jnp.nan, dtype)])
    # Backward: G_l^T = A_{l+1}^T ... A_L^T from the top; walking A_{j+1}^T (0-based j) turns the
    # product into G_j^T, row j - 1, with min(N_j .. N_L) rows.
    width = sizes[L]
    route = [
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
    _, rows = _walk_pieces(route, c, s, transpose=True, tol=tol, width=width)
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
