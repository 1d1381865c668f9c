"""One-sided (Hestenes) Jacobi orthogonalization of a matrix held in log-scaled column form.

A matrix X (n x m) is held as X = C^T diag(exp(s)): row j of C (shape (m, n)) is the direction of
column j, kept near unit norm, and s_j its natural-log scale. Nothing is ever formed at scale
exp(s), so scales of exp(+-1e4) are as harmless as exp(0).

Jacobi rotations act on the right, X -> X R, so X V = C'^T diag(exp(s')) for an orthogonal V.
When the columns are orthogonal, the singular values of X are exp(s_j) ||c_j||.

Written by hand because no library does this: LAPACK's Jacobi SVD (gesvj) is not exposed by jax,
and it needs X itself in floating point, which at depth 1000 it is not. The rotation formulas
below are the standard ones (zeta = (beta - alpha) / (2 gamma), t = sign(zeta) / (|zeta| +
sqrt(1 + zeta^2))) rewritten in terms of r = exp(s_j - s_i) <= 1 (i the larger-scale column),
so that for r -> 0 a rotation degrades gracefully into Gram-Schmidt of the small column against
the large one instead of underflowing. One-sided Jacobi on a matrix B D (B well conditioned,
D diagonal) computes every singular value to high relative accuracy (Demmel & Veselic 1992),
which plain bidiagonal SVD of the product does not.

Pairs are visited in round-robin (circle-method) order with the rows kept as two halves, so
each of the m - 1 rounds rotates the m / 2 disjoint pairs (top[k], bottom[k]) with slices and
per-pair scalar coefficients (no gathers, no row swaps), and re-arranges the halves by a fixed
slice-and-concatenate. Convergence is checked with one Gram product C C^T (BLAS-3) between
sweeps, not by a further sweep. The same product says how far from the diagonal (rows sorted by
scale) the pairs still above tolerance lie. On a deep product that band is narrow, because the
cosines after preconditioning decay like exp(-|s_i - s_j|): tanh, N = 256, depth 64 needs bands
of 20, 6 and 1 rows where a full sweep has 255 rounds. A banded sweep then visits the pairs by
distance, 2 rounds per distance, instead of all m - 1 rounds.

`qr_step` preconditions with two Householder QRs (QR, then LQ: Drmac & Veselic 2008), which
turns the row-graded triangular factor of the first QR into a column-graded one. Jacobi then
works on that factor's columns directly, so no rotation accumulator is needed: the new rows are
the orthogonalized factor times Q^T, and they represent X exactly (up to rounding) even before
Jacobi has converged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def renormalize(c: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fold row norms of c into the log-scales s; zero rows get scale -inf and stay zero."""
    n = jnp.sqrt(jnp.sum(c * c, axis=1))
    ok = n > 0
    c = c / jnp.where(ok, n, 1.0)[:, None]
    s = jnp.where(ok, s + jnp.log(jnp.where(ok, n, 1.0)), -jnp.inf)
    return c, s


def _rotation(tt, bb, g, st, sb):
    """Per-pair coefficients (cs, u, v) that make rows top and bottom orthogonal.

    tt, bb: squared norms of the top and bottom rows, g their dot product, st, sb their scales.
    The larger-scale row of each pair is i, the other j, r = exp(s_j - s_i) <= 1. With
    t = r * tau the rotation is new_i = cs (c_i - r t c_j) (scale s_i), new_j = cs (tau c_i + c_j)
    (scale s_j); written per pair as new_top = cs (c_top + u c_bottom), new_bottom =
    cs (v c_top + c_bottom).
    """
    swap = sb > st  # the bottom row has the larger scale: i = bottom
    a, b = jnp.where(swap, bb, tt), jnp.where(swap, tt, bb)
    si, sj = jnp.maximum(st, sb), jnp.minimum(st, sb)
    finite = jnp.isfinite(si) & jnp.isfinite(sj)
    r = jnp.where(finite, jnp.exp(jnp.where(finite, sj - si, 0.0)), 0.0)
    # zeta = (r^2 b - a) / (2 r g); t = r * tau with tau finite as r -> 0.
    z = r * r * b - a
    sgn = jnp.where(z >= 0, 1.0, -1.0) * jnp.where(g >= 0, 1.0, -1.0)
    den = jnp.abs(z) + jnp.sqrt(z * z + 4.0 * (r * g) ** 2)
    tau = jnp.where(g != 0, sgn * 2.0 * jnp.abs(g) / jnp.where(den > 0, den, 1.0), 0.0)
    t = r * tau
    cs = 1.0 / jnp.sqrt(1.0 + t * t)
    return cs, jnp.where(swap, tau, -r * t), jnp.where(swap, -r * t, tau)


def _rotate_pairs(ct, cb, st, sb):
    """Rotate the pairs (top[k], bottom[k]): three row dot products and two axpys."""
    tt = jnp.sum(ct * ct, axis=1)
    bb = jnp.sum(cb * cb, axis=1)
    g = jnp.sum(ct * cb, axis=1)
    cs, u, v = (x[:, None] for x in _rotation(tt, bb, g, st, sb))
    return cs * (ct + u * cb), cs * (v * ct + cb)


def _next_arrangement(top: jax.Array, bottom: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Circle-method step: top = [x0, y0, x1 .. x_{h-2}], bottom = [y1 .. y_{h-1}, x_{h-1}].

    Pairs (top[k], bottom[k]) over m - 1 steps meet every pair once, and the arrangement
    returns to where it started. With one pair (h = 1) there is nothing to re-arrange.
    """
    if top.shape[0] == 1:
        return top, bottom
    return (
        jnp.concatenate([top[:1], bottom[:1], top[1:-1]]),
        jnp.concatenate([bottom[1:], top[-1:]]),
    )


def sweep(c: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One full sweep (every pair once, m - 1 vectorized rounds), then renormalization."""
    m0 = c.shape[0]
    if m0 % 2:  # a bye for the round robin: a zero row of scale -inf never rotates
        c = jnp.concatenate([c, jnp.zeros((1, c.shape[1]), c.dtype)])
        s = jnp.concatenate([s, jnp.full((1,), -jnp.inf, s.dtype)])
    m = c.shape[0]
    h = m // 2

    def body(carry, _):
        ct, cb, st, sb = carry
        ct, cb = _rotate_pairs(ct, cb, st, sb)
        ct, cb = _next_arrangement(ct, cb)
        st, sb = _next_arrangement(st, sb)
        return (ct, cb, st, sb), None

    (ct, cb, _, _), _ = lax.scan(body, (c[:h], c[h:], s[:h], s[h:]), None, length=m - 1, unroll=2)
    c = jnp.concatenate([ct, cb])  # the arrangement is back home
    return renormalize(c[:m0], s[:m0])


def _distance_round(c: jax.Array, s: jax.Array, d: jax.Array, parity: jax.Array) -> jax.Array:
    """Rotate the disjoint pairs (i, i + d) with floor(i / d) = parity (mod 2), all at once.

    c, s: m rows and scales with a zero row of scale -inf appended (index m), which stands in for
    the missing partners: its pairs rotate by the identity. The tops are enumerated by arithmetic
    (k -> 2 d floor(k / d) + parity d + k mod d), gathered with their partners, rotated like a
    round-robin round and scattered back. Two rounds (parity 0, 1) visit every pair at distance d.
    """
    m = c.shape[0] - 1
    k = jnp.arange(m // 2)
    i = 2 * d * (k // d) + parity * d + k % d
    ok = i + d < m
    top, bottom = jnp.where(ok, i, m), jnp.where(ok, i + d, m)
    ct, cb = _rotate_pairs(c[top], c[bottom], s[top], s[bottom])
    return c.at[top].set(ct).at[bottom].set(cb)


def banded_sweep(c: jax.Array, s: jax.Array, band: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Every pair (i, j) with |i - j| <= band once (2 band rounds, by distance), then renormalize.

    Where the pairs beyond the band are already orthogonal to tolerance (as `off_diagonal`
    reports), this does a full sweep's work in 2 band rounds instead of m - 1.
    """
    m = c.shape[0]
    c1 = jnp.concatenate([c, jnp.zeros((1, c.shape[1]), c.dtype)])
    s1 = jnp.concatenate([s, jnp.full((1,), -jnp.inf, s.dtype)])

    def body(t, c1):
        return _distance_round(c1, s1, t // 2 + 1, t % 2)

    return renormalize(lax.fori_loop(0, 2 * band, body, c1)[:m], s)


def off_diagonal(c: jax.Array, tol: float) -> tuple[jax.Array, jax.Array]:
    """(largest |cos| between two rows, largest |i - j| whose |cos| > tol), by one Gram product.

    Rows of unit norm or zero.
    """
    m = c.shape[0]
    g = jnp.where(jnp.eye(m, dtype=bool), 0.0, jnp.abs(c @ c.T))
    dist = jnp.abs(jnp.arange(m)[:, None] - jnp.arange(m)[None, :])
    return jnp.max(g), jnp.max(jnp.where(g > tol, dist, 0))


# Below this many rows a full sweep is cheap next to compiling a second kind of sweep.
BANDED_MIN_ROWS = 64


def _banded_pays(band: jax.Array, m: int) -> jax.Array:
    # a distance round (gather + scatter) costs ~1.7x a round-robin round (slices), measured on
    # CPU at m = 256: 2 band rounds beat m - 1 where band < (m - 1) / 3.4
    return 3 * band < m - 1


@jax.custom_batching.custom_vmap
def _next_sweep(c: jax.Array, s: jax.Array, band: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A banded sweep where it pays, else a full one."""
    return lax.cond(_banded_pays(band, c.shape[0]), banded_sweep, lambda c, s, _: sweep(c, s), c, s, band)


@_next_sweep.def_vmap
def _next_sweep_vmap(axis_size, in_batched, c, s, band):
    # Under a plain vmap the cond's predicate is batched and both sweeps would run for every
    # member: choose once for the batch instead, with the widest member's band.
    c, s, band = (
        x if batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))
        for x, batched in zip((c, s, band), in_batched, strict=True)
    )
    widest = jnp.max(band)
    c, s = lax.cond(
        _banded_pays(widest, c.shape[1]),
        lambda: jax.vmap(banded_sweep, (0, 0, None))(c, s, widest),
        lambda: jax.vmap(sweep)(c, s),
    )
    return (c, s), (True, True)


def orthogonalize(
    c: jax.Array, s: jax.Array, *, tol: float | None = None, max_sweeps: int = 30
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sweep until every pair's cosine is below `tol` (default 8 m eps); c must be renormalized.

    From `BANDED_MIN_ROWS` rows up, each sweep covers the pairs the last Gram product found
    above `tol`: a banded sweep (`banded_sweep`, 2 band rounds) where they all lie within a band
    of the diagonal narrow enough to pay, else a full round-robin sweep (m - 1 rounds); below
    that, full sweeps. Returns (c, s, sweeps); zero sweeps when c is already orthogonal to `tol`.
    """
    m = c.shape[0]
    if tol is None:
        tol = 8.0 * m * float(jnp.finfo(c.dtype).eps)

    def cond(state):
        _, _, off, _, k = state
        return (off > tol) & (k < max_sweeps)

    def body(state):
        c, s, _, band, k = state
        c, s = _next_sweep(c, s, band) if m >= BANDED_MIN_ROWS else sweep(c, s)
        return c, s, *off_diagonal(c, tol), k + 1

    c, s, _, _, k = lax.while_loop(cond, body, (c, s, *off_diagonal(c, tol), 0))
    return c, s, k


def _grade(s: jax.Array) -> jax.Array:
    """exp(min(s_j - s_i, 0)) (1 on the diagonal, 0 where a scale is -inf)."""
    d = s[None, :] - s[:, None]
    finite = jnp.isfinite(s)[:, None] & jnp.isfinite(s)[None, :]
    grade = jnp.where(finite, jnp.exp(jnp.minimum(jnp.where(finite, d, 0.0), 0.0)), 0.0)
    return jnp.where(jnp.eye(s.shape[0], dtype=bool), 1.0, grade)


def precondition(y: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """X = y^T diag(exp(s)) as X W = q c^T diag(exp(s')), W orthogonal, by QR then LQ.

    y: (m, n) rows (any norms), s: (m,) log-scales. Returns q (n, p) with orthonormal columns,
    c (p, p) with unit (or zero) rows, and s' (p,), p = min(m, n): where n < m (a layer into a
    smaller state) the representation shrinks to the rank bound n. The rows of c are nearly orthogonal where the
    scales are well separated (their cosines decay like exp(-|s'_i - s'_j|)).

    Rows sorted by scale, y^T = Q R, so X = Q R diag(exp(s)) = Q diag(exp(s1)) K, K_ij =
    R_ij exp(s_j - s_i) / ||row i|| <= |R_ij| (row-graded). Rows re-sorted by s1 and K^T = Q2 R2:
    K = R2^T Q2^T, X Q2 = Q diag(exp(s1)) R2^T, whose column j is exp(s1_j) times
    (R2_ji exp(s1_i - s1_j))_i, bounded: column-graded, the form Jacobi works on.
    """
    order = jnp.argsort(-s)
    y, s = y[order], s[order]
    q, r = jnp.linalg.qr(y.T)  # q (n, p), r (p, m), p = min(n, m)
    p = r.shape[0]  # p < m where the state is smaller than the rows: X has rank <= p, and the
    # rows past p are dropped (X W keeps its singular values; the others are exactly zero)
    k, s1 = renormalize(jnp.triu(r * _grade(s)[:p]), s[:p])
    order = jnp.argsort(-s1)
    k, s1, q = k[order], s1[order], q[:, order]
    _, r2 = jnp.linalg.qr(k.T)
    c, s2 = renormalize(jnp.triu(r2 * _grade(s1)), s1)
    return q, c, s2


def carry_step(y: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Re-factor X = y^T diag(exp(s)) by the QR + LQ preconditioning alone (no Jacobi).

    Returns (rows, s') with X W = rows^T diag(exp(s')) for an orthogonal W: exact, like
    `qr_step`, but the rows are only nearly orthogonal (column-graded triangular factor times
    Q^T; condition numbers of 1.5 typical, under 10 measured on tanh nets at N = 256), so exp(s')
    are not yet the singular values. It is all the next layer of a product needs: applying A to
    these rows costs eps * cond(rows) * cond(A) relative per row, as with orthonormal rows.
    """
    q, c, s = precondition(y, s)
    return c @ q.T, s


def qr_step(y: jax.Array, s: jax.Array, *, tol: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Re-orthogonalize X = y^T diag(exp(s)): QR + LQ preconditioning, then Jacobi to `tol`.

    y: (m, n) rows (any norms), s: (m,) log-scales. Returns (rows, s') with orthonormal rows and
    X V = rows^T diag(exp(s')) for an orthogonal V, i.e. exp(s') are the singular values of X.
    """
    q, c, s = precondition(y, s)
    c, s, _ = orthogonalize(c, s, tol=tol)
    return c @ q.T, s
