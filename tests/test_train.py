"""gradflow.train: step, diagnostics, non-finite handling, run loop, resume after a kill."""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import initializers as gi
from gradflow.nn import MLPStack
from gradflow.numerics import stable_norm
from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import (
    NONFINITE_KINDS,
    TrainConfig,
    epoch_batches,
    fit,
    init_state,
    make_train_epoch,
    make_train_step,
    run_keys,
    summarize_epoch,
)
from gradflow.train import layout as train_layout


def _classification(seed, n, d=8, c=3):
    """Linearly separable labels: y = argmax(x @ w)."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    return x, jnp.argmax(x @ jax.random.normal(kw, (d, c)), axis=-1)


def _regression(seed, n, d=8):
    """Teacher-student: y = tanh(x @ w)."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    return x, jnp.tanh(x @ jax.random.normal(kw, (d, 1)))[:, 0]


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="task.*classification.*'ranking'"):
        TrainConfig(task="ranking")
    with pytest.raises(ValueError, match="on_nonfinite"):
        TrainConfig(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="batch_size.*0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="diagnostics_every"):
        TrainConfig(diagnostics_every=-1)
    with pytest.raises(ValueError, match="optim"):
        TrainConfig(optim="adam")


def test_loss_decreases_and_second_call_does_not_recompile():
    x, y = _regression(0, 128)
    model = MLPStack(depth=2, width=16, activation="tanh", num_outputs=1)
    cfg = TrainConfig(task="regression", diagnostics_every=0, optim=OptimConfig("adam", 1e-2))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x)
    step = jax.jit(make_train_step(model, tx, cfg))
    losses = []
    for _ in range(80):
        state, metrics = step(state, (x, y))
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    assert int(state.step) == 80
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


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
    x, y = _classification(1, 32)
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


def test_deep_relu_trains_while_deep_sigmoid_stays_at_chance():
    # The classic result (Glorot & Bengio 2010) at test size: 12 blocks, SGD + momentum.
    x, y = _classification(2, 1536, d=16, c=4)
    data = (x[:1024], y[:1024], x[1024:], y[1024:])
    cfg = TrainConfig(epochs=16, batch_size=64, diagnostics_every=16, optim=OptimConfig("momentum", 0.02))
    acc, ratio = {}, {}
    for act, init in [("relu", gi.he_normal()), ("sigmoid", gi.lecun_normal())]:
        model = MLPStack(depth=12, width=24, activation=act, kernel_init=init, num_outputs=4)
        result = fit(model, cfg, data, progress=False)
        acc[act] = result.test["accuracy"]
        g = result.history[0]["grad_norm"]
        ratio[act] = g[0] / g[-1]
    majority = float(jnp.max(jnp.bincount(data[3], length=4))) / data[3].shape[0]  # chance level
    print(f"test accuracy {acc}, chance {majority:.3f}, first/last-block gradient norm {ratio}")
    assert acc["relu"] > 0.75, acc
    assert acc["sigmoid"] < majority + 0.05, (acc, majority)
    assert ratio["sigmoid"] < 1e-4 < 1e-1 < ratio["relu"], ratio


def test_clipping_keeps_an_exploding_net_finite_and_stop_keeps_earlier_records(tmp_path):
    x, y = _regression(3, 256)
    model = MLPStack(depth=4, width=16, activation="tanh", kernel_init=gi.gaussian(3.0), num_outputs=1)
    base = dict(task="regression", epochs=10, batch_size=64, diagnostics_every=0)
    unclipped = TrainConfig(**base, optim=OptimConfig("sgd", 0.5))
    clipped = TrainConfig(**base, optim=OptimConfig("sgd", 0.5, clip="global_norm", clip_value=1.0))
    r = fit(model, unclipped, (x, y, x, y), run_dir=tmp_path / "unclipped")
    assert r.stopped and r.nonfinite is not None
    stop_epoch = r.nonfinite["epoch"]
    assert 1 <= stop_epoch < 9 and len(r.history) == stop_epoch + 1
    assert all(np.isfinite(h["loss"]) for h in r.history[:stop_epoch])
    assert r.nonfinite["kind"] in NONFINITE_KINDS[1:]
    lines = (tmp_path / "unclipped" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == list(range(stop_epoch + 1))
    assert all(
        jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(r.state.params)
    )  # last finite state
    c = fit(model, clipped, (x, y, x, y))
    assert not c.stopped and c.nonfinite is None and len(c.history) == 10
    assert np.isfinite(c.test["loss"]) and c.history[-1]["loss"] < c.history[0]["loss"]


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
    x, y = _classification(4, 128)
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


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_skip_mode_drops_exactly_the_nonfinite_update(optimizer):
    x, y = _classification(5, 96)
    model = MLPStack(depth=3, width=8, activation="relu", num_outputs=3)
    cfg = TrainConfig(diagnostics_every=0, on_nonfinite="skip", optim=OptimConfig(optimizer, 0.01))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x[:32])
    step = jax.jit(make_train_step(model, tx, cfg))
    b0, b1, b2 = [(x[i : i + 32], y[i : i + 32]) for i in (0, 32, 64)]
    bad = (b1[0].at[3, 2].set(jnp.inf), b1[1])
    s, skipped = state, 0
    for batch in (b0, bad, b2):
        s, m = step(s, batch)
        skipped += int(m["skipped"])
        if not bool(m["finite"]):
            assert (
                int(m["nonfinite_layer"]) == 0 and NONFINITE_KINDS[int(m["nonfinite_kind"])] == "activation"
            )
    ref = state
    for batch in (b0, b2):
        ref, _ = step(ref, batch)
    assert skipped == 1 and step._cache_size() == 1
    # Adam's moments and count, too, are those of the two finite steps only
    jax.tree.map(np.testing.assert_array_equal, (s.params, s.opt_state), (ref.params, ref.opt_state))


_CASE = """
import jax, jax.numpy as jnp
from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig
from gradflow.train import TrainConfig

def build():
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (192, 8))
    y = jnp.argmax(x @ jax.random.normal(kw, (8, 3)), axis=-1)
    model = MLPStack(depth=3, width=16, activation="relu", norm="batch", dropout_rate=0.1, num_outputs=3)
    cfg = TrainConfig(epochs=4, batch_size=32, seed=3, diagnostics_every=0, optim=OptimConfig("adam", 3e-3))
    return model, cfg, (x[:160], y[:160], x[160:], y[160:])
"""


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path):
    (tmp_path / "case.py").write_text(_CASE)
    run_dir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from case import build
        from gradflow.train import fit
        model, cfg, data = build()
        def die(epoch, record):
            if epoch == 1:
                os._exit(3)  # killed after epoch 1's checkpoint: no cleanup, no flush
        fit(model, cfg, data, run_dir={str(run_dir)!r}, callback=die)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["0", "1"]

    sys.path.insert(0, str(tmp_path))
    try:
        from case import build
    finally:
        sys.path.remove(str(tmp_path))
    model, cfg, data = build()
    resumed = fit(model, cfg, data, run_dir=run_dir)
    whole = fit(model, cfg, data)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, whole.state.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.batch_stats, whole.state.batch_stats)
    assert int(resumed.state.step) == int(whole.state.step) == 4 * 5
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3]
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 3
    with pytest.raises(ValueError, match="another config"):
        fit(model, TrainConfig(epochs=5), data, run_dir=run_dir)


class _UserCNN(nn.Module):
    """A researcher's own model, written with no gradflow in it: conv, strided conv, dense head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3,), name="conv1")(x))
        x = nn.relu(nn.Conv(6, (3,), strides=2, name="conv2")(x))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def test_diagnostics_of_a_users_linen_model_equal_a_direct_computation():
    x = jax.random.normal(jax.random.key(9), (16, 8, 2))
    y = jax.random.randint(jax.random.key(10), (16,), 0, 3)
    model, lr = _UserCNN(), 0.1
    cfg = TrainConfig(diagnostics_every=1, optim=OptimConfig("sgd", lr))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x)
    step = jax.jit(make_train_step(model, tx, cfg))
    _, m = step(state, (x, y))
    lay = train_layout(model, {"params": state.params}, x)
    assert lay.names == lay.layer_names == ["conv1", "conv2", "head"]
    # no known activation: its statistics are omitted with a reason, not NaN
    assert "preact_var" not in m and "saturated" in dict(lay.omitted)
    p = state.params
    conv1 = lambda h: nn.Conv(4, (3,)).apply({"params": p["conv1"]}, h)  # noqa: E731
    conv2 = lambda h: nn.Conv(6, (3,), strides=2).apply({"params": p["conv2"]}, jax.nn.relu(h))  # noqa: E731
    head = lambda h: nn.Dense(3).apply({"params": p["head"]}, jax.nn.relu(h).reshape(16, -1))  # noqa: E731

    def loss(params, e):
        h1 = nn.Conv(4, (3,)).apply({"params": params["conv1"]}, x) + e[0]
        h2 = nn.Conv(6, (3,), strides=2).apply({"params": params["conv2"]}, jax.nn.relu(h1)) + e[1]
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
    # a NaN planted in conv2 is located there, by name
    bad = {**p, "conv2": {**p["conv2"], "kernel": p["conv2"]["kernel"].at[0, 0, 0].set(jnp.nan)}}
    _, mb = step(state._replace(params=bad), (x, y))
    assert step._cache_size() == 1
    assert (
        lay.names[int(mb["nonfinite_layer"])] == "conv2"
        and NONFINITE_KINDS[int(mb["nonfinite_kind"])] == "param"
    )


def test_epoch_batches_are_a_pure_function_of_key_and_epoch():
    n, bs = 23, 5
    x = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    y = jnp.arange(n, dtype=jnp.int32)
    key = jax.random.key(4)
    xb, yb = epoch_batches(x, y, key, 2, bs)
    assert xb.shape == (4, 5, 3) and yb.shape == (4, 5)  # the remainder is dropped
    seen = np.asarray(yb).ravel()
    assert len(set(seen.tolist())) == 20  # no example twice
    np.testing.assert_array_equal(np.asarray(xb)[..., 0].ravel(), seen)  # x and y stay paired
    np.testing.assert_array_equal(epoch_batches(x, y, key, 2, bs)[1], yb)  # a resumed run: the same epoch
    for k, e in ((key, 3), (jax.random.key(5), 2)):
        assert not np.array_equal(epoch_batches(x, y, k, e, bs)[1], yb)
