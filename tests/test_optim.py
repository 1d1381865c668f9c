"""Tests for gradflow.optim: each chain against optax's reference or a closed-form step."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradflow import optim
from gradflow.optim import OptimConfig, make_optimizer, make_schedule

LR = 0.1
TOL = dict(rtol=1e-5, atol=1e-6)


def _params(key, scale=1.0):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {
        "dense": {
            "kernel": scale * jax.random.normal(k1, (4, 3)),
            "bias": scale * jax.random.normal(k2, (3,)),
        },
        "norm": {"scale": 1.0 + 0.1 * jax.random.normal(k3, (3,)), "offset": jnp.zeros(3)},
        "conv": {"kernel": scale * jax.random.normal(k4, (2, 2, 3))},
    }


def _grads(key, params, scale=1.0):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _run(tx, params, grads_seq):
    """jit(update) over a sequence of gradients; returns the final params and state."""
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in grads_seq:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _one_step(cfg, params, grads):
    return _run(make_optimizer(cfg), params, [grads])[0]


def _assert_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **(tol or TOL)), a, b)


def _kernels(tree):
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


def _is_kernel(path):
    return path[-1].key == "kernel"


# --- optimizers against optax ---------------------------------------------------------

REFERENCES = {
    "sgd": lambda: optax.sgd(LR),
    "momentum": lambda: optax.sgd(LR, momentum=0.8),
    "nesterov": lambda: optax.sgd(LR, momentum=0.8, nesterov=True),
    "adam": lambda: optax.adam(LR, b1=0.8, b2=0.95, eps=1e-6),
    "adamw": lambda: optax.adamw(
        LR,
        b1=0.8,
        b2=0.95,
        eps=1e-6,
        weight_decay=0.05,
        mask=_kernels,
    ),
    "rmsprop": lambda: optax.rmsprop(LR, decay=0.7, eps=1e-6),
}


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_optimizer_matches_optax_reference(name, key):
    cfg = OptimConfig(
        name,
        LR,
        momentum=0.8,
        b1=0.8,
        b2=0.95,
        eps=1e-6,
        rms_decay=0.7,
        weight_decay=0.05 if name == "adamw" else 0.0,
    )
    params = _params(key)
    grads_seq = [_grads(k, params) for k in jax.random.split(jax.random.key(1), 4)]
    got, _ = _run(make_optimizer(cfg), params, grads_seq)
    want, _ = _run(REFERENCES[name](), params, grads_seq)
    _assert_close(got, want)


def test_sgd_step_is_minus_lr_grad(key):
    params = _params(key)
    g = _grads(jax.random.key(1), params)
    got = _one_step(OptimConfig("sgd", LR), params, g)
    _assert_close(got, jax.tree.map(lambda w, gi: w - LR * gi, params, g))


# --- clipping ----------------------------------------------------------------------------


def test_global_norm_clip_bounds_update(key):
    params = _params(key)
    g = _grads(jax.random.key(1), params, scale=100.0)
    tx = make_optimizer(OptimConfig("sgd", 1.0, clip="global_norm", clip_value=2.5))
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    assert float(optax.tree.norm(g)) > 2.5
    assert float(optax.tree.norm(u)) <= 2.5 * (1 + 1e-5)
    np.testing.assert_allclose(float(optax.tree.norm(u)), 2.5, rtol=1e-5)


def test_value_clip_bounds_each_element(key):
    params = _params(key)
    g = _grads(jax.random.key(1), params, scale=100.0)
    tx = make_optimizer(OptimConfig("sgd", 1.0, clip="value", clip_value=0.3))
    u, _ = jax.jit(tx.update)(g, tx.init(params), params)
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u)) <= np.float32(0.3)
    _assert_close(u, jax.tree.map(lambda x: -jnp.clip(x, -0.3, 0.3), g))


def test_adaptive_clip_bounds_unitwise_ratio(key):
    clip = 0.05
    w = {"kernel": jax.random.normal(key, (8, 5)), "bias": jnp.array([1.0, -2.0, 0.5])}
    g = {"kernel": 100.0 * jax.random.normal(jax.random.key(1), (8, 5)), "bias": jnp.array([1e-4, 0.0, 0.0])}
    g["kernel"] = g["kernel"].at[:, 0].set(1e-4)  # a unit far below the bound is left alone
    tx = make_optimizer(OptimConfig("sgd", 1.0, clip="adaptive", clip_value=clip))
    u, _ = jax.jit(tx.update)(g, tx.init(w), w)
    # Dense kernel (fan_in, fan_out): a unit is an output column, its norm over axis 0.
    ratio = jnp.linalg.norm(u["kernel"], axis=0) / jnp.linalg.norm(w["kernel"], axis=0)
    assert float(jnp.max(ratio)) <= clip * (1 + 1e-5)
    np.testing.assert_allclose(ratio[1:], clip, rtol=1e-5)  # the big units are clipped to the bound
    np.testing.assert_allclose(u["kernel"][:, 0], -g["kernel"][:, 0], rtol=1e-6)
    np.testing.assert_allclose(u["bias"], -g["bias"], rtol=1e-6)  # the bias vector is one unit


# --- weight decay and regularizers --------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_decoupled_weight_decay_one_step(name, key):
    wd, eps = 0.3, 1e-8
    params = _params(key)
    g = _grads(jax.random.key(1), params)
    got = _one_step(OptimConfig(name, LR, weight_decay=wd, eps=eps), params, g)

    def want(path, w, gi):
        # Adam's first step is m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps).
        direction = gi if name == "sgd" else gi / (jnp.abs(gi) + eps)
        return w - LR * (direction + (wd * w if w.ndim >= 2 else 0.0))

    _assert_close(got, jax.tree_util.tree_map_with_path(want, params, g))


def test_coupled_l2_sgd_is_gradient_of_penalized_loss(key):
    l2 = 0.7
    params = _params(key)
    target = _grads(jax.random.key(1), params)

    def loss(p):
        return sum(
            jnp.sum((w - t) ** 3) for w, t in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True)
        )

    def penalized(p):
        return loss(p) + l2 / 2 * sum(jnp.sum(w**2) for w in jax.tree.leaves(p))

    g = jax.grad(loss)(params)
    got = _one_step(OptimConfig("sgd", LR, l2=l2, decay_mask="all"), params, g)
    _assert_close(got, jax.tree.map(lambda w, gp: w - LR * gp, params, jax.grad(penalized)(params)))


def test_coupled_l2_enters_momentum(key):
    """With momentum, coupled L2 = plain momentum SGD on the gradients of the penalized loss."""
    l2 = 0.5
    params = _params(key)
    grads_seq = [_grads(k, params) for k in jax.random.split(jax.random.key(1), 3)]
    cfg = OptimConfig("momentum", LR, momentum=0.9, l2=l2, decay_mask="all")
    tx, ref = make_optimizer(cfg), optax.sgd(LR, momentum=0.9)

    @jax.jit
    def both(g, p_got, s_got, p_ref, s_ref):
        u, s_got = tx.update(g, s_got, p_got)
        g_penalized = jax.tree.map(lambda gi, w: gi + l2 * w, g, p_ref)
        v, s_ref = ref.update(g_penalized, s_ref, p_ref)
        return optax.apply_updates(p_got, u), s_got, optax.apply_updates(p_ref, v), s_ref

    carry = (params, tx.init(params), params, ref.init(params))
    for g in grads_seq:
        carry = both(g, *carry)
    _assert_close(carry[0], carry[2])


def test_l1_subgradient_formula(key):
    l1 = 0.2
    params = _params(key)
    params["dense"]["kernel"] = params["dense"]["kernel"].at[0, 0].set(0.0)  # sign(0) = 0
    g = _grads(jax.random.key(1), params)
    got = _one_step(OptimConfig("sgd", LR, l1=l1, decay_mask="all"), params, g)
    _assert_close(got, jax.tree.map(lambda w, gi: w - LR * (gi + l1 * jnp.sign(w)), params, g))


def test_l1_proximal_soft_thresholds(key):
    l1 = 5.0  # threshold LR * l1 = 0.5
    params = _params(key)
    g = _grads(jax.random.key(1), params)
    got = _one_step(OptimConfig("sgd", LR, l1=l1, l1_mode="proximal", decay_mask="all"), params, g)

    def soft(w, gi):
        z = w - LR * gi
        return jnp.sign(z) * jnp.maximum(jnp.abs(z) - LR * l1, 0.0)

    want = jax.tree.map(soft, params, g)
    _assert_close(got, want)
    kernel = got["dense"]["kernel"]
    assert int(jnp.sum(kernel == 0.0)) == int(jnp.sum(want["dense"]["kernel"] == 0.0)) > 0  # exact zeros


def test_l1_proximal_uses_scheduled_lr(key):
    l1, decay = 1.0, 0.5
    cfg = OptimConfig("sgd", LR, l1=l1, l1_mode="proximal", schedule="exponential", decay_rate=decay)
    w = {"kernel": jnp.full((2, 2), 1.0)}
    zero = {"kernel": jnp.zeros((2, 2))}
    got, _ = _run(make_optimizer(cfg), w, [zero, zero, zero])
    shrink = LR * l1 * (1 + decay + decay**2)
    np.testing.assert_allclose(got["kernel"], 1.0 - shrink, rtol=1e-6)


@pytest.mark.parametrize(
    "reg", [dict(weight_decay=0.5), dict(l2=0.5), dict(l1=0.5), dict(l1=0.5, l1_mode="proximal")]
)
def test_default_mask_spares_biases_and_norm_params(reg, key):
    params = _params(key)
    zero = jax.tree.map(jnp.zeros_like, params)
    got = _one_step(OptimConfig("momentum", LR, **reg), params, zero)

    def check(path, w0, w1):
        if w0.ndim >= 2:
            assert float(jnp.max(jnp.abs(w1 - w0))) > 1e-3, path
        else:
            np.testing.assert_array_equal(w1, w0)

    jax.tree_util.tree_map_with_path(check, params, got)


def test_decay_mask_all_and_callable(key):
    params = _params(key)
    zero = jax.tree.map(jnp.zeros_like, params)
    everything = _one_step(OptimConfig("sgd", LR, weight_decay=0.5, decay_mask="all"), params, zero)
    _assert_close(everything, jax.tree.map(lambda w: (1 - LR * 0.5) * w, params))

    def only_dense_kernel(tree):
        return jax.tree_util.tree_map_with_path(lambda p, _: p[0].key == "dense" and _is_kernel(p), tree)

    picked = _one_step(OptimConfig("sgd", LR, weight_decay=0.5, decay_mask=only_dense_kernel), params, zero)
    _assert_close(picked["dense"]["kernel"], (1 - LR * 0.5) * params["dense"]["kernel"])
    _assert_close(picked["conv"], params["conv"])


def test_schedule_values():
    steps = jnp.array([0, 1, 5, 10, 15, 20, 30])
    t = np.asarray(steps, np.float64)

    def values(**kw):
        return np.asarray(jax.jit(jax.vmap(make_schedule(OptimConfig("sgd", 0.5, **kw))))(steps))

    np.testing.assert_allclose(values(), 0.5 * np.ones_like(t))
    cosine = 0.5 * 0.5 * (1 + np.cos(np.pi * np.minimum(t, 20) / 20))
    np.testing.assert_allclose(values(schedule="cosine", total_steps=20), cosine, atol=1e-7)
    warm, total = 5, 20
    after = np.minimum(t - warm, total - warm) / (total - warm)
    want = np.where(t < warm, 0.5 * t / warm, 0.5 * 0.5 * (1 + np.cos(np.pi * after)))
    got = values(schedule="warmup_cosine", warmup_steps=warm, total_steps=total)
    np.testing.assert_allclose(got, want, atol=1e-7)
    np.testing.assert_allclose(values(schedule="exponential", decay_rate=0.9), 0.5 * 0.9**t, rtol=1e-5)


def test_schedule_drives_the_step(key):
    cfg = OptimConfig("sgd", LR, schedule="warmup_cosine", warmup_steps=2, total_steps=6)
    w = {"kernel": jnp.zeros((2, 2))}
    one = {"kernel": jnp.ones((2, 2))}
    got, _ = _run(make_optimizer(cfg), w, [one] * 4)
    sched = make_schedule(cfg)
    np.testing.assert_allclose(got["kernel"], -sum(float(sched(t)) for t in range(4)), rtol=1e-6)


# --- config validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, kw",
    [
        ("optimizer", dict(optimizer="lbfgs")),
        ("lr", dict(lr=0.0)),
        ("lr", dict(lr=math.nan)),
        ("momentum", dict(momentum=1.0)),
        ("b1", dict(b1=-0.1)),
        ("b2", dict(b2=1.5)),
        ("eps", dict(eps=0.0)),
        ("rms_decay", dict(rms_decay=1.0)),
        ("clip", dict(clip="norm")),
        ("clip_value", dict(clip="value", clip_value=0.0)),
        ("weight_decay", dict(weight_decay=-1e-4)),
        ("l2", dict(l2=-1.0)),
        ("l1", dict(l1=math.inf)),
        ("l1_mode", dict(l1_mode="ista")),
        ("decay_mask", dict(decay_mask="biases")),
        ("schedule", dict(schedule="linear")),
        ("total_steps", dict(schedule="cosine")),
        ("warmup_steps", dict(schedule="warmup_cosine", total_steps=10)),
        ("total_steps", dict(schedule="warmup_cosine", warmup_steps=10, total_steps=10)),
        ("warmup_steps", dict(warmup_steps=3)),
        ("decay_rate", dict(schedule="exponential", decay_rate=0.0)),
        ("decay_rate", dict(decay_rate=1.5)),
    ],
)
def test_bad_config_raises_naming_the_field(field, kw):
    base = dict(optimizer="sgd", lr=0.1)
    with pytest.raises(ValueError, match=rf"OptimConfig\.{field} must be"):
        OptimConfig(**{**base, **kw})


def test_config_is_frozen_and_hashable():
    cfg = OptimConfig("adam", 1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert hash(cfg) == hash(OptimConfig("adam", 1e-3))


# --- jit and vmap -------------------------------------------------------------------------


def test_jitted_update_does_not_recompile(key):
    cfg = OptimConfig("adamw", LR, clip="global_norm", weight_decay=0.1, l1=0.01, l1_mode="proximal")
    tx = make_optimizer(cfg)
    traces = []

    @jax.jit
    def step(g, s, p):
        traces.append(None)  # a Python side effect: runs once per trace
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    params = _params(key)
    state = tx.init(params)
    for k in jax.random.split(jax.random.key(1), 3):
        params, state = step(_grads(k, params), state, params)
    assert len(traces) == 1
    assert step._cache_size() == 1


def test_vmap_over_learning_rates_matches_separate_runs(key):
    cfg = OptimConfig(
        "adam",
        1.0,  # overridden by lr=
        schedule="warmup_cosine",
        warmup_steps=1,
        total_steps=5,
        weight_decay=0.1,
        l1=0.05,
        l1_mode="proximal",
    )
    params = _params(key)
    grads_seq = [_grads(k, params) for k in jax.random.split(jax.random.key(1), 3)]
    lrs = jnp.array([1e-3, 1e-2, 1e-1, 3e-1])

    def run(lr):
        tx = make_optimizer(cfg, lr=lr)
        p, s = params, tx.init(params)
        for g in grads_seq:
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p

    swept = jax.jit(jax.vmap(run))(lrs)
    for i, lr in enumerate(lrs.tolist()):
        alone, _ = _run(make_optimizer(dataclasses.replace(cfg, lr=lr)), params, grads_seq)
        _assert_close(jax.tree.map(lambda x, i=i: x[i], swept), alone)


def test_vmap_over_clip_thresholds_matches_separate_configs(key):
    # one builder: a traced clip_value clips exactly like the config's own threshold
    cfg = OptimConfig("sgd", 1.0, clip="global_norm", clip_value=1.0)
    params = _params(key)
    g = _grads(jax.random.key(1), params, scale=100.0)
    values = jnp.array([0.5, 2.5])

    def step(v, grads):
        tx = make_optimizer(cfg, clip_value=v)
        return tx.update(grads, tx.init(params), params)[0]

    swept = jax.jit(jax.vmap(step, in_axes=(0, None)))(values, g)
    for i, v in enumerate(values.tolist()):
        tx = make_optimizer(dataclasses.replace(cfg, clip_value=v))
        _assert_close(jax.tree.map(lambda x, i=i: x[i], swept), tx.update(g, tx.init(params), params)[0])
        np.testing.assert_allclose(
            float(optax.tree.norm(jax.tree.map(lambda x, i=i: x[i], swept))), v, rtol=1e-5
        )
