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

The engine is real: each complex C x C product is carried in its real 2C x 2C form
[[Re, -Im], [Im, Re]], whose singular values are the complex ones, each twice. K^(-u) is the
complex conjugate of K^(u) for a real kernel, so only one frequency of each pair {u, -u} is
walked and its 2C values stand for both; a self-conjugate frequency (2u = 0 mod n) keeps every
other one. Convention: flax's nn.Conv (a cross-correlation, kernel (*k, C_in, C_out), padding
"CIRCULAR"); flipping the kernel or shifting the output conjugates or rotates each K^(u) by a
unit phase, which leaves every singular value as it is.

Only linear circular layers have this structure. Nonlinear layers (the Jacobian at a state
is diag(phi'(z)) times the conv, no longer circulant) and zero ("same") padding break it: use
`gradflow.spectra.model_spectra` (the general chain engine) for those.
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

from gradflow.spectra._exact import _exact
from gradflow.spectra.core import _check_depths
from gradflow.spectra.result import SpectraResult


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


def conv_spectra(
    kernels: jax.Array,
    spatial_shape: Sequence[int],
    *,
    depths: Sequence[int] | None = None,
    tol: float | None = None,
    batch: int = 256,
) -> SpectraResult:
    """Exact log singular values of J_l = K_l ... K_1 for a deep linear stride-1 circular CNN.

    Per frequency the product is walked by the log-scaled engine (see the module docstring);
    cost O(L n^d C^3 / 2), memory O(batch L C). Matches `model_spectra` of the same linear
    circular `ConvStack` (and brute-force jacfwd + SVD at small sizes) to float32 accuracy.

    Args:
      kernels: (L, *k, C, C): layer l's kernel, flax's layout (C_in = C_out = C).
      spatial_shape: (n_1, ..., n_d), d = len(k).
      depths: 1-based layers whose products are wanted (default all 1..L).
      tol: Jacobi tolerance on pair cosines (default 8 (2C) eps).
      batch: frequencies walked at once (memory against parallelism).

    Returns:
      SpectraResult with (D, n^d C) log singular values per depth, descending.
    """
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
    logs = _frequency_logs(
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
