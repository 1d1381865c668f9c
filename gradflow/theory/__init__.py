"""Mean-field signal propagation, critical lines, depth scales and random-matrix predictions.

A deep network h_l = W_l phi(h_{l-1}) + b_l with W_l entries N(0, sigma_w^2 / fan_in) and b_l
entries N(0, sigma_b^2) propagates, at infinite width, a pre-activation variance q_l and a
correlation c_l between two inputs through deterministic maps (Poole et al. 2016, "Exponential
expressivity in deep neural networks through transient chaos"; Schoenholz et al. 2017, "Deep
information propagation"). Their fixed points and slopes predict how gradients vanish or
explode: chi_1 = 1 is the order-to-chaos transition, where signals and gradients propagate
furthest.

Every function takes `activation` as a registry name or a callable (see
`gradflow.activations.resolve`), and numbers sigma_w, sigma_b (standard deviations) that may
be arrays (they broadcast, e.g. a (W, 1) grid against a (1, B) grid) or traced values, so
`jit` and `vmap` go through and a phase diagram is one call. Expectations use the kink-split
Gauss-Legendre quadrature of `gradflow.theory.quadrature`; wrap calls in `quadrature.x64()` for
~1e-12 accuracy. Derivatives phi' come from `jax.grad` of the activation.

Fixed points are the ones the length map reaches from the input's variance q0 (default 1), by
the scan of `gradflow.theory._length_map`, and every quantity defined at a fixed point is
evaluated there (`fixed_point`). Conventions where no finite fixed point is reached: `q_star` is
+inf when q grows without bound (e.g. relu with sigma_w^2 / 2 > 1); chi_1 is then its q -> inf
limit (finite for asymptotically linear activations), and quantities defined at the fixed point
(c*, chi_c, xi_q, xi_c) are nan. A fixed point q* = 0 (odd phi, sigma_b = 0, ordered) is
returned as 0 and its slopes as the q -> 0 limits.

The package, one idea per file:
  mean_field.py  the length and correlation maps and the fixed point a net reaches (q*, chi_1, c*, chi_c)
  phase.py       the critical line chi_1 = 1, phase diagrams, the trajectory to q*
  jacobian.py    gradients and Jacobian spectra across depth at q*, batchnorm's growth, SELU
  rmt.py         random-matrix, finite-width and residual results that need no fixed point
  quadrature.py  kink-split Gaussian expectations (and `x64`, `precise`)
  _maps.py, _length_map.py  the private cores and the q* solver
"""

from gradflow.theory._maps import ActivationLike as ActivationLike
from gradflow.theory.jacobian import SpectrumMoments as SpectrumMoments
from gradflow.theory.jacobian import batchnorm_gradient_growth as batchnorm_gradient_growth
from gradflow.theory.jacobian import derivative_moment as derivative_moment
from gradflow.theory.jacobian import forward_jacobian_moment as forward_jacobian_moment
from gradflow.theory.jacobian import gradient_norm_ratio as gradient_norm_ratio
from gradflow.theory.jacobian import jacobian_spectrum_moments as jacobian_spectrum_moments
from gradflow.theory.jacobian import predict_gradient_norms as predict_gradient_norms
from gradflow.theory.jacobian import predict_log_mean_sq_singular as predict_log_mean_sq_singular
from gradflow.theory.jacobian import selu_constants as selu_constants
from gradflow.theory.mean_field import FixedPoint as FixedPoint
from gradflow.theory.mean_field import c_star as c_star
from gradflow.theory.mean_field import chi1 as chi1
from gradflow.theory.mean_field import chi_c as chi_c
from gradflow.theory.mean_field import correlation_map as correlation_map
from gradflow.theory.mean_field import correlation_slope as correlation_slope
from gradflow.theory.mean_field import depth_scales as depth_scales
from gradflow.theory.mean_field import fixed_point as fixed_point
from gradflow.theory.mean_field import length_map as length_map
from gradflow.theory.mean_field import q_star as q_star
from gradflow.theory.phase import PhaseDiagram as PhaseDiagram
from gradflow.theory.phase import critical_sigma_w as critical_sigma_w
from gradflow.theory.phase import length_trajectory as length_trajectory
from gradflow.theory.phase import phase_diagram as phase_diagram
from gradflow.theory.rmt import ENSEMBLE_S1 as ENSEMBLE_S1
from gradflow.theory.rmt import ReluJacobianStats as ReluJacobianStats
from gradflow.theory.rmt import ensemble_s1 as ensemble_s1
from gradflow.theory.rmt import fuss_catalan_density as fuss_catalan_density
from gradflow.theory.rmt import gaussian_lyapunov_exponents as gaussian_lyapunov_exponents
from gradflow.theory.rmt import jacobian_spectral_density as jacobian_spectral_density
from gradflow.theory.rmt import relu_jacobian_norm_stats as relu_jacobian_norm_stats
from gradflow.theory.rmt import residual_variance as residual_variance

__all__ = [
    "ENSEMBLE_S1",
    "ActivationLike",
    "FixedPoint",
    "PhaseDiagram",
    "ReluJacobianStats",
    "SpectrumMoments",
    "batchnorm_gradient_growth",
    "c_star",
    "chi1",
    "chi_c",
    "correlation_map",
    "correlation_slope",
    "critical_sigma_w",
    "depth_scales",
    "derivative_moment",
    "ensemble_s1",
    "fixed_point",
    "forward_jacobian_moment",
    "fuss_catalan_density",
    "gaussian_lyapunov_exponents",
    "gradient_norm_ratio",
    "jacobian_spectral_density",
    "jacobian_spectrum_moments",
    "length_map",
    "length_trajectory",
    "phase_diagram",
    "predict_gradient_norms",
    "predict_log_mean_sq_singular",
    "q_star",
    "relu_jacobian_norm_stats",
    "residual_variance",
    "selu_constants",
]
