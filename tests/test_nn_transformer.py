"""gradflow.nn.TransformerStack and gradflow.signal: the chain against apply and a hand-written
block, spectra against jacfwd + SVD, the measures against numpy float64, rank collapse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import signal, spectra
from gradflow.nn import TransformerStack, chain
from gradflow.nn.chains import WHOLE
from gradflow.numerics import x64
from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import TrainConfig, init_state, make_train_step, run_keys
from gradflow.train import layout as train_layout

VARIANTS = [
    dict(),
    dict(ln="post"),
    dict(ln=None, branch_scale=0.25),
    dict(residual=False, activation=None),
    dict(activation="tanh", mlp_ratio=2),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()) or "pre")
def test_the_chain_from_x_to_y_is_the_model(kw):
    model = TransformerStack(depth=3, width=8, heads=2, max_len=8, **kw)
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    variables = model.init(jax.random.key(1), x)
    want = model.apply(variables, x)
    np.testing.assert_allclose(chain(model, variables, x, layers=WHOLE).final(), want, rtol=1e-5, atol=1e-6)
    c = chain(model, variables, x)
    np.testing.assert_allclose(c.readout(c.final()), want, rtol=1e-5, atol=1e-6)
    assert c.layers == ("blocks[1]", "blocks[2]", "blocks[3]")


def _hand_block(p, h, heads, ln):
    """A pre- or post-LN block written out with jnp (not flax's attention), from its parameters
    (written with broadcasting: called under jax.numpy_rank_promotion("allow"))."""

    def norm(q, z):
        mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
        return (z - mu) / jnp.sqrt(var + 1e-6) * q["scale"] + q["bias"]

    def attention(q, z):
        proj = {
            k: jnp.einsum("td,dhk->thk", z, q[k]["kernel"]) + q[k]["bias"] for k in ("query", "key", "value")
        }
        logits = jnp.einsum("qhk,thk->hqt", proj["query"], proj["key"]) / np.sqrt(proj["query"].shape[-1])
        out = jnp.einsum("hqt,thk->qhk", jax.nn.softmax(logits, axis=-1), proj["value"])
        return jnp.einsum("qhk,hkd->qd", out, q["out"]["kernel"]) + q["out"]["bias"]

    def mlp(z):
        u = jax.nn.gelu(z @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)
        return u @ p["fc2"]["kernel"] + p["fc2"]["bias"]

    if ln == "pre":
        h = h + attention(p["attention"], norm(p["attention_norm"], h))
        return h + mlp(norm(p["mlp_norm"], h))
    h = norm(p["attention_norm"], h + attention(p["attention"], h))
    return norm(p["mlp_norm"], h + mlp(h))


@pytest.mark.parametrize("ln", ["pre", "post"])
def test_blocks_are_the_textbook_formula_and_their_spectra_match_jacfwd(ln):
    """Each block against attention written out in jnp; the forward spectra of d h_l / d h_0
    against the SVD of the hand-written blocks' jacfwd (N = T D = 24), both in float64."""
    model = TransformerStack(depth=2, width=8, heads=2, max_len=8, ln=ln, num_outputs=None)
    x = jax.random.normal(jax.random.key(2), (3, 4))
    variables = model.init(jax.random.key(3), x)
    c = chain(model, variables, x)
    blocks = variables["params"]["blocks"]
    layer = lambda l: jax.tree.map(lambda a: a[l], blocks)  # noqa: E731
    h = c.h0
    allow = jax.numpy_rank_promotion("allow")
    allow.__enter__()
    for l, state in enumerate(c.states()[0]):
        h = _hand_block(layer(l), h, 2, ln)
        np.testing.assert_allclose(state, h, rtol=2e-5, atol=2e-5)
    with x64():  # post-LN: LayerNorm's null directions (e^-37) need float64 in both
        v64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), variables)
        res = spectra.model_spectra(model, v64, jnp.asarray(np.asarray(x), jnp.float64))
        p64 = v64["params"]["blocks"]
        h0 = jnp.asarray(np.asarray(c.h0), jnp.float64)
        f = lambda v: _hand_block(  # noqa: E731
            jax.tree.map(lambda a: a[1], p64),
            _hand_block(jax.tree.map(lambda a: a[0], p64), v.reshape(3, 8), 2, ln),
            2,
            ln,
        ).ravel()
        ref = np.log(np.linalg.svd(np.asarray(jax.jacfwd(f)(h0.ravel())), compute_uv=False))
    allow.__exit__(None, None, None)
    # post-LN: the last LayerNorm's null directions (one per token and norm) are exact zeros that
    # a float64 SVD floors at eps * sigma_max ~ e^-35; the rest agree to 1e-6
    live = ref > -30
    assert live.sum() == (24 if ln == "pre" else 18)
    np.testing.assert_allclose(res.log_singular_values[-1][live], ref[live], atol=1e-6)
    assert np.all(res.log_singular_values[-1][~live] < -30)


def test_auto_method_is_exact_for_small_states_and_topk_past_the_threshold(monkeypatch):
    """method="auto" (the default): every singular value while T D <= AUTO_EXACT_SIZE; past it the
    AUTO_K largest by topk, equal to the exact engine's leading values (threshold lowered here so
    that the exact reference stays test-sized: N = 8 x 16 = 128)."""
    model = TransformerStack(depth=2, width=16, heads=4, max_len=8, num_outputs=None)
    x = jax.random.normal(jax.random.key(7), (8, 5))
    variables = model.init(jax.random.key(8), x)
    exact = spectra.model_spectra(model, variables, x, method="exact")
    auto = spectra.model_spectra(model, variables, x)
    assert auto.method == exact.method == "exact" and auto.log_singular_values.shape == (2, 128)
    np.testing.assert_array_equal(auto.log_singular_values, exact.log_singular_values)
    monkeypatch.setattr(spectra.core, "AUTO_EXACT_SIZE", 100)
    top = spectra.model_spectra(model, variables, x)
    assert top.method == "topk" and top.log_singular_values.shape == (2, spectra.AUTO_K)
    np.testing.assert_allclose(
        top.log_singular_values, exact.log_singular_values[:, : spectra.AUTO_K], atol=2e-3
    )


def test_measures_against_numpy_float64():
    x = np.asarray(jax.random.normal(jax.random.key(4), (2, 6, 5)), np.float64)
    res = np.mean([np.linalg.norm(a - a.mean(0)) / np.linalg.norm(a) for a in x])
    cos = []
    for a in x:
        u = a / np.linalg.norm(a, axis=1, keepdims=True)
        g = u @ u.T
        cos.append((g.sum() - np.trace(g)) / 30)
    np.testing.assert_allclose(signal.rank_collapse_residual(x), res, rtol=1e-6)
    np.testing.assert_allclose(signal.token_cosine(x), np.mean(cos), rtol=1e-5)
    same = jnp.tile(jnp.arange(5.0)[None], (4, 1))
    assert float(signal.rank_collapse_residual(same)) == 0.0
    np.testing.assert_allclose(signal.token_cosine(same), 1.0, rtol=1e-6)
    np.testing.assert_allclose(signal.attention_entropy(jnp.full((2, 3, 4), 0.25)), np.log(4), rtol=1e-6)
    assert float(signal.attention_entropy(jnp.eye(4)[None])) == 0.0
    with pytest.raises(ValueError, match="T >= 2"):
        signal.token_cosine(jnp.ones((1, 5)))


def test_pure_attention_collapses_to_rank_one_and_residuals_stop_it():
    """Dong et al. 2021 at initialization: without skip connections res(X_l) falls by orders of
    magnitude within 8 blocks and the tokens become parallel; with them it stays of order one.
    Attention entropy is one value per block, each below log T."""
    x = jax.random.normal(jax.random.key(5), (8, 16))
    out = {}
    for name, kw in [("pure", dict(residual=False, activation=None)), ("residual", dict())]:
        model = TransformerStack(depth=8, width=16, heads=4, max_len=8, **kw)
        out[name] = signal.token_measures(model, model.init(jax.random.key(6), x), x)
    pure, res = out["pure"], out["residual"]
    assert pure["residual"][-1] < 1e-3 * pure["residual"][0] and pure["cosine"][-1] > 0.999
    assert res["residual"].min() > 0.3 and res["cosine"][-1] < 0.9
    assert pure["attention_entropy"].shape == (8,) and np.all(pure["attention_entropy"] <= np.log(8) + 1e-6)


def test_trainer_diagnostics_cover_the_blocks_and_name_what_attention_only_blocks_lack():
    x = jax.random.normal(jax.random.key(7), (8, 5, 3))
    y = jax.random.randint(jax.random.key(8), (8,), 0, 10)
    cfg = TrainConfig(diagnostics_every=1, optim=OptimConfig("sgd", 0.1))
    tx = make_optimizer(cfg.optim)
    for kw, preact in [(dict(), True), (dict(activation=None), False)]:
        model = TransformerStack(depth=3, width=8, heads=2, max_len=8, **kw)
        state = init_state(model, tx, run_keys(0)[0], x)
        lay = train_layout(model, state.params, x)
        _, m = jax.jit(make_train_step(model, tx, cfg))(state, (x, y))
        c = chain(model, {"params": state.params}, x)
        loss = lambda h, c=c: (
            -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(c.readout(h)), y[:, None], axis=1))
        )  # noqa: E731
        _, (g,) = c.state_gradients(loss)
        np.testing.assert_allclose(
            m["state_grad_norm"], np.linalg.norm(np.asarray(g).reshape(3, -1), axis=1), rtol=1e-5
        )
        assert ("preact_var" in m) == preact and lay.layer_names == ["blocks[1]", "blocks[2]", "blocks[3]"]
        if not preact:
            assert dict(lay.omitted)["preact_var"].startswith("the blocks have no activation")


def test_bad_configurations_are_named():
    with pytest.raises(
        ValueError, match=r"heads=3 does not divide width=8; use a head count among \[1, 2, 4, 8\]"
    ):
        TransformerStack(depth=1, width=8, heads=3)
    model = TransformerStack(depth=1, width=8, heads=2, max_len=4)
    with pytest.raises(ValueError, match="6 tokens is longer than the positional table \\(max_len=4\\)"):
        model.init(jax.random.key(0), jnp.ones((6, 3)))
    with pytest.raises(ValueError, match="integer tokens"):
        TransformerStack(depth=1, width=8, heads=2, vocab_size=5).init(jax.random.key(0), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="ln"):
        TransformerStack(depth=1, ln="sandwich")
