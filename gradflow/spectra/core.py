"""Per-layer singular-value spectra of Jacobian products, in log space, for any layer walk.

For maps h_l = step(params[l], h_{l-1}), l = 1..L, with A_l = d h_l / d h_{l-1} at the walked
states:
- forward products  J_l = A_l ... A_1 = d h_l / d h_0,
- backward products G_l = A_L ... A_{l+1} = d h_L / d h_l (what a gradient reaching layer l went
  through; G_L = I). Its singular values are those of G_l^T = A_{l+1}^T ... A_L^T, walked from the top.

Method ("exact"): the product is carried as M V = C^T diag(exp(s)) for an orthogonal V (unknown,
never needed): C has near-unit rows, s natural-log scales. Each layer applies A_l to the rows of C
with `jax.linearize` + `vmap` (no N x N Jacobian is materialised), then re-factors the result in
log-scaled form (`_jacobi`): two Householder QRs (QR with the rows sorted by scale, then LQ of the
graded triangular factor: Drmac & Veselic 2008) leave a column-graded triangular matrix with
nearly orthogonal rows, which is all the next layer needs. At a requested depth one-sided Jacobi
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

Method ("topk"): the same recursion on k + oversample rows (default 2k) from a random orthonormal
block (J_l X_0 instead of J_l), followed at each requested depth by subspace iteration through
J_l^T J_l (vjp back down, jvp up, all in log-scaled form) until the top k settle, i.e.
matrix-free: memory O((k + oversample) N + L N), never N x N.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow.spectra import _jacobi
from gradflow.spectra.result import SpectraResult

Step = Callable[[Any, jax.Array], jax.Array]
METHODS = ("exact", "topk")
DIRECTIONS = ("forward", "backward")


@functools.lru_cache(maxsize=256)
def _lift(step: Step) -> Callable[[Any, Any, jax.Array], jax.Array]:
    """step as (shared, params_l, h) -> h with nothing shared; cached, so jit sees one function."""
    return lambda shared, p, h: step(p, h)


@functools.lru_cache(maxsize=256)
def _walk_step(model: Any, train: bool) -> Callable[[Any, Any, jax.Array], jax.Array]:
    """A model's walk step with its variables and input as traced arguments, not closed over.

    `model.walk(...)` returns a fresh closure on every call, so passing `walk.step` to a jitted
    function recompiles each time; this function is the same for equal (hashable) models, so the
    compiled program is reused across calls with new variables or inputs of the same shapes.
    """
    return lambda shared, p, h: model.walk(shared[0], shared[1], train=train).step(p, h)


@functools.lru_cache(maxsize=256)
def _flat_step(step: Step, shape: tuple[int, ...]) -> Step:
    """step on flat vectors, for states of any shape (e.g. (B, W) in BatchNorm batch mode).

    Cached, so the same `step` gives the same function and jit reuses its compiled program.
    """
    return lambda p, v: step(p, v.reshape(shape)).reshape(-1)


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
    d = np.asarray(depths, dtype=np.int64).reshape(-1)
    if d.size == 0 or d.min() < 1 or d.max() > depth:
        raise ValueError(f"depths must be layer indices in 1..{depth}, got {list(depths)}")
    return np.unique(d)


def _states(step: Step, params: Any, h0: jax.Array) -> jax.Array:
    """h_0 .. h_{L-1}: the points at which A_1 .. A_L are taken, shape (L, N)."""
    _, hs = lax.scan(lambda h, p: (step(p, h), h), h0, params)
    return hs


def _apply_rows(step: Step, p: Any, h: jax.Array, c: jax.Array, transpose: bool) -> jax.Array:
    """Rows of c mapped by A = d step(p, .)/dh at h (or by A^T), shape (m, N) -> (m, N)."""
    if transpose:
        _, vjp = jax.vjp(lambda x: step(p, x), h)
        return jax.vmap(lambda v: vjp(v)[0])(c)
    _, jvp = jax.linearize(lambda x: step(p, x), h)
    return jax.vmap(jvp)(c)


def _walk_products(
    step: Step,
    params: Any,
    points: jax.Array,
    transpose: bool,
    tol: float | None,
    record: jax.Array | None = None,
) -> jax.Array:
    """Sorted log singular values of the running product at each layer, shape (L, N).

    record: (L,) bool, the layers whose spectrum is wanted (default: all); the other rows are
    NaN and those layers only re-factor the product (`_jacobi.carry_step`: two QRs, no Jacobi).
    """
    n = points.shape[1]

    def readout(c, s):
        c, s, _ = _jacobi.orthogonalize(c, s, tol=tol)
        return c, s, jnp.sort(s)[::-1]

    def skip(c, s):
        return c, s, jnp.full_like(s, jnp.nan)

    def body(carry, xs):
        c, s = carry
        p, h = xs[0], xs[1]
        q, c, s = _jacobi.precondition(_apply_rows(step, p, h, c, transpose), s)
        if record is None:
            c, s, logs = readout(c, s)
        else:  # a real branch even under vmap: the mask is never batched
            c, s, logs = lax.cond(xs[2], readout, skip, c, s)
        return (c @ q.T, s), logs

    start = (jnp.eye(n, dtype=points.dtype), jnp.zeros(n, points.dtype))
    xs = (params, points) if record is None else (params, points, record)
    _, logs = lax.scan(body, start, xs)
    return logs


def _reverse(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a[::-1], tree)


def _truncate(tree: Any, length: int) -> Any:
    return jax.tree_util.tree_map(lambda a: a[:length], tree)


def log_singular_values(
    step: Step, params: Any, h0: jax.Array, *, direction: str = "forward", tol: float | None = None
) -> jax.Array:
    """The pure core of `jacobian_spectra(method="exact")`, for use under `jit` and `vmap`.

    Returns (L, N) log singular values, sorted descending: row l - 1 is J_l (forward) or G_l
    (backward; the last row is G_L = I). No argument checks: use `jacobian_spectra` at API
    boundaries and this under `jax.vmap` over inputs, seeds or configurations.
    """
    return _exact(_lift(step), None, params, h0, direction=direction, tol=tol)


def _exact(step3, shared, params, h0, record=None, *, direction, tol, skip=0):
    """log_singular_values for step3(shared, params_l, h), shared traced (see `_walk_step`).

    record: optional (L,) bool mask of the depths l = 1..L wanted (other rows NaN).
    skip (backward only): G_1 .. G_skip are not wanted, so the walk stops above layer skip + 1
    (their rows are NaN; the forward pass still goes through every layer).
    """
    shape = tuple(h0.shape)
    flat = lambda p, v: step3(shared, p, v.reshape(shape)).reshape(-1)  # noqa: E731
    points = _states(flat, params, h0.reshape(-1))
    if direction == "forward":
        return _walk_products(flat, params, points, False, tol, record)
    # G_l^T = A_{l+1}^T ... A_L^T: walk A_L^T, A_{L-1}^T, ..., A_{skip+2}^T (A_1 only ever feeds
    # G_0, which is not a layer's product); after the step through A_m^T the product is
    # G_{m-1}^T, so the walk's step t gives G_{L-1-t} and the reversed rows are G_{skip+1} ..
    # G_{L-1}; G_L = I closes them.
    rec = None if record is None else record[skip:-1][::-1]
    above = lambda a: a[:skip:-1]  # noqa: E731  (layers L .. skip + 2, walk order)
    logs_rev = _walk_products(flat, jax.tree_util.tree_map(above, params), above(points), True, tol, rec)
    n = points.shape[1]
    unwanted = jnp.full((skip, n), jnp.nan, points.dtype)
    return jnp.concatenate([unwanted, logs_rev[::-1], jnp.zeros((1, n), points.dtype)])


_exact_jit = jax.jit(_exact, static_argnames=("step3", "direction", "tol", "skip"))


def jacobian_spectra(
    step: Step,
    params: Any,
    h0: jax.Array,
    *,
    depths: Sequence[int] | None = None,
    method: str = "exact",
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
      method: "exact" (all N singular values) or "topk" (matrix-free, the k largest).
      k: number of singular values kept (default: all for exact; required for topk).
      direction: "forward" (J_l) or "backward" (G_l).
      oversample, refine, key: topk only: extra block columns (default k: the block is 2k wide;
        tanh, N = 1024, depth 32, k = 4/16/32: 2.7x/1.5x/1.4x faster than 8 extra columns, since
        the rounds fall faster than their cost grows), the most subspace-iteration rounds
        at each requested depth (it stops once the top k log sigma move by < 1e-5), and the PRNG
        key of the random start block.
      tol: Jacobi convergence tolerance on pair cosines (default 8 N eps).

    Returns:
      SpectraResult with `.depths` (len D) and `.log_singular_values` (D, k), natural log, sorted
      descending; -inf marks an exactly zero singular value (e.g. dead ReLU units).
    """
    return _spectra(
        _lift(step),
        None,
        params,
        h0,
        depths=depths,
        method=method,
        k=k,
        direction=direction,
        oversample=oversample,
        refine=refine,
        key=key,
        tol=tol,
    )


def _spectra(step3, shared, params, h0, *, depths, method, k, direction, oversample, refine, key, tol):
    """`jacobian_spectra` for step3(shared, params_l, h) (see `_lift`, `_walk_step`)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {METHODS}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {DIRECTIONS}")
    h0 = jnp.asarray(h0)
    if not jnp.issubdtype(h0.dtype, jnp.floating):
        raise ValueError(f"h0 must be floating point, got dtype {h0.dtype}")
    if not bool(jnp.all(jnp.isfinite(h0))):
        raise ValueError("h0 contains non-finite values")
    depth = _depth_of(params)
    wanted = _check_depths(depths, depth)
    n = int(h0.size)
    if k is None:
        if method == "topk":
            raise ValueError("method='topk' needs k (the number of leading singular values)")
        k = n
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the state size), got {k}")
    if oversample is not None and oversample < 0:
        raise ValueError(f"oversample must be >= 0 (extra block columns for topk), got {oversample}")

    if method == "exact":
        # Walk only the layers the requested products contain: J_l needs layers 1..l, G_l layers
        # l+1..L (below the shallowest G_l the forward pass alone goes).
        skip = 0
        if direction == "forward":
            params = _truncate(params, int(wanted.max()))
        else:
            skip = int(wanted.min()) - 1
        record = np.zeros(_depth_of(params), bool)
        record[wanted - 1] = True
        logs = _exact_jit(step3, shared, params, h0, record, direction=direction, tol=tol, skip=skip)
        logs = logs[wanted - 1]
    else:
        key = jax.random.key(0) if key is None else key
        logs = _topk(step3, shared, params, h0, wanted, direction, k, oversample, refine, key, tol)
    return SpectraResult(depths=wanted, log_singular_values=np.asarray(logs)[:, :k], direction=direction)


def _layers(flat, params, points, c, s, n_steps, transpose, down, tol=None):
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
        return _jacobi.carry_step(_apply_rows(flat, p, h, c, transpose != down), s)

    c, s = lax.fori_loop(0, n_steps, body, (c, s))
    return _jacobi.qr_step(c, s, tol=tol)  # orthonormal rows, exp(s) the singular values


def _topk(step3, shared, params, h0, wanted, direction, k, oversample, refine, key, tol):
    """Block recursion from a random orthonormal start, refined by subspace iteration on J^T J."""
    n = int(h0.size)
    m = min(n, k + (k if oversample is None else oversample))
    x0 = jnp.linalg.qr(jax.random.normal(key, (n, m), h0.dtype))[0].T  # (m, n) orthonormal rows
    depth = _depth_of(params)
    # Depths in walk order, each started from the previous one's right singular block: the
    # input-side singular directions of a product settle as it deepens (Oseledets), so a deeper
    # depth starts nearer its answer (tanh, N = 1024, depth 32: 8 rounds instead of 10).
    steps = {int(l): int(l) if direction == "forward" else depth - int(l) for l in wanted}
    logs, x = {}, x0
    for l in sorted(steps, key=steps.get):
        if steps[l] == 0:  # G_L = I
            logs[l] = jnp.zeros(m, h0.dtype)
        else:
            logs[l], x = _topk_at_depth(
                step3,
                shared,
                params,
                h0,
                x,
                steps[l],
                k=k,
                transpose=direction == "backward",
                refine=refine,
                tol=tol,
            )
    return jnp.stack([logs[int(l)] for l in wanted])


@functools.partial(jax.jit, static_argnames=("step3", "k", "transpose", "refine", "tol", "refine_tol"))
def _topk_at_depth(step3, shared, params, h0, x0, n_steps, *, k, transpose, refine, tol, refine_tol=1e-5):
    """Top log singular values of the n_steps-layer product, from the start block x0 (m, N).

    Module-level and jitted on the step (cached like `_exact_jit`), so a new depth, input or
    set of variables of the same shapes reuses the compiled program. Returns the m log singular
    values, sorted descending, and the final right singular block (the start for a deeper depth).
    """
    shape = tuple(h0.shape)
    flat = lambda p, v: step3(shared, p, v.reshape(shape)).reshape(-1)  # noqa: E731
    points = _states(flat, params, h0.reshape(-1))
    if transpose:
        params, points = _reverse(params), points[::-1]
    zeros = jnp.zeros(x0.shape[0], points.dtype)
    up = lambda x: _layers(flat, params, points, x, zeros, n_steps, transpose, False, tol)  # noqa: E731
    down = lambda u: _layers(flat, params, points, u, zeros, n_steps, transpose, True, tol)  # noqa: E731
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
    state = (c, s, x0, jnp.asarray(jnp.inf, points.dtype), 0)
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
    _depth_of(params)  # checks the depth axis
    n = int(h0.size)
    k = n if k is None else k
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the state size), got {k}")
    return _lyapunov(_flat_step(step, tuple(h0.shape)), params, h0.reshape(-1), k=k)


@functools.partial(jax.jit, static_argnames=("flat", "k"))
def _lyapunov(flat: Step, params: Any, h0: jax.Array, *, k: int) -> jax.Array:
    """`lyapunov_exponents` on flat states; module-level, so equal steps reuse the program."""
    points = _states(flat, params, h0)

    def body(carry, xs):
        q, acc = carry
        p, h = xs
        y = _apply_rows(flat, p, h, q.T, False).T  # (n, k) = A_l Q
        q, r = jnp.linalg.qr(y)
        return (q, acc + jnp.log(jnp.abs(jnp.diagonal(r)))), None

    q0 = jnp.eye(h0.shape[0], k, dtype=h0.dtype)
    (_, acc), _ = lax.scan(body, (q0, jnp.zeros(k, h0.dtype)), (params, points))
    return jnp.sort(acc / points.shape[0])[::-1]


def model_spectra(
    model: Any, variables: Any, x: jax.Array, *, train: bool = False, **options
) -> SpectraResult:
    """`jacobian_spectra` of any gradflow stack through its layer-walking interface.

    Args:
      model: a stack with `walk(variables, x, train=...)` (MLPStack, RNNStack, LSTMStack, GRUStack).
      variables: its variables (params, and batch_stats if any).
      x: one input (per-example map) or, with `train=True` for BatchNorm, a batch (the batch map).
      **options: passed to `jacobian_spectra` (depths, method, k, direction, ...).
    """
    if not hasattr(model, "walk"):
        raise ValueError(f"{type(model).__name__} has no layer-walking interface (walk method)")
    walk = model.walk(variables, x, train=train)
    args = inspect.signature(jacobian_spectra).bind(walk.step, walk.params, walk.h0, **options)
    args.apply_defaults()
    kwargs = {name: v for name, v in args.arguments.items() if name not in ("step", "params", "h0")}
    try:
        step3, shared = _walk_step(model, train), (variables, x)
    except TypeError:  # an unhashable model: its fresh closure (recompiles on every call)
        step3, shared = _lift(walk.step), None
    return _spectra(step3, shared, walk.params, walk.h0, **kwargs)
