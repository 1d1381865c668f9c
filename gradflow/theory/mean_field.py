"""The mean-field maps of a deep network and the fixed point it reaches: q*, chi_1, c*, chi_c.

A deep network h_l = W_l phi(h_{l-1}) + b_l with W_l entries N(0, sigma_w^2 / fan_in) and b_l
entries N(0, sigma_b^2) propagates, at infinite width, a pre-activation variance q_l by the
length map and a correlation c_l between two inputs by the correlation map (Poole et al. 2016,
"Exponential expressivity in deep neural networks through transient chaos"; Schoenholz et al.
2017, "Deep information propagation"). `fixed_point` is the one definition of where a net
settles; every other quantity here is evaluated there.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from gradflow.theory import _maps
from gradflow.theory._maps import ActivationLike, as_float

Array = jax.Array

_C_STEPS = 40  # Newton steps for c* from c = 0 (monotone: the correlation map is convex)


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
    q = _maps.q_star(fn, kinks, sigma_w, sigma_b, q0)
    chi = sigma_w**2 * _maps.mu(fn, kinks, q, 1)

    def step(_, c):
        h = _maps.corr_map(fn, kinks, c, sigma_w, sigma_b, q) - c
        hp = _maps.corr_slope(fn, kinks, c, sigma_w, q) - 1
        newton = c - h / jnp.where(hp < 0, hp, -1.0)
        return jnp.clip(jnp.where((hp < 0) & jnp.isfinite(newton), newton, c + h), 0.0, 1.0)

    # Ordered (chi_1 <= 1): the convex map C(c) - c > 0 on [0, 1), so c* = 1. Chaotic: Newton
    # from c = 0 increases monotonically to the smaller root, the stable one.
    c_chaos = lax.fori_loop(0, _C_STEPS, step, jnp.zeros_like(q))
    ordered = chi <= 1
    c = jnp.where(ordered, 1.0, c_chaos)
    chi_c = jnp.where(ordered, chi, _maps.corr_slope(fn, kinks, c_chaos, sigma_w, q))
    finite = jnp.isfinite(q)
    nan = jnp.full_like(q, jnp.nan)
    slope = _maps.length_slope(fn, kinks, q, sigma_w)
    return FixedPoint(
        q, jnp.where(finite, slope, nan), chi, jnp.where(finite, c, nan), jnp.where(finite, chi_c, nan)
    )


def length_map(activation: ActivationLike, q: ArrayLike, sigma_w: ArrayLike, sigma_b: ArrayLike) -> Array:
    """The variance map q_l = L(q_{l-1}) = sigma_w^2 E_z[phi(sqrt(q) z)^2] + sigma_b^2  (Poole et al. 2016).

    Args and result broadcast elementwise over q, sigma_w, sigma_b.
    """
    _maps.check_sigmas(q=q, sigma_w=sigma_w, sigma_b=sigma_b)
    fn, kinks = _maps.resolve(activation)

    def one(q, sw, sb):
        return sw**2 * _maps.mean(fn, kinks, lambda u: fn(u) ** 2, q) + sb**2

    return jnp.vectorize(one)(as_float(q), as_float(sigma_w), as_float(sigma_b))


def fixed_point(
    activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, q0: ArrayLike = 1.0
) -> FixedPoint:
    """The fixed point of the length map that a deep net reaches from an input of variance q0.

    This is the one definition behind `q_star`, `chi1`, `c_star`, `chi_c`, `depth_scales`,
    `critical_sigma_w`, `phase_diagram` and `initializers.critical`. The length map is
    nondecreasing, so the iterates q_l = L(q_{l-1}) from q_1 = q0 move monotonically to the
    nearest root of L(q) = q in the direction of L(q0) - q0 (see `gradflow.theory._length_map`
    for the solver and its accuracy); where there is none they go to 0 or +inf. Other roots are
    never reached and never used: gelu and swish at sigma_b = 0 have q = 0 stable (slope
    sigma_w^2 / 4 < 1 for sigma_w < 2) and an unstable positive root, so which one a net goes to,
    and its chi_1, depends on q0. A q0 that is itself a root stays there (relu at the critical
    sigma_w and sigma_b = 0 has every q fixed).

    Conventions: chi_1 at q* = +inf is its q -> inf limit (finite for asymptotically linear
    activations); c*, chi_c and the length slope are nan there. At q* = 0 the slopes are their
    q -> 0 limits. Broadcasts over sigma_w, sigma_b and q0.
    """
    return FixedPoint(*_maps.broadcast(_fixed_point, activation, sigma_w, sigma_b, q0))


def q_star(activation: ActivationLike, sigma_w: ArrayLike, sigma_b: ArrayLike, q0: ArrayLike = 1.0) -> Array:
    """The fixed point q* = L(q*) that the length map reaches from q0 (`fixed_point`).

    +inf where q grows without bound (relu-like activations with sigma_w^2 E[phi'^2] > 1 at
    large q, or relu at sigma_w = sqrt(2) with a bias, where q grows linearly); 0 where it
    collapses (tanh with sigma_b = 0 and sigma_w <= 1).
    """
    return _maps.broadcast(_maps.q_star, activation, sigma_w, sigma_b, q0)


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
    _maps.check_sigmas(sigma_w=sigma_w, sigma_b=sigma_b)
    fn, kinks = _maps.resolve(activation)
    sw, sb = as_float(sigma_w), as_float(sigma_b)
    qv = _maps.broadcast(_maps.q_star, activation, sw, sb, 1.0) if q is None else as_float(q)
    return jnp.vectorize(functools.partial(_maps.corr_map, fn, kinks))(as_float(c), sw, sb, qv)


def correlation_slope(activation: ActivationLike, c: ArrayLike, sigma_w: ArrayLike, q: ArrayLike) -> Array:
    """C'(c) = sigma_w^2 E[phi'(u1) phi'(u2)], Var u_i = q, Corr(u1, u2) = c  (Price's theorem).

    The slope of the correlation map at any (c, q); sigma_b drops out. At c = 1 it is
    sigma_w^2 E[phi'(u)^2], i.e. chi_1 evaluated at that q; at (c*, q*) it is chi_c.
    Broadcasts over c, sigma_w and q.
    """
    _maps.check_sigmas(sigma_w=sigma_w, q=q)
    fn, kinks = _maps.resolve(activation)
    return jnp.vectorize(functools.partial(_maps.corr_slope, fn, kinks))(
        as_float(c), as_float(sigma_w), as_float(q)
    )


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
    return _maps.broadcast(_maps.chi1, activation, sigma_w, sigma_b, q0)


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
    return _maps.depth_scale(fp.length_slope), _maps.depth_scale(fp.chi_c)
