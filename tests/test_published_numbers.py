"""Published numbers, reproduced at test size: each test states the paper, its number, and the
tolerance that the smaller size allows. (BatchNorm's pi / (pi - 1) gradient explosion of
Yang et al. 2019 is `test_theory.py::test_batchnorm_gradient_explosion_rate_for_relu`.)"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import theory as T
from gradflow.theory import quadrature as _quadrature


@jax.jit
def _tanh_log_grad_norms(key, sigma_w, sigma_b):
    """log ||dL/dh_l||^2 (mean over a batch) for l = 0..L of a width-256, depth-50 tanh net."""
    depth, width, batch = 50, 256, 16
    kw, kb, kx, kg = jax.random.split(key, 4)
    ws = sigma_w * jax.random.normal(kw, (depth, width, width)) / math.sqrt(width)
    bs = sigma_b * jax.random.normal(kb, (depth, width))
    x = jax.random.normal(kx, (batch, width))
    g = jax.random.normal(kg, (batch, width))

    def loss(eps):  # eps_l is added to h_l, so dL/d eps_l = dL/dh_l
        def layer(h, inp):
            w, b, e = inp
            return jnp.tanh(h) @ w.T + b[None, :] + e, None

        h = jax.lax.scan(layer, x, (ws, bs, eps))[0]
        return jnp.sum(h * g)

    grads = jax.grad(loss)(jnp.zeros((depth, batch, width)))
    return jnp.log(jnp.mean(jnp.sum(grads**2, axis=-1), axis=-1))


@pytest.mark.parametrize("sigma_w2, published", [(1.0, -0.2757), (1.5, -0.0633), (2.5, 0.1253)])
def test_tanh_gradient_growth_per_layer_schoenholz_2017(sigma_w2, published):
    # Schoenholz, Gilmer, Ganguli & Sohl-Dickstein 2017, "Deep information propagation": in a
    # deep tanh net at sigma_b^2 = 0.05, ||dL/dh_l||^2 changes by chi_1 per layer, so its log
    # falls or grows linearly in l with slope log chi_1: -0.2757, -0.0633, +0.1253 for
    # sigma_w^2 = 1.0, 1.5, 2.5 (tolerance 0.012 at width 1000). Here width 256 and 4 nets:
    # the slope fitted over layers 5..45 (past the few layers q needs to reach q*) is within
    # the paper's tolerance, 0.012, of its number (measured: -0.2768, -0.0626, +0.1283), and the
    # theory matches the number to 1e-4.
    sigma_w, sigma_b = math.sqrt(sigma_w2), math.sqrt(0.05)
    assert math.log(_quadrature.precise(T.chi1, "tanh", sigma_w, sigma_b)) == pytest.approx(
        published, abs=1e-4
    )
    logs = np.mean(
        [
            np.asarray(_tanh_log_grad_norms(k, sigma_w, sigma_b))
            for k in jax.random.split(jax.random.key(0), 4)
        ],
        axis=0,
    )
    layers = np.arange(5, 45)
    slope = -np.polyfit(layers, logs[layers], 1)[0]  # the gradient grows going down: l decreasing
    assert slope == pytest.approx(published, abs=0.012)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _relu_log_norm_ratios(key, width, depth):
    """log ||z_d||^2 / ||z_0||^2 of He-initialised relu nets (one per key), z_l = W_l relu(z_{l-1})."""

    def one(k):
        kx, kw = jax.random.split(k)
        z0 = jax.random.normal(kx, (width,))
        ws = jax.random.normal(kw, (depth, width, width)) * jnp.sqrt(2.0 / width)

        def layer(z, w):
            return w @ jax.nn.relu(z), None

        # z_0 is a pre-activation too: its first layer sees relu(z_0), of half its norm on average,
        # so the ratio starts from ||relu(z_0)||^2 * 2 (He: each layer keeps E||z||^2)
        zd = jax.lax.scan(layer, z0, ws)[0]
        return jnp.log(jnp.sum(zd**2) / (2 * jnp.sum(jax.nn.relu(z0) ** 2)))

    return jax.lax.map(
        one, key, batch_size=500
    )  # vmapped in chunks: the weights of 2500 nets do not fit at once


@pytest.mark.parametrize("width, depth", [(50, 10), (100, 20)])
def test_relu_norm_fluctuations_hanin_nica_2020(width, depth):
    # Hanin & Nica 2020, "Products of many large random matrices and gradients in deep neural
    # networks": at He initialization log(||z_d||^2 / ||z_0||^2) is approximately Gaussian with
    # mean -5 beta / 2 and variance 5 beta, beta = d / n (beta = 0.2 here: mean -0.5, var 1).
    # Per layer the ratio is (2/n) sum_i relu(g_i)^2 with mean 1 and variance 5/n. 2500 nets:
    # standard errors 0.02 (mean) and 0.028 (variance); the O(beta / n) corrections are smaller.
    beta = depth / width
    logs = np.asarray(
        _relu_log_norm_ratios(jax.random.split(jax.random.key(1), 2500), width, depth), np.float64
    )
    assert logs.mean() == pytest.approx(-5 * beta / 2, abs=0.07)
    assert logs.var() == pytest.approx(5 * beta, rel=0.12)
