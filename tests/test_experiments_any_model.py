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


def test_rank_collapse_without_residuals_and_spectra_against_float64(tmp_path, load_experiment):
    import jax
    import jax.numpy as jnp

    from gradflow import spectra
    from gradflow.numerics import x64

    exp = load_experiment("rank_collapse")
    q = exp.QUICK
    result = exp.run(**q, out=tmp_path, verbose=False)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    res, pure = result["arms"]["residual"], result["arms"]["no_residual"]
    # pure attention: doubly exponential collapse to one token (Dong et al. 2021); res(X) falls
    # faster than geometrically and the tokens become parallel
    r = np.asarray(pure["res"])
    assert r[-1] < 1e-6 * r[0] and r[2] / r[1] < r[1] / r[0]
    assert pure["cosine"][-1] > 0.9999
    assert pure["log_tail_over_max"] < -20  # the end-to-end Jacobian has rank <= d left
    # with residuals (and MLPs) the tokens stay apart and the Jacobian keeps its rank
    assert min(res["res"]) > 0.2 and res["cosine"][-1] < 0.95 and res["log_tail_over_max"] > -5
    # the exact spectra against float64 jacfwd + SVD of the blocks composed by hand
    got = spectra.SpectraResult.load(tmp_path / "spectra_residual.npz").log_singular_values
    x = exp.tokens(q["seq_len"], q["vocab"], q["dim"], 0)
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
