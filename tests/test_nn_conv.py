"""gradflow.nn.ConvStack: its chain against its own apply and jacfwd + SVD, mean field against
the fully connected theory, delta-orthogonal kernels, and bad input named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import initializers as gi
from gradflow import spectra, theory
from gradflow.nn import ConvStack, StackConfig, chain
from gradflow.nn.chains import WHOLE
from gradflow.numerics import x64

VARIANTS = [
    dict(),
    dict(norm="batch"),
    dict(norm="layer", padding="same"),
    dict(residual="plain", pool=False),
    dict(residual="rezero"),
    dict(residual="fixup", activation="relu"),
    dict(activation="maxout", maxout_pieces=2),
    dict(activation="prelu", channels=(3, 4, 5)),
]


@pytest.mark.parametrize(
    "kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "plain"
)
def test_the_chain_from_x_to_y_is_the_model(kw):
    """Every variant, two or three stages with strided down blocks: walking the whole chain
    (embed, stages, down blocks, pool + head) gives `apply`; the default chain's readout too."""
    model = ConvStack(**{"depth": 2, "channels": (3, 4), "kernel_size": 3, "spatial_dims": 2, **kw})
    n = 4 * 2 ** (len(model.stages) - 1)  # 8x8 for two stages, 16x16 for three
    x = jax.random.normal(jax.random.key(0), (2, n, n, 2))
    variables = model.init(jax.random.key(1), x)
    want = model.apply(variables, x)
    whole = chain(model, variables, x, layers=WHOLE)
    np.testing.assert_allclose(whole.final(), want, rtol=1e-5, atol=1e-6)
    default = chain(model, variables, x)
    np.testing.assert_allclose(default.readout(default.final()), want, rtol=1e-5, atol=1e-6)
    if not model.pool:  # the head reads every position: (n / 2)^2 positions x 4 channels of stage 2
        assert variables["params"]["head"]["kernel"].shape == ((n // 2) ** 2 * 4, 10)
    stages = len(model.stages)
    assert default.depth == 2 * stages + stages - 1 and whole.depth == default.depth + 2


def test_spectra_of_a_strided_nonlinear_conv_stack_match_jacfwd_svd():
    """The general engine through a changing state size (8x8x3 -> 4x4x4) with zero padding: the
    forward product at the last block against the SVD of the jacfwd Jacobian, both in float64
    (the smallest singular value, e^-16, is below what a float32 Jacobian resolves)."""
    model = ConvStack(
        depth=2, channels=(3, 4), kernel_size=3, spatial_dims=2, padding="same", num_outputs=None
    )
    x32 = jax.random.normal(jax.random.key(2), (8, 8, 1))
    variables32 = model.init(jax.random.key(3), x32)
    with x64():
        x = jnp.asarray(np.asarray(x32), jnp.float64)
        variables = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), variables32)
        res = spectra.model_spectra(model, variables, x, layers=("embed", "blocks"))
        jac = jax.jacfwd(lambda z: model.apply(variables, z.reshape(x.shape)).ravel())(x.ravel())
        ref = np.sort(np.log(np.linalg.svd(np.asarray(jac), compute_uv=False)))[::-1]
    assert res.layers[-1] == "stage2[2]" and res.widths.tolist() == [192, 192, 192, 64, 64, 64]
    assert ref[63] < -10  # a product with a real spread
    np.testing.assert_allclose(res.log_singular_values[-1], ref[:64], atol=1e-7)


def test_circular_cnn_mean_field_is_the_fully_connected_one():
    """Xiao et al. 2018: with circular padding, a Gaussian CNN's pre-activation variance q_l
    follows the fully connected length map with fan-in k^d C. Measured over 64 channels x 64
    positions x 8 inputs against `theory.length_trajectory` from the measured q_1."""
    sigma_w, sigma_b, depth = 1.6, 0.3, 8
    model = ConvStack(
        depth=depth, channels=64, kernel_size=3, spatial_dims=2, activation="tanh", num_outputs=None,
        kernel_init=gi.gaussian(sigma_w), bias_init=gi.bias(sigma_b), input_init=gi.gaussian(2.0),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(4), (8, 8, 8, 3))
    variables = model.init(jax.random.key(5), x)
    _, inter = model.apply(variables, x, mutable=["intermediates"])
    z = inter["intermediates"]["stage1"]["preact"][0]  # (L, B, 8, 8, 64)
    q = np.asarray(jnp.mean(z**2, axis=(1, 2, 3, 4)))
    predicted, _ = theory.length_trajectory("tanh", sigma_w, sigma_b, float(q[0]), depth)
    np.testing.assert_allclose(q, np.asarray(predicted), rtol=0.06)
    assert abs(q[-1] / q[0] - 1) > 0.2  # q_l moves: the map is tested, not a constant


def test_delta_orthogonal_conv_layers_have_every_singular_value_equal_to_the_gain():
    kernel = gi.delta_orthogonal(1.7)(jax.random.key(0), (3, 3, 4, 6))
    np.testing.assert_allclose(spectra.conv_spectrum(kernel, (8, 8)), np.log(1.7), atol=1e-5)
    init = gi.critical_delta_orthogonal("tanh", 0.05)
    assert init.sigma_w == gi.critical("tanh", 0.05).sigma_w
    k = init(jax.random.key(1), (5, 4, 4))
    np.testing.assert_allclose(spectra.conv_spectrum(k, (8,)), np.log(init.sigma_w), atol=1e-5)


def test_a_conv_stack_config_builds_a_1d_stack_for_mnist1d_inputs():
    cfg = StackConfig(kind="conv", depth=3, width=6, kernel_size=5, init="critical_delta_orthogonal")
    model = cfg.build()
    x = jnp.ones((2, 40))
    variables = model.init(jax.random.key(0), x)
    assert model.apply(variables, x).shape == (2, 10)
    assert variables["params"]["stage1"]["conv"]["kernel"].shape == (3, 5, 6, 6)
    assert not cfg.recurrent and StackConfig(kind="gru").recurrent


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="kernel_size=9 is larger than the spatial size"):
        ConvStack(depth=1, channels=2, kernel_size=9).init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="stride=2 does not divide the spatial size"):
        ConvStack(depth=1, channels=(2, 3), kernel_size=3, spatial_dims=1).init(
            jax.random.key(0), jnp.ones((1, 9, 1))
        )
    with pytest.raises(ValueError, match="larger than the spatial size .* of stage 3"):
        ConvStack(depth=1, channels=(2, 2, 2), kernel_size=5, spatial_dims=1, padding="same").init(
            jax.random.key(0), jnp.ones((1, 9, 1))
        )
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConvStack(depth=1, kernel_size=4)
    with pytest.raises(ValueError, match="padding"):
        ConvStack(depth=1, padding="valid")
    with pytest.raises(ValueError, match=r"takes inputs of shape \(B, L, C\)"):
        ConvStack(depth=1, spatial_dims=1).init(jax.random.key(0), jnp.ones((1, 2, 8, 1)))
    with pytest.raises(ValueError, match="C_in=6 > C_out=4"):
        gi.delta_orthogonal()(jax.random.key(0), (3, 6, 4))
    with pytest.raises(ValueError, match="gain must be positive"):
        gi.delta_orthogonal(0.0)
    with pytest.raises(ValueError, match="for conv kernels: use kind='conv'"):
        StackConfig(kind="mlp", init="delta_orthogonal")
    with pytest.raises(ValueError, match="stride"):
        ConvStack(depth=1, stride=1)
