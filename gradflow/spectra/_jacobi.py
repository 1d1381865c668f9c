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


def _rotate(c: jax.Array, s: jax.Array, p: jax.Array, q: jax.Array, inv: jax.Array):
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
    return jnp.concatenate([new_p, new_q])[inv], jnp.max(cos)


def sweep(c: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One full sweep (every pair once, m - 1 vectorized rounds), then renormalization.

    Returns (c, s, the largest pair cosine met during the sweep).
    """
    m = c.shape[0]
    sched = round_robin(m)
    table = jnp.asarray(sched)
    inv_table = jnp.asarray(np.stack([np.argsort(np.concatenate(r)) for r in sched]).astype(np.int32))

    def body(carry, k):
        c, off = carry
        c, cos = _rotate(c, s, table[k, 0], table[k, 1], inv_table[k])
        return (c, jnp.maximum(off, cos)), None

    (c, off), _ = lax.scan(body, (c, jnp.zeros((), c.dtype)), jnp.arange(m - 1))
    c, s = renormalize(c, s)
    return c, s, off


def orthogonalize(
    c: jax.Array, s: jax.Array, *, tol: float | None = None, max_sweeps: int = 30, min_sweeps: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sweep until every pair's cosine is below `tol` (default 8 m eps); returns (c, s, sweeps)."""
    m = c.shape[0]
    if tol is None:
        tol = 8.0 * m * float(jnp.finfo(c.dtype).eps)

    def cond(state):
        _, _, off, k = state
        return ((off > tol) | (k < min_sweeps)) & (k < max_sweeps)

    def body(state):
        c, s, _, k = state
        c, s, off = sweep(c, s)
        return c, s, off, k + 1

    c, s, _, k = lax.while_loop(cond, body, (c, s, jnp.asarray(jnp.inf, c.dtype), 0))
    return c, s, k


def pad_even(c: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Append a zero row (scale -inf) when the number of rows is odd; it never rotates."""
    if c.shape[0] % 2 == 0:
        return c, s
    c = jnp.concatenate([c, jnp.zeros((1, c.shape[1]), c.dtype)])
    s = jnp.concatenate([s, jnp.full((1,), -jnp.inf, s.dtype)])
    return c, s
