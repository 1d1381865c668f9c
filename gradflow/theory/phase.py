"""The order-to-chaos transition: the critical line chi_1 = 1, phase diagrams, and the path to q*.

chi_1 = 1 separates the ordered phase (correlations converge to 1, gradients vanish) from the
chaotic one (correlations decorrelate, gradients explode); on that line signals and gradients
propagate furthest (Poole et al. 2016; Schoenholz et al. 2017). Everything here is evaluated
at the fixed point a net reaches from its input's variance q0 (`gradflow.theory.fixed_point`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from gradflow.theory import _maps
from gradflow.theory._maps import Q_MAX, Q_MIN, ActivationLike, as_float
from gradflow.theory.mean_field import fixed_point

Array = jax.Array

_BISECT_STEPS = 60  # bisection in log sigma_w over [1e-2, 1e2]: width 9.2 / 2^60 ~ 1e-17
_LOG_SW_BRACKET = (float(np.log(1e-2)), float(np.log(1e2)))


# chi_1 differing by more than this across the final bisection bracket is a jump, not a root:
# 1e-3 in float64; 0.012 in float32, where the length map of an activation that tends to relu
# (softplus) is below rounding past q ~ 1e4 and chi_1 stops 0.01 short of its limit 1 there.
def _jump(dtype) -> float:
    return max(1e-3, 1e5 * float(jnp.finfo(dtype).eps))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _critical(fn, kinks, sigma_b, q0):
    def chi(log_sw):
        return _maps.chi1(fn, kinks, jnp.exp(log_sw), sigma_b, q0)

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
    _maps.check_sigmas(sigma_b=sigma_b)
    _maps.check_q0(q0)
    fn, kinks = _maps.resolve(activation)
    return jnp.vectorize(functools.partial(_critical, fn, kinks))(as_float(sigma_b), as_float(q0))


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
    sw, sb = as_float(sigma_w_grid), as_float(sigma_b_grid)
    if sw.ndim != 1 or sb.ndim != 1:
        raise ValueError(f"phase_diagram needs 1-D grids, got shapes {sw.shape} and {sb.shape}")
    fp = fixed_point(activation, sw[:, None], sb[None, :], q0)
    return PhaseDiagram(
        sw,
        sb,
        fp.q_star,
        fp.chi1,
        fp.chi_c,
        _maps.depth_scale(fp.length_slope),
        _maps.depth_scale(fp.chi_c),
        fp.chi1 > 1,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _trajectory(fn, kinks, sigma_w, sigma_b, q1, depth):
    dphi = _maps.grad(fn)

    def layer(q, _):
        qe = jnp.clip(q, Q_MIN, Q_MAX)
        chi = sigma_w**2 * _maps.mean(fn, kinks, lambda u: dphi(u) ** 2, qe)
        return sigma_w**2 * _maps.mean(fn, kinks, lambda u: fn(u) ** 2, qe) + sigma_b**2, (q, chi)

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
    _maps.check_sigmas(sigma_w=sigma_w, sigma_b=sigma_b, q1=q1)
    fn, kinks = _maps.resolve(activation)
    q, chi = _trajectory(fn, kinks, as_float(sigma_w), as_float(sigma_b), as_float(q1), int(depth))
    return q, chi
