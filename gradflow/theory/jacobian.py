"""Gradients and Jacobians across depth at the mean-field fixed point, and SELU's constants.

Under the mean-field and gradient-independence assumptions, squared gradient norms and
||J u||^2 grow by chi_1 per layer (Schoenholz et al. 2017), and the spectrum of the
input-output Jacobian J_L = D_L W_L ... D_1 W_1 follows from the moments of phi' at q* by free
probability (Pennington, Schoenholz & Ganguli 2017, 2018). Batch normalisation and SELU have
their own fixed points (Yang et al. 2019; Klambauer et al. 2017).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from gradflow.theory import _maps, quadrature
from gradflow.theory._maps import ActivationLike, as_float
from gradflow.theory.mean_field import chi1
from gradflow.theory.rmt import ensemble_s1

Array = jax.Array


# ----------------------------------------------------------------------------- gradients across depth


def gradient_norm_ratio(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, depth_from_top: ArrayLike
) -> Array:
    """E||dL/dh_l||^2 / E||dL/dh_L||^2 = chi_1^(L - l)  (Schoenholz et al. 2017).

    `depth_from_top` is L - l. Mean field, gradient-independence assumption.
    """
    return chi1(activation, sigma_w, sigma_b) ** as_float(depth_from_top)


def forward_jacobian_moment(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, l: ArrayLike
) -> Array:
    """E||J_l u||^2 / ||u||^2 = chi_1^l for the input-output Jacobian J_l of l layers at q*.

    Equal to the mean squared singular value of J_l, (1/N) tr J_l J_l^T (Pennington et al. 2017).
    Finite-width fluctuations for relu: `relu_jacobian_norm_stats`.
    """
    return chi1(activation, sigma_w, sigma_b) ** as_float(l)


def predict_log_mean_sq_singular(
    activation: ActivationLike, sigma_w: float, sigma_b: float, depths: ArrayLike | Any
) -> Array:
    """l log(chi_1): the mean-field log mean squared singular value of J_l at each depth l.

    For plotting beside a measured curve: `depths` is an array of depths or any object with a
    `.depths` attribute (a spectra result). sigma_w and sigma_b are scalars; result has the
    shape of `depths`.
    """
    d = as_float(getattr(depths, "depths", depths))
    return d * jnp.log(chi1(activation, sigma_w, sigma_b))


def predict_gradient_norms(activation: ActivationLike, sigma_w: float, sigma_b: float, depth: int) -> Array:
    """log(E||dL/dh_l||^2 / E||dL/dh_L||^2) = (L - l) log(chi_1) for l = 1..L; shape (depth,)."""
    l = jnp.arange(1, int(depth) + 1, dtype=jnp.result_type(float))
    return (int(depth) - l) * jnp.log(chi1(activation, sigma_w, sigma_b))


def batchnorm_gradient_growth(activation: ActivationLike = "relu") -> Array:
    """Per-layer growth of E||dL/dx_l||^2 (going down) in a deep batch-normalised net, large batch.

        lambda = E[phi'(z)^2] / Var[phi(z)],  z ~ N(0, 1)

    Yang et al. 2019, "A mean field theory of batch normalization" (pi / (pi - 1) for relu in the
    large-batch limit). Derivation: at the BN fixed point the normalised
    pre-activations of a unit across a large batch are ~ N(0, 1) and nearly uncorrelated between
    examples (their correlation is -1 / (B - 1)), so the next layer's batch-centred variance is
    sigma_w^2 Var[phi(z)]; backprop through BN divides by it and through phi multiplies by
    E[phi'^2], sigma_w cancelling. relu: (1/2) / (1/2 - 1/(2 pi)) = pi / (pi - 1) ~ 1.4675;
    identity: 1. O(1/B) corrections at finite batch.
    """
    fn, kinks = _maps.resolve(activation)
    dphi = _maps.grad(fn)
    m2 = _maps.mean(fn, kinks, lambda u: dphi(u) ** 2, 1.0)
    var = _maps.mean(fn, kinks, lambda u: fn(u) ** 2, 1.0) - _maps.mean(fn, kinks, fn, 1.0) ** 2
    return m2 / var


# ----------------------------------------------------------------------------- random matrices


def derivative_moment(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, k: int = 1, q0: ArrayLike = 1.0
) -> Array:
    """mu_k = E_z[phi'(sqrt(q*) z)^(2k)] at the fixed point reached from q0  (Pennington, Schoenholz
    & Ganguli 2017)."""
    return _maps.broadcast(
        lambda fn, kinks, sw, sb, q0: _maps.mu(fn, kinks, _maps.q_star(fn, kinks, sw, sb, q0), k),
        activation,
        sigma_w,
        sigma_b,
        q0,
    )


class SpectrumMoments(NamedTuple):
    """Mean and variance of the eigenvalues of J_L J_L^T at infinite width, and their ingredients."""

    mean: Array
    variance: Array
    mu1: Array
    mu2: Array
    s1: float


def jacobian_spectrum_moments(
    activation: ActivationLike,
    sigma_w: ArrayLike,
    sigma_b: ArrayLike,
    depth: ArrayLike,
    ensemble: str = "gaussian",
) -> SpectrumMoments:
    """Moments of the squared singular values lambda of J_L = D_L W_L ... D_1 W_1, D_l = diag(phi'(h_l)).

        mean = (sigma_w^2 mu_1)^L = chi_1^L
        variance / mean^2 = L (mu_2 / mu_1^2 - 1 - s1)

    with mu_k = E[phi'(h)^(2k)] at q* and s1 = -1 (Gaussian), 0 (orthogonal) the first S-transform
    coefficient of W W^T (Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
    learning through dynamical isometry", sec. 3; Pennington, Schoenholz & Ganguli 2018, "The
    emergence of spectral universality in deep networks"). It follows from the
    free multiplicative convolution: S(z) = (1 / m1)(1 - (var / m1^2) z + O(z^2)) and S-transforms
    multiply. At criticality the mean is 1 and the variance grows linearly in L; orthogonal weights
    with mu_2 = mu_1^2 (e.g. linear, or tanh as q* -> 0) give dynamical isometry.
    """
    s1 = ensemble_s1(ensemble)
    mu1 = derivative_moment(activation, sigma_w, sigma_b, 1)
    mu2 = derivative_moment(activation, sigma_w, sigma_b, 2)
    L = as_float(depth)
    mean = (as_float(sigma_w) ** 2 * mu1) ** L
    return SpectrumMoments(mean, mean**2 * L * (mu2 / mu1**2 - 1 - s1), mu1, mu2, s1)


# ----------------------------------------------------------------------------- SELU


def selu_constants() -> tuple[float, float]:
    """(alpha, scale) of SELU from its fixed point  (Klambauer et al. 2017, eq. 14).

    Solves E[selu(z)] = 0 and E[selu(z)^2] = 1 for z ~ N(0, 1), with
    selu(x) = scale * (x if x > 0 else alpha (e^x - 1)), by 30 two-dimensional Newton steps
    (Jacobian by jax.jacfwd) on the kink-split quadrature, in float64.
    """

    def residual(p):
        alpha, scale = p[0], p[1]

        def f(x):
            return scale * jnp.where(x > 0, x, alpha * jnp.expm1(jnp.minimum(x, 0.0)))

        m1 = quadrature.gaussian_expectation(f, 1.0, (0.0,))
        m2 = quadrature.gaussian_expectation(lambda x: f(x) ** 2, 1.0, (0.0,))
        return jnp.stack([m1, m2 - 1.0])

    def step(_, p):
        return p - jnp.linalg.solve(jax.jacfwd(residual)(p), residual(p))

    with quadrature.x64() if not jax.config.jax_enable_x64 else contextlib.nullcontext():
        p = jax.jit(lambda p0: lax.fori_loop(0, 30, step, p0))(jnp.asarray([1.5, 1.0], jnp.float64))
        return float(p[0]), float(p[1])
