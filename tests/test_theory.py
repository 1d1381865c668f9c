import functools
import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from scipy import integrate, optimize

from gradflow import activations
from gradflow import initializers as I
from gradflow import theory as T
from gradflow.theory import quadrature as _quadrature

SQRT2 = math.sqrt(2.0)


@pytest.fixture
def x64():
    with _quadrature.x64():
        yield


def _f(x):
    return float(np.asarray(x))


# ----------------------------------------------------------------------------- mean field


def test_tanh_is_critical_at_one_and_relu_at_sqrt2(x64):
    assert _f(T.critical_sigma_w("tanh", 0.0)) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(T.critical_sigma_w("relu", jnp.array([0.0, 0.5])), SQRT2, rtol=1e-12)
    leaky = activations.get("leaky_relu", negative_slope=0.2)
    assert _f(T.critical_sigma_w(leaky)) == pytest.approx(math.sqrt(2 / 1.04), rel=1e-12)
    assert _f(T.chi1("relu", SQRT2, 0.3)) == pytest.approx(1.0, rel=1e-12)


def test_q_star_regimes(x64):
    # Ordered tanh without bias collapses to q* = 0; chaotic relu diverges; ordered relu with a
    # bias has the closed form q* = sigma_b^2 / (1 - sigma_w^2 / 2).
    assert _f(T.q_star("tanh", 0.8, 0.0)) < 1e-12
    assert _f(T.chi1("tanh", 0.8, 0.0)) == pytest.approx(0.64, rel=1e-12)
    assert math.isinf(_f(T.q_star("relu", 1.5, 0.1)))
    assert _f(T.chi1("relu", 1.5, 0.1)) == pytest.approx(1.125, rel=1e-12)  # its q -> inf limit
    assert math.isnan(_f(T.c_star("relu", 1.5, 0.1)))
    assert _f(T.q_star("relu", 1.2, 0.3)) == pytest.approx(0.09 / (1 - 0.72), rel=1e-12)
    q = T.q_star("tanh", 1.7, 0.4)
    assert _f(T.length_map("tanh", q, 1.7, 0.4)) == pytest.approx(_f(q), rel=1e-12)


@pytest.mark.parametrize(
    "name, sigma_w, sigma_b",
    [("tanh", 1.5, 0.3), ("relu", 1.2, 0.2), ("gelu", 1.3, 0.1), ("sigmoid", 4.5, 0.5)],
)
def test_fixed_point_and_chi1_against_monte_carlo(name, sigma_w, sigma_b, x64):
    phi = activations.get(name)
    dphi = jax.vmap(jax.grad(phi))
    q = _f(T.q_star(name, sigma_w, sigma_b))
    u = math.sqrt(q) * jax.random.normal(jax.random.key(1), (1_000_000,), jnp.float64)
    length = sigma_w**2 * phi(u) ** 2 + sigma_b**2
    chi = sigma_w**2 * dphi(u) ** 2
    se_q, se_chi = _f(jnp.std(length)) / 1e3, _f(jnp.std(chi)) / 1e3
    assert abs(_f(jnp.mean(length)) - q) < 5 * se_q  # q* is a fixed point of the sampled map
    assert abs(_f(jnp.mean(chi)) - _f(T.chi1(name, sigma_w, sigma_b))) < 5 * se_chi
    assert _f(T.chi1(name, sigma_w, sigma_b)) == pytest.approx(_f(jnp.mean(chi)), rel=2e-3)


def _scipy_critical_sigma_w(sigma_b):
    """Independent edge of chaos for tanh: scipy.integrate.quad + nested brentq."""

    def gauss(f, q):
        s = math.sqrt(q)
        return integrate.quad(lambda z: f(s * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi), -12, 12)[0]

    def excess(sw):
        q = optimize.brentq(
            lambda q: sw**2 * gauss(lambda u: math.tanh(u) ** 2, q) + sigma_b**2 - q, 1e-9, 50
        )
        return sw**2 * gauss(lambda u: math.cosh(u) ** -4, q) - 1

    return optimize.brentq(excess, 1.0, 3.0, xtol=1e-13)


def test_tanh_critical_line_against_scipy(x64):
    sigma_b = jnp.array([0.05, 0.1, 0.3, 1.0])
    ours = np.asarray(T.critical_sigma_w("tanh", sigma_b))
    expected = [_scipy_critical_sigma_w(float(sb)) for sb in sigma_b]
    np.testing.assert_allclose(ours, expected, rtol=1e-8)
    # The curve rises from (1, 0) (Poole et al. 2016, fig. 2; Schoenholz et al. 2017, fig. 1).
    assert np.all(np.diff(ours) > 0) and 1.0 < ours[0] < 1.2 and 1.7 < ours[-1] < 2.0
    np.testing.assert_allclose(T.chi1("tanh", ours, sigma_b), 1.0, rtol=1e-10)


def test_depth_scales_and_correlation_fixed_point(x64):
    sb = 0.3
    sw_c = _f(T.critical_sigma_w("tanh", sb))
    eps = 1e-6
    # Ordered: c* = 1, C(1) = 1 and C'(1) (by finite differences of the map) = chi1.
    sw = 0.9 * sw_c
    chi, c = _f(T.chi1("tanh", sw, sb)), _f(T.c_star("tanh", sw, sb))
    assert c == 1.0 and _f(T.correlation_map("tanh", 1.0, sw, sb)) == pytest.approx(1.0, rel=1e-12)
    slope = (
        _f(T.correlation_map("tanh", 1.0, sw, sb)) - _f(T.correlation_map("tanh", 1 - eps, sw, sb))
    ) / eps
    assert slope == pytest.approx(chi, rel=1e-5)
    xi_q, xi_c = T.depth_scales("tanh", sw, sb)
    assert _f(xi_c) == pytest.approx(-1 / math.log(chi), rel=1e-12)
    # xi_q: the Stein form chi1 + sigma_w^2 E[phi'' phi] with phi'' by autodiff.
    d1, d2 = jax.vmap(jax.grad(jnp.tanh)), jax.vmap(jax.grad(jax.grad(jnp.tanh)))
    q = T.q_star("tanh", sw, sb)
    slope_q = chi + sw**2 * _quadrature.gaussian_expectation(lambda u: d2(u) * jnp.tanh(u), q)
    assert _f(xi_q) == pytest.approx(-1 / math.log(_f(slope_q)), rel=1e-10)
    assert _f(d1(jnp.zeros(1))[0]) == 1.0
    # Chaotic: c* < 1 is a fixed point and chi_c is the map's slope there.
    sw = 1.5 * sw_c
    c = _f(T.c_star("tanh", sw, sb))
    assert 0 < c < 1 and _f(T.correlation_map("tanh", c, sw, sb)) == pytest.approx(c, abs=1e-10)
    fd = (_f(T.correlation_map("tanh", c + eps, sw, sb)) - _f(T.correlation_map("tanh", c - eps, sw, sb))) / (
        2 * eps
    )
    assert _f(T.chi_c("tanh", sw, sb)) == pytest.approx(fd, rel=1e-5) and fd < 1
    # xi_c diverges at the critical line from both sides.
    _, xi = T.depth_scales("tanh", sw_c * jnp.array([0.5, 1 - 1e-4, 1 + 1e-4, 2.0]), sb)
    xi = np.asarray(xi)
    assert xi[1] > 1000 * xi[0] and xi[2] > 100 * xi[3]


def test_phase_diagram_is_one_vmapped_call_and_matches_pointwise(x64):
    sw, sb = jnp.array([0.8, 1.3, 2.5]), jnp.array([0.0, 0.3])
    pd = T.phase_diagram("tanh", sw, sb)
    assert pd.chi1.shape == pd.xi_c.shape == pd.q_star.shape == pd.chaotic.shape == (3, 2)
    np.testing.assert_array_equal(pd.chaotic, pd.chi1 > 1)
    np.testing.assert_allclose(pd.chi1[:, 1], T.chi1("tanh", sw, 0.3), rtol=1e-12)
    np.testing.assert_array_equal(pd.chaotic, [[False, False], [True, False], [True, True]])
    jitted = jax.jit(jax.vmap(lambda s: T.chi1("tanh", s, 0.3)))(sw)
    np.testing.assert_allclose(jitted, pd.chi1[:, 1], rtol=1e-12)


# ----------------------------------------------------------------------------- gradients and Jacobians


def _weights(key, sigma_w, width, depth, ensemble="gaussian"):
    """(depth, width, width) weights: entries N(0, sigma_w^2 / width), or sigma_w times Haar."""
    g = jax.random.normal(key, (depth, width, width))
    if ensemble == "gaussian":
        return sigma_w * g / math.sqrt(width)
    qmat, r = jnp.linalg.qr(g)  # batched, outside any scan
    return sigma_w * qmat * jnp.sign(jnp.diagonal(r, axis1=1, axis2=2))[:, None, :]


@functools.partial(jax.jit, static_argnums=1)
def _jacobians(key, phi, ws, sigma_b, q):
    """J_l = dx_l / dx_0 for l = 1..depth (stacked), h_l = W_l phi(h_{l-1}) + b_l, h_0 ~ N(0, q*)."""
    dphi = jax.vmap(jax.grad(phi))
    depth, width, _ = ws.shape

    def layer(carry, inputs):
        h, jac = carry
        w, b = inputs
        h = w @ phi(h) + b
        jac = dphi(h)[:, None] * (w @ jac)
        return (h, jac), jac

    k0, k1 = jax.random.split(key)
    h0 = jnp.sqrt(q) * jax.random.normal(k0, (width,))
    bs = sigma_b * jax.random.normal(k1, (depth, width))
    return jax.lax.scan(layer, (h0, jnp.eye(width)), (ws, bs))[1]


@pytest.mark.parametrize("name, sigma_w, sigma_b", [("tanh", 2.0, 0.3), ("relu", 1.25, 0.2)])
def test_mean_squared_singular_value_grows_like_chi1_power(name, sigma_w, sigma_b):
    depth, width, seeds = 6, 128, 12
    q = _quadrature.precise(T.q_star, name, sigma_w, sigma_b)
    m = []
    for k in jax.random.split(jax.random.key(3), seeds):
        kw, kh = jax.random.split(k)
        jacs = _jacobians(kh, activations.get(name), _weights(kw, sigma_w, width, depth), sigma_b, q)
        m.append(np.asarray(jnp.sum(jacs**2, axis=(1, 2)) / width))  # (1/N) tr J_l J_l^T
    m = np.stack(m)
    mean, se = m.mean(0), m.std(0) / math.sqrt(seeds)
    pred = np.asarray(T.forward_jacobian_moment(name, sigma_w, sigma_b, jnp.arange(1, depth + 1)))
    assert abs(math.log(pred[-1])) > 0.5  # far enough from criticality for the test to bite
    assert np.all(np.abs(mean - pred) < 4 * se + 0.02 * pred)
    np.testing.assert_allclose(
        T.predict_log_mean_sq_singular(name, sigma_w, sigma_b, jnp.arange(1, depth + 1)),
        np.log(pred),
        rtol=1e-6,
    )


def test_gradient_predictions_are_consistent():
    chi = _f(T.chi1("tanh", 1.4, 0.2))
    np.testing.assert_allclose(
        T.gradient_norm_ratio("tanh", 1.4, 0.2, jnp.arange(3.0)), chi ** np.arange(3), rtol=1e-5
    )
    logs = np.asarray(T.predict_gradient_norms("tanh", 1.4, 0.2, 5))
    np.testing.assert_allclose(logs, np.arange(4, -1, -1) * math.log(chi), rtol=1e-5, atol=1e-7)

    class Spectra:  # anything with `.depths`, like a spectra result
        depths = jnp.array([2.0, 4.0])

    np.testing.assert_allclose(
        T.predict_log_mean_sq_singular("tanh", 1.4, 0.2, Spectra()),
        np.array([2, 4]) * math.log(chi),
        rtol=1e-5,
    )


def test_relu_finite_width_jacobian_norm_against_monte_carlo():
    widths, n = (6, 8, 5, 8, 6), 200_000
    rng = np.random.default_rng(0)  # numpy: 200k tiny independent nets, batched with einsum
    x, v = rng.standard_normal((n, widths[0])), rng.standard_normal((n, widths[0]))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    for n_in, n_out in zip(widths[:-1], widths[1:], strict=True):
        w = rng.standard_normal((n, n_out, n_in)) * math.sqrt(2.0 / n_in)
        h = np.einsum("sij,sj->si", w, x)
        x, v = np.maximum(h, 0), (h > 0) * np.einsum("sij,sj->si", w, v)
    xs = np.sum(v**2, axis=1)
    s = T.relu_jacobian_norm_stats(widths)
    nz = np.log(xs[xs > 0])
    assert s.second_moment == pytest.approx(
        np.prod([(b * b + 5 * b) / a**2 for a, b in zip(widths, widths[1:])])
    )
    assert abs(xs.mean() - s.mean) < 4 * xs.std() / math.sqrt(n)
    assert abs((xs**2).mean() - s.second_moment) < 4 * (xs**2).std() / math.sqrt(n)
    assert abs((xs == 0).mean() - s.p_zero) < 4 * math.sqrt(s.p_zero / n)
    assert abs(nz.mean() - s.log_mean) < 4 * nz.std() / math.sqrt(nz.size)
    assert nz.var() == pytest.approx(s.log_variance, rel=0.03)
    wide = T.relu_jacobian_norm_stats((512,) * 4)
    assert wide.log_variance == pytest.approx(5 * wide.beta, rel=0.01)  # Hanin: ~ 5 sum 1/n


def test_gaussian_lyapunov_exponents_against_benettin():
    n, sigma, steps, chains = 6, 1.3, 2000, 8

    def benettin(key):
        def step(qmat, k):
            qmat, r = jnp.linalg.qr(sigma * jax.random.normal(k, (n, n)) / math.sqrt(n) @ qmat)
            return qmat, jnp.log(jnp.abs(jnp.diag(r)))

        return jax.lax.scan(step, jnp.eye(n), jax.random.split(key, steps))[1]

    logs = np.asarray(jax.jit(jax.vmap(benettin))(jax.random.split(jax.random.key(1), chains)), np.float64)
    est, se = logs.mean(axis=(0, 1)), logs.std(axis=(0, 1)) / math.sqrt(steps * chains)
    exact = np.asarray(T.gaussian_lyapunov_exponents(n, sigma))
    assert np.all(np.abs(est - exact) < 4 * se)
    # The top exponent from E log chi^2_n, by mpmath.
    top = math.log(sigma) + 0.5 * float(mpmath.log(2.0 / n) + mpmath.digamma(n / 2))
    assert exact[0] == pytest.approx(top, rel=1e-6)


@pytest.mark.parametrize("name, sigma_b", [("tanh", 0.3), ("relu", 0.0)])
@pytest.mark.parametrize("ensemble", ["gaussian", "orthogonal"])
def test_spectral_variance_at_criticality(name, sigma_b, ensemble):
    # Orthogonal spectra fluctuate less, and Haar sampling (QR) is the slow part: narrower.
    depth, width, seeds = 8, (400 if ensemble == "gaussian" else 200), 6
    sigma_w = _quadrature.precise(T.critical_sigma_w, name, sigma_b)
    q = _quadrature.precise(T.q_star, name, sigma_w, sigma_b)
    ratios = []
    for k in jax.random.split(jax.random.key(5), seeds):
        kw, kh = jax.random.split(k)
        jac = _jacobians(
            kh, activations.get(name), _weights(kw, sigma_w, width, depth, ensemble), sigma_b, q
        )[-1]
        jjt = jac @ jac.T  # eigenvalue moments by traces: m1 = tr(JJ^T)/N, m2 = tr((JJ^T)^2)/N
        m1, m2 = jnp.trace(jjt) / width, jnp.sum(jjt * jjt) / width
        ratios.append(_f(m2 / m1**2 - 1))
    with _quadrature.x64():
        pred = T.jacobian_spectrum_moments(name, sigma_w, sigma_b, depth, ensemble)
        formula = depth * (pred.mu2 / pred.mu1**2 - 1 - pred.s1)
        assert _f(pred.mean) == pytest.approx(1.0, rel=1e-9)
        assert _f(pred.variance) == pytest.approx(_f(formula), rel=1e-12)
    assert np.mean(ratios) == pytest.approx(_f(formula), rel=0.08)


@pytest.mark.parametrize("depth", [1, 3])
def test_linear_gaussian_spectral_density(depth, x64):
    x, rho = map(np.asarray, T.jacobian_spectral_density(depth, "gaussian", sigma_w=1.1, num=4001))
    scale = 1.1 ** (2 * depth)
    assert np.all(np.diff(x) > 0) and np.all(rho >= 0)
    moments = [np.trapezoid(rho * x**k, x) for k in range(3)]
    assert moments[0] == pytest.approx(1.0, abs=3e-3)
    assert moments[1] == pytest.approx(scale, rel=1e-3)
    pred = T.jacobian_spectrum_moments("identity", 1.1, 0.0, depth)
    assert moments[2] - moments[1] ** 2 == pytest.approx(_f(pred.variance), rel=3e-3)
    if depth == 1:  # Marchenko-Pastur, ratio 1
        mp = np.sqrt(np.clip(4 * scale / x - 1, 0, None)) / (2 * np.pi * scale)
        np.testing.assert_allclose(rho, mp, rtol=1e-6, atol=1e-9)
    x, mass = T.jacobian_spectral_density(depth, "orthogonal", sigma_w=1.1)
    assert _f(x[0]) == pytest.approx(scale) and _f(mass.sum()) == 1.0


def test_batchnorm_gradient_explosion_rate_for_relu():
    batch, width, depth = 128, 256, 30
    rate = _quadrature.precise(T.batchnorm_gradient_growth, "relu")
    assert rate == pytest.approx(math.pi / (math.pi - 1), rel=1e-10)
    assert _quadrature.precise(T.batchnorm_gradient_growth, "identity") == pytest.approx(1.0, rel=1e-10)

    def log_grad_norms(key):
        kx, kw, kg = jax.random.split(key, 3)
        ws = jax.random.normal(kw, (depth, width, width)) / math.sqrt(width)
        x0, g = jax.random.normal(kx, (batch, width)), jax.random.normal(kg, (batch, width))

        def loss(eps):  # eps_l is added to x_l, so d loss / d eps_l = d loss / d x_l
            def layer(x, inp):
                w, e = inp
                h = x @ w
                y = (h - h.mean(0, keepdims=True)) / jnp.sqrt(h.var(0, keepdims=True))
                return jax.nn.relu(y) + e, None

            return jnp.sum(jax.lax.scan(layer, x0, (ws, eps))[0] * g)

        grads = jax.grad(loss)(jnp.zeros((depth, batch, width)))
        return jnp.log(jnp.sum(grads**2, axis=(1, 2)))

    logs = np.mean(
        [np.asarray(jax.jit(log_grad_norms)(k)) for k in jax.random.split(jax.random.key(2), 2)], axis=0
    )
    layers = np.arange(depth)[5:-3]
    measured = math.exp(-np.polyfit(layers, logs[5:-3], 1)[0])
    assert measured == pytest.approx(rate, rel=0.02)


def test_residual_variance_bookkeeping_against_monte_carlo(key):
    width, depth = 512, 6
    x0 = jax.random.normal(key, (256, width))
    ks = jax.random.split(jax.random.key(7), 2 * depth)
    he = I.he_normal()
    x_plain, x_bn = x0, x0
    for l in range(depth):
        w1, w2 = he(ks[2 * l], (width, width)), I.lecun_normal()(ks[2 * l + 1], (width, width))
        x_plain = x_plain + jax.nn.relu(x_plain @ w1) @ w2
        h = jax.nn.relu(x_bn @ w1) @ w2
        x_bn = x_bn + (h - h.mean(0, keepdims=True)) / h.std(0, keepdims=True)
    np.testing.assert_allclose(T.residual_variance(jnp.arange(4.0), "plain"), [1, 2, 4, 8])
    assert _f(jnp.mean(x_plain**2)) == pytest.approx(_f(T.residual_variance(depth, "plain")), rel=0.1)
    assert _f(jnp.mean(x_bn**2)) == pytest.approx(_f(T.residual_variance(depth, "batchnorm")), rel=0.05)
    for kind in ("rezero", "skipinit", "fixup"):
        assert _f(T.residual_variance(depth, kind)) == 1.0


# ----------------------------------------------------------------------------- SELU, initializer, errors


def test_selu_constants_from_the_fixed_point():
    alpha, scale = T.selu_constants()
    assert alpha == pytest.approx(activations.SELU_ALPHA, abs=1e-9)
    assert scale == pytest.approx(activations.SELU_SCALE, abs=1e-9)


def test_critical_initializer(key):
    for name, params in [("relu", {}), ("identity", {}), ("leaky_relu", {"negative_slope": 0.2})]:
        act = activations.get(name, **params) if params else name
        assert I.critical(act).sigma_w == pytest.approx(I.gain(name, **params), rel=1e-10)
    init = I.get("critical", activation="tanh", sigma_b=0.1)
    assert init.sigma_w == pytest.approx(_quadrature.precise(T.critical_sigma_w, "tanh", 0.1), rel=1e-12)
    w = init(key, (512, 256))
    assert float(jnp.var(w)) == pytest.approx(init.sigma_w**2 / 512, rel=0.03)
    assert float(jnp.std(init.bias_init(key, (100_000,)))) == pytest.approx(0.1, rel=0.02)
    assert "critical" in I.names()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown activation 'tanhh'"):
        T.chi1("tanhh", 1.0, 0.0)
    with pytest.raises(ValueError, match="sigma_w must be >= 0"):
        T.chi1("tanh", -1.0, 0.0)
    with pytest.raises(ValueError, match="sigma_b must be >= 0"):
        T.critical_sigma_w("tanh", jnp.array([0.1, -0.2]))
    with pytest.raises(ValueError, match="elementwise"):
        T.q_star("maxout", 1.0, 0.0)
    with pytest.raises(ValueError, match="unknown weight ensemble 'haar'"):
        T.jacobian_spectral_density(3, "haar")
    with pytest.raises(ValueError, match="unknown residual kind"):
        T.residual_variance(3, "densenet")
    with pytest.raises(ValueError, match="unknown activation"):
        I.critical("nope")
    with pytest.raises(ValueError, match="sigma_b must be >= 0"):
        I.critical("tanh", sigma_b=-0.1)


def test_traced_sigmas_are_not_checked_but_work():
    f = jax.jit(functools.partial(T.chi1, "relu", sigma_b=0.0))
    assert _f(f(1.0)) == pytest.approx(0.5, rel=1e-6)
    crit = jax.jit(jax.vmap(lambda sb: T.critical_sigma_w("relu", sb)))(jnp.array([0.0, 0.5]))
    np.testing.assert_allclose(crit, SQRT2, rtol=1e-5)
