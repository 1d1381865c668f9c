"""The layer-chain interface on users' own models: linen, nnx, cut-marked functions.

Oracles are independent of the chain code: each model's layer maps are written out again from
its submodules, composed in float64, differentiated by jacfwd and decomposed by SVD.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import spectra
from gradflow.nn import chain, cut
from gradflow.nn.chains import WHOLE
from gradflow.numerics import x64


class CNN(nn.Module):
    """Conv -> strided Conv -> flatten -> Dense -> Dense: every state has its own shape."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(3, (3, 3))(x))
        x = nn.tanh(nn.Conv(4, (3, 3), strides=2)(x))
        x = x.reshape(x.shape[0], -1)
        x = nn.tanh(nn.Dense(12)(x))
        return nn.Dense(5)(x)


def _cnn_maps(v):
    """The CNN's layer maps by hand (code between modules goes with the next layer)."""
    p = v["params"]
    conv0 = lambda h: nn.Conv(3, (3, 3)).apply({"params": p["Conv_0"]}, h)  # noqa: E731
    conv1 = lambda h: nn.Conv(4, (3, 3), strides=2).apply({"params": p["Conv_1"]}, jnp.tanh(h))  # noqa: E731
    dense0 = lambda h: nn.Dense(12).apply({"params": p["Dense_0"]}, jnp.tanh(h).reshape(h.shape[0], -1))  # noqa: E731
    dense1 = lambda h: nn.Dense(5).apply({"params": p["Dense_1"]}, jnp.tanh(h))  # noqa: E731
    return [conv0, conv1, dense0, dense1]


def _f64(tree):
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), tree)


def _reference(maps_of, v, x, direction):
    """float64 log singular values of d h_l / d x or d y / d h_l for every layer, by jacfwd + SVD."""
    with x64():
        maps, x = maps_of(_f64(v)), jnp.asarray(np.asarray(x), jnp.float64)
        hs = [x]
        for f in maps:
            hs.append(f(hs[-1]))
        out = []
        for l in range(1, len(maps) + 1):
            if direction == "forward":
                fn, at = (lambda h, l=l: _compose(maps[:l], h)), x
            else:
                fn, at = (lambda h, l=l: _compose(maps[l:], h)), hs[l]
            jac = np.asarray(jax.jacfwd(lambda h, fn=fn: fn(h).reshape(-1))(at)).reshape(-1, at.size)
            with np.errstate(divide="ignore"):
                out.append(np.log(np.linalg.svd(jac, compute_uv=False)))
    return out


def _compose(maps, h):
    for f in maps:
        h = f(h)
    return h


def _assert_rows(res, ref, atol=2e-4):
    for row, want in zip(res.log_singular_values, ref, strict=True):
        ok = want > want[0] - 9.0  # float32 resolves ~e^-9 below sigma_max per factor
        np.testing.assert_allclose(row[: want.size][ok], want[ok], atol=atol)
        assert np.all(np.isneginf(row[want.size :]))  # past the rank bound


@pytest.fixture(scope="module")
def cnn():
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 1))
    return CNN(), CNN().init(jax.random.key(1), x), x


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_strided_cnn_spectra_against_float64_jacfwd(cnn, direction):
    model, v, x = cnn
    res = spectra.model_spectra(model, v, x, direction=direction)
    assert res.layers == ("Conv_0", "Conv_1", "Dense_0", "Dense_1")
    np.testing.assert_array_equal(res.widths, [75, 36, 12, 5])
    # forward rows hold min(N_0 .. N_l) values, backward rows min(N_l .. N_L): 25 and 5 wide
    assert res.log_singular_values.shape == (4, 25 if direction == "forward" else 5)
    _assert_rows(res, _reference(_cnn_maps, v, x, direction))


def test_chain_states_are_the_model_and_compile_once(cnn):
    from gradflow.spectra import _exact

    model, v, x = cnn
    c = chain(model, v, x)
    np.testing.assert_allclose(c.final(), model.apply(v, x), rtol=1e-6)
    v2 = model.init(jax.random.key(7), x)
    spectra.model_spectra(model, v, x, depths=[2])
    compiled = _exact._exact_jit._cache_size()
    res = spectra.model_spectra(model, v2, x, depths=[2])
    assert _exact._exact_jit._cache_size() == compiled  # new variables, same program
    _assert_rows(res, _reference(_cnn_maps, v2, x, "forward")[1:2])


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_topk_on_a_chain_whose_widths_change_against_float64_jacfwd(cnn, direction):
    """topk walks every segment (25 -> 75 -> 36 -> 12 -> 5 values): its leading values at every
    layer are the float64 SVD's, with a block of 6 rows and with one row (no oversampling: the
    subspace iteration must find the top direction)."""
    model, v, x = cnn
    ref = _reference(_cnn_maps, v, x, direction)
    for k, over in ((3, None), (1, 0)):
        res = spectra.model_spectra(model, v, x, direction=direction, method="topk", k=k, oversample=over)
        assert res.method == "topk" and res.log_singular_values.shape == (4, k)
        for row, want in zip(res.log_singular_values, ref, strict=True):
            np.testing.assert_allclose(row, want[:k], atol=2e-4)


class WidthMLP(nn.Module):
    """784-512-256-10 in miniature: 16 -> 12 -> 6 -> 3 with ReLU."""

    @nn.compact
    def __call__(self, x):
        for i, n in enumerate((12, 6)):
            x = nn.relu(nn.Dense(n, name=f"fc{i}")(x))
        return nn.Dense(3, name="out")(x)


def test_changing_widths_rank_bounds_and_chosen_layers():
    model, x = WidthMLP(), jax.random.normal(jax.random.key(2), (16,))
    v = model.init(jax.random.key(3), x)
    # the cuts are the Dense outputs, so each ReLU belongs to the next layer's map
    maps = lambda v: [  # noqa: E731
        lambda h: h @ v["params"]["fc0"]["kernel"] + v["params"]["fc0"]["bias"],
        lambda h: jax.nn.relu(h) @ v["params"]["fc1"]["kernel"] + v["params"]["fc1"]["bias"],
        lambda h: jax.nn.relu(h) @ v["params"]["out"]["kernel"] + v["params"]["out"]["bias"],
    ]
    fwd = spectra.model_spectra(model, v, x)
    assert fwd.layers == ("fc0", "fc1", "out") and fwd.log_singular_values.shape == (3, 12)
    assert (
        np.isneginf(fwd.log_singular_values[1, 6:]).all()
        and np.isneginf(fwd.log_singular_values[2, 3:]).all()
    )
    ref = _reference(maps, v, x, "forward")
    _assert_rows(fwd, ref)
    # cut at chosen layers only: the product is the same, the rows are the chosen ones
    some = spectra.model_spectra(model, v, x, layers=["fc1", "out"])
    assert some.layers == ("fc1", "out")
    _assert_rows(some, ref[1:])
    # a cut that leaves code after it adds the remainder as the layer "output"
    assert chain(model, v, x, layers=["fc0"], check=False).layers == ("fc0", "output")


def residual_fn(params, x):
    """A plain function with cut markers and a skip connection around the second cut."""
    h = cut(jnp.tanh(params["a"] @ x), "a")
    h = cut(jnp.tanh(params["b"] @ h), "b")
    return cut(params["c"] @ h, "c") + x  # skip from the input around every cut


def test_cut_marked_function_and_the_bypass_check():
    key = jax.random.split(jax.random.key(4), 3)
    params = {k: jax.random.normal(kk, (5, 5)) / 2 for k, kk in zip("abc", key)}
    x = jax.random.normal(jax.random.key(5), (5,))
    with pytest.raises(ValueError, match="the cut at 'c' is bypassed: layer 'output'"):
        chain(residual_fn, params, x)

    # without the skip the chain is valid and its product is the function's Jacobian
    def marked(p, x):
        h = cut(jnp.tanh(p["a"] @ x), "a")
        h = cut(jnp.tanh(p["b"] @ h), "b")
        return p["c"] @ h

    c = chain(marked, params, x)
    assert c.layers == ("a", "b", "output")
    res = spectra.chain_spectra(c, depths=[3])
    with x64():
        jac = np.asarray(
            jax.jacfwd(lambda x: marked(_f64(params), x))(jnp.asarray(np.asarray(x), jnp.float64))
        )
    np.testing.assert_allclose(
        res.log_singular_values[0], np.log(np.linalg.svd(jac, compute_uv=False)), atol=2e-5
    )


class ResBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(x.shape[-1], name="inner")(jnp.tanh(x))


class ResNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, name="stem")(x)
        x = ResBlock(name="block1")(x)
        x = ResBlock(name="block2")(x)
        return nn.Dense(2, name="head")(x)


def test_skip_inside_a_cut_is_refused_and_the_enclosing_block_works():
    model, x = ResNet(), jax.random.normal(jax.random.key(6), (4,))
    v = model.init(jax.random.key(7), x)
    with pytest.raises(
        ValueError, match=r"cut at 'block1/inner' is bypassed.*enclosing block \(e.g. 'block1'\)"
    ):
        chain(model, v, x, layers=["stem", "block1/inner", "block2", "head"])
    res = spectra.model_spectra(model, v, x, direction="backward")
    assert res.layers == ("stem", "block1", "block2", "head")
    with x64():
        v64, x64_ = _f64(v), jnp.asarray(np.asarray(x), jnp.float64)
        h1 = nn.Dense(6).apply({"params": v64["params"]["stem"]}, x64_)
        p = v64["params"]
        blocks = [lambda h, b=b: ResBlock().apply({"params": p[b]}, h) for b in ("block1", "block2")]
        head = lambda h: nn.Dense(2).apply({"params": p["head"]}, h)  # noqa: E731
        rest = lambda h: head(blocks[1](blocks[0](h)))  # noqa: E731
        jac = np.asarray(jax.jacfwd(rest)(h1))
    np.testing.assert_allclose(
        res.log_singular_values[0], np.log(np.linalg.svd(jac, compute_uv=False)), atol=2e-5
    )


class Dropper(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(nn.Dense(3)(x)))


class NoSubmodules(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.tanh(self.param("w", nn.initializers.ones, (3, 3)) @ x)


class TupleLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(Pair(name="pair")(x)[0])


class Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x, x


def test_bad_input_is_named(cnn):
    model, v, x = cnn
    with pytest.raises(
        ValueError, match=r"layers \['Conv_9'\] are not in CNN; its cut points are: Conv_0, Conv_1"
    ):
        chain(model, v, x, layers=["Conv_9"])
    with pytest.raises(ValueError, match=r"running the model on x of shape \(1, 5\) failed"):
        chain(model, v, jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="no submodules or cut markers"):
        m = NoSubmodules()
        chain(m, m.init(jax.random.key(0), jnp.ones(3)), jnp.ones(3))
    with pytest.raises(ValueError, match="layer 'pair' returns tuple, not an array"):
        m = TupleLayer()
        chain(m, m.init(jax.random.key(0), jnp.ones(3)), jnp.ones(3))
    m = Dropper()
    vd = m.init(jax.random.key(0), jnp.ones(3))
    with pytest.raises(ValueError, match="dropout in training mode"):
        chain(m, vd, jnp.ones(3), train=True)
    assert chain(m, vd, jnp.ones(3)).layers == ("Dense_1", "Dropout_0", "Dense_0")  # call order
    with pytest.raises(ValueError, match="takes no `train` argument"):
        chain(model, v, x, train=True)
    nan = {"params": {**v["params"], "Conv_1": {**v["params"]["Conv_1"], "bias": jnp.full(4, jnp.nan)}}}
    with pytest.raises(ValueError, match="non-finite parameters .* layer 'Conv_1'"):
        spectra.chain_spectra(chain(model, nan, x, check=False))
    with pytest.raises(ValueError, match="layer 'Conv_1' computes non-finite values"):
        spectra.model_spectra(model, nan, x)
    with pytest.raises(ValueError, match=r"k must be an integer in 1..25"):
        spectra.model_spectra(model, v, x, k=26)


def test_nnx_module_with_cut_markers():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(4, 6, rngs=rngs)
            self.b = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            return self.b(cut(jnp.tanh(self.a(x)), "a"))

    net = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(8), (4,))
    res = spectra.model_spectra(net, None, x, direction="backward")
    assert res.layers == ("a", "output")
    jac_b = np.asarray(net.b.kernel[...], np.float64).T  # d y / d h_a: the last layer is linear
    np.testing.assert_allclose(
        res.log_singular_values[0], np.log(np.linalg.svd(jac_b, compute_uv=False)), atol=2e-5
    )


def test_nnx_module_without_markers_is_cut_at_its_submodules_against_float64():
    """No `cut` markers: the layers are the outputs of its top-level submodules' calls, a list's
    items named "blocks.i", in call order; spectra in both directions against float64 jacfwd."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, n, rngs):
            self.lin = nnx.Linear(n, n, rngs=rngs)

        def __call__(self, x):
            return x + self.lin(jnp.tanh(x))  # the skip stays inside the cut at the block

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.Linear(4, 6, rngs=rngs)
            self.blocks = nnx.List([Block(6, rngs) for _ in range(2)])
            self.head = nnx.Linear(6, 3, rngs=rngs)

        def __call__(self, x):
            x = self.stem(x)
            for b in self.blocks:
                x = b(x)
            return self.head(jnp.tanh(x))

    net, x = Net(nnx.Rngs(0)), jax.random.normal(jax.random.key(1), (4,))
    assert chain(net, None, x).layers == ("stem", "blocks.0", "blocks.1", "head")

    class Tied(nnx.Module):  # reads a submodule's parameter (tied weights) and mixes a list
        def __init__(self, rngs):
            self.enc = nnx.Linear(4, 6, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(6, 6, rngs=rngs), jnp.tanh])

        def __call__(self, x):
            h = self.layers[1](self.layers[0](self.enc(x)))
            return h @ self.enc.kernel[...].T

    tied = Tied(nnx.Rngs(2))
    assert chain(tied, None, x).layers == ("enc", "layers.0", "output")
    for direction in ("forward", "backward"):
        res = spectra.model_spectra(net, None, x, direction=direction)
        with x64():
            graphdef, state = nnx.split(net)
            n64 = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), state))
            maps = [n64.stem, n64.blocks[0], n64.blocks[1], lambda h, n64=n64: n64.head(jnp.tanh(h))]
            hs = [jnp.asarray(np.asarray(x), jnp.float64)]
            for f in maps:
                hs.append(f(hs[-1]))
            for l in range(1, 5):
                part, at = (maps[:l], hs[0]) if direction == "forward" else (maps[l:], hs[l])
                jac = np.asarray(jax.jacfwd(lambda h, part=part: _compose(part, h))(at)).reshape(-1, at.size)
                want = np.log(np.linalg.svd(jac, compute_uv=False))
                np.testing.assert_allclose(res.log_singular_values[l - 1, : want.size], want, atol=2e-5)


class _HasChainMethod(nn.Module):
    """A user's model that happens to define a method named `chain`: it is cut, not asked."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(4)(x))
        return nn.Dense(3)(h)

    def chain(self, *args):
        return "not a gradflow chain"


def test_stack_parts_recurrent_readout_and_a_users_chain_method():
    from gradflow.nn import MLPStack, RNNStack

    x = jax.random.normal(jax.random.key(0), (2, 5))
    m = MLPStack(depth=3, width=6, num_outputs=4, activation="tanh")
    v = m.init(jax.random.key(1), x)
    full = chain(m, v, x, layers=("embed", "blocks", "head"))
    assert full.layers == ("embed", "blocks[1]", "blocks[2]", "blocks[3]", "head") and full.readout is None
    np.testing.assert_allclose(full.final(), m.apply(v, x), rtol=1e-6)  # x -> y, the model itself
    _, inter = m.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    np.testing.assert_allclose(full.states()[0][0], inter["intermediates"]["embed"]["__call__"][0], rtol=1e-6)
    blocks = chain(m, v, x)  # the default: the blocks from h0 = embed(x), the head as readout
    np.testing.assert_allclose(blocks.readout(blocks.final()), m.apply(v, x), rtol=1e-6)
    with pytest.raises(ValueError, match="in order"):
        chain(m, v, x, layers=("head", "blocks"))
    with pytest.raises(ValueError, match="containing"):
        chain(m, v, x, layers=("embed",))
    rnn = RNNStack(hidden=4)
    xs = jax.random.normal(jax.random.key(2), (2, 5, 3))
    vr = rnn.init(jax.random.key(3), xs)
    c = chain(rnn, vr, xs)
    np.testing.assert_allclose(c.readout(c.final()), rnn.apply(vr, xs), rtol=1e-5, atol=1e-6)
    # WHOLE: the model from x to y for any source (a stack's parts; an adapted model's default cuts)
    assert chain(m, v, x, layers=WHOLE).layers == full.layers
    user = _HasChainMethod()
    vu = user.init(jax.random.key(4), x)
    assert chain(user, vu, x).layers == chain(user, vu, x, layers=WHOLE).layers == ("Dense_0", "Dense_1")


def test_an_equinox_module_is_a_function_of_its_own_pytree():
    """equinox needs no adapter: a module is a pytree and a callable, so `lambda m, x: m(x)` with
    the module as params is the function adapter; `cut` markers in its __call__ are the layers."""
    eqx = pytest.importorskip("equinox")

    class MLP(eqx.Module):
        layers: list

        def __init__(self, key):
            k = jax.random.split(key, 3)
            self.layers = [eqx.nn.Linear(a, b, key=kk) for a, b, kk in zip((6, 8, 5), (8, 5, 3), k)]

        def __call__(self, x):
            for i, layer in enumerate(self.layers[:-1]):
                x = cut(jnp.tanh(layer(x)), f"fc{i}")
            return self.layers[-1](x)

    m, x = MLP(jax.random.key(0)), jax.random.normal(jax.random.key(1), (6,))
    apply = lambda mod, x: mod(x)  # noqa: E731
    fwd = spectra.model_spectra(apply, m, x)
    bwd = spectra.model_spectra(apply, m, x, direction="backward")
    assert fwd.layers == bwd.layers == ("fc0", "fc1", "output") and list(fwd.widths) == [8, 5, 3]
    with x64():
        m64, x64_ = (
            jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), m),
            jnp.asarray(np.asarray(x), jnp.float64),
        )
        maps = [lambda h: jnp.tanh(m64.layers[0](h)), lambda h: jnp.tanh(m64.layers[1](h)), m64.layers[2]]
        hs = [x64_]
        for f in maps:
            hs.append(f(hs[-1]))
        for l in range(1, 4):
            j_fwd = np.asarray(jax.jacfwd(lambda h, l=l: _compose(maps[:l], h))(x64_))
            j_bwd = np.asarray(jax.jacfwd(lambda h, l=l: _compose(maps[l:], h))(hs[l]))
            want_f, want_b = (
                np.log(np.linalg.svd(j_fwd, compute_uv=False)),
                np.log(np.linalg.svd(j_bwd, compute_uv=False)),
            )
            np.testing.assert_allclose(fwd.log_singular_values[l - 1, : want_f.size], want_f, atol=2e-5)
            np.testing.assert_allclose(bwd.log_singular_values[l - 1, : want_b.size], want_b, atol=2e-5)
