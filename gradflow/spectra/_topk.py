"""The matrix-free engine: the k largest singular values of a layer chain's Jacobian products.

Method ("topk"): the exact engine's log-scaled recursion on a block of m = k + oversample rows
from a random orthonormal start (J_l X_0 instead of J_l), then, at each requested depth, a block
iteration on J_l^T J_l (vjp back down, jvp up, all in log-scaled form): the top m left Ritz
directions U go down through J^T, and the new right block Y_t = orth(J^T U) comes back up
together with the previous round's Y_{t-1}: the Ritz values of J on span{Y_t, Y_t-1} (2m rows,
the log-scaled product and Jacobi: exact at any scale) are the estimates. Keeping the previous
block is LOBPCG's locally optimal step (Knyazev 2001) without a preconditioner: where the
spectrum is clustered (a conv layer's) it converges in far fewer rounds than plain subspace
iteration, at 1.5 times a round's cost, so a small oversample does what 2k rows did
(`experiments/bench/bench_topk_matfree.py` measures both). It stops once the top k log sigma move by < 1e-5
(or after `refine` rounds). Matrix-free: memory O(m N + L N), never N x N. On a chain whose
state sizes change, the block (and the basis) has at most as many rows as the smallest state the
product passes through (the rank bound), and a one-layer segment that changes the size is
applied outside any loop.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow.nn.chains import Chain, inputs, walk
from gradflow.spectra import _jacobi
from gradflow.spectra._exact import _apply_rows, _slice

_inputs_jit = jax.jit(
    functools.partial(walk, observe=inputs), static_argnames=("steps",)
)  # each segment's layer inputs, one compiled call


def default_oversample(k: int) -> int:
    """Extra rows of the block beyond k (2 at least): with the previous round's block in the
    Ritz basis, a small margin converges about as fast as a block of 2k without it, at less cost."""
    return max(2, k // 4)


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
    """Block recursion from a random orthonormal start, refined by block iteration on J^T J,
    along the chain's segments (widths may change between them)."""
    steps, shared, params = c.parts()
    _, points = _inputs_jit(steps, shared, params, c.h0)
    sizes = c.state_sizes()
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
        m = min(int(path.min()), k + (default_oversample(k) if oversample is None else oversample))
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
            key,
            depths=depths,
            k=k,
            transpose=not forward,
            refine=refine,
            tol=tol,
            m_basis=min(int(path.min()), 2 * m),
        )
    out = [
        jnp.concatenate([logs[int(l)][:k], jnp.full((k - min(k, logs[int(l)].shape[0]),), -jnp.inf, dtype)])
        for l in wanted
    ]
    return jnp.stack(out)


@functools.partial(
    jax.jit, static_argnames=("steps", "depths", "k", "transpose", "refine", "tol", "refine_tol", "m_basis")
)
def _topk_path(
    steps,
    shared,
    params,
    points,
    x0,
    n_last,
    key,
    *,
    depths,
    k,
    transpose,
    refine,
    tol,
    refine_tol=1e-5,
    m_basis,
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
    zeros = jnp.zeros(max(x0.shape[0], m_basis), points[0].dtype)

    def segment(step3, sh, p, pts, depth, n, c, s, down):
        if depth == 1:  # one layer, whose state may change size: no loop (its carry would)
            y = _apply_rows(step3, sh, jax.tree.map(lambda a: a[0], p), pts[0], c, transpose != down)
            return _jacobi.qr_step(y, s, tol=tol)
        return _layers(step3, sh, p, pts, c, s, n, transpose, down, tol)

    path = list(zip(steps, shared, params, points, depths, counts, strict=True))

    def up(x):
        c, s = x, zeros[: x.shape[0]]
        for piece in path:
            c, s = segment(*piece, c, s, False)
        return c, s

    def down(u):
        c, s = u, zeros[: u.shape[0]]
        for piece in reversed(path):
            c, s = segment(*piece, c, s, True)
        return c, s

    top = lambda s: jnp.sort(s)[::-1][:k]  # noqa: E731
    m = x0.shape[0]
    m_aug = max(m, min(m_basis, x0.shape[1]))  # the Ritz basis: the block and, where the
    # states are wide enough, the previous round's block

    def cond(state):
        return (state[3] > refine_tol) & (state[4] < refine)

    def body(state):
        # The top m left Ritz directions U (rows, orthonormal, dead rows zeroed) go down
        # through J^T; Y = orth(J^T U) and the previous round's block come back up as the basis.
        c, s, y_prev, _, it = state
        order = jnp.argsort(-s)[:m]
        u = jnp.where(jnp.isfinite(s[order])[:, None], c[order], 0.0)
        y, _ = down(u)
        c2, s2 = up(basis(y, y_prev))
        return c2, s2, y, jnp.max(jnp.abs(top(s2) - top(s))), it + 1

    def basis(y, y_prev):
        if m_aug == m:
            return y
        q = jnp.linalg.qr(jnp.concatenate([y, y_prev]).T)[0]  # (N, 2m) orthonormal columns
        return q.T[:m_aug]

    extra = jnp.linalg.qr(jax.random.normal(jax.random.fold_in(key, 1), x0.shape[::-1], x0.dtype))[0].T
    start = basis(x0, extra)  # the first round's basis: x0 and random directions
    c, s = up(start)
    state = (c, s, x0, jnp.asarray(jnp.inf, zeros.dtype), 0)
    _, s, y, _, _ = lax.while_loop(cond, body, state)
    return jnp.sort(s)[::-1][:m], y
