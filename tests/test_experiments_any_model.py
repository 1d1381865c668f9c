"""Test-sized runs of the any-model research scripts (users' own architectures), asserting their claims."""

import json

import numpy as np
import pytest


def test_widths_mlp_rank_bounds_and_he_vs_glorot(tmp_path, load_experiment):
    exp = load_experiment("widths_mlp")
    result = exp.run(**exp.QUICK, out=tmp_path, verbose=False)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert (tmp_path / "widths_mlp.png").stat().st_size > 1000
    he, glorot = result["inits"]["he"], result["inits"]["glorot"]
    # 1. every forward row is full rank up to min(widths so far), every backward row up to 10
    assert he["rank_bounds_hold"] and glorot["rank_bounds_hold"]
    assert he["layers"] == ["Dense_0", "Dense_1", "Dense_2"]
    # 2. mean field through changing widths: He keeps the per-unit gain at 2, Glorot loses it
    widths = result["widths"]
    np.testing.assert_allclose(he["predicted_gain"], 2.0)
    shrink = [a / (a + b) for a, b in zip(widths[1:-1], widths[2:])]  # per ReLU layer
    np.testing.assert_allclose(np.diff(np.log(glorot["predicted_gain"])), np.log(shrink), rtol=1e-12)
    assert he["max_rel_error"] < 0.1 and glorot["max_rel_error"] < 0.1  # exact spectra vs theory
    assert result["ratio_max_rel_error"] < 1e-4  # the He / Glorot ratio is exact (homogeneity)
    assert result["he_over_glorot_last"] == pytest.approx(
        he["predicted_gain"][-1] / glorot["predicted_gain"][-1], rel=1e-4
    )


def test_rank_collapse_without_skips_and_spectra_against_float64(tmp_path, load_experiment):
    import jax
    import jax.numpy as jnp

    from gradflow import spectra
    from gradflow.numerics import x64

    exp = load_experiment("rank_collapse")
    q = exp.QUICK
    result = exp.run(**q, out=tmp_path, verbose=False)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    arms = result["arms"]
    assert set(arms) == {"attention", "attention_mlp", "attention_skip", "attention_skip_mlp"}
    # the fit recovers a known doubly exponential fall, res_l = exp(-0.5 * 3^l): a = 3
    fit = exp.doubly_exponential_fit(np.exp(-0.5 * 3.0 ** np.arange(5)))
    assert fit["a"] == pytest.approx(3.0, rel=1e-9) and fit["points"] == 3
    # without skips (with or without MLPs) the tokens collapse doubly exponentially (Dong et al.
    # 2021): res_{l+1} ~ C res_l^a with a well above 1 (their bound: a = 3), down to float64
    # rounding, and the tokens become parallel
    for arm in ("attention", "attention_mlp"):
        r = arms[arm]
        assert r["fit"]["points"] >= 2 and r["fit"]["a"] > 2.0
        assert r["res"][-1] < 1e-14 and r["cosine"][-1] > 0.9999
    assert arms["attention"]["log_tail_over_max"] < -20  # the end-to-end Jacobian has rank <= d left
    # skip connections stop it, with or without MLPs: the tokens stay apart, nothing to fit
    for arm in ("attention_skip", "attention_skip_mlp"):
        r = arms[arm]
        assert min(r["res"]) > 0.2 and r["cosine"][-1] < 0.95 and r["fit"]["a"] is None
    assert arms["attention_skip_mlp"]["log_tail_over_max"] > -5  # and the Jacobian keeps its rank
    x = exp.tokens(q["seq_len"], q["vocab"], q["dim"], 0)
    # the collapsing arm's res(X_l) against the float64 blocks composed by hand, in numpy
    pure = exp.Transformer(q["depth"], q["heads"], q["vocab"], residual=False, mlp=False)
    pure_params = pure.init(jax.random.key(1), x)["params"]
    pure_block = exp.Block(q["heads"], residual=False, mlp=False, parent=None)
    with x64():
        h = jnp.asarray(x, jnp.float64)
        for i in range(q["depth"]):
            p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), pure_params[f"Block_{i}"])
            h = pure_block.apply({"params": p64}, h)
            hn = np.asarray(h[0])
            want = np.linalg.norm(hn - hn.mean(axis=0)) / np.linalg.norm(hn)
            got = arms["attention"]["res"][i]
            assert got == pytest.approx(want, rel=1e-6) if want > 1e-13 else got < 1e-14
    # the exact spectra against float64 jacfwd + SVD of the blocks composed by hand
    got = spectra.SpectraResult.load(tmp_path / "spectra_attention_skip_mlp.npz").log_singular_values
    model = exp.Transformer(q["depth"], q["heads"], q["vocab"])
    params = model.init(jax.random.key(1), x)["params"]
    block = exp.Block(q["heads"], parent=None)
    with x64():
        p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)

        def states(h):  # every block's output, in one program
            out = []
            for i in range(q["depth"]):
                h = block.apply({"params": p64[f"Block_{i}"]}, h)
                out.append(h.ravel())
            return out

        jacs = jax.jit(jax.jacfwd(states))(jnp.asarray(x, jnp.float64))
        for l, jac in enumerate(jacs):
            s = np.linalg.svd(np.asarray(jac).reshape(jac.shape[0], -1), compute_uv=False)
            np.testing.assert_allclose(got[l], np.log(s), atol=2e-3)


def test_resnet_spectra_at_init_and_trained_against_float64(tmp_path, load_experiment):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import serialization

    from gradflow import data, spectra
    from gradflow.numerics import x64

    exp = load_experiment("resnet_spectra")
    q = exp.QUICK
    result = exp.run(**q, out=tmp_path, verbose=False)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    layers = ["Conv_0", "BatchNorm_0", "ResBlock_0", "ResBlock_1", "Dense_0"]
    assert result["init_forward"]["layers"] == layers == result["diagnostic_layers"]
    # trained by the trainer on the same cuts (BatchNorm's statistics updated), well above chance
    assert result["test_accuracy"] > 0.3
    # rank bounds: 64 input pixels forward, 10 classes backward
    assert result["trained_forward"]["rank"] == [64, 64, 64, 64, 10]
    assert result["trained_backward"]["rank"] == [10] * 5
    # the oracle: the layers composed by hand in float64 (running statistics), jacfwd / jacrev + SVD
    ds = data.digits(seed=0)
    x = jnp.asarray(np.asarray(ds.x_test[:1], np.float64).reshape(1, 8, 8, 1))
    model = exp.ResNet(tuple(q["widths"]), q["blocks"])
    template = model.init(jax.random.key(0), x.astype(np.float32))
    variables = serialization.from_bytes(template, (tmp_path / "trained_variables.msgpack").read_bytes())
    with x64():
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        sub = lambda name: {k: v[k][name] for k in v if name in v[k]}  # noqa: E731
        maps = [
            lambda h: nn.Conv(q["widths"][0], (3, 3)).apply(sub("Conv_0"), h),
            lambda h: nn.BatchNorm(use_running_average=True).apply(sub("BatchNorm_0"), h),
            lambda h: exp.ResBlock(q["widths"][0]).apply(sub("ResBlock_0"), jax.nn.relu(h)),
            lambda h: exp.ResBlock(q["widths"][1], strides=2).apply(sub("ResBlock_1"), h),
            lambda h: nn.Dense(10).apply(sub("Dense_0"), h.mean(axis=(1, 2))),
        ]

        def states(h):
            out = []
            for f in maps:
                h = f(h)
                out.append(h)
            return out

        hs = states(x)
        fwd = jax.jit(jax.jacfwd(lambda h: [s.ravel() for s in states(h)]))(x)
        got_f = spectra.SpectraResult.load(tmp_path / "spectra_trained_forward.npz").log_singular_values
        got_b = spectra.SpectraResult.load(tmp_path / "spectra_trained_backward.npz").log_singular_values

        def check(got, s):
            # float32 resolves what lies above its rounding of the largest value; exact zeros of
            # the float64 product (dead units) must come out below that floor too
            resolved = s > 1e-5 * s[0]
            np.testing.assert_allclose(got[: len(s)][resolved], np.log(s[resolved]), atol=2e-3)
            assert np.all(got[: len(s)][~resolved] < np.log(1e-5 * s[0]))

        # dy/dh_l for every l in one program: y with a zero perturbation added to every state
        def y_of(es):
            h = x
            for f, e in zip(maps, es, strict=True):
                h = f(h) + e
            return h.ravel()

        bwd = jax.jit(jax.jacrev(y_of))([jnp.zeros_like(h) for h in hs])
        for l in range(5):
            s = np.linalg.svd(np.asarray(fwd[l]).reshape(fwd[l].shape[0], -1), compute_uv=False)
            check(got_f[l], s[:64])
            check(got_b[l], np.linalg.svd(np.asarray(bwd[l]).reshape(10, -1), compute_uv=False))
