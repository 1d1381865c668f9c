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

Pairs are visited in round-robin (tournament) order: each of the m - 1 rounds rotates m / 2
disjoint pairs at once, vectorized.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@functools.lru_cache(maxsize=64)
def round_robin(m: int) -> np.ndarray:
    """Tournament schedule for m players (m even): array (m - 1, 2, m // 2) of (p, q) pairs."""
    if m % 2:
        raise ValueError(f"round_robin needs an even number of columns, got {m}")
    players = list(range(m))
    rounds = []
    for _ in range(m - 1):
        half = m // 2
        rounds.append([players[:half], players[half:][::-1]])
        players = [players[0], players[-1], *players[1:-1]]
    return np.asarray(rounds, dtype=np.int32)


def renormalize(c: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Fold row norms of c into the log-scales s; zero rows get scale -inf and stay zero."""
    n = jnp.sqrt(jnp.sum(c * c, axis=1))
    ok = n > 0
    c = c / jnp.where(ok, n, 1.0)[:, None]
    s = jnp.where(ok, s + jnp.log(jnp.where(ok, n, 1.0)), -jnp.inf)
    return c, s


def _rotate(c: jax.Array, s: jax.Array, p: jax.Array, q: jax.Array, inv: jax.Array, acc: jax.Array):
    """Rotate the disjoint row pairs (p_k, q_k) of one round so each pair becomes orthogonal.

    Returns the new c (rows back in their original order via the permutation `inv`) and the
    largest cosine between the pairs before rotation (the convergence measure).
    """
    swap = s[q] > s[p]
    i = jnp.where(swap, q, p)  # i: the larger-scale row of each pair
    j = jnp.where(swap, p, q)
    ci, cj = c[i], c[j]  # (m/2, n)
    a = jnp.sum(ci * ci, axis=1)
    b = jnp.sum(cj * cj, axis=1)
    g = jnp.sum(ci * cj, axis=1)
    finite = jnp.isfinite(s[j]) & jnp.isfinite(s[i])
    r = jnp.where(finite, jnp.exp(jnp.minimum(s[j] - s[i], 0.0)), 0.0)
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
    new_p = jnp.where(swap[:, None], new_j, new_i)
    new_q = jnp.where(swap[:, None], new_i, new_j)
    # The accumulator's rows rotate by the same full-scale rotation (cs, sn = cs * t), unscaled.
    ai, aj = acc[i], acc[j]
    sn = (cs * t)[:, None]
    acc_i, acc_j = cs[:, None] * ai - sn * aj, sn * ai + cs[:, None] * aj
    acc_p = jnp.where(swap[:, None], acc_j, acc_i)
    acc_q = jnp.where(swap[:, None], acc_i, acc_j)
    return jnp.concatenate([new_p, new_q])[inv], jnp.concatenate([acc_p, acc_q])[inv], jnp.max(cos)


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
    sched = round_robin(m)
    table = jnp.asarray(sched)
    inv_table = jnp.asarray(np.stack([np.argsort(np.concatenate(r)) for r in sched]).astype(np.int32))

    def body(carry, k):
        c, acc, off = carry
        c, acc, cos = _rotate(c, s, table[k, 0], table[k, 1], inv_table[k], acc)
        return (c, acc, jnp.maximum(off, cos)), None

    (c, acc, off), _ = lax.scan(body, (c, acc, jnp.zeros((), c.dtype)), jnp.arange(m - 1))
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
