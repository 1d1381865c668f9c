"""Mean field against finite nets: at their edge of chaos (as `theory.fixed_point` defines it)
width-512 nets neither grow nor shrink J's mean squared singular value, and where a net never
reaches its fixed point the length map's trajectory predicts it."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import activations
from gradflow import theory as T
from gradflow.theory import quadrature as _quadrature


@functools.partial(jax.jit, static_argnums=0)
def _log_mean_sq_singular(phi, key, sigma_w, sigma_b, q):
    """log (1/N) tr J J^T of J = dh_50/dh_0 at width 512, by ||J u||^2 over 4 nets x 4 probes."""
    depth, width = 50, 512

    def net(k):
        kw, kb, kh, ku = jax.random.split(k, 4)
        ws = sigma_w * jax.random.normal(kw, (depth, width, width)) / math.sqrt(width)
        bs = sigma_b * jax.random.normal(kb, (depth, width))
        h0 = jnp.sqrt(q) * jax.random.normal(kh, (width,))

        def f(h):
            return jax.lax.scan(lambda h, wb: (wb[0] @ phi(h) + wb[1], None), h, (ws, bs))[0]

        us = jax.random.normal(ku, (4, width))
        ju = jax.vmap(lambda u: jax.jvp(f, (h0,), (u,))[1])(us)
        return jnp.sum(ju**2, axis=1) / jnp.sum(us**2, axis=1)

    return jnp.log(jnp.mean(jax.vmap(net)(jax.random.split(key, 4))))


@pytest.mark.parametrize("name, sigma_b", [("gelu", 0.5), ("silu", 1.0), ("elu", 0.3), ("selu", 0.3)])
def test_critical_points_are_critical_in_width_512_nets(name, sigma_b):
    # At its edge of chaos, started at its fixed point, a 50-layer net neither grows nor shrinks
    # J's mean squared singular value: per layer, log mean sigma^2 is 0 to 0.01 (mean field:
    # exactly 0, l log chi_1 = 0). gelu and swish have no edge of chaos at sigma_b = 0, so they
    # are taken where theirs is (sigma_b 0.5 and 1.0).
    sw = _quadrature.precise(T.critical_sigma_w, name, sigma_b)
    q = _quadrature.precise(T.q_star, name, sw, sigma_b)
    rate = float(_log_mean_sq_singular(activations.get(name), jax.random.key(5), sw, sigma_b, q)) / 50
    assert abs(rate) < 0.01, rate
    # below the edge (at that sigma_w's own fixed point) it falls by log chi_1 per layer
    q_off = _quadrature.precise(T.q_star, name, 0.9 * sw, sigma_b)
    off = (
        float(_log_mean_sq_singular(activations.get(name), jax.random.key(5), 0.9 * sw, sigma_b, q_off)) / 50
    )
    assert off == pytest.approx(math.log(_quadrature.precise(T.chi1, name, 0.9 * sw, sigma_b)), abs=0.01)
    assert off < -0.05


def test_softplus_is_critical_only_as_q_grows():
    # softplus tends to relu, and its chi_1 tends to 1 only as q -> inf: at sigma_w = sqrt(2)
    # (its critical_sigma_w) a net started at q0 = 1e4 is within 0.01 per layer of critical,
    # one started at q0 = 1 is not (mean field along its trajectory, measured at width 512).
    sw = _quadrature.precise(T.critical_sigma_w, "softplus", 0.3)
    assert sw == pytest.approx(math.sqrt(2), rel=1e-6)
    # just below sqrt(2) q* is finite and huge; at sqrt(2) itself it grows without bound, as it
    # does for relu with a bias, in both precisions (a tail fading into rounding is no root)
    assert _quadrature.precise(T.q_star, "softplus", sw, 0.3) > 1e10
    for name in ("softplus", "relu"):
        assert math.isinf(_quadrature.precise(T.q_star, name, math.sqrt(2), 0.3)), name
        assert math.isinf(float(T.q_star(name, math.sqrt(2), 0.3))), name  # float32
    assert _quadrature.precise(T.q_star, "tanh", 1.0, 0.0) == 0.0
    for name in ("softplus", "relu"):
        assert math.isinf(_quadrature.precise(T.q_star, name, math.sqrt(2), 0.3)), name
        assert math.isinf(float(T.q_star(name, math.sqrt(2), 0.3))), name  # float32
    assert _quadrature.precise(T.q_star, "tanh", 1.0, 0.0) == 0.0
    far = float(_log_mean_sq_singular(activations.softplus, jax.random.key(6), sw, 0.3, 1e4)) / 50
    near = float(_log_mean_sq_singular(activations.softplus, jax.random.key(6), sw, 0.3, 1.0)) / 50
    assert abs(far) < 0.01 and near < -0.05, (far, near)


def test_the_trajectory_predicts_a_net_that_never_reaches_its_fixed_point():
    # tanh at its edge of chaos with sigma_b = 0 has q* = 0, a double root that q_l approaches
    # like 1 / l: 50 layers from q_1 = 1 see chi_l < 1 all the way, and the sum of log chi_l
    # along the length map's trajectory predicts the net (width 512) where the fixed point's 0 does not.
    q, chi = T.length_trajectory("tanh", 1.0, 0.0, 1.0, 50)
    assert float(q[0]) == 1.0 and np.all(np.diff(np.asarray(q)) < 0) and float(q[-1]) > 0.01
    np.testing.assert_allclose(q[1:], T.length_map("tanh", q[:-1], 1.0, 0.0), rtol=1e-6)
    predicted = float(jnp.mean(jnp.log(chi)))
    # (the net's h_0 ~ N(0, 1) is its first pre-activation: J's factors are phi'(h_0), phi'(h_1), ...
    # at variances q_1 = 1, q_2 = L(q_1), ..., the trajectory's)
    measured = float(_log_mean_sq_singular(activations.tanh, jax.random.key(7), 1.0, 0.0, 1.0)) / 50
    assert predicted < -0.02 and measured == pytest.approx(predicted, abs=0.01), (measured, predicted)
