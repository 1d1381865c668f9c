import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import initializers
from gradflow.lsuv import lsuv
from gradflow.nn import MLPStack

B, D, W, L = 256, 16, 32, 10


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(1), (B, D))


@pytest.fixture(scope="module")
def vanishing(x):
    """A deep tanh MLP at sigma_w = 0.3: signals vanish (Var z_l ~ 0.09^l)."""
    model = MLPStack(
        depth=L,
        width=W,
        activation="tanh",
        kernel_init=initializers.gaussian(0.3),
        input_init=initializers.gaussian(0.3),
    )
    return model, model.init(jax.random.key(0), x)


@pytest.fixture(scope="module")
def result(vanishing, x):
    model, v = vanishing
    return lsuv(model, v, x, key=jax.random.key(3))


def _preacts(model, v, x):
    """Independent oracle: z_l = h_{l-1} W_l + b_l from the chain's states, by hand."""
    c = model.chain(v, x)
    hs = jnp.concatenate([c.h0[None], c.states()[0][:-1]])
    p = v["params"]["blocks"]["dense"]
    return jnp.einsum("lbi,lio->lbo", hs, p["kernel"]) + p["bias"][:, None, :]


def test_vanishing_tanh_stack_reaches_unit_variance_at_every_layer(vanishing, result, x):
    model, v0 = vanishing
    v, report = result
    before = jnp.var(_preacts(model, v0, x), axis=(1, 2))
    assert before[-1] < 1e-6  # the init really is vanishing
    after = np.asarray(jnp.var(_preacts(model, v, x), axis=(1, 2)))
    assert np.all(np.abs(after - 1) < 0.1), after
    assert abs(float(jnp.var(model.chain(v, x).h0)) - 1) < 0.1  # embed
    assert report.converged and [s.name for s in report.layers] == ["embed"] + [
        f"blocks[{l}]" for l in range(1, L + 1)
    ] + ["head"]
    np.testing.assert_allclose([s.var_after for s in report.layers[1:-1]], after, rtol=1e-4)
    np.testing.assert_allclose([s.var_init for s in report.layers[1:-1]], before, rtol=1e-3)
    # the variance holds on a fresh batch of the same distribution
    x_new = jax.random.normal(jax.random.key(9), (4 * B, D))
    assert np.all(np.abs(np.asarray(jnp.var(_preacts(model, v, x_new), axis=(1, 2))) - 1) < 0.15)


def test_kernels_are_scaled_orthonormal(vanishing, result):
    v, report = result
    kernels = v["params"]["blocks"]["dense"]["kernel"]
    for l, k in enumerate(kernels):
        gram = np.asarray(k.T @ k, np.float64)
        c = np.mean(np.diag(gram))
        np.testing.assert_allclose(gram / c, np.eye(W), atol=1e-5)
        assert np.sqrt(c) == pytest.approx(report.layers[l + 1].scale, rel=1e-5)
    embed = np.asarray(v["params"]["embed"]["kernel"], np.float64)  # (16, 32): orthonormal rows
    gram = embed @ embed.T
    np.testing.assert_allclose(gram / np.mean(np.diag(gram)), np.eye(D), atol=1e-5)
    # biases and everything but the kernels untouched
    v0 = vanishing[1]
    np.testing.assert_array_equal(
        v["params"]["blocks"]["dense"]["bias"], v0["params"]["blocks"]["dense"]["bias"]
    )


def test_iteration_cap_is_respected(vanishing, x):
    model, v0 = vanishing
    with pytest.warns(UserWarning, match="did not reach"):
        v, report = lsuv(model, v0, x, max_iters=0)
    assert all(s.iterations == 0 and s.scale == 1.0 for s in report.layers)
    k = v["params"]["blocks"]["dense"]["kernel"]
    np.testing.assert_allclose(
        np.asarray(jnp.einsum("lio,lip->lop", k, k)), np.broadcast_to(np.eye(W), (L, W, W)), atol=1e-5
    )
    # "layer" on tanh: Var(tanh z) < 1 needs ~16 rescalings to pass 0.9, so the cap binds
    with pytest.warns(UserWarning, match="did not reach"):
        _, report = lsuv(model, v0, x, measure="layer", max_iters=3)
    blocks = report.layers[1:-1]
    assert all(s.iterations == 3 and not s.converged for s in blocks)
    assert all(s.var_after < 0.9 for s in blocks)


def test_residual_branch_and_rezero_alpha_kept(vanishing, x):
    model = MLPStack(depth=L, width=W, activation="relu", residual="rezero")
    p = vanishing[1]["params"]  # the same parameter shapes plus ReZero's alpha = 0 (saves an init compile)
    v0 = {"params": {**p, "blocks": {**p["blocks"], "alpha": jnp.zeros(L)}}}
    assert jax.tree_util.tree_structure(v0) == jax.tree_util.tree_structure(
        jax.eval_shape(model.init, jax.random.key(0), x)
    )
    v, report = lsuv(model, v0, x, layers=("embed", "blocks"))
    assert report.converged and [s.name for s in report.layers][-1] == f"blocks[{L}]"
    np.testing.assert_array_equal(v["params"]["blocks"]["alpha"], 0.0)  # ReZero: still the identity
    np.testing.assert_array_equal(v["params"]["head"]["kernel"], v0["params"]["head"]["kernel"])
    # the branch W relu(h) + b has unit variance at every block (oracle by hand)
    c = model.chain(v, x)
    hs = jnp.concatenate([c.h0[None], c.states()[0][:-1]])
    p = v["params"]["blocks"]["dense"]
    branch = jnp.einsum("lbi,lio->lbo", jax.nn.relu(hs), p["kernel"]) + p["bias"][:, None, :]
    assert np.all(np.abs(np.asarray(jnp.var(branch, axis=(1, 2))) - 1) < 0.1)


def test_bad_input_raises_value_error(vanishing, x):
    model, v = vanishing
    with pytest.raises(ValueError, match=r"shape \(256, 17\) does not fit"):
        lsuv(model, v, jnp.ones((B, D + 1)))
    with pytest.raises(ValueError, match="at least 2"):
        lsuv(model, v, jnp.ones((1, D)))
    with pytest.raises(ValueError, match="measure"):
        lsuv(model, v, x, measure="post")
    with pytest.raises(ValueError, match="max_iters"):
        lsuv(model, v, x, max_iters=-1)
    with pytest.raises(ValueError, match="norm=None"):
        lsuv(MLPStack(depth=2, width=4, norm="layer"), v, x)
    with pytest.raises(ValueError, match="Fixup"):
        lsuv(MLPStack(depth=2, width=4, residual="fixup"), v, x)
    with pytest.raises(ValueError, match="cannot be rescaled"):  # all-zero input: zero variance
        lsuv(model, jax.tree_util.tree_map(jnp.zeros_like, v), jnp.zeros((B, D)))


class _CNN(nn.Module):
    """A user's linen CNN (widths and shapes change from layer to layer)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), kernel_init=initializers.gaussian(0.2))(x))
        h = nn.relu(nn.Conv(6, (3, 3), strides=2, kernel_init=initializers.gaussian(0.2))(h))
        return nn.Dense(5, kernel_init=initializers.gaussian(0.2))(h.reshape(h.shape[0], -1))


class _TwoConvBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (3, 3))(nn.relu(nn.Conv(3, (3, 3))(x)))


class _Blocks(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _TwoConvBlock()(x).mean(axis=(1, 2))


def test_a_users_cnn_gets_unit_variance_at_every_conv_and_dense():
    model, x = _CNN(), jax.random.normal(jax.random.key(2), (64, 8, 8, 1))
    v0 = model.init(jax.random.key(0), x)
    v, report = lsuv(model, v0, x, key=jax.random.key(1))
    # the oracle: every submodule's output recorded by flax itself, not through the chain
    _, inter = model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    outs = {k: jnp.var(inter["intermediates"][k]["__call__"][0]) for k in ("Conv_0", "Conv_1", "Dense_0")}
    assert [s.name for s in report.layers] == ["Conv_0", "Conv_1", "Dense_0"] and report.converged
    assert all(abs(float(o) - 1) < 0.1 for o in outs.values()), outs
    assert report.layers[0].var_init < 0.2  # the init really was too small
    # each kernel is a scaled orthonormal matrix, a conv kernel as the (9 c_in, c_out) matrix it applies
    for name, s in zip(outs, report.layers):
        k = np.asarray(v["params"][name]["kernel"], np.float64)
        k = k.reshape(-1, k.shape[-1])
        gram = k.T @ k if k.shape[0] >= k.shape[1] else k @ k.T
        np.testing.assert_allclose(gram / s.scale**2, np.eye(len(gram)), atol=1e-5)
    # a layer holding two convs cannot be measured at "its" conv; "layer" scales both
    blocks = _Blocks()
    vb = blocks.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="2 kernels"):
        lsuv(blocks, vb, x, layers=["_TwoConvBlock_0"])
    _, report = lsuv(blocks, vb, x, layers=["_TwoConvBlock_0"], measure="layer")
    assert report.layers[0].name == "_TwoConvBlock_0" and report.converged
