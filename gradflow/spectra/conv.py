"""Exact singular values of linear circular convolutions by FFT, one layer or a product at any depth.

A circular convolution of an n^d x C_in signal is block circulant: the d-dimensional DFT over
positions block-diagonalizes it, and its singular values are those of the per-frequency
C_out x C_in matrices

    K^(u) = sum_a K[a]^T exp(-2 pi i <a, u / n>),     u in Z_n^d

(Sedghi, Gupta & Long 2019, "The singular values of convolutional layers"). A stride-s layer
samples every s-th output position, which folds the s^d aliased frequencies u' + j n / s into
each output frequency u' of the coarse grid: its block is s^(-d/2) [K^(u'_1) ... K^(u'_{s^d})],
C_out x s^d C_in. A product of stride-1 circular convolutions is the product per frequency,
J_l(u) = K^_l(u) ... K^_1(u), so the spectrum of a depth-L linear CNN is n^d independent C x C
matrix products. `conv_spectra` walks each one with the log-scaled product engine of
`gradflow.spectra` (exact at any depth, sigma = 1e-600 as accurate as sigma = 1), vmapped over
frequencies: a 10,000-layer linear CNN on 16 x 16 x 16 states is 256 products of 16 x 16 complex
matrices instead of one of a 4096 x 4096 Jacobian.

Two walks of each frequency's product (`method`), the same numbers to rounding:
- "qr" (default): the product is held as P_l = Q_l diag(exp(s)) U_l, Q_l unitary, U_l unit rows,
  in complex C x C. A layer multiplies K Q_l (columns ordered by decreasing s), takes one
  Householder QR K Q_l = Q_{l+1} R (`jnp.linalg.qr`, batched over frequencies) and folds R into
  the scaled rows: R diag(exp(s)) = diag(exp(s)) (R_ij exp(s_j - s_i)), whose entries above the
  diagonal are bounded by |R_ij| because s decreases (the column-graded form of Drmac & Veselic
  2008 and of the stabilized products of Loh & Gubernatis 1992), so U_{l+1} = (R_ij exp(s_j - s_i))
  U_l, rows renormalized into s. Nothing is formed at the product's scale. At a requested depth
  the singular values of diag(exp(s)) U are read by the engine's QR + LQ preconditioning and
  one-sided Jacobi (`_jacobi`, on the real 2C x 2C form). One QR of a complex C x C matrix a
  layer, where the general engine re-factors the real 2C x 2C form by two.
- "chain": the general engine's own walk (`model_spectra`'s log-scaled product on the real form,
  QR + LQ every layer), vmapped over frequencies: the reference the "qr" walk is checked against.

The real form of a complex C x C matrix is [[Re, -Im], [Im, Re]], whose singular values are the
complex ones, each twice. K^(-u) is the
complex conjugate of K^(u) for a real kernel, so only one frequency of each pair {u, -u} is
walked and its 2C values stand for both; a self-conjugate frequency (2u = 0 mod n) keeps every
other one. Convention: flax's nn.Conv (a cross-correlation, kernel (*k, C_in, C_out), padding
"CIRCULAR"); flipping the kernel or shifting the output conjugates or rotates each K^(u) by a
unit phase, which leaves every singular value as it is.

Only linear circular layers have this structure. Nonlinear layers (the Jacobian at a state
is diag(phi'(z)) times the conv, no longer circulant), normalization and zero ("same") padding
break it: use `gradflow.spectra.model_spectra` (the general chain engine) for those.
`conv_stack_spectra` takes a linear circular `ConvStack` and its variables (its kernels read
through the layer chain) and refuses any other, saying so.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow.nn.chains import chain as make_chain
from gradflow.nn.chains import kernel_paths, layer_variables, subtree
from gradflow.nn.conv import ConvStack
from gradflow.spectra import _jacobi
from gradflow.spectra._exact import _exact
from gradflow.spectra.core import _check_depths
from gradflow.spectra.result import SpectraResult

CONV_METHODS = ("qr", "chain")
LINEAR = ("linear", "identity")
# "qr" walk: the columns are re-ordered by scale only when a scale exceeds an earlier one by more
# than this (natural log): a factor e in the graded entries, harmless, and deep in a product the
# order no longer changes, so most layers skip the sort.
_RESORT = 1.0


def _check_kernel(kernel: Any, spatial_shape: Sequence[int], what: str, stacked: bool) -> tuple[int, ...]:
    """spatial_shape as a tuple, after checking the kernel's rank, size and values (stacked: a
    leading layer axis)."""
    shape = tuple(int(n) for n in spatial_shape)
    d = len(shape)
    if d < 1 or kernel.ndim != d + 2 + stacked:
        lead = "(L, " if stacked else "("
        raise ValueError(
            f"{what}: a kernel of shape {lead}*k, C_in, C_out) with {d} spatial axes for spatial_shape "
            f"{shape}; got shape {kernel.shape}"
        )
    if any(n < 1 for n in shape):
        raise ValueError(f"{what}: spatial_shape must be positive, got {shape}")
    taps = kernel.shape[-d - 2 : -2]
    if any(k > n for k, n in zip(taps, shape, strict=True)):
        raise ValueError(
            f"{what}: the kernel's spatial size {taps} is larger than the input's {shape} "
            "(a circular conv would wrap it onto itself); use a kernel no larger than the input"
        )
    if not bool(jnp.all(jnp.isfinite(kernel))):
        raise ValueError(f"{what}: the kernel contains non-finite values")
    return shape


def _symbol(kernel: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """K^(u) for every frequency u: (*shape, C_out, C_in), complex."""
    d = len(shape)
    k_hat = jnp.fft.fftn(kernel, s=shape, axes=tuple(range(d)))
    return jnp.swapaxes(k_hat, -1, -2)


def conv_spectrum(kernel: jax.Array, spatial_shape: Sequence[int], *, stride: int = 1) -> jax.Array:
    """All singular values of one linear circular convolution, by FFT; natural log, descending.

    Args:
      kernel: (*k, C_in, C_out), flax's layout, len(k) = len(spatial_shape).
      spatial_shape: the input's positions (n_1, ..., n_d).
      stride: the same along every axis; must divide each n_i.

    Returns:
      (min(N_out, N_in),) log sigma, N_in = prod(n) C_in, N_out = prod(n / stride) C_out; -inf
      marks an exactly zero singular value.
    """
    kernel = jnp.asarray(kernel)
    shape = _check_kernel(kernel, spatial_shape, "conv_spectrum", stacked=False)
    if not (isinstance(stride, int) and stride >= 1) or any(n % stride for n in shape):
        raise ValueError(f"conv_spectrum: stride={stride!r} must be a positive integer dividing {shape}")
    d, (c_in, c_out) = len(shape), kernel.shape[-2:]
    k_hat = _symbol(kernel, shape)  # (*n, C_out, C_in)
    coarse = tuple(n // stride for n in shape)
    # Fine frequency u = u' + j * coarse: axis i of n splits into (stride, coarse), j the alias.
    split = k_hat.reshape(*[x for n in coarse for x in (stride, n)], c_out, c_in)
    aliases = tuple(range(0, 2 * d, 2))
    blocks = jnp.moveaxis(split, aliases, tuple(range(d, 2 * d)))  # (*coarse, *stride^d, C_out, C_in)
    blocks = blocks.reshape(*coarse, stride**d, c_out, c_in)
    blocks = jnp.moveaxis(blocks, -3, -2).reshape(-1, c_out, stride**d * c_in) / stride ** (d / 2)
    sv = jnp.linalg.svd(blocks, compute_uv=False).reshape(-1)
    return jnp.sort(jnp.log(sv))[::-1]


@dataclasses.dataclass(frozen=True)
class _FrequencyStep:
    """h -> K^(u) h in real form, (2C,) -> (2C,); shared = (cos, sin) of the taps' phases at u."""

    def __call__(self, shared: Any, kernel_TxIxO: jax.Array, h: jax.Array) -> jax.Array:
        cos_T, sin_T = shared
        re = jnp.einsum("t,tio->oi", cos_T, kernel_TxIxO)
        im = -jnp.einsum("t,tio->oi", sin_T, kernel_TxIxO)
        c = re.shape[1]
        x, y = h[:c], h[c:]
        return jnp.concatenate([re @ x - im @ y, im @ x + re @ y])


def _half_frequencies(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """One frequency of each conjugate pair {u, -u} (the lower one in row-major order), (F, d), and
    whether it is its own conjugate, (F,)."""
    grid = np.array(list(itertools.product(*[range(n) for n in shape])), dtype=np.int64)
    conj = (-grid) % np.array(shape)
    as_int = lambda g: np.ravel_multi_index(g.T, shape)  # noqa: E731
    keep = as_int(grid) <= as_int(conj)
    return grid[keep], (as_int(grid) == as_int(conj))[keep]


@functools.partial(jax.jit, static_argnames=("record", "tol", "batch"))
def _frequency_logs(kernels, cos_FxT, sin_FxT, *, record, tol, batch):
    """(F, D, 2C) log sigma of the real-form products at the recorded depths, per frequency."""
    depth, c = kernels.shape[0], kernels.shape[-1]
    mask = np.zeros(depth, bool)
    mask[list(record)] = True
    steps = ((_FrequencyStep(), depth),)
    hi = max(record) + 1

    def one(phase):
        rows = _exact(
            steps,
            (phase,),
            (kernels,),
            jnp.zeros(2 * c, kernels.dtype),
            mask,
            direction="forward",
            tol=tol,
            hi=hi,
        )
        return rows[np.array(record)]

    return lax.map(one, (cos_FxT, sin_FxT), batch_size=batch)


def _renormalize(u: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Complex rows of u to unit norm, their norms folded into the log-scales s (zero rows: -inf)."""
    n = jnp.sqrt(jnp.sum(jnp.real(u * jnp.conj(u)), axis=-1))
    ok = n > 0
    u = u / jnp.where(ok, n, 1.0)[..., None].astype(u.dtype)
    return u, jnp.where(ok, s + jnp.log(jnp.where(ok, n, 1.0)), -jnp.inf)


def _graded(r: jax.Array, s: jax.Array) -> jax.Array:
    """triu(R_ij exp(s_j - s_i)), batched (..., C, C): R diag(exp(s)) = diag(exp(s)) times this."""
    finite = jnp.isfinite(s)
    both = finite[..., None, :] & finite[..., :, None]
    d = jnp.where(both, s[..., None, :] - s[..., :, None], 0.0)
    grade = jnp.where(both, jnp.exp(d), 0.0)
    grade = jnp.where(jnp.eye(s.shape[-1], dtype=bool), 1.0, grade)
    return jnp.triu(r * grade.astype(r.dtype))


def _by_scale(q: jax.Array, u: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Q's columns, U's rows and s ordered by decreasing s, per frequency."""
    order = jnp.argsort(-s, axis=-1)
    return (
        jnp.take_along_axis(q, order[..., None, :], -1),
        jnp.take_along_axis(u, order[..., None], -2),
        jnp.take_along_axis(s, order, -1),
    )


def _readout(u: jax.Array, s: jax.Array, tol: float | None) -> jax.Array:
    """log sigma of diag(exp(s)) U (complex C x C), descending, each twice: (2C,). Jacobi on the
    real form of U^T diag(exp(s)), whose rows [[Re U, Im U], [-Im U, Re U]] carry scales [s, s]."""
    re, im = jnp.real(u), jnp.imag(u)
    rows = jnp.concatenate([jnp.concatenate([re, im], 1), jnp.concatenate([-im, re], 1)])
    _, c, s2 = _jacobi.precondition(rows, jnp.concatenate([s, s]))
    _, s2, _ = _jacobi.orthogonalize(c, s2, tol=tol)
    return jnp.sort(s2)[::-1]


def _qr_walk(kernels, cos_FxT, sin_FxT, mask, tol):
    """(D, F, 2C) log sigma of every frequency's product at the masked layers (the "qr" walk)."""
    num_f, c = cos_FxT.shape[0], kernels.shape[-1]
    cdtype = jnp.result_type(kernels.dtype, jnp.complex64)
    eye = jnp.broadcast_to(jnp.eye(c, dtype=cdtype), (num_f, c, c))
    s0 = jnp.zeros((num_f, c), kernels.dtype)

    def layer(carry, xs):
        q, u, s = carry
        kernel_TxIxO, rec = xs
        flat = kernel_TxIxO.reshape(kernel_TxIxO.shape[0], -1)
        k_hat = lax.complex(cos_FxT @ flat, -(sin_FxT @ flat)).reshape(num_f, c, c)  # K^(u)^T
        q, r = jnp.linalg.qr(jnp.swapaxes(k_hat, -1, -2) @ q)
        u, s = _renormalize(_graded(r, s) @ u, s)
        low = jnp.where(jnp.isfinite(s), s, jnp.finfo(s.dtype).min / 2)
        unsorted = jnp.max(low - lax.cummin(low, axis=1)) > _RESORT
        q, u, s = lax.cond(unsorted, _by_scale, lambda *a: a, q, u, s)
        logs = lax.cond(
            rec,
            lambda: jax.vmap(lambda a, b: _readout(a, b, tol))(u, s),
            lambda: jnp.full((num_f, 2 * c), jnp.nan, s.dtype),
        )
        return (q, u, s), logs

    _, logs = lax.scan(layer, (eye, eye, s0), (kernels, mask))
    return logs


@functools.partial(jax.jit, static_argnames=("record", "tol", "batch"))
def _qr_logs(kernels, cos_FxT, sin_FxT, *, record, tol, batch):
    """(F, D, 2C) as `_frequency_logs`, by the "qr" walk, `batch` frequencies at a time."""
    hi = max(record) + 1
    mask = np.zeros(hi, bool)
    mask[list(record)] = True
    num_f = cos_FxT.shape[0]
    chunks = -(-num_f // batch)
    batch = -(-num_f // chunks)  # equal chunks: the last one padded by fewer than `chunks` rows
    pad = lambda a: jnp.concatenate([a, jnp.zeros((chunks * batch - num_f, *a.shape[1:]), a.dtype)])  # noqa: E731
    cos_, sin_ = (pad(a).reshape(chunks, batch, -1) for a in (cos_FxT, sin_FxT))
    logs = lax.map(lambda cs: _qr_walk(kernels[:hi], cs[0], cs[1], jnp.asarray(mask), tol), (cos_, sin_))
    logs = jnp.moveaxis(logs[:, np.array(record)], 2, 1)  # (chunks, batch, D, 2C)
    return logs.reshape(chunks * batch, *logs.shape[2:])[:num_f]


def conv_spectra(
    kernels: jax.Array,
    spatial_shape: Sequence[int],
    *,
    depths: Sequence[int] | None = None,
    tol: float | None = None,
    batch: int = 256,
    method: str = "qr",
) -> SpectraResult:
    """Exact log singular values of J_l = K_l ... K_1 for a deep linear stride-1 circular CNN.

    Per frequency the product is walked in log-scaled form (see the module docstring); cost
    O(L n^d C^3 / 2), memory O(batch C^2) ("qr") or O(batch L C) ("chain"). Matches
    `model_spectra` of the same linear circular `ConvStack` (and brute-force jacfwd + SVD at
    small sizes) to float32 accuracy, and a complex128 product per frequency where float64
    resolves it. From a `ConvStack` and its variables: `conv_stack_spectra`.

    Args:
      kernels: (L, *k, C, C): layer l's kernel, flax's layout (C_in = C_out = C).
      spatial_shape: (n_1, ..., n_d), d = len(k).
      depths: 1-based layers whose products are wanted (default all 1..L).
      tol: Jacobi tolerance on pair cosines (default 8 (2C) eps).
      batch: frequencies walked at once (memory against parallelism).
      method: "qr" (one complex QR a layer) or "chain" (the general engine's walk on the real
        form, about 3x slower: the reference).

    Returns:
      SpectraResult with (D, n^d C) log singular values per depth, descending.
    """
    if method not in CONV_METHODS:
        raise ValueError(f"conv_spectra: method must be one of {CONV_METHODS}, got {method!r}")
    kernels = jnp.asarray(kernels)
    shape = _check_kernel(kernels, spatial_shape, "conv_spectra", stacked=True)
    if kernels.shape[-1] != kernels.shape[-2]:
        raise ValueError(
            f"conv_spectra: every layer must keep its channels (C_in = C_out), got kernels {kernels.shape}; "
            "use conv_spectrum per layer or model_spectra for a stack whose channels change"
        )
    if not jnp.issubdtype(kernels.dtype, jnp.floating):
        raise ValueError(f"conv_spectra: kernels must be floating point, got {kernels.dtype}")
    if not (isinstance(batch, int) and batch >= 1):
        raise ValueError(f"conv_spectra: batch must be a positive integer, got {batch!r}")
    depth, c, d = kernels.shape[0], kernels.shape[-1], len(shape)
    wanted = _check_depths(depths, depth)
    taps = kernels.shape[1 : 1 + d]
    offsets = np.array(list(itertools.product(*[range(k) for k in taps])), dtype=np.float64)  # (T, d)
    freqs, self_conj = _half_frequencies(shape)
    theta = 2 * np.pi * (freqs / np.array(shape)) @ offsets.T  # (F, T)
    dtype = kernels.dtype
    logs = (_qr_logs if method == "qr" else _frequency_logs)(
        kernels.reshape(depth, -1, c, c),
        jnp.asarray(np.cos(theta), dtype),
        jnp.asarray(np.sin(theta), dtype),
        record=tuple(int(l) - 1 for l in wanted),
        tol=tol,
        batch=min(batch, len(freqs)),
    )
    logs = np.asarray(logs)  # (F, D, 2C), each row descending
    per_depth = lambda a: np.moveaxis(a, 1, 0).reshape(len(wanted), -1)  # noqa: E731
    # a pair's 2C values stand for both of its frequencies; a self-conjugate one's come twice
    rows = np.concatenate([per_depth(logs[~self_conj]), per_depth(logs[self_conj][:, :, ::2])], axis=1)
    out = -np.sort(-rows, axis=1)
    n = int(np.prod(shape)) * c
    return SpectraResult(
        depths=wanted,
        log_singular_values=out,
        direction="forward",
        layers=tuple(str(l) for l in wanted),
        widths=np.full(len(wanted), n),
    )


def conv_stack_spectra(
    model: ConvStack,
    variables: Any,
    x: jax.Array,
    *,
    depths: Sequence[int] | None = None,
    tol: float | None = None,
    batch: int = 256,
    method: str = "qr",
) -> SpectraResult:
    """`conv_spectra` of a linear circular `ConvStack`: its blocks' product J_l = d h_l / d h_0.

    The layers and h_0 = embed(x) are those of `model_spectra(model, variables, x)` (the stack's
    layer chain, its default layers); the kernels are read through the chain
    (`layer_variables`, `kernel_paths`), not by parameter name. The FFT path needs a stack whose
    blocks are circular convolutions and nothing else: activation "linear" or "identity", padding
    "circular", no norm, no residual, one stage (a down block changes the channels and strides).
    Any other is refused, naming what breaks the circulant structure: its spectra come from
    `spectra.model_spectra`, the general chain engine.

    Args:
      model: the `ConvStack`.
      variables: its variables (`model.init(key, x)`).
      x: one example, (*spatial) with `add_channel`, else (*spatial, C_in); no batch axis.
      depths, tol, batch, method: as in `conv_spectra`.

    Returns:
      SpectraResult with (D, n^d C) log singular values per depth, descending, its layers named
      as the chain's ("stage1[1]", ...).
    """
    if not isinstance(model, ConvStack):
        raise ValueError(
            f"conv_stack_spectra takes a gradflow ConvStack, got {type(model).__name__}; "
            "use spectra.model_spectra (the general chain engine) for other models"
        )
    breaks = [
        f"{name}={value!r} (the FFT path needs {need})"
        for name, value, ok, need in (
            ("activation", model.activation, model.activation in LINEAR, f"one of {LINEAR}"),
            ("padding", model.padding, model.padding == "circular", "'circular'"),
            ("norm", model.norm, model.norm is None, "None"),
            ("residual", model.residual, model.residual is None, "None"),
            ("channels", model.channels, len(model.stages) == 1, "one stage"),
        )
        if not ok
    ]
    if breaks:
        raise ValueError(
            f"conv_stack_spectra: this ConvStack is not a product of circular convolutions: "
            f"{'; '.join(breaks)}. Its spectra come from the general chain engine: "
            "spectra.model_spectra(model, variables, x)"
        )
    x = jnp.asarray(x)
    d = model.spatial_dims
    if x.ndim != d + (not model.add_channel):
        raise ValueError(
            f"conv_stack_spectra: x must be one example of {d + (not model.add_channel)} axes "
            f"(no batch axis), got shape {x.shape}"
        )
    c = make_chain(model, variables, x)
    (seg,) = c.segments  # one stage, the input map in h0 and the head in the readout
    own = jax.vmap(lambda i: layer_variables(variables, seg, i))(jnp.arange(seg.depth))
    paths = kernel_paths(own)
    if len(paths) != 1:
        raise ValueError(f"conv_stack_spectra: a block must hold one conv kernel, found {paths}")
    res = conv_spectra(
        subtree(own, paths[0]), c.h0.shape[:d], depths=depths, tol=tol, batch=batch, method=method
    )
    return dataclasses.replace(res, layers=tuple(c.layers[int(l) - 1] for l in res.depths))
