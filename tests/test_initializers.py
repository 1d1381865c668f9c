import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from gradflow import activations
from gradflow import initializers as I

FAN_IN, FAN_OUT = 512, 256


def _var(init, key, shape=(FAN_IN, FAN_OUT)):
    w = init(key, shape, jnp.float32)
    assert w.shape == shape and w.dtype == jnp.float32
    return float(jnp.var(w)), float(jnp.mean(w)), w


@pytest.mark.parametrize(
    "name, params, expected_var",
    [
        ("glorot_uniform", {}, 2 / (FAN_IN + FAN_OUT)),
        ("glorot_normal", {}, 2 / (FAN_IN + FAN_OUT)),
        ("xavier_normal", {"gain": 2.0}, 4 * 2 / (FAN_IN + FAN_OUT)),
        ("he_uniform", {}, 2 / FAN_IN),
        ("he_normal", {}, 2 / FAN_IN),
        ("kaiming_normal", {}, 2 / FAN_IN),
        ("lecun_uniform", {}, 1 / FAN_IN),
        ("lecun_normal", {}, 1 / FAN_IN),
        ("gaussian", {"sigma_w": 1.5}, 1.5**2 / FAN_IN),
        ("orthogonal", {"gain": 1.0}, 1 / FAN_IN),  # rows of a 512x256 orthonormal-column matrix
    ],
)
def test_empirical_variance_matches_formula(name, params, expected_var, key):
    var, mean, _ = _var(I.get(name, **params), key)
    assert var == pytest.approx(expected_var, rel=0.03)
    assert abs(mean) < 4 * math.sqrt(expected_var / (FAN_IN * FAN_OUT))


@pytest.mark.parametrize(
    "name, fan", [("glorot_uniform", "avg"), ("he_uniform", "in"), ("lecun_uniform", "in")]
)
def test_uniform_bounds(name, fan, key):
    w = I.get(name)(key, (FAN_IN, FAN_OUT))
    gain2 = 2.0 if name == "he_uniform" else 1.0
    n = (FAN_IN + FAN_OUT) / 2 if fan == "avg" else FAN_IN
    bound = math.sqrt(3 * gain2 / n)
    assert float(jnp.abs(w).max()) <= bound
    assert float(jnp.abs(w).max()) > 0.99 * bound


def test_conv_fans_include_the_receptive_field(key):
    # HWIO kernel: fan_in = 3*3*16 = 144, fan_out = 3*3*32 = 288.
    var, _, _ = _var(I.he_normal(), key, (3, 3, 16, 32))
    assert var == pytest.approx(2 / 144, rel=0.05)
    var, _, _ = _var(I.glorot_uniform(), key, (3, 3, 16, 32))
    assert var == pytest.approx(2 / (144 + 288), rel=0.05)


@pytest.mark.parametrize("shape", [(64, 64), (128, 32)])
@pytest.mark.parametrize("gain", [1.0, 1.7])
def test_orthogonal_columns_are_orthonormal_times_gain(shape, gain, key):
    w = I.orthogonal(gain)(key, shape)
    np.testing.assert_allclose(w.T @ w, gain**2 * jnp.eye(shape[1]), atol=2e-5)


def test_delta_orthogonal_is_orthogonal_at_the_centre_and_zero_elsewhere(key):
    w = I.delta_orthogonal(1.0)(key, (3, 3, 16, 16))
    centre = w[1, 1]
    np.testing.assert_allclose(centre.T @ centre, jnp.eye(16), atol=2e-5)
    assert float(jnp.abs(w).sum() - jnp.abs(centre).sum()) == 0.0


def test_bias_initializer(key):
    assert float(jnp.abs(I.bias(0.0)(key, (100,))).max()) == 0.0
    b = I.bias(0.3)(key, (100000,))
    assert float(b.std()) == pytest.approx(0.3, rel=0.02)


def test_errors_name_the_problem(key):
    with pytest.raises(ValueError, match="unknown initializer 'he'.*he_normal"):
        I.get("he")
    with pytest.raises(ValueError, match=r"glorot_uniform needs a kernel of rank >= 2, got shape \(7,\)"):
        I.glorot_uniform()(key, (7,))
    with pytest.raises(ValueError, match="scale must be positive"):
        I.gaussian(0.0)
    with pytest.raises(ValueError, match="delta_orthogonal needs a kernel of rank >= 3"):
        I.delta_orthogonal()(key, (4, 4))
    with pytest.raises(ValueError, match="bad parameters"):
        I.get("gaussian", sigma=1.0)


def test_gain_of_homogeneous_activations_is_closed_form():
    assert I.gain("relu") == pytest.approx(math.sqrt(2), rel=1e-12)
    assert I.gain("identity") == pytest.approx(1.0, rel=1e-12)
    for a in (0.01, 0.2, 0.5):
        assert I.gain("leaky_relu", negative_slope=a) == pytest.approx(math.sqrt(2 / (1 + a * a)), rel=1e-12)
    assert I.gain("selu") == pytest.approx(1.0, rel=1e-9)  # the self-normalizing fixed point


def test_gain_of_tanh_against_high_precision_integral():
    # The fixed point of the second moment, not PyTorch's heuristic 5/3.
    mpmath.mp.dps = 30
    m2 = mpmath.quad(lambda z: mpmath.tanh(z) ** 2 * mpmath.npdf(z), [-mpmath.inf, 0, mpmath.inf])
    expected = float(1 / mpmath.sqrt(m2))
    assert I.gain("tanh") == pytest.approx(expected, rel=1e-10)
    assert abs(I.gain("tanh") - 5 / 3) > 0.07


def test_gain_preserves_the_second_moment_through_a_layer(key):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (512, 512))
    # Many output columns: with a non-zero-mean activation (sigmoid) the squared column sums of
    # one fixed W fluctuate by sqrt(2 / fan_out); 16384 columns bring that under 1%.
    for name in ("tanh", "sigmoid", "relu", "gelu", "elu"):
        w = I.gaussian(I.gain(name))(kw, (512, 16384))
        z = activations.get(name)(x) @ w
        assert float(jnp.mean(z**2)) == pytest.approx(1.0, abs=0.04), name


def test_gain_accepts_a_callable():
    assert I.gain(lambda x: 2.0 * x) == pytest.approx(0.5, rel=1e-12)
