import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import activations
from gradflow.numerics import x64
from gradflow.theory import quadrature as _quadrature

REQUIRED = [
    "identity", "linear", "sigmoid", "tanh", "hard_tanh", "relu", "leaky_relu", "elu", "selu",
    "gelu", "silu", "swish", "softplus", "erf", "rrelu", "maxout",
]  # fmt: skip
ELEMENTWISE = [n for n in activations.names() if n != "maxout"]


def test_registry_has_the_required_names():
    assert set(REQUIRED) <= set(activations.names())


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="unknown activation 'relux'.*leaky_relu.*tanh"):
        activations.get("relux")


def test_unknown_parameter_is_named():
    with pytest.raises(ValueError, match="no parameter 'slope'.*negative_slope"):
        activations.get("leaky_relu", slope=0.2)


def test_parameters_bind_by_keyword():
    f = activations.get("leaky_relu", negative_slope=0.2)
    np.testing.assert_allclose(f(jnp.array([-2.0, 3.0])), [-0.4, 3.0])
    g = activations.get("elu", alpha=2.0)
    np.testing.assert_allclose(g(jnp.array([-1.0])), [2.0 * (math.exp(-1.0) - 1.0)], rtol=1e-6)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_jit_vmap_grad_go_through(name):
    f = activations.get(name)
    x = jnp.linspace(-3.0, 3.0, 13) + 0.05  # avoid kinks for the finite difference
    y = jax.jit(f)(x)
    assert y.shape == x.shape
    np.testing.assert_allclose(jax.vmap(f)(x), y, rtol=1e-6)
    d = jax.vmap(jax.grad(lambda t: f(t)))(x)
    eps = 1e-3
    fd = (f(x + eps) - f(x - eps)) / (2 * eps)
    np.testing.assert_allclose(d, fd, rtol=2e-2, atol=2e-3)


def test_sigmoid_derivative_at_most_a_quarter_with_equality_at_zero():
    x = jnp.linspace(-10.0, 10.0, 20001)
    d = jax.vmap(jax.grad(activations.sigmoid))(x)
    assert float(d.max()) <= 0.25 + 1e-7
    assert float(jax.grad(activations.sigmoid)(0.0)) == pytest.approx(0.25, abs=1e-7)
    np.testing.assert_allclose(d, activations.sigmoid(x) * (1 - activations.sigmoid(x)), atol=1e-6)


def test_tanh_derivative_at_most_one():
    x = jnp.linspace(-10.0, 10.0, 20001)
    d = jax.vmap(jax.grad(activations.tanh))(x)
    assert float(d.max()) <= 1.0 + 1e-7
    assert float(jax.grad(activations.tanh)(0.0)) == pytest.approx(1.0)
    np.testing.assert_allclose(d, 1 - jnp.tanh(x) ** 2, atol=1e-6)


def test_gelu_is_x_times_normal_cdf():
    x = np.linspace(-4, 4, 81)
    phi = 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    np.testing.assert_allclose(activations.gelu(jnp.asarray(x)), x * phi, atol=1e-6)


def test_selu_constants_give_the_self_normalizing_fixed_point():
    # Quadrature: E[selu(z)] = 0 and E[selu(z)^2] = 1 for z ~ N(0, 1), to float64 precision.
    with x64():
        mean = float(_quadrature.gaussian_expectation(activations.selu, 1.0, (0.0,)))
        m2 = float(_quadrature.gaussian_expectation(lambda x: activations.selu(x) ** 2, 1.0, (0.0,)))
    assert abs(mean) < 1e-9 and abs(m2 - 1) < 1e-9


def test_selu_layer_with_lecun_normal_keeps_mean_zero_variance_one(key):
    from gradflow import initializers

    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (4096, 512))
    w = initializers.lecun_normal()(kw, (512, 512))
    z = activations.selu(x) @ w
    assert abs(float(z.mean())) < 0.02
    assert float(z.var()) == pytest.approx(1.0, abs=0.03)
    a = activations.selu(x)
    assert abs(float(a.mean())) < 0.01 and float(a.var()) == pytest.approx(1.0, abs=0.01)


def test_rrelu_train_draws_slopes_in_range_and_eval_uses_mean(key):
    x = -jnp.ones((10000,))
    y = activations.rrelu(x, key=key, lower=0.1, upper=0.3, train=True)
    slopes = -y
    assert float(slopes.min()) >= 0.1 and float(slopes.max()) <= 0.3
    assert float(slopes.mean()) == pytest.approx(0.2, abs=0.005)
    assert float(slopes.std()) == pytest.approx(0.2 / math.sqrt(12), rel=0.05)
    np.testing.assert_allclose(activations.rrelu(x, lower=0.1, upper=0.3), -0.2 * jnp.ones(10000), rtol=1e-6)
    np.testing.assert_array_equal(activations.rrelu(jnp.arange(3.0), key=key, train=True), jnp.arange(3.0))


def test_rrelu_errors():
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        activations.rrelu(jnp.ones(3), train=True)
    with pytest.raises(ValueError, match="lower <= upper"):
        activations.rrelu(jnp.ones(3), lower=0.5, upper=0.1)


def test_maxout_takes_the_max_over_consecutive_pieces():
    x = jnp.array([[1.0, 5.0, 2.0, -1.0, 0.0, 3.0]])
    np.testing.assert_array_equal(activations.maxout(x, num_pieces=2), [[5.0, 2.0, 3.0]])
    np.testing.assert_array_equal(activations.maxout(x, num_pieces=3), [[5.0, 3.0]])
    with pytest.raises(ValueError, match="not a multiple of num_pieces=4"):
        activations.maxout(x, num_pieces=4)


def test_kinks_are_recorded():
    assert activations.kinks("relu") == (0.0,)
    assert activations.kinks("hard_tanh") == (-1.0, 1.0)
    assert activations.kinks("tanh") == ()
    fn, kinks = activations.resolve(lambda x: x)
    assert kinks == (0.0,)
    with pytest.raises(ValueError, match="registry name or a callable"):
        activations.resolve(3)
    fn, kinks = activations.resolve("leaky_relu", negative_slope=0.2)
    assert float(fn(-1.0)) == pytest.approx(-0.2) and kinks == (0.0,)
    with pytest.raises(ValueError, match="apply to registry names only"):
        activations.resolve(lambda x: x, alpha=1.0)


def test_saturated_derivatives_are_accurate_in_float32():
    # jax's own rules give exactly 0 here; the true values are representable in float32.
    for x in (9.0, 17.0, 30.0, -30.0):
        ds = float(jax.grad(activations.sigmoid)(jnp.float32(x)))
        dt = float(jax.grad(activations.tanh)(jnp.float32(x / 2)))
        assert ds == pytest.approx(math.exp(-abs(x)) / (1 + math.exp(-abs(x))) ** 2, rel=1e-5)
        assert dt == pytest.approx(1 / math.cosh(x / 2) ** 2, rel=1e-5)
    assert float(jax.grad(jax.nn.sigmoid)(jnp.float32(17.0))) == 0.0  # the failure fixed above
    # Second derivatives still work (theory uses phi'').
    d2 = float(jax.grad(jax.grad(activations.tanh))(0.5))
    assert d2 == pytest.approx(-2 * math.tanh(0.5) / math.cosh(0.5) ** 2, rel=1e-5)
