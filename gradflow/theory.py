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
Gauss-Legendre quadrature of `gradflow._quadrature`; wrap calls in `_quadrature.x64()` for
~1e-12 accuracy. Derivatives phi' come from `jax.grad` of the activation.

Fixed points are the ones the length map reaches from the input's variance q0 (default 1), by
the scan of `gradflow._length_map`, and every quantity defined at a fixed point is evaluated
there (`fixed_point`). Conventions where no finite fixed point is reached: `q_star` is +inf when
q grows without bound (e.g. relu with sigma_w^2 / 2 > 1); chi_1 is then its q -> inf limit
(finite for asymptotically linear activations), and quantities defined at the fixed point (c*,
chi_c, xi_q, xi_c) are nan. A fixed point q* = 0 (odd phi, sigma_b = 0, ordered) is returned as
0 and its slopes as the q -> 0 limits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from gradflow import _length_map, _quadrature, activations
from gradflow._rmt import ENSEMBLE_S1 as ENSEMBLE_S1
from gradflow._rmt import ReluJacobianStats as ReluJacobianStats
from gradflow._rmt import ensemble_s1
from gradflow._rmt import fuss_catalan_density as fuss_catalan_density
from gradflow._rmt import gaussian_lyapunov_exponents as gaussian_lyapunov_exponents
from gradflow._rmt import jacobian_spectral_density as jacobian_spectral_density
from gradflow._rmt import relu_jacobian_norm_stats as relu_jacobian_norm_stats
from gradflow._rmt import residual_variance as residual_variance

Array = jax.Array
ActivationLike = str | Callable[..., Array]

_Q_MIN, _Q_MAX = _length_map.Q_MIN, _length_map.Q_MAX  # q is clamped here where a slope divides by it
_C_STEPS = 40  # Newton steps for c* from c = 0 (monotone: the correlation map is convex)
_BISECT_STEPS = 60  # bisection in log sigma_w over [1e-2, 1e2]: width 9.2 / 2^60 ~ 1e-17
_LOG_SW_BRACKET = (float(np.log(1e-2)), float(np.log(1e2)))


# chi_1 differing by more than this across the final bisection bracket is a jump, not a root:
# 1e-3 in float64; 0.012 in float32, where the length map of an activation that tends to relu
# (softplus) is below rounding past q ~ 1e4 and chi_1 stops 0.01 short of its limit 1 there.
def _jump(dtype) -> float:
    return max(1e-3, 1e5 * float(jnp.finfo(dtype).eps))


# ----------------------------------------------------------------------------- plumbing


def _resolve(activation: ActivationLike) -> tuple[Callable, tuple[float, ...]]:
    fn, kinks = activations.resolve(activation)  # unknown names raise ValueError
    if isinstance(activation, str) and not activations._spec(activation).elementwise:
        raise ValueError(f"mean-field theory needs an elementwise activation, got {activation!r}")
    return fn, tuple(float(k) for k in kinks)


def _check_sigmas(**values: Any) -> None:
    """ValueError naming a negative or nan sigma; traced values are not checked."""
    for name, value in values.items():
        try:
            a = np.asarray(value, dtype=float)
        except jax.errors.TracerArrayConversionError:
            continue
        if np.any(np.isnan(a)) or np.any(a < 0):
            raise ValueError(f"{name} must be >= 0 (a standard deviation), got {value!r}")


def _float(x: ArrayLike) -> Array:
    return jnp.asarray(x, dtype=jnp.result_type(float))


def _grad(fn: Callable) -> Callable[[Array], Array]:
    """Elementwise phi' via jax.grad, vmapped over the flattened input."""
    g = jax.vmap(jax.grad(fn))
    return lambda x: g(x.ravel()).reshape(x.shape)


def _mean(fn, kinks, f, q):
    return _quadrature.gaussian_expectation(f, q, kinks)


def _length_slope(fn, kinks, q, sigma_w):
    """dL/dq = sigma_w^2 E[u phi(u) phi'(u)] / q = chi_1 + sigma_w^2 E[phi phi''] (Stein's lemma).

    The first form is exact for kinked phi (no delta functions); q is clamped to [1e-30, 1e30]
    so q -> 0 gives the limit sigma_w^2 (phi'(0)^2 + phi(0) phi''(0)).
    """
    dphi = _grad(fn)
    qs = jnp.clip(q, _Q_MIN, _Q_MAX)
    return sigma_w**2 * _mean(fn, kinks, lambda u: u * fn(u) * dphi(u), qs) / qs


def _q_star(fn, kinks, sigma_w, sigma_b, q0):
    return _length_map.q_star(fn, kinks, sigma_w, sigma_b, q0)


def _q_eval(q):
    """q* clamped to [1e-30, 1e30]: the q -> 0 and q -> inf limits, with kinks still split."""
    return jnp.clip(jnp.where(jnp.isfinite(q), q, _Q_MAX), _Q_MIN, _Q_MAX)


def _mu(fn, kinks, q, k):
    dphi = _grad(fn)
    return _mean(fn, kinks, lambda u: dphi(u) ** (2 * k), _q_eval(q))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chi1(fn, kinks, sigma_w, sigma_b, q0):
    return sigma_w**2 * _mu(fn, kinks, _q_star(fn, kinks, sigma_w, sigma_b, q0), 1)


def _corr_map(fn, kinks, c, sigma_w, sigma_b, q):
    qe = _q_eval(q)
    e = _quadrature.gaussian_expectation_2d(lambda a, b: fn(a) * fn(b), qe, qe, c * qe, kinks)
    return (sigma_w**2 * e + sigma_b**2) / qe


def _corr_slope(fn, kinks, c, sigma_w, q):
    """dC/dc = sigma_w^2 E[phi'(u1) phi'(u2)] (Price's theorem), Corr(u1, u2) = c."""
    dphi, qe = _grad(fn), _q_eval(q)
    return sigma_w**2 * _quadrature.gaussian_expectation_2d(
        lambda a, b: dphi(a) * dphi(b), qe, qe, c * qe, kinks
    )


class FixedPoint(NamedTuple):
    """The mean-field fixed point a deep net reaches from q0, and the slopes that decide its fate.

    Attributes:
      q_star: the pre-activation variance the length map converges to from q0 (0 or +inf where
        q collapses or grows without bound).
      length_slope: L'(q*), the length map's slope there (< 1 stable, = 1 marginal); nan at +inf.
      chi1: sigma_w^2 E[phi'(u)^2] at q* (its q -> inf limit where q* = +inf).
      c_star: the stable fixed point of the correlation map (nan where q* = +inf).
      chi_c: the correlation map's slope at c* (nan where q* = +inf).
    """

    q_star: Array
    length_slope: Array
    chi1: Array
    c_star: Array
    chi_c: Array


@functools.partial(jax.jit, static_argnums=(0, 1))
def _fixed_point(fn, kinks, sigma_w, sigma_b, q0):
    q = _q_star(fn, kinks, sigma_w, sigma_b, q0)
    chi = sigma_w**2 * _mu(fn, kinks, q, 1)

    def step(_, c):
        h = _corr_map(fn, kinks, c, sigma_w, sigma_b, q) - c
        hp = _corr_slope(fn, kinks, c, sigma_w, q) - 1
        newton = c - h / jnp.where(hp < 0, hp, -1.0)
        return jnp.clip(jnp.where((hp < 0) & jnp.isfinite(newton), newton, c + h), 0.0, 1.0)

    # Ordered (chi_1 <= 1): the convex map C(c) - c > 0 on [0, 1), so c* = 1. Chaotic: Newton
    # from c = 0 increases monotonically to the smaller root, the stable one.
    c_chaos = lax.fori_loop(0, _C_STEPS, step, jnp.zeros_like(q))
    ordered = chi <= 1
    c = jnp.where(ordered, 1.0, c_chaos)
    chi_c = jnp.where(ordered, chi, _corr_slope(fn, kinks, c_chaos, sigma_w, q))
    finite = jnp.isfinite(q)
    nan = jnp.full_like(q, jnp.nan)
    slope = _length_slope(fn, kinks, q, sigma_w)
    return FixedPoint(
        q, jnp.where(finite, slope, nan), chi, jnp.where(finite, c, nan), jnp.where(finite, chi_c, nan)
    )


def _depth_scale(slope):
    return jnp.where(slope >= 1, jnp.inf, -1.0 / jnp.log(slope))


def _check_q0(q0: Any) -> None:
    try:
        a = np.asarray(q0, dtype=float)
    except jax.errors.TracerArrayConversionError:
        return
    if not np.all(np.isfinite(a) & (a > 0)):
        raise ValueError(f"q0 (the input's pre-activation variance) must be positive and finite, got {q0!r}")


def _broadcast(core, activation, sigma_w, sigma_b, q0, *extra):
    _check_sigmas(sigma_w=sigma_w, sigma_b=sigma_b)
    _check_q0(q0)
    fn, kinks = _resolve(activation)
    return jnp.vectorize(functools.partial(core, fn, kinks))(
        _float(sigma_w), _float(sigma_b), _float(q0), *extra
    )


# ----------------------------------------------------------------------------- mean field


def length_map(activation: ActivationLike, q: ArrayLike, sigma_w: ArrayLike, sigma_b: ArrayLike) -> Array:
    """The variance map q_l = L(q_{l-1}) = sigma_w^2 E_z[phi(sqrt(q) z)^2] + sigma_b^2  (Poole et al. 2016).

    Args and result broadcast elementwise over q, sigma_w, sigma_b.
    """
    _check_sigmas(q=q, sigma_w=sigma_w, sigma_b=sigma_b)
    fn, kinks = _resolve(activation)

    def one(q, sw, sb):
        return sw**2 * _mean(fn, kinks, lambda u: fn(u) ** 2, q) + sb**2

    return jnp.vectorize(one)(_float(q), _float(sigma_w), _float(sigma_b))


def fixed_point(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, q0: ArrayLike = 1.0
) -> FixedPoint:
    """The fixed point of the length map that a deep net reaches from an input of variance q0.

    This is the one definition behind `q_star`, `chi1`, `c_star`, `chi_c`, `depth_scales`,
    `critical_sigma_w`, `phase_diagram` and `initializers.critical`. The length map is
    nondecreasing, so the iterates q_l = L(q_{l-1}) from q_1 = q0 move monotonically to the
    nearest root of L(q) = q in the direction of L(q0) - q0 (see `gradflow._length_map` for the
    solver and its accuracy); where there is none they go to 0 or +inf. Other roots are never
    reached and never used: gelu and swish at sigma_b = 0 have q = 0 stable (slope
    sigma_w^2 / 4 < 1 for sigma_w < 2) and an unstable positive root, so which one a net goes to,
    and its chi_1, depends on q0. A q0 that is itself a root stays there (relu at the critical
    sigma_w and sigma_b = 0 has every q fixed).

    Conventions: chi_1 at q* = +inf is its q -> inf limit (finite for asymptotically linear
    activations); c*, chi_c and the length slope are nan there. At q* = 0 the slopes are their
    q -> 0 limits. Broadcasts over sigma_w, sigma_b and q0.
    """
    return FixedPoint(*_broadcast(_fixed_point, activation, sigma_w, sigma_b, q0))


def q_star(activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, q0: ArrayLike = 1.0) -> Array:
    """The fixed point q* = L(q*) that the length map reaches from q0 (`fixed_point`).

    +inf where q grows without bound (relu-like activations with sigma_w^2 E[phi'^2] > 1 at
    large q, or relu at sigma_w = sqrt(2) with a bias, where q grows linearly); 0 where it
    collapses (tanh with sigma_b = 0 and sigma_w <= 1).
    """
    return _broadcast(_q_star, activation, sigma_w, sigma_b, q0)


def correlation_map(
    activation: ActivationLike,
    c: ArrayLike,
    sigma_w: ArrayLike,
    sigma_b: ArrayLike,
    q: ArrayLike | None = None,
) -> Array:
    """The correlation map C(c) = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q  (Poole et al. 2016).

    (u1, u2) are Gaussian with variances q and correlation c; `q` defaults to q*(sigma_w, sigma_b)
    from q0 = 1, where C(1) = 1. Broadcasts over c, sigma_w, sigma_b (and q).
    """
    _check_sigmas(sigma_w=sigma_w, sigma_b=sigma_b)
    fn, kinks = _resolve(activation)
    sw, sb = _float(sigma_w), _float(sigma_b)
    qv = _broadcast(_q_star, activation, sw, sb, 1.0) if q is None else _float(q)
    return jnp.vectorize(functools.partial(_corr_map, fn, kinks))(_float(c), sw, sb, qv)


def correlation_slope(activation: ActivationLike, c: ArrayLike, sigma_w: ArrayLike, q: ArrayLike) -> Array:
    """C'(c) = sigma_w^2 E[phi'(u1) phi'(u2)], Var u_i = q, Corr(u1, u2) = c  (Price's theorem).

    The slope of the correlation map at any (c, q); sigma_b drops out. At c = 1 it is
    sigma_w^2 E[phi'(u)^2], i.e. chi_1 evaluated at that q; at (c*, q*) it is chi_c.
    Broadcasts over c, sigma_w and q.
    """
    _check_sigmas(sigma_w=sigma_w, q=q)
    fn, kinks = _resolve(activation)
    return jnp.vectorize(functools.partial(_corr_slope, fn, kinks))(_float(c), _float(sigma_w), _float(q))


def c_star(activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, q0: ArrayLike = 1.0) -> Array:
    """The stable fixed point c* of the correlation map at q* (`fixed_point`): 1 in the ordered
    phase (chi_1 <= 1), the smaller root of C(c) = c in [0, 1) in the chaotic phase (Poole et al. 2016)."""
    return fixed_point(activation, sigma_w, sigma_b, q0).c_star


def chi1(activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, q0: ArrayLike = 1.0) -> Array:
    """chi_1 = sigma_w^2 E_z[phi'(sqrt(q*) z)^2] at the fixed point reached from q0  (Poole et al. 2016;
    Schoenholz et al. 2017).

    The mean growth per layer of squared gradient norms (and of ||J u||^2); chi_1 = 1 is the
    order-to-chaos transition.
    """
    return _broadcast(_chi1, activation, sigma_w, sigma_b, q0)


def chi_c(activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, q0: ArrayLike = 1.0) -> Array:
    """chi_c = C'(c*) = sigma_w^2 E[phi'(u1) phi'(u2)], Corr(u1, u2) = c*  (Schoenholz et al. 2017).

    Equal to chi_1 in the ordered phase (c* = 1), below 1 in the chaotic phase.
    """
    return fixed_point(activation, sigma_w, sigma_b, q0).chi_c


def depth_scales(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, q0: ArrayLike = 1.0
) -> tuple[Array, Array]:
    """The depths (xi_q, xi_c) over which q and c approach their fixed points  (Schoenholz et al. 2017).

    xi_q^-1 = -log(chi_1 + sigma_w^2 E[phi''(u) phi(u)]), the log-slope of the length map
    at q*, computed as sigma_w^2 E[u phi(u) phi'(u)] / q* (equal by Stein's lemma, and exact for
    kinked phi); xi_c^-1 = -log(chi_c), which diverges on the critical line chi_1 = 1 from
    both sides and equals -1 / log(chi_1) in the ordered phase. A slope >= 1 gives +inf.
    """
    fp = fixed_point(activation, sigma_w, sigma_b, q0)
    return _depth_scale(fp.length_slope), _depth_scale(fp.chi_c)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _critical(fn, kinks, sigma_b, q0):
    def chi(log_sw):
        return _chi1(fn, kinks, jnp.exp(log_sw), sigma_b, q0)

    # chi_1 at the bracket's ends rides along with it, so the program holds two copies of the
    # fixed-point solver (the ends, vmapped, and the loop body) instead of five: compile time
    # is most of a call's cost.
    def step(_, bracket):
        lo, hi, chi_lo, chi_hi = bracket
        mid = (lo + hi) / 2
        chi_mid = chi(mid)
        up = chi_mid > 1
        return (
            jnp.where(up, lo, mid),
            jnp.where(up, mid, hi),
            jnp.where(up, chi_lo, chi_mid),
            jnp.where(up, chi_mid, chi_hi),
        )

    ends = jnp.asarray(_LOG_SW_BRACKET, sigma_b.dtype)
    chi_lo0, chi_hi0 = jax.vmap(chi)(ends)
    lo0, hi0 = ends
    valid = (chi_lo0 < 1) & (chi_hi0 > 1)
    lo, hi, chi_lo, chi_hi = lax.fori_loop(0, _BISECT_STEPS, step, (lo0, hi0, chi_lo0, chi_hi0))
    continuous = jnp.abs(chi_hi - chi_lo) <= _jump(lo.dtype)
    return jnp.where(valid & continuous, jnp.exp((lo + hi) / 2), jnp.nan)


def critical_sigma_w(activation: ActivationLike, sigma_b: ArrayLike = 0.0, q0: ArrayLike = 1.0) -> Array:
    """The sigma_w at which chi_1 = 1 at the fixed point reached from q0 (`fixed_point`).

    Bisection in log sigma_w over [1e-2, 1e2] (60 steps) on chi1(sigma_w, sigma_b, q0) - 1,
    which is nondecreasing in sigma_w for the registered activations; the result is accepted
    only where chi_1 is continuous there (it differs by <= 1e-3 across the final bracket in
    float64, 0.012 in float32), so
    it is always a point with chi_1 = 1, never the place where chi_1 jumps across 1. nan where
    there is none: gelu for sigma_b below about 0.42 and swish below about 0.75, whose fixed
    point with chi_1 = 1 is unstable (L'(q*) > 1), so chi_1 jumps from < 1 (q falls to a small
    stable fixed point) to > 1 (q grows without bound) as sigma_w passes the value where the
    unstable root crosses q0. The edge of chaos can sit at q* = 0 (tanh, elu, selu at
    sigma_b = 0: sigma_w = 1 / phi'(0) in the mean of the one-sided slopes squared) or at
    q* = +inf (relu-like activations with a bias, softplus: q grows sub-exponentially and
    chi_1 tends to 1). 1 for tanh at sigma_b = 0 and sqrt(2) for relu (any sigma_b); the curve
    in the (sigma_w, sigma_b) plane is the edge of chaos of Poole et al. 2016 / Schoenholz et
    al. 2017. Broadcasts over sigma_b (and q0).
    """
    _check_sigmas(sigma_b=sigma_b)
    _check_q0(q0)
    fn, kinks = _resolve(activation)
    return jnp.vectorize(functools.partial(_critical, fn, kinks))(_float(sigma_b), _float(q0))


class PhaseDiagram(NamedTuple):
    """Mean-field quantities on a grid; arrays are (W, B), indexed [sigma_w, sigma_b]."""

    sigma_w: Array  # (W,)
    sigma_b: Array  # (B,)
    q_star: Array
    chi1: Array
    chi_c: Array
    xi_q: Array
    xi_c: Array
    chaotic: Array  # bool, chi1 > 1


def phase_diagram(
    activation: ActivationLike, sigma_w_grid: ArrayLike, sigma_b_grid: ArrayLike, q0: float = 1.0
) -> PhaseDiagram:
    """q*, chi_1, chi_c, xi_q, xi_c and the ordered/chaotic label on the grid, in one vmapped call.

    All at the fixed point reached from q0 (`fixed_point`). Cost: the 2-D quadratures of the
    Newton steps for c* dominate (tens of ms per grid point on a CPU core, after a few seconds
    of compilation).
    """
    sw, sb = _float(sigma_w_grid), _float(sigma_b_grid)
    if sw.ndim != 1 or sb.ndim != 1:
        raise ValueError(f"phase_diagram needs 1-D grids, got shapes {sw.shape} and {sb.shape}")
    fp = fixed_point(activation, sw[:, None], sb[None, :], q0)
    return PhaseDiagram(
        sw,
        sb,
        fp.q_star,
        fp.chi1,
        fp.chi_c,
        _depth_scale(fp.length_slope),
        _depth_scale(fp.chi_c),
        fp.chi1 > 1,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _trajectory(fn, kinks, sigma_w, sigma_b, q1, depth):
    dphi = _grad(fn)

    def layer(q, _):
        qe = jnp.clip(q, _Q_MIN, _Q_MAX)
        chi = sigma_w**2 * _mean(fn, kinks, lambda u: dphi(u) ** 2, qe)
        return sigma_w**2 * _mean(fn, kinks, lambda u: fn(u) ** 2, qe) + sigma_b**2, (q, chi)

    return lax.scan(layer, q1, None, length=depth)[1]


def length_trajectory(
    activation: ActivationLike, sigma_w: float, sigma_b: float, q1: float, depth: int
) -> tuple[Array, Array]:
    """(q_l, chi_l) for l = 1..depth: the variances a net's pre-activations follow from q_1, and
    sigma_w^2 E[phi'(u_l)^2] at each, the mean growth of ||J u||^2 through layer l.

    Beside `fixed_point`, which is where they end: a net that starts far from q*, or at a
    marginal q* (tanh at sigma_b = 0, sigma_w = 1, whose q_l falls like 1 / l), is described by
    the trajectory, and sum_l log chi_l predicts its log mean squared singular value. Scalars in;
    arrays of shape (depth,) out.
    """
    _check_sigmas(sigma_w=sigma_w, sigma_b=sigma_b, q1=q1)
    fn, kinks = _resolve(activation)
    q, chi = _trajectory(fn, kinks, _float(sigma_w), _float(sigma_b), _float(q1), int(depth))
    return q, chi


# ----------------------------------------------------------------------------- gradients across depth


def gradient_norm_ratio(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, depth_from_top: ArrayLike
) -> Array:
    """E||dL/dh_l||^2 / E||dL/dh_L||^2 = chi_1^(L - l)  (Schoenholz et al. 2017).

    `depth_from_top` is L - l. Mean field, gradient-independence assumption.
    """
    return chi1(activation, sigma_w, sigma_b) ** _float(depth_from_top)


def forward_jacobian_moment(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, l: ArrayLike
) -> Array:
    """E||J_l u||^2 / ||u||^2 = chi_1^l for the input-output Jacobian J_l of l layers at q*.

    Equal to the mean squared singular value of J_l, (1/N) tr J_l J_l^T (Pennington et al. 2017).
    Finite-width fluctuations for relu: `relu_jacobian_norm_stats`.
    """
    return chi1(activation, sigma_w, sigma_b) ** _float(l)


def predict_log_mean_sq_singular(
    activation: ActivationLike, sigma_w: float, sigma_b: float, depths: ArrayLike | Any
) -> Array:
    """l log(chi_1): the mean-field log mean squared singular value of J_l at each depth l.

    For plotting beside a measured curve: `depths` is an array of depths or any object with a
    `.depths` attribute (a spectra result). sigma_w and sigma_b are scalars; result has the
    shape of `depths`.
    """
    d = _float(getattr(depths, "depths", depths))
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
    fn, kinks = _resolve(activation)
    dphi = _grad(fn)
    m2 = _mean(fn, kinks, lambda u: dphi(u) ** 2, 1.0)
    var = _mean(fn, kinks, lambda u: fn(u) ** 2, 1.0) - _mean(fn, kinks, fn, 1.0) ** 2
    return m2 / var


# ----------------------------------------------------------------------------- random matrices


def derivative_moment(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, k: int = 1, q0: ArrayLike = 1.0
) -> Array:
    """mu_k = E_z[phi'(sqrt(q*) z)^(2k)] at the fixed point reached from q0  (Pennington, Schoenholz
    & Ganguli 2017)."""
    return _broadcast(
        lambda fn, kinks, sw, sb, q0: _mu(fn, kinks, _q_star(fn, kinks, sw, sb, q0), k),
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
    L = _float(depth)
    mean = (_float(sigma_w) ** 2 * mu1) ** L
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

        m1 = _quadrature.gaussian_expectation(f, 1.0, (0.0,))
        m2 = _quadrature.gaussian_expectation(lambda x: f(x) ** 2, 1.0, (0.0,))
        return jnp.stack([m1, m2 - 1.0])

    def step(_, p):
        return p - jnp.linalg.solve(jax.jacfwd(residual)(p), residual(p))

    with _quadrature.x64() if not jax.config.jax_enable_x64 else contextlib.nullcontext():
        p = jax.jit(lambda p0: lax.fori_loop(0, 30, step, p0))(jnp.asarray([1.5, 1.0], jnp.float64))
        return float(p[0]), float(p[1])
