"""Random-matrix, finite-width and residual-network results that need no mean-field fixed point.

`gradflow.theory` re-exports the public names. Everything here is closed form (or a parametric
curve) in the depth, the widths and the weight ensemble; the activation enters only through
`gradflow.theory.mean_field`, which owns the fixed points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import digamma, polygamma
from jax.typing import ArrayLike

from gradflow._checks import check_int
from gradflow.theory import quadrature

Array = jax.Array

# First coefficient of the S-transform of W W^T, S(z) = sigma_w^-2 (1 + s1 z + ...), for weights
# normalised to E[W W^T] = sigma_w^2 I (Pennington, Schoenholz & Ganguli 2017, sec. 3):
# s1 = -(variance / mean^2) of the spectrum of W W^T: Marchenko-Pastur (ratio 1) -> -1, Haar -> 0.
ENSEMBLE_S1 = {"gaussian": -1.0, "orthogonal": 0.0}


def ensemble_s1(ensemble: str) -> float:
    """s1 of the weight ensemble: -1 for Gaussian, 0 for (scaled) orthogonal weights."""
    if ensemble not in ENSEMBLE_S1:
        raise ValueError(f"unknown weight ensemble {ensemble!r}; known ensembles: {', '.join(ENSEMBLE_S1)}")
    return ENSEMBLE_S1[ensemble]


def gaussian_lyapunov_exponents(n: int, sigma: float = 1.0) -> Array:
    """Lyapunov exponents of a product of i.i.d. real Gaussian n x n matrices, entries N(0, sigma^2/n).

    lambda_i = log(sigma) + (1/2) [log(2/n) + digamma((n - i + 1)/2)],  i = 1..n

    (Newman 1986, "The distribution of Lyapunov exponents: exact results for random matrices";
    Forrester 2013). lambda_i is the almost-sure growth rate of log of the i-th singular value of
    the product, per factor. The top one is E log ||W u|| for a unit u: ||W u||^2 ~ sigma^2
    chi^2_n / n, and E log chi^2_k = log 2 + digamma(k / 2); the i-th follows from the Gaussian
    invariance of the QR (Benettin) recursion, whose i-th diagonal entry is chi_{n-i+1}.

    Args:
      n: the matrix size.
      sigma: weight scale (the mean-field sigma_w).

    Returns:
      Shape (n,), decreasing, in the default float dtype.
    """
    n = check_int("n", n, 1)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    i = jnp.arange(1, n + 1, dtype=jnp.result_type(float))
    return math.log(sigma) + 0.5 * (math.log(2.0 / n) + digamma((n - i + 1) / 2))


def fuss_catalan_density(depth: int, num: int = 2001) -> tuple[Array, Array]:
    """Limiting density of squared singular values of a product of `depth` Ginibre matrices.

    For W_l with i.i.d. entries N(0, 1/N), N -> infinity, the spectrum of J J^T, J = W_L...W_1,
    is the free multiplicative power of Marchenko-Pastur: the Fuss-Catalan law with moments
    m_k = binom((L + 1) k, k) / (L k + 1), support [0, (L + 1)^(L + 1) / L^L]. Its density has
    the parametric form, for 0 < phi < pi / (L + 1) (Haagerup & Moller 2012; Neuschel 2014):

        x(phi)   = sin((L + 1) phi)^(L + 1) / (sin(phi) sin(L phi)^L)
        rho(phi) = sin(phi)^2 sin(L phi)^(L - 1) / (pi sin((L + 1) phi)^L)

    Returns:
      (x, density), each shape (num,), x increasing: nodes uniform in phi, from just above 0
      (where the density diverges like x^(-L/(L+1)) and the mass per node is uniform) to the
      upper edge (density 0; the square-root edge gets quadratically spaced nodes). Float64 under
      `quadrature.x64()`; in float32 the smallest nodes underflow for depth >~ 20.
    """
    depth = check_int("depth", depth, 1)
    num = check_int("num", num, 3)
    s = depth
    with quadrature.x64():
        phi = (math.pi / (s + 1)) * jnp.arange(1, num, dtype=jnp.float64) / num
        sin1, sins, sins1 = jnp.sin(phi), jnp.sin(s * phi), jnp.sin((s + 1) * phi)
        x = sins1 ** (s + 1) / (sin1 * sins**s)
        rho = sin1**2 * sins ** (s - 1) / (jnp.pi * sins1**s)
        x_max = (s + 1) ** (s + 1) / s**s  # phi -> 0
        x = np.concatenate([np.asarray(x[::-1]), [x_max]])
        rho = np.concatenate([np.asarray(rho[::-1]), [0.0]])
    dt = jnp.result_type(float)
    return jnp.asarray(x, dt), jnp.asarray(rho, dt)


class ReluJacobianStats(NamedTuple):
    """Exact finite-width statistics of X = ||J u||^2 for a zero-bias He-init ReLU net (unit u).

    Attributes:
      mean: E[X] = n_L / n_0.
      second_moment: E[X^2] = prod_l (n_l^2 + 5 n_l) / n_{l-1}^2  (= prod (1 + 5/n) at equal widths).
      log_mean: E[log X | X > 0].
      log_variance: Var[log X | X > 0]  (~ 5 beta for wide layers).
      p_zero: P(X = 0) = 1 - prod_l (1 - 2^-n_l)  (a layer with every unit off).
      beta: Hanin's sum_l 1 / n_l over the hidden and output layers.
    """

    mean: float
    second_moment: float
    log_mean: float
    log_variance: float
    p_zero: float
    beta: float


def relu_jacobian_norm_stats(widths: Sequence[int]) -> ReluJacobianStats:
    """Exact moments of ||J u||^2 for a finite-width ReLU net with He-init Gaussian weights.

    Network: h_l = W_l x_{l-1}, x_l = relu(h_l), W_l entries N(0, 2 / n_{l-1}), no biases;
    J = D_L W_L ... D_1 W_1 with D_l = diag(1{h_l > 0}); u a fixed unit vector, widths =
    (n_0, n_1, ..., n_L). Flipping the sign of a row of W_l flips its unit's on/off state and
    keeps (W_l v)_i^2, so the states are i.i.d. Bernoulli(1/2), independent of the Gaussian
    values, and the per-layer factors are independent (Hanin 2018, "Which neural net
    architectures give rise to exploding and vanishing gradients?", and Hanin & Nica 2019):

        ||J_l u||^2 / ||J_{l-1} u||^2 = (2 / n_{l-1}) chi^2_{K_l},   K_l ~ Binomial(n_l, 1/2).

    Hence E[R_l] = n_l / n_{l-1}, E[R_l^2] = (n_l^2 + 5 n_l) / n_{l-1}^2, and, with
    E log chi^2_k = log 2 + digamma(k/2), Var log chi^2_k = trigamma(k/2), the log-moments
    conditional on K_l >= 1 follow by summing over the binomial. The fluctuations of log X grow
    like 5 sum_l 1/n_l: Hanin's exp(C beta) with C = 5 for the second moment.

    Args:
      widths: (n_0, ..., n_L), L >= 1.

    Returns:
      `ReluJacobianStats` of Python floats.
    """
    widths = [check_int("widths", n, 1) for n in widths]
    if len(widths) < 2:
        raise ValueError(f"widths must list n_0 and at least one layer, got {widths}")
    mean = second = 1.0
    log_mean = log_var = 0.0
    p_alive = 1.0
    with quadrature.x64():
        for n_in, n in zip(widths[:-1], widths[1:], strict=True):
            mean *= n / n_in
            second *= (n * n + 5 * n) / n_in**2
            k = np.arange(1, n + 1)
            log_pmf = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in k])
            pmf = np.exp(log_pmf - n * math.log(2.0))
            p_alive *= 1.0 - 0.5**n
            pmf = pmf / pmf.sum()
            m1 = math.log(2.0) + np.asarray(digamma(k / 2.0))  # E log chi^2_k
            var_k = np.asarray(polygamma(1, k / 2.0))  # Var log chi^2_k
            e = float(np.sum(pmf * m1))
            log_mean += math.log(2.0 / n_in) + e
            log_var += float(np.sum(pmf * (var_k + m1**2))) - e * e
    beta = float(sum(1.0 / n for n in widths[1:]))
    return ReluJacobianStats(mean, second, log_mean, log_var, 1.0 - p_alive, beta)


def jacobian_spectral_density(
    depth: int, ensemble: str = "gaussian", sigma_w: float = 1.0, num: int = 2001
) -> tuple[Array, Array]:
    """Limiting density of the squared singular values of a deep *linear* net's Jacobian.

    - "gaussian": W_l entries N(0, sigma_w^2 / N): sigma_w^(2L) times the Fuss-Catalan law
      (`fuss_catalan_density`), mean sigma_w^(2L), variance L sigma_w^(4L).
    - "orthogonal": a point mass at sigma_w^(2L), returned as x = [sigma_w^(2L)], density = [1.0]
      (a mass, not a density).

    Returns:
      (x, density), x increasing.
    """
    ensemble_s1(ensemble)
    if not sigma_w >= 0:
        raise ValueError(f"sigma_w must be >= 0, got {sigma_w!r}")
    dt = jnp.result_type(float)
    scale = float(sigma_w) ** (2 * int(depth))
    if ensemble == "orthogonal":
        return jnp.asarray([scale], dt), jnp.asarray([1.0], dt)
    x, rho = fuss_catalan_density(depth, num)
    return x * scale, rho / scale


_RESIDUAL_KINDS = ("plain", "batchnorm", "rezero", "skipinit", "fixup")


def residual_variance(depth: ArrayLike, kind: str) -> Array:
    """Var(x_l) / Var(x_0) after l residual blocks x_{l+1} = x_l + F(x_l) at initialisation.

    - "plain": He-init branch with Var F(x) = Var x, so the variance doubles: 2^l.
    - "batchnorm": BN at the end of the branch, Var F(x) = 1 (for Var x_0 = 1): l + 1
      (De & Smith 2020, "Batch normalization biases residual blocks towards the identity").
    - "rezero" / "skipinit" / "fixup": the branch is zero at init (Bachlechner et al. 2020;
      De & Smith 2020; Zhang et al. 2019): 1.
    """
    if kind not in _RESIDUAL_KINDS:
        raise ValueError(f"unknown residual kind {kind!r}; known kinds: {', '.join(_RESIDUAL_KINDS)}")
    l = jnp.asarray(depth, dtype=jnp.result_type(float))
    if kind == "plain":
        return 2.0**l
    if kind == "batchnorm":
        return l + 1.0
    return jnp.ones_like(l)
