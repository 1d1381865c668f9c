"""flax.nnx models in the trainer, through flax's own bridge (`nnx.bridge.to_linen`).

The bridged model is cut at the nnx module's top-level submodules, named by attribute. Oracles
are independent of the bridge: the nnx module itself, its layers written out again and
differentiated by `nnx.grad`, or composed in float64 and decomposed by jacfwd + SVD.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gradflow import spectra
from gradflow.nn import chain
from gradflow.numerics import stable_norm, x64
from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import TrainConfig, init_state, init_variables, make_train_step, run_keys
from gradflow.train import layout as train_layout


class Block(nnx.Module):
    def __init__(self, n: int, *, rngs: nnx.Rngs):
        self.lin = nnx.Linear(n, n, rngs=rngs)

    def __call__(self, x):
        return x + self.lin(jnp.tanh(x))  # the skip stays inside the cut at the block


class Net(nnx.Module):
    """A user's nnx model: nothing of gradflow in it."""

    def __init__(self, din: int, width: int, dout: int, *, rngs: nnx.Rngs):
        self.stem = nnx.Linear(din, width, rngs=rngs)
        self.blocks = nnx.List([Block(width, rngs=rngs) for _ in range(2)])
        self.head = nnx.Linear(width, dout, rngs=rngs)

    def __call__(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(jnp.tanh(x))


LAYERS = ("stem", "blocks.0", "blocks.1", "head")


def _nnx_net(params):
    """The nnx module itself holding the bridged model's parameters."""
    net = Net(4, 6, 3, rngs=nnx.Rngs(0))
    nnx.update(net, params)
    return net


def _maps(net):
    return [net.stem, net.blocks[0], net.blocks[1], lambda h: net.head(jnp.tanh(h))]


def test_trainer_diagnostics_of_a_bridged_nnx_model_equal_nnx_grad():
    x = jax.random.normal(jax.random.key(1), (8, 4))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 3)
    model, lr = nnx.bridge.to_linen(Net, 4, 6, 3), 0.1
    cfg = TrainConfig(diagnostics_every=1, optim=OptimConfig("sgd", lr))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x)
    _, m = jax.jit(make_train_step(model, tx, cfg))(state, (x, y))
    lay = train_layout(model, {"params": state.params}, x)
    assert tuple(lay.layer_names) == LAYERS and lay.names == ["stem", "blocks", "head"]

    net = _nnx_net(state.params)

    def loss(net, e):  # the layers written out again, a perturbation added to each output
        h = x
        for f, e_l in zip(_maps(net), e, strict=True):
            h = f(h) + e_l
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], axis=1))

    zeros = [jnp.zeros((8, 6))] * 3 + [jnp.zeros((8, 3))]
    g, g_states = nnx.grad(loss, argnums=(0, 1))(net, zeros)
    norm = lambda t: float(np.sqrt(sum(float(stable_norm(a)) ** 2 for a in jax.tree.leaves(t))))  # noqa: E731
    direct = np.array([norm(g.stem), norm(g.blocks[0]), norm(g.blocks[1]), norm(g.head)])
    weights = np.array([norm(nnx.state(s)) for s in (net.stem, net.blocks[0], net.blocks[1], net.head)])
    np.testing.assert_allclose(m["grad_norm"], direct, rtol=1e-5)
    np.testing.assert_allclose(m["weight_norm"], weights, rtol=1e-5)
    np.testing.assert_allclose(m["update_ratio"], lr * direct / weights, rtol=1e-5)
    np.testing.assert_allclose(m["state_grad_norm"], [float(stable_norm(e)) for e in g_states], rtol=1e-5)


def test_bridged_seeds_draw_different_parameters():
    """A sweep initializes each run from its seed (`run_keys`), under vmap: the bridge's nnx.Rngs
    take the traced keys, so the seeds' parameters differ."""
    model, x = nnx.bridge.to_linen(Net, 4, 6, 3), jnp.ones((2, 4))
    keys = jax.vmap(lambda s: run_keys(s)[0])(jnp.arange(2))
    kernels = jax.vmap(lambda k: init_variables(model, k, x)["params"]["stem"]["kernel"])(keys)
    assert not np.allclose(kernels[0], kernels[1])


def test_a_sweeps_weight_scale_reaches_every_layer_of_a_bridged_model():
    """`Hparams.weight_scale` scales the kernels of every layer of the layout, the nnx list's
    blocks (integer keys in the bridge's params) included, and nothing else."""
    from gradflow.train.hparams import scale_kernels

    model, x = nnx.bridge.to_linen(Net, 4, 6, 3), jnp.ones((2, 4))
    params = model.init(jax.random.key(5), x)["params"]
    scaled = scale_kernels(params, 2.0, train_layout(model, {"params": params}, x))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        want = 2.0 * leaf if str(getattr(path[-1], "key", path[-1])) == "kernel" else leaf
        got = scaled
        for k in path:
            got = got[getattr(k, "key", getattr(k, "idx", k))]
        np.testing.assert_array_equal(got, want)


def test_bridged_spectra_against_float64_and_nested_names():
    model, x = nnx.bridge.to_linen(Net, 4, 6, 3), jax.random.normal(jax.random.key(3), (1, 4))
    v = model.init(jax.random.key(4), x)
    res = spectra.model_spectra(model, v, x)  # forward rows: d h_l / d x
    assert res.layers == LAYERS
    with x64():
        net = _nnx_net(jax.tree.map(lambda a: jnp.asarray(np.asarray(a), jnp.float64), v["params"]))
        x64_ = jnp.asarray(np.asarray(x), jnp.float64)
        maps = _maps(net)
        for l, row in enumerate(res.log_singular_values, start=1):

            def prefix(h, l=l):
                for f in maps[:l]:
                    h = f(h)
                return h.reshape(-1)

            jac = np.asarray(jax.jacfwd(prefix)(x64_)).reshape(-1, x64_.size)
            want = np.log(np.linalg.svd(jac, compute_uv=False))
            np.testing.assert_allclose(row[: want.size], want, atol=2e-4)
            assert np.all(np.isneginf(row[want.size :]))  # past the rank bound (4 inputs)

    class Outer(nn.Module):  # a bridged nnx model inside a linen one: its layers by path
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="top")(nnx.bridge.to_linen(Net, 4, 6, 3, name="net")(x))

    outer = Outer()
    v = outer.init(jax.random.key(5), x)
    assert chain(outer, v, x, check=False).layers == ("net", "top")
    picked = chain(outer, v, x, layers=["net/blocks.1", "top"], check=False)
    assert picked.layers == ("net/blocks.1", "top")
    assert [s.param_path for s in picked.segments] == [("net", "blocks", 1), ("top",)]
