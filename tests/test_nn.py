import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import initializers
from gradflow.nn import Block, GRUStack, LSTMStack, Maxout, MLPStack, PReLU, RNNStack, RReLU

B, D, W, L = 4, 6, 8, 3
VARIANTS = [
    dict(),
    dict(norm="batch"),
    dict(norm="layer"),
    dict(residual="plain"),
    dict(residual="plain", norm="batch"),
    dict(residual="rezero"),
    dict(residual="skipinit"),
    dict(residual="fixup", activation="relu"),
    dict(activation="prelu"),
    dict(activation="rrelu"),
    dict(activation="maxout", maxout_pieces=3),
    dict(activation=jnp.sin, dropout_rate=0.2),
]


@pytest.fixture
def x():
    return jax.random.normal(jax.random.key(1), (B, D))


def _affine(h, p):
    """h @ kernel + bias with an explicit broadcast (rank promotion raises in this suite)."""
    return h @ p["kernel"] + p["bias"].reshape((1,) * (h.ndim - 1) + p["bias"].shape)


def _init(model, x):
    return model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)


def _variant_id(kw):
    """A stable test id (no memory addresses: pytest-xdist workers must collect the same ids)."""
    return ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items()) or "default"


@pytest.mark.parametrize("kw", VARIANTS, ids=_variant_id)
def test_shapes_dtypes_and_stacked_depth_axis(kw, x):
    model = MLPStack(depth=L, width=W, **kw)
    v = _init(model, x)
    y = model.apply(v, x)
    assert y.shape == (B, 10) and y.dtype == jnp.float32
    for leaf in jax.tree_util.tree_leaves(v["params"]["blocks"]):
        assert leaf.shape[0] == L
    y_train, _ = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
    assert y_train.shape == (B, 10)
    assert MLPStack(depth=L, width=W, num_outputs=None, **kw).apply(v_no_head(v), x).shape == (B, W)


def v_no_head(v):
    return {**v, "params": {k: p for k, p in v["params"].items() if k != "head"}}


@pytest.mark.parametrize("kw", VARIANTS, ids=_variant_id)
def test_scan_over_depth_equals_unrolled_python_loop(kw, x):
    model = MLPStack(depth=L, width=W, **kw)
    v = _init(model, x)
    # Perturb so zero-initialised branches (rezero, fixup) are exercised too.
    leaves, tree = jax.tree_util.tree_flatten(v["params"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    )
    v = {**v, "params": params}
    p = v["params"]
    h = _affine(x, p["embed"])
    block = Block(**model.block_fields())
    for l in range(L):
        layer = {"params": jax.tree_util.tree_map(lambda a, l=l: a[l], p["blocks"])}
        if "batch_stats" in v:
            layer["batch_stats"] = jax.tree_util.tree_map(lambda a, l=l: a[l], v["batch_stats"]["blocks"])
        h, _ = block.apply(layer, h)
    expected = _affine(h, p["head"])
    np.testing.assert_allclose(model.apply(v, x), expected, rtol=2e-5, atol=2e-6)
    # The layer chain runs the same maps.
    c = model.chain(v, x)
    np.testing.assert_allclose(c.readout(c.final()), expected, rtol=2e-5, atol=2e-6)


def test_batchnorm_train_uses_batch_stats_and_eval_uses_running_averages(x):
    model = MLPStack(depth=1, width=W, norm="batch", activation="identity", num_outputs=None, bn_momentum=0.9)
    v = model.init(jax.random.key(0), x)
    y, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.var(0), 1.0, rtol=1e-3)  # BN eps = 1e-5
    # Running averages: 0.9 * old + 0.1 * batch statistics of the pre-norm activations.
    p = v["params"]
    h = _affine(x, p["embed"])
    z = _affine(h, jax.tree_util.tree_map(lambda a: a[0], p["blocks"]["dense"]))
    stats = updates["batch_stats"]["blocks"]["norm"]
    np.testing.assert_allclose(stats["mean"][0], 0.1 * z.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"][0], 0.9 + 0.1 * z.var(0), rtol=1e-5)
    # Evaluation with the initial running stats (mean 0, var 1) is the affine map z / sqrt(1 + eps).
    np.testing.assert_allclose(model.apply(v, x), z / np.sqrt(1 + 1e-5), rtol=1e-5, atol=1e-6)


def test_batchnorm_chain_modes(x):
    model = MLPStack(depth=2, width=W, norm="batch", activation="identity", num_outputs=None)
    v = model.init(jax.random.key(0), x)
    h = model.chain(v, x, train=True).final()
    np.testing.assert_allclose(h.mean(0), 0.0, atol=1e-5)  # the batch map normalises the batch
    np.testing.assert_allclose(model.chain(v, x[0]).final(), model.apply(v, x[0]), rtol=1e-6)
    with pytest.raises(ValueError, match="needs a batch"):
        model.chain(v, x[0], train=True)


@pytest.mark.parametrize(
    "kw", [dict(residual="rezero"), dict(residual="skipinit"), dict(residual="fixup")], ids=str
)
def test_zero_init_residual_stacks_are_exactly_the_identity(kw, x):
    model = MLPStack(depth=5, width=W, activation="relu", kernel_init=initializers.he_normal(), **kw)
    v = model.init(jax.random.key(0), x)
    c = model.chain(v, x[0])
    np.testing.assert_array_equal(c.final(), c.h0)
    jac = jax.jacfwd(lambda h0: dataclasses.replace(c, h0=h0).final())(c.h0)
    np.testing.assert_array_equal(jac, jnp.eye(W))


def test_fixup_scales_the_first_branch_layer_by_depth_to_minus_half(x):
    depth = 16
    base = MLPStack(
        depth=depth, width=256, activation="relu", residual="fixup", kernel_init=initializers.he_normal()
    )
    v = base.init(jax.random.key(0), jnp.ones((1, 256)))
    w1 = v["params"]["blocks"]["dense1"]["kernel"]
    assert float(w1.var()) == pytest.approx(2 / 256 / depth, rel=0.03)
    assert float(jnp.abs(v["params"]["blocks"]["dense2"]["kernel"]).max()) == 0.0


def test_residual_variance_bookkeeping():
    # He-init residual without normalization doubles Var per block; with BatchNorm on the branch
    # Var(h_l) = Var(h_0) + l (De & Smith 2020). Monte-Carlo on a wide stack.
    n, batch, depth = 512, 512, 4
    x = jax.random.normal(jax.random.key(0), (batch, n))
    for norm, expected in (
        (None, [2.0**l for l in range(1, depth + 1)]),
        ("batch", [1.0 + l for l in range(1, depth + 1)]),
    ):
        model = MLPStack(
            depth=depth,
            width=n,
            activation="relu",
            residual="plain",
            norm=norm,
            kernel_init=initializers.he_normal(),
            input_init=initializers.lecun_normal(),
        )
        v = model.init(jax.random.key(1), x)
        c = model.chain(v, x, train=norm == "batch")
        v0 = float(c.h0.var())
        (hs,) = c.states()
        ratios = [float(h.var()) / v0 for h in hs]
        if norm == "batch":
            ratios = [float(h.var()) - v0 + 1.0 for h in hs]
        np.testing.assert_allclose(ratios, expected, rtol=0.08)


def test_dropout_is_random_in_training_and_off_in_evaluation(x):
    model = MLPStack(depth=2, width=W, dropout_rate=0.5)
    v = model.init(jax.random.key(0), x)
    a = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert float(jnp.abs(a - b).max()) > 1e-3
    np.testing.assert_array_equal(model.apply(v, x), model.apply(v, x))


def test_prelu_rrelu_maxout_modules():
    x = jnp.array([[-2.0, 1.0, -1.0, 3.0]])
    v = PReLU().init(jax.random.key(0), x)
    assert v["params"]["slope"].shape == (4,)
    np.testing.assert_allclose(PReLU().apply(v, x), [[-0.5, 1.0, -0.25, 3.0]])
    assert PReLU(per_channel=False).init(jax.random.key(0), x)["params"]["slope"].shape == ()
    g = jax.grad(lambda p: PReLU().apply(p, x).sum())(v)
    np.testing.assert_allclose(g["params"]["slope"], [[-2.0, 0.0, -1.0, 0.0]][0])

    r = RReLU(lower=0.1, upper=0.3)
    np.testing.assert_allclose(r.apply({}, x), [[-0.4, 1.0, -0.2, 3.0]], rtol=1e-6)
    noisy = RReLU(lower=0.1, upper=0.3, deterministic=False)
    a = noisy.apply({}, -jnp.ones((1000,)), rngs={"dropout": jax.random.key(0)})
    assert 0.1 <= float(-a.max()) and float(-a.min()) <= 0.3 and float(a.std()) > 0.03

    m = Maxout(features=3, num_pieces=2)
    vm = m.init(jax.random.key(0), x)
    z = _affine(x, vm["params"]["Dense_0"])
    np.testing.assert_allclose(m.apply(vm, x), z.reshape(1, 3, 2).max(-1), rtol=1e-6)


@pytest.mark.parametrize("stack", [RNNStack, LSTMStack, GRUStack])
def test_recurrent_chain_reproduces_the_scanned_stack(stack):
    xs = jax.random.normal(jax.random.key(0), (3, 7, 5))
    model = stack(hidden=6, num_outputs=None, head="all")
    v = model.init(jax.random.key(1), xs)
    ys = model.apply(v, xs)
    assert ys.shape == (3, 7, 6)
    c = model.chain(v, xs[1])
    assert c.depth == 7 and c.h0.shape == (model.carry_size(),)
    assert c.layers == tuple(f"t={t}" for t in range(1, 8))
    (states,) = c.states()
    hidden = states[:, -6:]  # for an LSTM the flat carry is [c; h]
    np.testing.assert_allclose(hidden, ys[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.chain(v, xs).final()[:, -6:], ys[:, -1], rtol=1e-5, atol=1e-6)
    assert stack(hidden=6).apply(v_with_head(stack, xs), xs).shape == (3, 1)


def v_with_head(stack, xs):
    return stack(hidden=6).init(jax.random.key(1), xs)


def test_vanilla_rnn_step_is_the_textbook_formula():
    xs = jax.random.normal(jax.random.key(0), (1, 4, 3))
    model = RNNStack(hidden=5, activation="sigmoid", num_outputs=None, head="all")
    v = model.init(jax.random.key(1), xs)
    p = v["params"]["cell"]
    h = jnp.zeros(5)
    for t in range(4):
        h = jax.nn.sigmoid(_affine(xs[0, t], p["i"]) + h @ p["h"]["kernel"])
    np.testing.assert_allclose(model.chain(v, xs[0]).final(), h, rtol=1e-6)


def test_bad_configurations_are_named():
    with pytest.raises(ValueError, match="norm must be one of .*got 'group'$"):  # nothing near it
        MLPStack(depth=2, width=4, norm="group")
    with pytest.raises(ValueError, match=r"got 'batchnorm' \(did you mean 'batch'\?\)"):  # the atlas's word
        MLPStack(depth=2, width=4, norm="batchnorm")
    with pytest.raises(ValueError, match="residual must be one of .*got 'dense'"):
        MLPStack(depth=2, width=4, residual="dense")
    with pytest.raises(ValueError, match=r"unknown activation 'tanhh' \(did you mean 'tanh'\?\)"):
        MLPStack(depth=2, width=4, activation="tanhh")
    with pytest.raises(ValueError, match="fixup"):
        MLPStack(depth=2, width=4, residual="fixup", norm="batch")
    with pytest.raises(ValueError, match="MLPStack.depth must be an integer >= 1, got 0"):
        MLPStack(depth=0, width=4)
    with pytest.raises(ValueError, match=r"expects x of shape \(batch, time, features\)"):
        RNNStack(hidden=3).init(jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="head='first'"):
        LSTMStack(hidden=3, head="first")


def test_stack_config_fields_each_mean_one_thing():
    from gradflow import theory
    from gradflow.nn import StackConfig

    x = jnp.ones((2, 400))
    cfg = StackConfig(depth=2, width=400, init="gaussian", gain=2.0, sigma_b=0.5, num_outputs=3)
    p = cfg.build().init(jax.random.key(0), x)["params"]["blocks"]["dense"]
    assert float(jnp.std(p["kernel"])) == pytest.approx(2.0 / np.sqrt(400), rel=0.02)  # gain = sigma_w
    assert float(jnp.std(p["bias"])) == pytest.approx(0.5, rel=0.1)  # sigma_b: the biases' std
    crit = StackConfig(depth=2, width=400, init="critical", sigma_b=0.3, activation="tanh", num_outputs=3)
    k = crit.build().init(jax.random.key(1), x)["params"]["blocks"]["dense"]["kernel"]
    want = float(theory.critical_sigma_w("tanh", sigma_b=0.3))  # the edge of chaos for that sigma_b
    assert float(jnp.std(k)) * np.sqrt(400) == pytest.approx(want, rel=0.02)
    with pytest.raises(ValueError, match="gain does not apply"):
        StackConfig(init="critical", gain=1.5)
    with pytest.raises(ValueError, match="residual must be one of"):  # the module's own check
        StackConfig(residual="dense")
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1"):
        StackConfig(kind="rnn", seq_len=0)
    # the module activations (a learned or random slope) build in the feed-forward stacks only
    for kind in ("mlp", "conv"):
        assert StackConfig(kind=kind, activation="prelu").build().activation == "prelu"
    with pytest.raises(ValueError, match="activation must be one of .*got 'prelu'"):
        StackConfig(kind="rnn", activation="prelu")


def test_integer_fields_refuse_fractions():
    with pytest.raises(ValueError, match="MLPStack.depth must be an integer >= 1, got 2.5"):
        MLPStack(depth=2.5, width=4)
    with pytest.raises(ValueError, match="RNNStack.hidden must be an integer >= 1, got 0"):
        RNNStack(hidden=0)
