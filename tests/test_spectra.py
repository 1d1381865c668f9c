import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from gradflow import initializers, spectra
from gradflow.nn import GRUStack, LSTMStack, MLPStack, RNNStack
from gradflow.numerics import x64


def linear_step(a, h):
    return a @ h


def _gaussian_factors(key, depth, n, scale=1.0):
    return scale * jax.random.normal(key, (depth, n, n)) / np.sqrt(n)


def _mp_log_svals(mats, depths, dps=80):
    """Exact log singular values of the products of float32 matrices, in mpmath."""
    mpmath.mp.dps = dps
    n = mats.shape[1]
    prod = mpmath.eye(n)
    out = {}
    for l, a in enumerate(np.asarray(mats, np.float64), start=1):
        prod = mpmath.matrix(a.tolist()) * prod
        if l in depths:
            s = mpmath.svd_r(prod, compute_uv=False)
            out[l] = np.array(sorted((float(mpmath.log(x)) for x in s), reverse=True))
    return out


def _walk(c):
    """A one-segment chain as (step(params_l, h), stacked params, h0)."""
    (seg,) = c.segments
    return (lambda p, h: seg.step(seg.shared, p, h)), seg.params, c.h0


def _layer_jacobians(step, params, h0):
    """The per-layer Jacobians exactly as the engine sees them: float32, at the float32 walk's states."""
    shape = np.shape(h0)
    f = lambda p, v: step(p, v.reshape(shape)).reshape(-1)
    depth = jax.tree_util.tree_leaves(params)[0].shape[0]
    h, mats = jnp.asarray(h0).reshape(-1), []
    for l in range(depth):
        p = jax.tree_util.tree_map(lambda a, l=l: a[l], params)
        mats.append(np.asarray(jax.jacfwd(lambda v, p=p: f(p, v))(h), np.float64))
        h = f(p, h)
    return np.stack(mats)


def _product_log_svals(mats, direction="forward"):
    """float64 products of given factors and their log singular values (use with _reliable)."""
    n, depth = mats.shape[1], mats.shape[0]
    logs = []
    for l in range(1, depth + 1):
        m = np.eye(n)
        for a in mats[:l] if direction == "forward" else mats[l:]:
            m = a @ m
        with np.errstate(divide="ignore"):
            logs.append(np.log(np.linalg.svd(m, compute_uv=False)))
    return np.array(logs)


def _float64_products(step, params, h0, direction="forward"):
    """Brute force: jacfwd per layer in float64, products and SVD (only where float64 is reliable)."""
    with x64():
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), params)
        h = jnp.asarray(np.asarray(h0), jnp.float64).reshape(-1)
        shape = np.shape(h0)
        f = lambda p, v: step(p, v.reshape(shape)).reshape(-1)
        depth = jax.tree_util.tree_leaves(params)[0].shape[0]
        mats = []
        for l in range(depth):
            p = jax.tree_util.tree_map(lambda a, l=l: a[l], params)
            mats.append(np.asarray(jax.jacfwd(lambda v, p=p: f(p, v))(h)))
            h = f(p, h)
    n = mats[0].shape[0]
    logs = []
    for l in range(1, depth + 1):
        if direction == "forward":
            m = np.eye(n)
            for a in mats[:l]:
                m = a @ m
        else:
            m = np.eye(n)
            for a in mats[l:]:
                m = a @ m
        logs.append(np.log(np.linalg.svd(m, compute_uv=False)))
    return np.array(logs), mats


def _reliable(ref):
    """Where the float64 product's SVD is itself reliable: relative error ~ eps64 * smax / s < 2e-5."""
    return ref > ref[:, :1] - 25.0


def test_matches_float64_on_a_tanh_net_forward_and_backward():
    depth, n = 12, 16
    w = _gaussian_factors(jax.random.key(0), depth, n, 1.3)
    step = lambda w, h: jnp.tanh(w @ h)
    h0 = jax.random.normal(jax.random.key(1), (n,))
    for direction in ("forward", "backward"):
        ref, _ = _float64_products(step, w, h0, direction)
        res = spectra.jacobian_spectra(step, w, h0, direction=direction)
        np.testing.assert_array_equal(res.depths, np.arange(1, depth + 1))
        assert res.log_singular_values.shape == (depth, n)
        ok = _reliable(ref)
        assert ok.mean() > 0.8
        np.testing.assert_allclose(res.log_singular_values[ok], ref[ok], atol=2e-4)
        # chosen depths: the layers between them are only re-factored, never Jacobi-converged
        # and only the layers they contain are walked (forward: up to the deepest; backward: from
        # the shallowest, the input carried there without Jacobians)
        for some in (np.array([2, 7, depth - 1]), np.array([depth - 3]), np.array([1]), np.array([depth])):
            part = spectra.jacobian_spectra(step, w, h0, depths=some, direction=direction)
            np.testing.assert_array_equal(part.depths, some)
            ok = _reliable(ref[some - 1])
            np.testing.assert_allclose(part.log_singular_values[ok], ref[some - 1][ok], atol=2e-4)


def test_full_spectrum_beyond_float64_against_mpmath():
    # 8x8 Gaussian factors: Lyapunov gap lambda_1 - lambda_8 ~ 1.6 per layer, so at depth 40 the
    # spread is ~e^64 ~ 1e28: float64 products lose the small singular values, float32 ones all
    # but the top few. The log-scaled Jacobi recursion in float32 keeps every one.
    depth, n = 40, 8
    a = _gaussian_factors(jax.random.key(2), depth, n)
    res = spectra.jacobian_spectra(linear_step, a, jnp.zeros(n), depths=[10, 25, 40])
    ref = _mp_log_svals(a, {10, 25, 40})
    for i, l in enumerate(res.depths):
        np.testing.assert_allclose(res.log_singular_values[i], ref[l], atol=2e-3)
    assert ref[40][0] - ref[40][-1] > 50  # the spread really is beyond float64
    naive = np.log(np.linalg.svd(np.linalg.multi_dot(np.asarray(a, np.float32)[::-1]), compute_uv=False))
    assert np.abs(naive[-1] - ref[40][-1]) > 10  # float32 product + SVD is far off


def test_issue_example_tanh_small_singular_values_stay_accurate():
    # The issue's case scaled down: tanh, sigma_w = 1.05, where the float32 product's SVD reports
    # a smallest singular value many orders too large.
    depth, n = 64, 24
    w = _gaussian_factors(jax.random.key(3), depth, n, 1.05)
    step = lambda w, h: jnp.tanh(w @ h)
    h0 = jax.random.normal(jax.random.key(4), (n,))
    res = spectra.jacobian_spectra(step, w, h0, depths=[depth])
    ref = _mp_log_svals(_layer_jacobians(step, w, h0), {depth}, dps=120)[depth]
    assert ref[0] - ref[-1] > 120  # a spread of ~1e66: beyond float64 many times over
    np.testing.assert_allclose(res.log_singular_values[0], ref, atol=5e-3)


def test_orthogonal_linear_stack_is_an_exact_isometry_at_every_depth():
    depth, n = 200, 16
    keys = jax.random.split(jax.random.key(5), depth)
    q = jax.vmap(lambda k: initializers.orthogonal()(k, (n, n)))(keys)
    res = spectra.jacobian_spectra(linear_step, q, jnp.zeros(n))
    np.testing.assert_allclose(res.log_singular_values, 0.0, atol=5e-5)
    np.testing.assert_allclose(res.isometry_gap, 0.0, atol=5e-5)


def _log_det_and_extremes(mats):
    """Oracles without the product: sum log sigma = sum log|det A_l| (exact), and log sigma_max /
    log sigma_min by float64 power-style products renormalised every layer."""
    mats = np.asarray(mats, np.float64)
    logdet = sum(np.linalg.slogdet(a)[1] for a in mats)
    v, log_top = np.eye(mats.shape[1]), 0.0
    for a in mats:
        v = a @ v
        nrm = np.linalg.norm(v, 2)
        v, log_top = v / nrm, log_top + np.log(nrm)
    log_top += np.log(np.linalg.svd(v, compute_uv=False)[0])
    u, log_inv = np.eye(mats.shape[1]), 0.0
    for a in mats:  # J^{-1} = A_1^{-1} ... A_L^{-1}
        u = u @ np.linalg.inv(a)
        nrm = np.linalg.norm(u, 2)
        u, log_inv = u / nrm, log_inv + np.log(nrm)
    log_inv += np.log(np.linalg.svd(u, compute_uv=False)[0])
    return logdet, log_top, -log_inv


@pytest.mark.parametrize("case", ["sigmoid", "exploding"])
def test_depth_1000_in_float32_never_underflows_or_overflows(case):
    depth, n = 1000, 8
    w = _gaussian_factors(jax.random.key(6), depth, n, 1.0 if case == "sigmoid" else 16.0)
    if case == "sigmoid":
        step = lambda w, h: jax.nn.sigmoid(w @ h)
    else:
        step = lambda w, h: w @ h
    h0 = jax.random.normal(jax.random.key(7), (n,))
    res = spectra.jacobian_spectra(step, w, h0, depths=[500, 1000])
    logs = res.log_singular_values[-1]
    assert np.all(np.isfinite(logs)) and logs.dtype == np.float32
    if case == "sigmoid":
        assert logs[0] < np.log(1e-38) * 10  # every singular value far below float32's range
    else:
        assert logs[-1] > np.log(1e38) * 10  # every one far above it
    mats = _layer_jacobians(step, w, h0) if case == "sigmoid" else np.asarray(w, np.float64)
    logdet, log_top, log_bottom = _log_det_and_extremes(mats)
    assert logs.sum() == pytest.approx(logdet, rel=2e-5)
    assert logs[0] == pytest.approx(log_top, abs=2e-2)
    assert logs[-1] == pytest.approx(log_bottom, abs=2e-2)


def test_topk_is_matrix_free_and_matches_exact():
    depth, n, k = 10, 48, 5
    w = _gaussian_factors(jax.random.key(8), depth, n, 1.5)
    step = lambda w, h: jnp.tanh(w @ h)
    h0 = jax.random.normal(jax.random.key(9), (n,))
    exact = spectra.jacobian_spectra(step, w, h0, depths=[1, 5, 10])
    for direction in ("forward", "backward"):
        ex = spectra.jacobian_spectra(step, w, h0, depths=[1, 5, 10], direction=direction)
        top = spectra.jacobian_spectra(
            step, w, h0, depths=[1, 5, 10], method="topk", k=k, direction=direction
        )
        assert top.log_singular_values.shape == (3, k)
        np.testing.assert_allclose(top.log_singular_values, ex.log_singular_values[:, :k], atol=1e-3)
    assert exact.log_singular_values.shape == (3, n)


def test_lyapunov_exponents_sum_to_the_mean_log_determinant_and_match_long_products():
    depth, n = 300, 8
    a = _gaussian_factors(jax.random.key(10), depth, n)
    lyap = np.asarray(spectra.lyapunov_exponents(linear_step, a, jnp.zeros(n)))
    assert np.all(np.diff(lyap) <= 0)
    logdet = sum(np.linalg.slogdet(m)[1] for m in np.asarray(a, np.float64))
    assert lyap.sum() == pytest.approx(logdet / depth, rel=1e-4)
    res = spectra.jacobian_spectra(linear_step, a, jnp.zeros(n), depths=[depth])
    np.testing.assert_allclose(lyap, res.log_singular_values[0] / depth, atol=0.02)
    assert spectra.lyapunov_exponents(linear_step, a, jnp.zeros(n), k=3).shape == (3,)


STACKS = [
    ("plain-tanh", MLPStack(depth=4, width=6, activation="tanh", num_outputs=None), False),
    (
        "residual-relu",
        MLPStack(depth=4, width=6, activation="relu", residual="plain", num_outputs=None),
        False,
    ),
    ("layernorm", MLPStack(depth=4, width=6, norm="layer", num_outputs=None), False),
    ("batchnorm-eval", MLPStack(depth=4, width=6, norm="batch", num_outputs=None), False),
    (
        "batchnorm-batch-map",
        MLPStack(depth=3, width=4, norm="batch", activation="relu", num_outputs=None),
        True,
    ),
]


@pytest.mark.parametrize("name, model, train", STACKS, ids=[s[0] for s in STACKS])
def test_every_feed_forward_stack_against_brute_force(name, model, train):
    x = jax.random.normal(jax.random.key(11), (3, 5))
    v = model.init(jax.random.key(12), x)
    xin = x if train else x[0]
    res = spectra.model_spectra(model, v, xin, train=train)
    ref = _product_log_svals(_layer_jacobians(*_walk(model.chain(v, xin, train=train))))
    n = model.chain(v, xin, train=train).h0.size
    # Normalization layers have singular values near eps * ||A_l|| in a single factor (LayerNorm's
    # near-null direction): float32 cannot resolve those; compare above that floor here and the
    # whole spectrum in float64 below.
    # Relative error ~ eps32 * smax / s must stay under the 5e-4 tolerance: s / smax > e^-8.
    floor = ref > ref[:, :1] - 8.0
    assert res.log_singular_values.shape == (model.depth, n)
    finite = np.isfinite(ref) & _reliable(ref) & floor
    np.testing.assert_allclose(res.log_singular_values[finite], ref[finite], atol=5e-4)
    if train:  # the batch map's Jacobian couples examples: it is not block diagonal
        assert np.all(np.isfinite(res.log_singular_values[:, :3]))


@pytest.mark.parametrize("stack", [RNNStack, LSTMStack, GRUStack])
def test_recurrent_stacks_through_time_against_brute_force(stack):
    xs = jax.random.normal(jax.random.key(13), (2, 9, 3))
    model = stack(hidden=5)
    v = model.init(jax.random.key(14), xs)
    res = spectra.model_spectra(model, v, xs[0], depths=[1, 4, 9])
    ref = _product_log_svals(_layer_jacobians(*_walk(model.chain(v, xs[0]))))
    ref = ref[[0, 3, 8]]
    np.testing.assert_allclose(res.log_singular_values[_reliable(ref)], ref[_reliable(ref)], atol=5e-4)


def test_result_statistics_save_load_and_plot(tmp_path):
    logs = np.log(np.array([[4.0, 1.0, 0.25], [2.0, 2.0, 2.0]]))
    r = spectra.SpectraResult(depths=np.array([1, 2]), log_singular_values=logs)
    np.testing.assert_allclose(r.log_max, np.log([4.0, 2.0]))
    np.testing.assert_allclose(r.log_min, np.log([0.25, 2.0]))
    np.testing.assert_allclose(r.log_spread, np.log([16.0, 1.0]))
    np.testing.assert_allclose(r.log_mean_sq, np.log([(16 + 1 + 1 / 16) / 3, 4.0]))
    np.testing.assert_allclose(r.isometry_gap, [np.sqrt(2 * np.log(4) ** 2 / 3), np.log(2)])
    r.save(tmp_path / "s.npz")
    back = spectra.SpectraResult.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.log_singular_values, logs)
    assert back.direction == "forward"
    r.plot(tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    named = spectra.SpectraResult(
        depths=np.array([1, 2]), log_singular_values=logs, layers=("Conv_0", "Dense_0")
    )
    fig = named.plot()
    heat, density = fig.axes[0], fig.axes[1]  # (the colorbar is added after them)
    assert "natural log" in heat.get_xlabel() and "natural log" in density.get_xlabel()
    assert [t.get_text() for t in heat.get_yticklabels()] == ["Conv_0", "Dense_0"]  # rows named by layer
    assert [t.get_text() for t in density.get_legend().get_texts()] == ["Conv_0 (l = 1)", "Dense_0 (l = 2)"]
    assert "log smax" in r.table()
    with pytest.raises(FileNotFoundError, match="no spectra file"):
        spectra.SpectraResult.load(tmp_path / "missing.npz")


def test_bad_input_is_named():
    w = jnp.zeros((3, 4, 4))
    with pytest.raises(ValueError, match="method='svd' is not one of"):
        spectra.jacobian_spectra(linear_step, w, jnp.zeros(4), method="svd")
    with pytest.raises(ValueError, match="direction='up'"):
        spectra.jacobian_spectra(linear_step, w, jnp.zeros(4), direction="up")
    with pytest.raises(ValueError, match=r"depths must be layer indices in 1..3"):
        spectra.jacobian_spectra(linear_step, w, jnp.zeros(4), depths=[0, 2])
    with pytest.raises(ValueError, match="needs k"):
        spectra.jacobian_spectra(linear_step, w, jnp.zeros(4), method="topk")
    with pytest.raises(ValueError, match="non-finite"):
        spectra.jacobian_spectra(linear_step, w, jnp.array([1.0, jnp.nan, 0, 0]))
    with pytest.raises(ValueError, match="same leading depth axis"):
        spectra.jacobian_spectra(
            lambda p, h: h, {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 2))}, jnp.zeros(4)
        )
    with pytest.raises(ValueError, match="cannot cut object into layers"):
        spectra.model_spectra(object(), {}, jnp.zeros(3))
    with pytest.raises(ValueError, match="layer '2' has non-finite parameters"):
        spectra.jacobian_spectra(linear_step, w.at[1, 0, 0].set(jnp.nan), jnp.zeros(4))
    with pytest.raises(ValueError, match="layer '3' has non-finite parameters"):
        spectra.lyapunov_exponents(linear_step, w.at[2, 1, 1].set(jnp.inf), jnp.zeros(4))
    with pytest.raises(ValueError, match="h0 contains non-finite"):
        spectra.lyapunov_exponents(linear_step, w, jnp.array([1.0, jnp.nan, 0, 0]))
    with pytest.raises(ValueError, match="integer layer indices"):
        spectra.jacobian_spectra(linear_step, w, jnp.zeros(4), depths=[2.5])
    with pytest.raises(ValueError, match="oversample must be >= 0"):
        spectra.jacobian_spectra(linear_step, w, jnp.zeros(4), method="topk", k=2, oversample=-1)


def test_float64_engine_resolves_what_float32_cannot():
    model = MLPStack(depth=3, width=6, norm="layer", num_outputs=None)
    x = jax.random.normal(jax.random.key(15), (5,))
    v = model.init(jax.random.key(16), x[None])
    with x64():
        v64 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), v)
        x64_ = jnp.asarray(x, jnp.float64)
        res = spectra.model_spectra(model, v64, x64_)
        ref = _product_log_svals(_layer_jacobians(*_walk(model.chain(v64, x64_))))
    assert res.log_singular_values.dtype == np.float64
    ok = _reliable(ref) & np.isfinite(ref)
    assert (ref[ok] < ref[:, :1].repeat(ref.shape[1], 1)[ok] - 12).any()  # tiny values really checked
    np.testing.assert_allclose(res.log_singular_values[ok], ref[ok], atol=1e-6)


def test_pure_core_vmaps_over_seeds_and_matches_the_api():
    depth, n = 6, 8
    ws = jax.vmap(lambda k: _gaussian_factors(k, depth, n, 1.2))(jax.random.split(jax.random.key(17), 3))
    step = lambda w, h: jnp.tanh(w @ h)
    h0 = jax.random.normal(jax.random.key(18), (n,))
    batched = jax.jit(jax.vmap(lambda w: spectra.log_singular_values(step, w, h0)))(ws)
    assert batched.shape == (3, depth, n)
    for i in range(3):
        one = spectra.jacobian_spectra(step, ws[i], h0)
        np.testing.assert_allclose(batched[i], one.log_singular_values, atol=1e-5)
    back = spectra.log_singular_values(step, ws[0], h0, direction="backward")
    np.testing.assert_allclose(back[-1], 0.0)  # G_L = I
    api = spectra.jacobian_spectra(step, ws[0], h0, direction="backward")
    np.testing.assert_allclose(back, api.log_singular_values, atol=1e-5)


def test_model_spectra_compiles_once_per_model_and_shape():
    from gradflow.spectra import _exact, _topk, core

    model = MLPStack(depth=3, width=4, activation="tanh", num_outputs=None)
    x = jax.random.normal(jax.random.key(19), (3,))
    v1, v2 = (model.init(jax.random.key(i), x[None]) for i in (20, 21))
    w1 = _gaussian_factors(jax.random.key(22), 3, 3)
    spectra.model_spectra(model, v1, x)
    compiled = _exact._exact_jit._cache_size()
    res = spectra.model_spectra(model, v2, x)
    assert _exact._exact_jit._cache_size() == compiled  # new variables, same program
    ref = spectra.jacobian_spectra(*_walk(model.chain(v2, x)))  # and the new variables are the ones used
    np.testing.assert_allclose(res.log_singular_values, ref.log_singular_values, atol=1e-5)
    # topk likewise: one program for every depth and every set of variables of these shapes
    spectra.model_spectra(model, v1, x, method="topk", k=2, depths=[1])
    compiled = _topk._topk_path._cache_size()
    top = spectra.model_spectra(model, v2, x, method="topk", k=2, depths=[2, 3])
    assert _topk._topk_path._cache_size() == compiled
    np.testing.assert_allclose(top.log_singular_values, res.log_singular_values[1:, :2], atol=1e-4)
    # and the Lyapunov exponents: new params of the same shapes, same program, their own values
    lyap = [spectra.lyapunov_exponents(linear_step, 2 * w1, jnp.zeros(3))]
    compiled = core._lyapunov._cache_size()
    lyap.append(spectra.lyapunov_exponents(linear_step, 3 * w1, jnp.zeros(3)))
    assert core._lyapunov._cache_size() == compiled
    np.testing.assert_allclose(lyap[1] - lyap[0], np.log(1.5), atol=1e-5)


def test_qr_lq_jacobi_step_on_a_graded_matrix_against_float64():
    from gradflow.spectra import _jacobi

    # X = Y^T diag(exp(s)) with a spread of e^60: the float32 step keeps every singular value.
    m, n = 8, 12
    y = jax.random.normal(jax.random.key(22), (m, n))
    s = jnp.linspace(0.0, -60.0, m)[jax.random.permutation(jax.random.key(23), m)]
    rows, s2 = _jacobi.qr_step(y, s)
    mpmath.mp.dps = 60
    x = mpmath.matrix(np.asarray(y, np.float64).T.tolist()) * mpmath.diag(
        [mpmath.exp(float(v)) for v in np.asarray(s)]
    )
    ref = sorted((float(mpmath.log(v)) for v in mpmath.svd_r(x, compute_uv=False)), reverse=True)
    np.testing.assert_allclose(np.sort(np.asarray(s2))[::-1], ref, atol=1e-4)
    np.testing.assert_allclose(rows @ rows.T, np.eye(m), atol=1e-5)
    # orthogonal input: the Gram check stops before any sweep
    q = jnp.linalg.qr(jax.random.normal(jax.random.key(24), (m, m)))[0]
    _, c, s3 = _jacobi.precondition(q, jnp.zeros(m))
    assert int(_jacobi.orthogonalize(c, s3)[2]) == 0


def test_banded_sweep_rotates_exactly_the_pairs_within_the_band():
    from gradflow.spectra import _jacobi

    m, band = 9, 3  # odd m: some rounds leave a row unpaired
    sweep = jax.jit(_jacobi.banded_sweep)
    s = -jnp.arange(m, dtype=jnp.float32)
    for i in range(m):
        for j in range(i + 1, m):
            c = np.eye(m, dtype=np.float32)
            c[j] = (c[j] + 0.5 * c[i]) / np.sqrt(1.25)  # the only non-orthogonal pair
            out, _ = sweep(jnp.asarray(c), s, band)
            cos = abs(float(out[i] @ out[j]))
            if j - i <= band:
                assert cos < 1e-6, (i, j, cos)
            else:  # out of band: not touched (renormalized to the last bit)
                np.testing.assert_allclose(out, c, atol=3e-7)


def test_banded_sweeps_on_a_deep_product_against_float64():
    from gradflow.nn.chains import inputs, walk
    from gradflow.spectra import _exact, _jacobi

    # N = 64 rows take the banded path; at depth 24 the pairs above tolerance after the QR + LQ
    # preconditioning lie in a band narrow enough for it, so the readout starts with a banded sweep.
    depth, n = 24, _jacobi.BANDED_MIN_ROWS
    w = _gaussian_factors(jax.random.key(30), depth, n, 1.05)
    step = lambda w, h: jnp.tanh(w @ h)
    h0 = jax.random.normal(jax.random.key(31), (n,))
    ref, _ = _float64_products(step, w, h0)
    step3 = lambda _, w, h: step(w, h)
    _, (points,) = walk(((step3, depth),), (None,), (w,), h0, observe=inputs)
    apply = jax.jit(lambda w, h, rows: _exact._apply_rows(step3, None, w, h, rows, False))
    rows, s = jnp.eye(n), jnp.zeros(n)
    for l in range(depth - 1):  # the engine's walk to the last layer
        rows, s = _jacobi.carry_step(apply(w[l], points[l], rows), s)
    _, c, s = _jacobi.precondition(apply(w[-1], points[-1], rows), s)
    _, band = _jacobi.off_diagonal(c, 8 * n * float(jnp.finfo(jnp.float32).eps))
    assert _jacobi._banded_pays(band, n)
    _, s_last, _ = jax.jit(_jacobi.orthogonalize)(c, s)  # the readout at depth 24, unbatched
    ok = _reliable(ref[-1:])[0]
    np.testing.assert_allclose(np.sort(np.asarray(s_last))[::-1][ok], ref[-1][ok], atol=2e-4)
    # every depth, vmapped over two weight scales: the batch takes one kind of sweep at a time
    # (banded with the widest member's band, or full), and each member is right
    ws = jnp.stack([w, 1.1 * w])
    batched = np.asarray(jax.jit(jax.vmap(lambda w: spectra.log_singular_values(step, w, h0)))(ws))
    for b, want in enumerate((ref, _float64_products(step, ws[1], h0)[0])):
        ok = _reliable(want)
        np.testing.assert_allclose(batched[b][ok], want[ok], atol=2e-4)


def test_an_h0_the_step_cannot_take_is_named():
    w = jnp.full((3, 4, 4), 0.3)
    step = lambda W, h: jnp.tanh(W @ h)  # noqa: E731
    for f in (spectra.jacobian_spectra, spectra.lyapunov_exponents):
        with pytest.raises(ValueError, match=r"fails on h0 of shape \(5,\)"):
            f(step, w, jnp.ones(5))
    with pytest.raises(ValueError, match=r"maps h0 of shape \(4,\) to \(2,\)"):
        spectra.jacobian_spectra(lambda W, h: (W @ h)[:2], w, jnp.ones(4))


def test_unscanned_identical_blocks_walked_as_one_switch_scan_match_jacfwd_both_ways():
    """A user's model with its blocks written out (one layer each, one state shape) is walked as
    one scan over `lax.switch`: every forward and backward product against float64 jacfwd + SVD."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, h):
            return jnp.tanh(nn.Dense(6, kernel_init=nn.initializers.normal(1.5))(h))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(6)(x)
            for _ in range(4):
                h = Block()(h)
            return nn.Dense(3)(h)

    with x64():
        x = jax.random.normal(jax.random.key(0), (1, 5), jnp.float64)
        model = Net()
        v = model.init(jax.random.key(1), x)
        p = v["params"]
        maps = [lambda h: nn.Dense(6).apply({"params": p["Dense_0"]}, h)]
        maps += [lambda h, i=i: Block().apply({"params": p[f"Block_{i}"]}, h) for i in range(4)]
        maps += [lambda h: nn.Dense(3).apply({"params": p["Dense_1"]}, h)]

        def compose(h, a, b):
            for f in maps[a:b]:
                h = f(h)
            return h

        hs = [compose(x, 0, l) for l in range(len(maps) + 1)]  # hs[l] = h_l
        fwd = spectra.model_spectra(model, v, x, method="exact").log_singular_values
        bwd = spectra.model_spectra(model, v, x, method="exact", direction="backward").log_singular_values
        for l in range(1, len(maps) + 1):
            j = jax.jacfwd(lambda h, l=l: compose(h, 0, l).ravel())(x).reshape(hs[l].size, -1)
            s = np.log(np.linalg.svd(np.asarray(j), compute_uv=False))
            np.testing.assert_allclose(fwd[l - 1, : s.size], s, atol=1e-9)
            g = jax.jacfwd(lambda h, l=l: compose(h, l, len(maps)).ravel())(hs[l]).reshape(3, -1)
            s = np.log(np.linalg.svd(np.asarray(g), compute_uv=False))
            np.testing.assert_allclose(bwd[l - 1, : s.size], s, atol=1e-9)
