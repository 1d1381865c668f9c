"""The private cores of the mean-field maps, shared by `gradflow.theory`'s public modules.

Each core takes the resolved activation `fn` and its `kinks` (static) and scalar sigma_w,
sigma_b, q (traced); the public functions resolve the activation, check their arguments and
broadcast a core over the arrays they are given (`broadcast`). Expectations use the kink-split
Gauss-Legendre quadrature of `gradflow.theory.quadrature`; phi' comes from `jax.grad`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradflow import activations
from gradflow.theory import _length_map, quadrature

Array = jax.Array
ActivationLike = str | Callable[..., Array]

Q_MIN, Q_MAX = _length_map.Q_MIN, _length_map.Q_MAX  # q is clamped here where a slope divides by it


# ----------------------------------------------------------------------------- plumbing


def resolve(activation: ActivationLike) -> tuple[Callable, tuple[float, ...]]:
    fn, kinks = activations.resolve(activation)  # unknown names raise ValueError
    if isinstance(activation, str) and not activations._spec(activation).elementwise:
        raise ValueError(f"mean-field theory needs an elementwise activation, got {activation!r}")
    return fn, tuple(float(k) for k in kinks)


def check_sigmas(**values: Any) -> None:
    """ValueError naming a negative or nan sigma; traced values are not checked."""
    for name, value in values.items():
        try:
            a = np.asarray(value, dtype=float)
        except jax.errors.TracerArrayConversionError:
            continue
        if np.any(np.isnan(a)) or np.any(a < 0):
            raise ValueError(f"{name} must be >= 0 (a standard deviation), got {value!r}")


def check_q0(q0: Any) -> None:
    try:
        a = np.asarray(q0, dtype=float)
    except jax.errors.TracerArrayConversionError:
        return
    if not np.all(np.isfinite(a) & (a > 0)):
        raise ValueError(f"q0 (the input's pre-activation variance) must be positive and finite, got {q0!r}")


def as_float(x: Any) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(float))


def broadcast(core, activation, sigma_w, sigma_b, q0, *extra):
    """`core(fn, kinks, sigma_w, sigma_b, q0, *extra)` vectorized over its (checked) arguments."""
    check_sigmas(sigma_w=sigma_w, sigma_b=sigma_b)
    check_q0(q0)
    fn, kinks = resolve(activation)
    return jnp.vectorize(functools.partial(core, fn, kinks))(
        as_float(sigma_w), as_float(sigma_b), as_float(q0), *extra
    )


# ----------------------------------------------------------------------------- cores


def grad(fn: Callable) -> Callable[[Array], Array]:
    """Elementwise phi' via jax.grad, vmapped over the flattened input."""
    g = jax.vmap(jax.grad(fn))
    return lambda x: g(x.ravel()).reshape(x.shape)


def mean(fn, kinks, f, q):
    return quadrature.gaussian_expectation(f, q, kinks)


def length_slope(fn, kinks, q, sigma_w):
    """dL/dq = sigma_w^2 E[u phi(u) phi'(u)] / q = chi_1 + sigma_w^2 E[phi phi''] (Stein's lemma).

    The first form is exact for kinked phi (no delta functions); q is clamped to [1e-30, 1e30]
    so q -> 0 gives the limit sigma_w^2 (phi'(0)^2 + phi(0) phi''(0)).
    """
    dphi = grad(fn)
    qs = jnp.clip(q, Q_MIN, Q_MAX)
    return sigma_w**2 * mean(fn, kinks, lambda u: u * fn(u) * dphi(u), qs) / qs


def q_star(fn, kinks, sigma_w, sigma_b, q0):
    return _length_map.q_star(fn, kinks, sigma_w, sigma_b, q0)


def q_eval(q):
    """q* clamped to [1e-30, 1e30]: the q -> 0 and q -> inf limits, with kinks still split."""
    return jnp.clip(jnp.where(jnp.isfinite(q), q, Q_MAX), Q_MIN, Q_MAX)


def mu(fn, kinks, q, k):
    dphi = grad(fn)
    return mean(fn, kinks, lambda u: dphi(u) ** (2 * k), q_eval(q))


@functools.partial(jax.jit, static_argnums=(0, 1))
def chi1(fn, kinks, sigma_w, sigma_b, q0):
    return sigma_w**2 * mu(fn, kinks, q_star(fn, kinks, sigma_w, sigma_b, q0), 1)


def corr_map(fn, kinks, c, sigma_w, sigma_b, q):
    qe = q_eval(q)
    e = quadrature.gaussian_expectation_2d(lambda a, b: fn(a) * fn(b), qe, qe, c * qe, kinks)
    return (sigma_w**2 * e + sigma_b**2) / qe


def corr_slope(fn, kinks, c, sigma_w, q):
    """dC/dc = sigma_w^2 E[phi'(u1) phi'(u2)] (Price's theorem), Corr(u1, u2) = c."""
    dphi, qe = grad(fn), q_eval(q)
    return sigma_w**2 * quadrature.gaussian_expectation_2d(
        lambda a, b: dphi(a) * dphi(b), qe, qe, c * qe, kinks
    )


def depth_scale(slope):
    return jnp.where(slope >= 1, jnp.inf, -1.0 / jnp.log(slope))
