"""The fixed point a deep net reaches, chi_1 there and the edge of chaos: one definition, checked
against an independent oracle for every registered activation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, optimize

from gradflow import activations
from gradflow import initializers as I
from gradflow import theory as T
from gradflow.theory import quadrature as _quadrature

ELEMENTWISE = [n for n in activations._REGISTRY if activations._REGISTRY[n].elementwise]
SIGMA_B = (0.0, 0.05, 0.3)


@pytest.fixture
def x64():
    with _quadrature.x64():
        yield


# The oracle: E_z[f(sqrt(q) z)] by the trapezoid rule on 24000 points of [-12, 12] (numpy,
# not gradflow's kink-split Gauss-Legendre; z = 0 is the midpoint of an interval, so a jump of
# phi' there costs O(h^2) ~ 1e-6 like a kink elsewhere), and the
# critical points found on the curve of fixed points rather than by iterating the map: for
# each q > sigma_b^2, sigma_w^2(q) = (q - sigma_b^2) / E[phi^2] makes q a fixed point, and
# chi_1(q) = sigma_w^2(q) E[phi'^2], L'(q) = sigma_w^2(q) E[u phi phi'] / q.
def _trapezoid(n):
    z = np.linspace(-12.0, 12.0, n)
    w = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    w[[0, -1]] /= 2
    return z, w


_Z, _W = _trapezoid(24000)
_FINE = _trapezoid(240000)  # refines roots where phi' jumps away from 0 (hard_tanh): the rule is O(h) there


def _curve(name, sigma_b, qs, refine=False):
    fn = activations.get(name)
    d = jax.vmap(jax.grad(fn))
    z, w = _FINE if refine and any(k != 0 for k in activations.kinks(name)) else (_Z, _W)
    u = np.sqrt(qs)[:, None] * z[None, :]
    flat = jnp.asarray(u.ravel(), jnp.float64)
    phi = np.asarray(fn(flat)).reshape(u.shape)
    dphi = np.asarray(d(flat)).reshape(u.shape)
    e2, ed, es = (np.sum(w * f, axis=1) for f in (phi**2, dphi**2, u * phi * dphi))
    sw2 = (qs - sigma_b**2) / e2
    return sw2, sw2 * ed, sw2 * es / qs


def _stable_interior_critical_points(name, sigma_b):
    """(sigma_w, q*, L'(q*)) at every root of chi_1(q) = 1 on the fixed-point curve, q in (b^2, 1e3)."""
    lo = math.log10(sigma_b**2) + 1e-3 if sigma_b > 0 else -6
    qs = np.logspace(lo, 3, 120)
    sw2, chi, slope = _curve(name, sigma_b, qs)
    g = np.log(chi)
    g = np.where(np.abs(g) < 1e-9, 0.0, g)  # chi_1 = 1 to rounding (hard_tanh near q = 0) is no crossing
    out = []
    for i in np.flatnonzero(np.sign(g[:-1]) * np.sign(g[1:]) < 0):
        q = optimize.brentq(
            lambda q: math.log(_curve(name, sigma_b, np.array([q]), True)[1][0]), qs[i], qs[i + 1]
        )
        s2, _, sl = (v[0] for v in _curve(name, sigma_b, np.array([q]), True))
        out.append((math.sqrt(s2), q, sl))
    return out


def _slopes_at_zero(name):
    """E[phi'(0+-)^2]: the mean of the squared one-sided slopes at 0 (chi_1 / sigma_w^2 as q -> 0)."""
    fn = activations.get(name)
    d = jax.grad(fn)
    return (float(d(1e-12)) ** 2 + float(d(-1e-12)) ** 2) / 2


def _relu_like(name):
    fn = activations.get(name)
    return all(float(fn(jnp.float64(x)) - 2 * fn(jnp.float64(x / 2))) == 0 for x in (-1.3, 0.7, 2.9))


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_critical_sigma_w_is_critical_for_every_activation(name, x64):
    sw = np.asarray(T.critical_sigma_w(name, jnp.asarray(SIGMA_B)))
    for sigma_b, s in zip(SIGMA_B, sw, strict=True):
        if _relu_like(name) or name == "softplus":
            # chi_1 = 1 only as q -> inf (exactly, for the positively homogeneous ones):
            # sigma_w^2 E[phi'^2] = 1 with E[phi'^2] the large-q mean of phi'^2.
            fn = activations.get(name)
            big = (float(jax.grad(fn)(1e6)) ** 2 + float(jax.grad(fn)(-1e6)) ** 2) / 2
            assert s == pytest.approx(1 / math.sqrt(big), rel=1e-6), (name, sigma_b)
            assert float(T.chi1(name, s, sigma_b)) == pytest.approx(1.0, abs=1e-4)
            continue
        roots = _stable_interior_critical_points(name, sigma_b)
        interior = [p for p in roots if p[2] < 1 + 1e-6]
        small_q = _curve(name, sigma_b, np.array([1e-3]))[2][0] if sigma_b == 0 else math.nan
        if interior:  # a stable root of chi_1 = 1 at a finite q*: ours is that one
            want_sw, want_q, _ = interior[0]
            assert s == pytest.approx(want_sw, rel=1e-5), (name, sigma_b)
            assert float(T.q_star(name, s, sigma_b)) == pytest.approx(want_q, rel=3e-4)
            assert float(T.chi1(name, s, sigma_b)) == pytest.approx(1.0, abs=1e-4)
        elif sigma_b == 0 and float(activations.get(name)(0.0)) == 0 and small_q <= 1:
            # The edge of chaos at q* = 0, where the small fixed points are stable:
            # sigma_w = 1 / sqrt(E[phi'(0+-)^2]) (tanh 1, erf sqrt(pi)/2, selu 0.6905).
            assert s == pytest.approx(1 / math.sqrt(_slopes_at_zero(name)), rel=1e-3), name
            assert float(T.q_star(name, s, 0.0)) < 0.02
            assert float(T.chi1(name, s, 0.0)) == pytest.approx(1.0, abs=1e-4)
        else:  # no stable critical point: every root of chi_1 = 1 is an unstable fixed point
            assert math.isnan(s), (name, sigma_b, s)
            assert all(p[2] > 1 for p in roots), roots
    if name in ("gelu", "silu"):
        assert np.all(np.isnan(sw)), sw  # the failing cases: never a non-critical sigma_w


def test_critical_line_of_gelu_and_swish_starts_at_the_saddle_node(x64):
    # Below some sigma_b the stable fixed point with chi_1 = 1 does not exist; it is born where
    # the stable and unstable roots of L(q) = q merge (L'(q) = 1) with chi_1 = 1: on the curve
    # of fixed points, two equations in (q, sigma_b), solved by scipy on the oracle's integrals.
    for name, guess, band in [("gelu", (3.0, 0.42), (0.40, 0.43)), ("silu", (12.0, 0.74), (0.72, 0.77))]:

        def eqs(v, name=name):
            _, chi, slope = _curve(name, v[1], np.array([v[0]]))
            return [chi[0] - 1, slope[0] - 1]

        q, sb = optimize.fsolve(eqs, guess, xtol=1e-12)
        sw = math.sqrt(_curve(name, sb, np.array([q]))[0][0])
        assert band[0] < sb < band[1] and max(abs(e) for e in eqs((q, sb))) < 1e-8
        assert math.isnan(float(T.critical_sigma_w(name, sb * 0.99)))
        assert float(T.critical_sigma_w(name, sb * 1.02)) == pytest.approx(sw, rel=5e-3)


def test_a_marginal_fixed_point_converges(x64):
    # Near gelu's saddle-node (sigma_b = 0.4158, where its critical line starts) the length map
    # has a marginal fixed point: L(q) = q and L'(q) = 1, a double root, as activation
    # transforms such as DKS/TAT make on purpose. It must converge, not give nan. Made exact for
    # gradflow's own length map by scipy's fsolve (central differences for L').
    name, sb = "gelu", 0.4158393809586435

    def fold(v):
        lq, sw = v
        L = lambda x: float(T.length_map(name, x, sw, sb))  # noqa: E731
        q, e = math.exp(lq), 1e-5 * math.exp(lq)
        return [math.log(L(q)) - lq, (L(q + e) - L(q - e)) / (2 * e) - 1]

    lq_t, sw_t = optimize.fsolve(fold, (math.log(3.56), 1.409), xtol=1e-13)
    q_t = math.exp(lq_t)
    assert max(abs(e) for e in fold((lq_t, sw_t))) < 1e-9
    # A double root keeps L(q) - q of one sign on both sides (negative: L(q) < q), so the map
    # reaches it from above. This one is flat (|r| < 2e-6 within 5% of q_t): from q0 = 1.05 q_t
    # the scan's first step of 0.1 in log q straddles it with |r| falling, and it is stepped
    # over, as `gradflow.theory._length_map` documents; from further up it is found.
    r = [math.log(float(T.length_map(name, q_t * f, sw_t, sb)) / (q_t * f)) for f in (1 / 1.05, 1.05)]
    assert r[0] < 0 and r[1] < 0
    for f in (1.2, 3.0):
        fp = T.fixed_point(name, sw_t, sb, q0=q_t * f)
        assert float(fp.q_star) == pytest.approx(q_t, rel=1e-5), f
        assert float(fp.length_slope) == pytest.approx(1.0, abs=1e-6)
    assert float(T.q_star(name, sw_t, sb, q0=q_t)) == pytest.approx(q_t, rel=1e-12)  # q0 on it: exact


def test_q_star_is_the_fixed_point_reached_from_q0(x64):
    # gelu at sigma_b = 0, sigma_w = 1.8: q = 0 is stable (slope sigma_w^2 / 4 = 0.81) and there
    # is one unstable positive root q_u; a deep net collapses from q0 < q_u and blows up above.
    sw = 1.8
    q_u = optimize.brentq(lambda q: _curve("gelu", 0.0, np.array([q]))[0][0] - sw**2, 1e-4, 1e4)
    q0 = jnp.array([q_u / 2, q_u * 2])
    np.testing.assert_array_equal(T.q_star("gelu", sw, 0.0, q0=q0), [0.0, math.inf])
    np.testing.assert_allclose(T.chi1("gelu", sw, 0.0, q0=q0), [sw**2 / 4, sw**2 / 2], rtol=1e-6)
    # Iterating the map itself (the oracle's quadrature) agrees.
    for q0, want in [(q_u / 2, 0.0), (q_u * 2, math.inf)]:
        q = q0
        for _ in range(400):
            q = sw**2 * float(np.sum(_W * np.asarray(activations.gelu(jnp.asarray(np.sqrt(q) * _Z))) ** 2))
            if q > 1e8 or q < 1e-12:
                break
        assert (q > 1e8) if want else (q < 1e-12)
    # Every q is a fixed point of relu at sigma_w = sqrt(2), sigma_b = 0: q* is q0.
    np.testing.assert_allclose(
        T.q_star("relu", math.sqrt(2), 0.0, q0=jnp.array([0.1, 1.0, 7.0])), [0.1, 1.0, 7.0]
    )


def test_correlation_slope_at_any_c_and_q(x64):
    # C'(c) at (c, q) by finite differences of the correlation map at that q; at c = 1 it is
    # sigma_w^2 E[phi'^2] at q (chi_1 at q), at (c*, q*) it is chi_c.
    sw, sb, eps = 1.7, 0.2, 1e-6
    for c, q in [(0.3, 0.5), (0.8, 2.0), (-0.4, 1.3)]:
        fd = (
            T.correlation_map("gelu", c + eps, sw, sb, q) - T.correlation_map("gelu", c - eps, sw, sb, q)
        ) / (2 * eps)
        assert float(T.correlation_slope("gelu", c, sw, q)) == pytest.approx(float(fd), rel=1e-6)
    q = 0.9
    d = jax.vmap(jax.grad(jnp.tanh))
    m = float(np.sum(_W * np.asarray(d(jnp.asarray(np.sqrt(q) * _Z))) ** 2))
    assert float(T.correlation_slope("tanh", 1.0, sw, q)) == pytest.approx(sw**2 * m, rel=1e-6)
    fp = T.fixed_point("tanh", 2.5, 0.1)
    assert float(T.correlation_slope("tanh", fp.c_star, 2.5, fp.q_star)) == pytest.approx(
        float(fp.chi_c), rel=1e-10
    )


def test_declared_kinks_keep_a_callable_exact(x64):
    # selu with its kink moved to 0.5: undeclared, the quadrature converges only algebraically.
    shift = 0.5

    def phi(x):
        return activations.selu(x - shift)

    def ref(f, q):
        s = math.sqrt(q)
        return integrate.quad(
            lambda z: f(s * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
            -14,
            14,
            points=[shift / s],
            limit=400,
            epsabs=1e-14,
        )[0]

    a, k = activations.SELU_ALPHA, activations.SELU_SCALE
    q = 1.3
    L_ref = ref(lambda u: (k * (u - shift if u > shift else a * math.expm1(u - shift))) ** 2, q)
    chi_ref = ref(lambda u: (k * (1.0 if u > shift else a * math.exp(u - shift))) ** 2, q)
    kinked = activations.with_kinks(phi, [shift])
    assert float(T.length_map(kinked, q, 1.0, 0.0)) == pytest.approx(L_ref, abs=1e-12)
    # chi at q: the first step of a trajectory from q (1-D quadrature)
    assert float(T.length_trajectory(kinked, 1.0, 0.0, q, 1)[1][0]) == pytest.approx(chi_ref, rel=1e-12)
    undeclared = float(T.length_trajectory(phi, 1.0, 0.0, q, 1)[1][0])
    assert abs(undeclared - chi_ref) / chi_ref > 1e-4  # what the docs warn of
    with pytest.raises(ValueError, match="kinks must be finite"):
        activations.with_kinks(phi, [math.nan])


def test_initializer_refuses_an_activation_without_an_edge_of_chaos():
    with pytest.raises(
        ValueError, match=r"'gelu' has no critical sigma_w at sigma_b=0.0.*smallest sigma_b .* 0\.45"
    ):
        I.critical("gelu")
    init = I.critical("gelu", sigma_b=0.5)
    assert float(T.chi1("gelu", init.sigma_w, 0.5)) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="q0"):
        T.q_star("tanh", 1.0, 0.0, q0=0.0)
