"""The fixed point q* of the mean-field length map that a deep net reaches from its input's q0.

The length map L(q) = sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2 is nondecreasing in q for every
activation whose |phi| grows away from its zero (all registered ones), so iterating it from q0
moves monotonically towards the nearest fixed point in the direction of L(q0) - q0, and never
past it. That fixed point, not any other root of L(q) = q, is what a deep network's
pre-activation variance settles at, and it is the one gradflow's theory is evaluated at: gelu
and swish at sigma_b = 0 have a stable q = 0 and an unstable positive root, relu at the
critical sigma_w has every q fixed, and several activations have q grow without bound.

Written by hand (no library finds the root a monotone iteration converges to, inside jit):

- a scan in s = log q from s0 = log q0 with steps max(|r(s)|, 0.1), where
  r(s) = log L(e^s) - s is the log step the map itself takes; a step of |r| is the map's own
  iterate and cannot cross a root, so only two roots closer than 0.1 in log q can be stepped
  over together;
- bisection (60 halvings) once r changes sign: a simple root to rounding. A sign change
  with |r| <= 256 eps on both sides is rounding, not a root, and the scan goes on: relu at
  sigma_w = sqrt(2) with a bias has r = sigma_b^2 / q, below rounding from q ~ 1e12, and its q
  does grow without bound;
- a double root that the scan passes without a sign change (a marginal fixed point,
  L'(q*) = 1, as activation transforms such as DKS/TAT produce on purpose): the first local
  minimum of |r| below 0.05 is refined by golden-section search and taken if |r| <= 256 eps
  there; such a root is located to about sqrt(256 eps / r'') in log q (1e-6 in float64).
  A double root strictly inside one step of 0.1, with |r| falling across that step, shows
  no minimum and is stepped over (q0 = 1.05 q_t above gelu's flat one at sigma_b = 0.416);
  a q0 at the double root itself, as activation transforms put it (q0 = 1), is exact;
- q* = 0 or +inf where the scan reaches q = 1e-30 or 1e30 without a root.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow.theory import quadrature

Q_MIN, Q_MAX = 1e-30, 1e30  # q is clamped here; beyond them q* is reported as 0 or +inf
_S_MIN, _S_MAX = float(np.log(Q_MIN)), float(np.log(Q_MAX))
_H_MIN = 0.1  # the smallest scan step in log q
_SCAN_STEPS = int(np.ceil((_S_MAX - _S_MIN) / _H_MIN)) + 2
_REFINE_STEPS = 60
_TOUCH = 0.05  # a local minimum of |r| below this is checked for a double root
_GOLDEN = (np.sqrt(5.0) - 1) / 2


def tolerance(dtype) -> jax.Array:
    """|r| at or below which q is taken as a fixed point: 256 eps (3e-5 float32, 6e-14 float64)."""
    return 256 * jnp.finfo(dtype).eps


def log_gap(fn: Callable, kinks: tuple[float, ...], s, sigma_w, sigma_b):
    """r(s) = log L(e^s) - s, the log step of the length map from q = e^s."""
    lq = sigma_w**2 * quadrature.gaussian_expectation(lambda u: fn(u) ** 2, jnp.exp(s), kinks) + sigma_b**2
    return jnp.log(lq) - s


@functools.partial(jax.jit, static_argnums=(0, 1))
def q_star(fn, kinks, sigma_w, sigma_b, q0):
    """The fixed point reached from q0 (see the module docstring); 0 or +inf at the ends."""
    gap = functools.partial(log_gap, fn, kinks, sigma_w=sigma_w, sigma_b=sigma_b)
    s0 = jnp.log(jnp.clip(q0, Q_MIN, Q_MAX)) + jnp.zeros_like(sigma_w + sigma_b)
    r0 = gap(s0)
    tol = tolerance(s0.dtype)
    up = r0 > 0
    sign = jnp.where(up, 1.0, -1.0)

    def g(s):  # positive while the map still moves towards the root
        return sign * gap(s)

    g0 = sign * r0

    def cond(state):
        k, done = state[0], state[-1]
        return (k < _SCAN_STEPS) & ~done

    def body(state):
        k, s_b, g_b, s_c, g_c, t_lo, t_hi, touch, crossed, done = state
        s_n = s_c + sign * jnp.maximum(g_c, _H_MIN)
        out = jnp.where(up, s_n >= _S_MAX, s_n <= _S_MIN)
        s_n = jnp.clip(s_n, _S_MIN, _S_MAX)
        g_n = g(s_n)
        # a minimum that stands clear of rounding on both sides: a tail fading into rounding
        # noise (relu at sqrt(2) with a bias, r = sigma_b^2 / q) is no double root
        is_min = (g_b - g_c > tol) & (g_n - g_c > tol) & (g_c <= _TOUCH) & ~touch
        t_lo, t_hi = jnp.where(is_min, s_b, t_lo), jnp.where(is_min, s_n, t_hi)
        hit = (g_n <= 0) & ((g_c > tol) | (g_n < -tol))  # a sign change within rounding is none
        return (k + 1, s_c, g_c, s_n, g_n, t_lo, t_hi, touch | is_min, hit, hit | out)

    false = jnp.zeros_like(up)
    # g_b = inf lets q0 itself be the local minimum (a double root between q0 and the first step)
    init = (0, s0, jnp.full_like(g0, jnp.inf), s0, g0, s0, s0, false, false, jnp.abs(r0) <= tol)
    _, s_b, _, s_c, _, t_lo, t_hi, touch, crossed, _ = lax.while_loop(cond, body, init)

    def bisect(_, bracket):
        lo, hi = bracket  # g(lo) > 0 >= g(hi)
        mid = (lo + hi) / 2
        ahead = g(mid) > 0
        return jnp.where(ahead, mid, lo), jnp.where(ahead, hi, mid)

    lo, hi = lax.fori_loop(0, _REFINE_STEPS, bisect, (s_b, s_c))

    def golden(_, bracket):
        a, b = bracket
        c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
        left = g(c) < g(d)
        return jnp.where(left, a, c), jnp.where(left, d, b)

    a, b = lax.fori_loop(0, _REFINE_STEPS, golden, (t_lo, t_hi))
    s_touch = (a + b) / 2
    double = touch & (jnp.abs(g(s_touch)) <= tol)
    s = jnp.where(double, s_touch, (lo + hi) / 2)
    end = jnp.where(up, jnp.inf, 0.0)
    q = jnp.where(double | crossed, jnp.exp(s), end)
    return jnp.where(jnp.abs(r0) <= tol, jnp.exp(s0), q)
