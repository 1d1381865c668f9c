"""gradflow.train.diagnostics: per-layer diagnostics against direct computations, NaN/Inf located by layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _datasets import classification

from gradflow import initializers as gi
from gradflow.nn import MLPStack
from gradflow.numerics import stable_norm
from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import (
    NONFINITE_KINDS,
    TrainConfig,
    epoch_batches,
    init_state,
    make_train_epoch,
    make_train_step,
    run_keys,
)
from gradflow.train import layout as train_layout
from gradflow.train.loop import summarize_epoch


def _hand_forward(params, x, deltas, phi, state_deltas=None):
    """The MLPStack forward written out layer by layer, with offsets added to each pre-activation
    (and to each block's output)."""
    h = x @ params["embed"]["kernel"] + params["embed"]["bias"][None, :]
    zs = []
    for l, delta in enumerate(deltas):
        z = h @ params["blocks"]["dense"]["kernel"][l] + params["blocks"]["dense"]["bias"][l][None, :] + delta
        zs.append(z)
        h = phi(z) + (0.0 if state_deltas is None else state_deltas[l])
    return h @ params["head"]["kernel"] + params["head"]["bias"][None, :], zs


def test_diagnostics_equal_a_direct_computation():
    x, y = classification(1, 32)
    depth, width, lr = 3, 8, 0.1
    model = MLPStack(depth=depth, width=width, activation="tanh", kernel_init=gi.gaussian(2.5), num_outputs=3)
    cfg = TrainConfig(diagnostics_every=1, optim=OptimConfig("sgd", lr))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x)
    _, m = jax.jit(make_train_step(model, tx, cfg))(state, (x, y))

    params = state.params

    def loss(params, deltas, state_deltas):
        logits, _ = _hand_forward(params, x, deltas, jnp.tanh, state_deltas)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    deltas = [jnp.zeros((32, width))] * depth
    g, g_deltas, g_states = jax.grad(loss, argnums=(0, 1, 2))(params, deltas, deltas)
    _, zs = _hand_forward(params, x, deltas, jnp.tanh)
    blocks = lambda t, l: [a[l] for a in jax.tree_util.tree_leaves(t["blocks"])]  # noqa: E731
    norm = lambda leaves: float(np.sqrt(sum(float(stable_norm(a)) ** 2 for a in leaves)))  # noqa: E731
    direct = np.array([norm(blocks(g, l)) for l in range(depth)])
    weights = np.array([norm(blocks(params, l)) for l in range(depth)])
    assert m["grad_norm"].shape == (depth,)
    np.testing.assert_allclose(m["grad_norm"], direct, rtol=1e-5)
    np.testing.assert_allclose(m["weight_norm"], weights, rtol=1e-5)
    np.testing.assert_allclose(m["update_ratio"], lr * direct / weights, rtol=1e-5)  # SGD: u = -lr g
    np.testing.assert_allclose(m["preact_grad_norm"], [float(stable_norm(d)) for d in g_deltas], rtol=1e-5)
    np.testing.assert_allclose(m["state_grad_norm"], [float(stable_norm(d)) for d in g_states], rtol=1e-5)
    np.testing.assert_allclose(m["preact_mean"], [float(jnp.mean(z)) for z in zs], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(m["preact_var"], [float(jnp.var(z)) for z in zs], rtol=1e-4)
    sat = [jnp.abs(1 - jnp.tanh(z) ** 2) < 0.01 for z in zs]
    np.testing.assert_allclose(m["saturated"], [float(jnp.mean(s)) for s in sat], atol=1e-6)
    np.testing.assert_allclose(m["dead"], [float(jnp.mean(jnp.all(s, axis=0))) for s in sat], atol=1e-6)
    assert float(m["saturated"][-1]) > 0.1  # sigma_w = 2.5 tanh: deep layers do saturate
    assert bool(m["finite"]) and int(m["nonfinite_layer"]) == -1


def _plant(params, where, value=jnp.nan):
    if where == "embed":
        return {
            **params,
            "embed": {**params["embed"], "kernel": params["embed"]["kernel"].at[0, 0].set(value)},
        }
    if where == "head":
        return {**params, "head": {**params["head"], "bias": params["head"]["bias"].at[0].set(value)}}
    dense = params["blocks"]["dense"]
    kernel = dense["kernel"].at[where - 1, 0, 0].set(value)  # block `where` (1-based)
    return {**params, "blocks": {**params["blocks"], "dense": {**dense, "kernel": kernel}}}


def test_a_nan_planted_in_one_layer_is_located_and_stops_the_run():
    on_nonfinite = "stop"  # skip mode: test_skip_mode_drops_exactly_the_nonfinite_update
    depth = 5
    x, y = classification(4, 128)
    model = MLPStack(depth=depth, width=8, activation="tanh", num_outputs=3)
    cfg = TrainConfig(
        batch_size=32, diagnostics_every=1, on_nonfinite=on_nonfinite, optim=OptimConfig("sgd", 0.1)
    )
    tx = make_optimizer(cfg.optim)
    init_key, data_key = run_keys(0)
    state = init_state(model, tx, init_key, x[:32])
    epoch = jax.jit(make_train_epoch(model, tx, cfg))
    batches = epoch_batches(x, y, data_key, 0, 32)
    state, m0 = epoch(state, batches)  # a clean epoch first: its records stay as they are
    assert bool(jnp.all(m0["finite"])) and bool(jnp.all(m0["active"]))
    for where, layer in [(3, 3), ("embed", 0), ("head", depth + 1)]:
        planted = state._replace(params=_plant(state.params, where))
        out, m = epoch(planted, batches, False)
        s = summarize_epoch(m)
        assert int(m["nonfinite_layer"][0]) == layer, (where, m["nonfinite_layer"])
        assert NONFINITE_KINDS[int(m["nonfinite_kind"][0])] == "param"
        assert int(s["nonfinite_layer"]) == layer and int(s["nonfinite_step"]) == int(planted.step)
        # the update is never applied: the parameters are the planted ones
        jax.tree.map(np.testing.assert_array_equal, out.params, planted.params)
        np.testing.assert_array_equal(m["active"], [True, False, False, False])
        assert bool(s["done"]) and int(s["steps"]) == 1 and int(s["skipped"]) == 1


class _ConvBN(nn.Module):
    """A strided conv and its BatchNorm: one layer of the user's model, with running statistics."""

    @nn.compact
    def __call__(self, h, train: bool = False):
        return nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (3,), strides=2)(h))


class _UserCNN(nn.Module):
    """A researcher's own model, written with no gradflow in it: conv, strided conv + BatchNorm, dense head."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Conv(4, (3,), name="conv1")(x))
        x = nn.relu(_ConvBN(name="conv2")(x, train))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def test_diagnostics_of_a_users_linen_model_equal_a_direct_computation():
    x = jax.random.normal(jax.random.key(9), (16, 8, 2))
    y = jax.random.randint(jax.random.key(10), (16,), 0, 3)
    model, lr = _UserCNN(), 0.1
    cfg = TrainConfig(diagnostics_every=1, optim=OptimConfig("sgd", lr))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x)
    step = jax.jit(make_train_step(model, tx, cfg))
    new_state, m = step(state, (x, y))
    lay = train_layout(model, {"params": state.params, "batch_stats": state.batch_stats}, x)
    assert lay.names == lay.layer_names == ["conv1", "conv2", "head"]
    # no known activation: its statistics are omitted with a reason, not NaN
    assert "preact_var" not in m and "saturated" in dict(lay.omitted)
    p, bs = state.params, state.batch_stats
    conv1 = lambda h: nn.Conv(4, (3,)).apply({"params": p["conv1"]}, h)  # noqa: E731

    def conv2_train(params, h):  # the batch statistics, as the trainer's step uses them
        v = {"params": params, "batch_stats": bs["conv2"]}
        return _ConvBN().apply(v, jax.nn.relu(h), train=True, mutable=["batch_stats"])[0]

    conv2 = lambda h: conv2_train(p["conv2"], h)  # noqa: E731
    head = lambda h: nn.Dense(3).apply({"params": p["head"]}, jax.nn.relu(h).reshape(16, -1))  # noqa: E731

    def loss(params, e):
        h1 = nn.Conv(4, (3,)).apply({"params": params["conv1"]}, x) + e[0]
        h2 = conv2_train(params["conv2"], h1) + e[1]
        logits = nn.Dense(3).apply({"params": params["head"]}, jax.nn.relu(h2).reshape(16, -1)) + e[2]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    h1 = conv1(x)
    h2 = conv2(h1)
    zeros = [jnp.zeros_like(h1), jnp.zeros_like(h2), jnp.zeros_like(head(h2))]
    g, g_states = jax.grad(loss, argnums=(0, 1))(p, zeros)
    norm = lambda t: float(np.sqrt(sum(float(stable_norm(a)) ** 2 for a in jax.tree_util.tree_leaves(t))))  # noqa: E731
    direct = np.array([norm(g[k]) for k in ("conv1", "conv2", "head")])
    np.testing.assert_allclose(m["grad_norm"], direct, rtol=1e-5)
    np.testing.assert_allclose(
        m["update_ratio"], lr * direct / [norm(p[k]) for k in ("conv1", "conv2", "head")], rtol=1e-5
    )
    np.testing.assert_allclose(m["state_grad_norm"], [float(stable_norm(e)) for e in g_states], rtol=1e-5)
    # the BatchNorm's running mean moved by (1 - momentum) of the batch mean (flax's rule)
    z = nn.Conv(6, (3,), strides=2).apply({"params": p["conv2"]["Conv_0"]}, jax.nn.relu(h1))
    np.testing.assert_allclose(
        new_state.batch_stats["conv2"]["BatchNorm_0"]["mean"],
        0.01 * z.mean(axis=(0, 1)),
        rtol=1e-4,
        atol=1e-7,
    )
    # a NaN planted in conv2 is located there, by name
    conv = p["conv2"]["Conv_0"]
    bad = {
        **p,
        "conv2": {**p["conv2"], "Conv_0": {**conv, "kernel": conv["kernel"].at[0, 0, 0].set(jnp.nan)}},
    }
    _, mb = step(state._replace(params=bad), (x, y))
    assert step._cache_size() == 1
    assert (
        lay.names[int(mb["nonfinite_layer"])] == "conv2"
        and NONFINITE_KINDS[int(mb["nonfinite_kind"])] == "param"
    )


def _circular_conv(h_BxNxC, kernel_KxCxO, bias, stride=1):
    """A 1-D circular convolution written with lax (not flax): wrap-pad, then a VALID conv."""
    k = kernel_KxCxO.shape[0]
    h = jnp.pad(h_BxNxC, ((0, 0), ((k - 1) // 2, k // 2), (0, 0)), mode="wrap")
    out = jax.lax.conv_general_dilated(
        h, kernel_KxCxO, (stride,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
    )
    return out + bias[None, None, :]


def _hand_conv_forward(params, x, deltas, phi, depth):
    """ConvStack(channels=(3, 5), add_channel=True) written out: embed, stage1, down2, stage2, pool, head;
    deltas[l] is added to layer l's pre-activation and its output (the two perturbations)."""
    h = _circular_conv(x[..., None], params["embed"]["kernel"], params["embed"]["bias"])
    zs, l = [], 0
    for name in ("stage1", "down2", "stage2"):
        p = params[name]["conv"]
        for i in range(1 if name == "down2" else depth):
            kernel, b = (p["kernel"], p["bias"]) if name == "down2" else (p["kernel"][i], p["bias"][i])
            z = _circular_conv(h, kernel, b, stride=2 if name == "down2" else 1) + deltas[l][0]
            zs.append(z)
            h, l = phi(z) + deltas[l][1], l + 1
    return jnp.mean(h, axis=1) @ params["head"]["kernel"] + params["head"]["bias"][None, :], zs


def test_conv_stack_diagnostics_cover_every_stage_and_equal_a_direct_computation():
    """Per-layer diagnostics of a two-stage ConvStack (its down block included) against the
    stack written out with lax convolutions; a NaN planted in the down block is located there."""
    from gradflow.nn import ConvStack

    x, y = classification(2, 16)
    depth = 2
    model = ConvStack(
        depth=depth, channels=(3, 5), kernel_size=3, spatial_dims=1, add_channel=True,
        kernel_init=gi.gaussian(2.0), num_outputs=3,
    )  # fmt: skip
    cfg = TrainConfig(diagnostics_every=1, optim=OptimConfig("sgd", 0.1))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x)
    lay = train_layout(model, state.params, x)
    assert lay.layer_names == ["stage1[1]", "stage1[2]", "down2", "stage2[1]", "stage2[2]"]
    step = jax.jit(make_train_step(model, tx, cfg))  # one compile: the planted step reuses it
    _, m = step(state, (x, y))

    shapes = [(16, 8, 3)] * depth + [(16, 4, 5)] * (depth + 1)
    deltas = [(jnp.zeros(s), jnp.zeros(s)) for s in shapes]

    def loss(params, deltas):
        logits, _ = _hand_conv_forward(params, x, deltas, jnp.tanh, depth)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    g, g_deltas = jax.grad(loss, argnums=(0, 1))(state.params, deltas)
    _, zs = _hand_conv_forward(state.params, x, deltas, jnp.tanh, depth)
    norm = lambda leaves: float(np.sqrt(sum(float(stable_norm(a)) ** 2 for a in leaves)))  # noqa: E731

    def layer(tree, name, i):
        leaves = jax.tree_util.tree_leaves(tree[name])
        return leaves if name == "down2" else [a[i] for a in leaves]

    rows = [("stage1", i) for i in range(depth)] + [("down2", 0)] + [("stage2", i) for i in range(depth)]
    np.testing.assert_allclose(m["grad_norm"], [norm(layer(g, n, i)) for n, i in rows], rtol=1e-5)
    np.testing.assert_allclose(m["preact_grad_norm"], [float(stable_norm(d[0])) for d in g_deltas], rtol=1e-5)
    np.testing.assert_allclose(m["state_grad_norm"], [float(stable_norm(d[1])) for d in g_deltas], rtol=1e-5)
    np.testing.assert_allclose(m["preact_var"], [float(jnp.var(z)) for z in zs], rtol=1e-4)
    sat = [(jnp.abs(1 - jnp.tanh(z) ** 2) < 0.01).reshape(-1, z.shape[-1]) for z in zs]
    np.testing.assert_allclose(m["saturated"], [float(jnp.mean(s)) for s in sat], atol=1e-6)
    np.testing.assert_allclose(m["dead"], [float(jnp.mean(jnp.all(s, axis=0))) for s in sat], atol=1e-6)

    down = state.params["down2"]["conv"]
    planted = {**state.params, "down2": {"conv": {**down, "kernel": down["kernel"].at[0, 0, 0].set(jnp.nan)}}}
    _, m = step(state._replace(params=planted), (x, y))
    assert lay.names[int(m["nonfinite_layer"])] == "down2"
    assert NONFINITE_KINDS[int(m["nonfinite_kind"])] == "param"
