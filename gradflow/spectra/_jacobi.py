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
selects only (no gathers), and re-arranges the halves by a fixed slice-and-concatenate.
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


def _rotate_pairs(ct, cb, st, sb, at, ab):
    """Rotate the pairs (top[k], bottom[k]) so each pair of rows becomes orthogonal.

    The larger-scale row of each pair is i, the other j, r = exp(s_j - s_i) <= 1; selects, not
    gathers, so a round is a handful of fused elementwise ops. The accumulator rows (at, ab)
    receive the same full-scale rotation (cs, sn = cs * t), unscaled. Returns the new halves
    and the largest cosine between the pairs before rotation (the convergence measure).
    """
    swap = (sb > st)[:, None]
    ci, cj = jnp.where(swap, cb, ct), jnp.where(swap, ct, cb)
    si, sj = jnp.where(swap[:, 0], sb, st), jnp.where(swap[:, 0], st, sb)
    a = jnp.sum(ci * ci, axis=1)
    b = jnp.sum(cj * cj, axis=1)
    g = jnp.sum(ci * cj, axis=1)
    finite = jnp.isfinite(si) & jnp.isfinite(sj)
    r = jnp.where(finite, jnp.exp(jnp.minimum(sj - si, 0.0)), 0.0)
    # zeta = (r^2 b - a) / (2 r g); t = r * tau with tau finite as r -> 0.
    z = r * r * b - a
    sgn = jnp.where(z >= 0, 1.0, -1.0) * jnp.where(g >= 0, 1.0, -1.0)
    den = jnp.abs(z) + jnp.sqrt(z * z + 4.0 * (r * g) ** 2)
    tau = jnp.where(g != 0, sgn * 2.0 * jnp.abs(g) / jnp.where(den > 0, den, 1.0), 0.0)
    t = r * tau
    cs = 1.0 / jnp.sqrt(1.0 + t * t)
    new_i = cs[:, None] * (ci - (r * t)[:, None] * cj)  # scale s_i
    new_j = cs[:, None] * (tau[:, None] * ci + cj)  # scale s_j
    cos = jnp.where(b > 0, jnp.abs(g) / jnp.sqrt(jnp.where(a * b > 0, a * b, 1.0)), 0.0)
    ai, aj = jnp.where(swap, ab, at), jnp.where(swap, at, ab)
    sn = (cs * t)[:, None]
    acc_i, acc_j = cs[:, None] * ai - sn * aj, sn * ai + cs[:, None] * aj
    return (
        jnp.where(swap, new_j, new_i),
        jnp.where(swap, new_i, new_j),
        jnp.where(swap, acc_j, acc_i),
        jnp.where(swap, acc_i, acc_j),
        jnp.max(cos),
    )


def _next_arrangement(top: jax.Array, bottom: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Circle-method step: top = [x0, y0, x1 .. x_{h-2}], bottom = [y1 .. y_{h-1}, x_{h-1}].

    Pairs (top[k], bottom[k]) over m - 1 steps meet every pair once, and the arrangement
    returns to where it started.
    """
    return (
        jnp.concatenate([top[:1], bottom[:1], top[1:-1]]),
        jnp.concatenate([bottom[1:], top[-1:]]),
    )


def sweep(c: jax.Array, s: jax.Array, acc: jax.Array | None = None):
    """One full sweep (every pair once, m - 1 vectorized rounds), then renormalization.

    Returns (c, s, the largest pair cosine met during the sweep, acc): `acc` (m, k) has its rows
    rotated by the same rotations (pass the identity to get V^T of X V), or is None.
    """
    m0 = c.shape[0]
    track = acc is not None
    acc = acc if track else jnp.zeros((m0, 0), c.dtype)
    if m0 % 2:  # a bye for the round robin: a zero row of scale -inf never rotates
        c = jnp.concatenate([c, jnp.zeros((1, c.shape[1]), c.dtype)])
        s = jnp.concatenate([s, jnp.full((1,), -jnp.inf, s.dtype)])
        acc = jnp.concatenate([acc, jnp.zeros((1, acc.shape[1]), acc.dtype)])
    m = c.shape[0]
    h = m // 2

    def body(carry, _):
        ct, cb, st, sb, at, ab, off = carry
        ct, cb, at, ab, cos = _rotate_pairs(ct, cb, st, sb, at, ab)
        ct, cb = _next_arrangement(ct, cb)
        st, sb = _next_arrangement(st, sb)
        at, ab = _next_arrangement(at, ab)
        return (ct, cb, st, sb, at, ab, jnp.maximum(off, cos)), None

    carry = (c[:h], c[h:], s[:h], s[h:], acc[:h], acc[h:], jnp.zeros((), c.dtype))
    (ct, cb, _, _, at, ab, off), _ = lax.scan(body, carry, None, length=m - 1)
    c, acc = jnp.concatenate([ct, cb]), jnp.concatenate([at, ab])  # arrangement is back home
    c, s = renormalize(c[:m0], s[:m0])
    return c, s, off, (acc[:m0] if track else None)


def orthogonalize(
    c: jax.Array,
    s: jax.Array,
    *,
    tol: float | None = None,
    max_sweeps: int = 30,
    min_sweeps: int = 1,
    acc: jax.Array | None = None,
):
    """Sweep until every pair's cosine is below `tol` (default 8 m eps).

    Returns (c, s, sweeps) or, with an accumulator `acc`, (c, s, sweeps, acc rotated likewise).
    """
    m = c.shape[0]
    if tol is None:
        tol = 8.0 * m * float(jnp.finfo(c.dtype).eps)

    track = acc is not None
    acc0 = acc if track else jnp.zeros((m, 0), c.dtype)

    def cond(state):
        _, _, _, off, k = state
        return ((off > tol) | (k < min_sweeps)) & (k < max_sweeps)

    def body(state):
        c, s, acc, _, k = state
        c, s, off, acc = sweep(c, s, acc)
        return c, s, acc, off, k + 1

    c, s, acc, _, k = lax.while_loop(cond, body, (c, s, acc0, jnp.asarray(jnp.inf, c.dtype), 0))
    return (c, s, k, acc) if track else (c, s, k)


def qr_step(y: jax.Array, s: jax.Array, *, tol: float | None = None) -> tuple[jax.Array, jax.Array]:
    """Re-orthogonalize X = y^T diag(exp(s)) with QR preconditioning (Drmac & Veselic 2008).

    y: (m, n) rows (any norms), s: (m,) log-scales. Returns (c, s') with orthonormal rows c and
    X V = c^T diag(exp(s')) for an orthogonal V, i.e. exp(s') are the singular values of X.

    Rows sorted by scale, y^T = Q R (Householder), so X = Q R diag(exp(s)) = Q M. The rows of the
    triangular M are graded: row i is exp(s_i) (R_ij exp(s_j - s_i))_j with every factor <= 1, so
    M^T is exactly the log-scaled column form, and when the scales are graded its columns are
    already nearly orthogonal: Jacobi on it converges in one or two sweeps instead of ten.
    With M^T V' = C^T S: M = V' S C, X C^T = (Q V') S, so the new rows are (Q V')^T = V'^T Q^T.
    """
    m = y.shape[0]
    order = jnp.argsort(-s)
    y, s = y[order], s[order]
    q, r = jnp.linalg.qr(y.T)  # q (n, m), r (m, m)
    d = s[None, :] - s[:, None]  # s_j - s_i: <= 0 above the diagonal after sorting
    finite = jnp.isfinite(s)[:, None] & jnp.isfinite(s)[None, :]
    grade = jnp.where(finite, jnp.exp(jnp.minimum(d, 0.0)), 0.0)
    grade = jnp.where(jnp.eye(m, dtype=bool), 1.0, grade)
    c = jnp.triu(r * grade)
    c, s = renormalize(c, s)
    c, s, _, acc = orthogonalize(c, s, tol=tol, acc=jnp.eye(m, dtype=y.dtype))
    return acc @ q.T, s
