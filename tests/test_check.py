import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import check
from gradflow.check import compare_gradients, gradient_errors


def _mlp(seed=0):
    rng = np.random.default_rng(seed)  # numpy draws: no compilation
    x = jnp.asarray(rng.standard_normal((8, 5)), jnp.float32)
    params = {
        "w1": jnp.asarray(rng.standard_normal((5, 6)) / np.sqrt(5.0), jnp.float32),
        "b1": jnp.asarray(0.1 * rng.standard_normal(6), jnp.float32),
        "w2": jnp.asarray(rng.standard_normal((6, 2)) / np.sqrt(6.0), jnp.float32),
    }

    def loss(p):
        h = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return jnp.mean((h @ p["w2"] - 1.0) ** 2)

    return loss, params


def test_correct_gradients_pass_and_a_planted_error_is_flagged_in_its_leaf_only():
    loss, params = _mlp()
    grads = jax.grad(loss)(params)
    good = compare_gradients(loss, params, grads)
    assert good.passed and good.failed == ()
    assert all(leaf.rel_error < 1e-6 for leaf in good.leaves)

    planted = dict(grads, b1=grads["b1"].at[3].multiply(-1.0))  # one sign flipped in one entry
    bad = compare_gradients(loss, params, planted)
    assert not bad.passed
    assert bad.failed == ("b1",)
    assert bad["b1"].rel_error > 1e-2 and bad["w1"].passed and bad["w2"].passed
    assert "FAIL" in str(bad) and "PASS" in str(good) and "b1" in str(bad)
    json.dumps(bad.to_dict())  # serialisable


def test_relative_errors_equal_hand_computed_values():
    # loss = 3 a0 + 4 a1 + 0 * sum(z): g_auto = {a: [3, 4] (norm 5), z: [0, 0]}
    loss = lambda p: 3.0 * p["a"][0] + 4.0 * p["a"][1] + 0.0 * jnp.sum(p["z"])
    params = {"a": jnp.array([1.0, 2.0]), "z": jnp.array([1.0, -1.0])}
    zeros = jnp.zeros(2)
    cases = [
        (jnp.array([3.0, 4.0]), 0.0),  # exact
        (jnp.array([0.0, 4.0]), 3.0 / 5.0),  # ||(-3, 0)|| / max(5, 4)
        (jnp.array([6.0, 8.0]), 5.0 / 10.0),  # ||(3, 4)|| / max(5, 10)
        (jnp.array([-3.0, -4.0]), 2.0),  # flipped sign: 10 / 5
        (zeros, 1.0),  # forgotten leaf: 5 / 5
    ]
    for g_a, expected in cases:
        res = compare_gradients(loss, params, {"a": g_a, "z": zeros}, fd_check=False)
        assert res["a"].rel_error == pytest.approx(expected, rel=1e-6, abs=1e-7)
        assert res["a"].auto_norm == pytest.approx(5.0)
        assert res["z"].rel_error == 0.0 and res["z"].passed  # 0 / max(0, 0, tiny)
        assert res["a"].passed == (expected <= 1e-4)
    assert compare_gradients(loss, params, {"a": jnp.array([0.0, 4.0]), "z": zeros}, rtol=0.7).passed


def test_tiny_gradients_do_not_underflow():
    # gradients ~1e-30: squaring them underflows in float32, stable_norm does not
    loss = lambda p: 1e-30 * jnp.sum(p["w"])
    params = {"w": jnp.ones(4)}
    res = compare_gradients(loss, params, {"w": jnp.full(4, 1.1e-30)}, fd_check=False)
    assert res["w"].rel_error == pytest.approx(0.1 / 1.1, rel=1e-4)


def test_finite_differences_agree_with_autodiff_in_float64():
    loss, params = _mlp()
    res = compare_gradients(loss, params, jax.grad(loss)(params))  # 50 parameters: fd runs
    assert res.fd_rtol is not None
    for leaf in res.leaves:
        assert leaf.fd_passed and leaf.fd_rel_error < 1e-7, leaf
    assert compare_gradients(loss, params, jax.grad(loss)(params), fd_check=False).fd_errors is None


def test_finite_differences_run_automatically_only_for_small_problems():
    loss = lambda p: jnp.sum(p["w"] ** 2)
    big = {"w": jnp.ones(check.FD_AUTO_MAX_PARAMS + 1)}
    assert compare_gradients(loss, big, {"w": 2 * big["w"]}).fd_rtol is None
    forced = compare_gradients(loss, big, {"w": 2 * big["w"]}, fd_check=True)
    assert forced.passed and forced["w"].fd_rel_error < 1e-7


def test_finite_differences_catch_a_loss_autodiff_cannot_see_through():
    # stop_gradient hides half of the loss from jax.grad; finite differences see all of it
    loss = lambda p: jnp.sum(p["w"] ** 2) + jax.lax.stop_gradient(jnp.sum(p["w"] ** 2))
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    res = compare_gradients(loss, params, jax.grad(loss)(params))
    assert res["w"].passed and not res["w"].fd_passed and not res.passed
    assert res["w"].fd_rel_error == pytest.approx(0.5, rel=1e-6)  # ||2w - 4w|| / ||4w||


def test_structure_mismatch_raises_naming_the_leaf():
    loss, params = _mlp()
    grads = jax.grad(loss)(params)
    with pytest.raises(ValueError, match="'w2'"):
        compare_gradients(loss, params, {"w1": grads["w1"], "b1": grads["b1"]})
    with pytest.raises(ValueError, match="'extra'"):
        compare_gradients(loss, params, dict(grads, extra=grads["b1"]))
    with pytest.raises(ValueError, match=r"'b1'.*\(1, 6\).*\(6,\)"):
        compare_gradients(loss, params, dict(grads, b1=grads["b1"][None, :]))
    nested = {"layer1": {"kernel": jnp.ones((2, 3))}}
    with pytest.raises(ValueError, match=r"\['layer1'\]\['kernel'\]"):
        gradient_errors(lambda p: jnp.sum(p["layer1"]["kernel"]), nested, {"layer1": {"kernel": jnp.ones(3)}})
    with pytest.raises(ValueError, match="floating"):
        compare_gradients(lambda p: 0.0, {"n": jnp.arange(3)}, {"n": jnp.arange(3)})


def test_gradient_errors_is_jittable_and_matches_compare_gradients():
    loss, params = _mlp()
    grads = jax.grad(loss)(params)
    grads = dict(grads, w2=1.5 * grads["w2"])

    jitted = jax.jit(lambda p, g: gradient_errors(loss, p, g))
    errs = jitted(params, grads)
    assert jax.tree.structure(errs) == jax.tree.structure(params)
    assert float(errs["w2"]) == pytest.approx(0.5 / 1.5, rel=1e-5)
    assert float(errs["w1"]) < 1e-6
    res = compare_gradients(loss, params, grads, fd_check=False)
    for name, e in res.errors.items():
        assert float(errs[name]) == pytest.approx(e, rel=1e-5, abs=1e-7)
    # jit traces it with abstract values: the structure check still fires at trace time
    with pytest.raises(ValueError, match="'w2'"):
        jitted(params, dict(grads, w2=grads["w2"].T))
    # and it vmaps over a batch of parameter sets
    batch = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), params)
    batched = jax.vmap(lambda p: gradient_errors(loss, p, jax.grad(loss)(p)))(batch)
    assert np.all(np.asarray(batched["w1"]) < 1e-6)


def test_bad_arguments():
    loss = lambda p: jnp.sum(p**2)
    with pytest.raises(ValueError, match="rtol"):
        compare_gradients(loss, jnp.ones(2), jnp.ones(2), rtol=-1.0)
    with pytest.raises(ValueError, match="fd_eps"):
        compare_gradients(loss, jnp.ones(2), jnp.ones(2), fd_eps=0.0)
    res = compare_gradients(loss, jnp.ones(2), 2 * jnp.ones(2))  # a bare array: leaf "params"
    assert res.passed and res.errors == {"params": 0.0}
    with pytest.raises(KeyError, match="params"):
        res["nope"]
