"""gradflow.spectra.conv: FFT spectra of circular convolutions against brute-force jacfwd + SVD in
float64, against the general chain engine, and against closed forms at depth."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import initializers as gi
from gradflow import spectra
from gradflow.nn import ConvStack, chain


def _dense_log_sv(f, x):
    """log singular values of d f / d x, by jacfwd and a float64 SVD, descending."""
    jac = jax.jacfwd(lambda z: f(z.reshape(x.shape)).ravel())(x.ravel())
    return np.sort(np.log(np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)))[::-1]


@pytest.mark.parametrize(
    "spatial, stride, c_in, c_out",
    [
        ((8,), 1, 3, 4),
        ((8,), 2, 4, 3),
        ((6, 6), 1, 2, 3),
        ((8, 8), 2, 3, 4),
        ((8, 8), 2, 5, 2),
        ((4, 8), 2, 2, 2),
    ],
)
def test_one_circular_conv_layer_matches_jacfwd_svd(spatial, stride, c_in, c_out):
    """Sedghi et al. 2019, with the stride's aliased frequencies folded into each block."""
    conv = nn.Conv(c_out, (3,) * len(spatial), strides=stride, padding="CIRCULAR", use_bias=False)
    x = jnp.zeros((*spatial, c_in))
    kernel = conv.init(jax.random.key(c_in + 10 * c_out), x)["params"]["kernel"]
    ref = _dense_log_sv(lambda z: conv.apply({"params": {"kernel": kernel}}, z), x)
    got = np.asarray(spectra.conv_spectrum(kernel, spatial, stride=stride))
    assert got.shape == (min(ref.size, int(np.prod(spatial)) // stride ** len(spatial) * c_out),)
    np.testing.assert_allclose(got, ref[: got.size], atol=2e-5)


def test_a_product_of_circular_convs_matches_jacfwd_and_the_chain_engine():
    """A linear circular ConvStack: the FFT product, the general engine and jacfwd + SVD agree."""
    model = ConvStack(
        depth=4, channels=3, kernel_size=3, spatial_dims=2, activation="identity", num_outputs=None,
        kernel_init=gi.gaussian(1.3), bias_init=nn.initializers.normal(0.5),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (6, 6, 3))
    variables = model.init(jax.random.key(1), x)
    kernels = variables["params"]["stage1"]["conv"]["kernel"]
    fft = spectra.conv_spectra(kernels, (6, 6))
    engine = spectra.model_spectra(model, variables, x)
    # float32 throughout: the smallest singular value (e^-6.5 under a largest of e^1.7) is good to
    # about eps * cond ~ 1e-4 in each of the three computations; the rest agree to 1e-5
    np.testing.assert_allclose(fft.log_singular_values, engine.log_singular_values, atol=3e-4)
    c = chain(model, variables, x)
    np.testing.assert_allclose(
        fft.log_singular_values[0], _dense_log_sv(lambda h: _walk(c, h, 1), c.h0), atol=3e-4
    )
    np.testing.assert_allclose(
        fft.log_singular_values[-1], _dense_log_sv(lambda h: _walk(c, h, 4), c.h0), atol=3e-4
    )
    assert fft.widths.tolist() == [108] * 4


def test_a_conv_stack_goes_to_the_fft_path_through_its_chain():
    """conv_stack_spectra of a linear circular 2-D ConvStack (its kernels read through the chain)
    equals the general engine, model_spectra(method="exact"), layer by layer, with its names."""
    model = ConvStack(
        depth=3, channels=2, kernel_size=3, spatial_dims=2, activation="linear", add_channel=True,
        kernel_init=gi.gaussian(1.2), bias_init=nn.initializers.normal(0.3),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(4), (6, 6))
    variables = model.init(jax.random.key(5), x)
    engine = spectra.model_spectra(model, variables, x, method="exact")
    fft = spectra.conv_stack_spectra(model, variables, x)
    assert fft.layers == engine.layers == ("stage1[1]", "stage1[2]", "stage1[3]")
    assert fft.widths.tolist() == engine.widths.tolist() == [72] * 3
    np.testing.assert_allclose(fft.log_singular_values, engine.log_singular_values, atol=1e-4)
    assert fft.log_singular_values[-1, 0] - fft.log_singular_values[-1, -1] > 3  # a real spread


@pytest.mark.parametrize(
    "fields, named",
    [
        (dict(activation="tanh"), "activation='tanh' (the FFT path needs one of ('linear', 'identity'))"),
        (dict(padding="same"), "padding='same'"),
        (dict(norm="layer"), "norm='layer'"),
        (dict(residual="plain"), "residual='plain'"),
        (dict(channels=(2, 4)), "channels=(2, 4) (the FFT path needs one stage)"),
    ],
)
def test_a_conv_stack_that_is_not_circulant_is_refused_naming_the_general_engine(fields, named):
    model = ConvStack(
        **{
            "depth": 2,
            "channels": 2,
            "spatial_dims": 1,
            "activation": "identity",
            "add_channel": True,
            **fields,
        }
    )
    x = jnp.ones((8,))
    with pytest.raises(ValueError, match=r"not a product of circular convolutions") as e:
        spectra.conv_stack_spectra(model, None, x)
    assert named in str(e.value) and "spectra.model_spectra(model, variables, x)" in str(e.value)


def test_conv_stack_spectra_refuses_other_models_and_batches():
    from gradflow.nn import MLPStack

    with pytest.raises(
        ValueError, match="takes a gradflow ConvStack, got MLPStack; use spectra.model_spectra"
    ):
        spectra.conv_stack_spectra(MLPStack(depth=2, width=4), None, jnp.ones(4))
    model = ConvStack(depth=2, channels=2, spatial_dims=1, activation="identity", add_channel=True)
    with pytest.raises(ValueError, match=r"one example of 1 axes \(no batch axis\), got shape \(2, 8\)"):
        spectra.conv_stack_spectra(model, None, jnp.ones((2, 8)))
    with pytest.raises(ValueError, match="method must be one of"):
        spectra.conv_spectra(jnp.ones((2, 3, 2, 2)), (8,), method="svd")


def test_the_qr_walk_matches_the_chain_engine_walk_at_depth():
    """The one-QR-a-layer walk against the general engine's (QR + LQ) on the same frequencies,
    at a depth whose spread (e^-300 to e^+5) no dense product holds in float32."""
    depth, c = 200, 4
    kernels = jax.vmap(lambda k: gi.gaussian(1.0)(k, (3, c, c)))(jax.random.split(jax.random.key(6), depth))
    qr = spectra.conv_spectra(kernels, (8,), depths=[50, depth]).log_singular_values
    ref = spectra.conv_spectra(kernels, (8,), depths=[50, depth], method="chain").log_singular_values
    np.testing.assert_allclose(qr, ref, atol=2e-3)
    assert qr[1, 0] - qr[1, -1] > 20


def _walk(c, h, depth):
    """The chain's first `depth` layers applied to h, one by one."""
    for i in range(depth):
        h = c.segments[0].step(None, c.segments[0].layer_params(i), h)
    return h


def test_deep_products_against_a_complex128_product_per_frequency():
    """1-D, C = 4: each frequency's product formed in complex128 by numpy and its SVD against the
    log-scaled walk in float32, at depths whose spread (< e^30) float64 still resolves."""
    depth, n, c = 16, 8, 4
    kernels = jax.random.normal(jax.random.key(3), (depth, 3, c, c)) / np.sqrt(3 * c) * 1.2
    got = spectra.conv_spectra(kernels, (n,), depths=[8, 16]).log_singular_values
    k_hat = np.fft.fft(np.asarray(kernels, np.float64), n=n, axis=1)  # (L, n, C_in, C_out)
    for row, depth_l in zip(got, (8, 16), strict=True):
        logs = []
        for u in range(n):
            prod = np.eye(c, dtype=np.complex128)
            for l in range(depth_l):
                prod = k_hat[l, u].T @ prod
            logs += list(np.log(np.linalg.svd(prod, compute_uv=False)))
        np.testing.assert_allclose(row, np.sort(logs)[::-1], atol=2e-3)
    assert got[1, 0] - got[1, -1] > 10  # a real spread: the test would see a wrong product


def test_delta_orthogonal_stacks_are_isometries_times_gain_at_any_depth():
    """All n^d C singular values of L delta-orthogonal layers equal gain^L (closed form):
    gain = 1.05 at depth 3000 is e^146, exact in log space in float32."""
    depth, c, gain = 3000, 4, 1.05
    keys = jax.random.split(jax.random.key(0), depth)
    kernels = jax.vmap(lambda k: gi.delta_orthogonal(gain)(k, (3, 3, c, c)))(keys)
    res = spectra.conv_spectra(kernels, (4, 4), depths=[1, 100, 3000])
    expected = np.array([1, 100, 3000])[:, None] * np.log(gain)
    # float32 rounding in each factor adds up like eps * L (the engine's accuracy): 1e-6 per layer
    for row, want, l in zip(res.log_singular_values, expected, (1, 100, 3000), strict=True):
        np.testing.assert_allclose(row, np.full(64, want[0]), atol=1e-6 * l + 1e-5)


def test_gaussian_kernels_spread_where_delta_orthogonal_ones_do_not():
    """Xiao et al. 2018 in the linear case: at the same variance (sigma_w = 1) Gaussian kernels'
    spectrum spreads with depth, delta-orthogonal ones stay at 1."""
    depth, c = 200, 4
    keys = jax.random.split(jax.random.key(1), depth)
    gauss = jax.vmap(lambda k: gi.gaussian(1.0)(k, (3, c, c)))(keys)
    delta = jax.vmap(lambda k: gi.delta_orthogonal(1.0)(k, (3, c, c)))(keys)
    g = spectra.conv_spectra(gauss, (8,), depths=[depth]).log_singular_values[0]
    d = spectra.conv_spectra(delta, (8,), depths=[depth]).log_singular_values[0]
    assert np.max(np.abs(d)) < 1e-3
    assert g[0] - g[-1] > 20  # Gaussian: a spread of more than e^20


def test_bad_inputs_are_named():
    k = jnp.ones((3, 3, 2, 2))
    with pytest.raises(ValueError, match="larger than the input"):
        spectra.conv_spectrum(k, (2, 2))
    with pytest.raises(ValueError, match="stride=3 must be a positive integer dividing"):
        spectra.conv_spectrum(k, (8, 8), stride=3)
    with pytest.raises(ValueError, match="3 spatial axes"):
        spectra.conv_spectrum(k, (8, 8, 8)[:2] + (8,))
    with pytest.raises(ValueError, match="non-finite"):
        spectra.conv_spectrum(k.at[0, 0, 0, 0].set(jnp.nan), (8, 8))
    with pytest.raises(ValueError, match="C_in = C_out"):
        spectra.conv_spectra(jnp.ones((2, 3, 2, 3)), (8,))
    with pytest.raises(ValueError, match="depths"):
        spectra.conv_spectra(jnp.ones((2, 3, 2, 2)), (8,), depths=[3])
