"""Greedy layer-wise autoencoder pretraining (gradflow.pretrain) and its experiment at test size."""

import importlib.util
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import data
from gradflow.nn import MLPStack
from gradflow.nn.mlp import Block
from gradflow.pretrain import PretrainConfig, pretrain, pretrain_layer

_EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_experiments_{name}", _EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bits_equal(a, b):
    return jax.tree.all(jax.tree.map(lambda u, v: np.array_equal(np.asarray(u), np.asarray(v)), a, b))


# The unit tests use the experiment's test-sized model, data and config, so that the compiled
# `pretrain` (its cost is compilation, not steps) is shared with the experiment's test.
EXP = _load("pretraining")
DEPTH, WIDTH, BATCH = EXP.TEST_SIZE["depth"], EXP.TEST_SIZE["width"], EXP.TEST_SIZE["batch_size"]
CFG = EXP.pretrain_config(EXP.TEST_SIZE["pretrain_steps"], BATCH, seed=3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mnist1d")


@pytest.fixture(scope="module")
def setup(cache_dir):
    model = EXP.make_model(DEPTH, WIDTH)
    x = jnp.asarray(
        data.mnist1d(seed=0, num_samples=EXP.TEST_SIZE["num_samples"], cache_dir=cache_dir).x_train
    )
    params = EXP.initial_params(model, x[:BATCH], seed=1)
    full = jax.device_get(pretrain(model, params, x, CFG))
    return model, x, params, full


def test_every_layer_learns_to_reconstruct_its_input(setup):
    _, _, _, full = setup
    assert full.losses.shape == (DEPTH + 1, CFG.steps_per_layer)
    assert np.all(np.isfinite(full.losses))
    assert np.all(full.loss_after < 0.5 * full.loss_before)
    # better than the best constant reconstruction (the input's variance) by a wide margin
    assert np.all(full.loss_after < 0.2 * full.input_var)
    first, last = full.losses[:, :10].mean(axis=1), full.losses[:, -10:].mean(axis=1)
    assert np.all(last < 0.5 * first)


def test_lower_layers_frozen_and_higher_layers_untouched(setup):
    model, x, params, full = setup
    for k in range(1, DEPTH + 1):  # pretrain embed and blocks 1..k-1 only
        part = jax.device_get(pretrain(model, params, x, CFG, num_layers=k))
        assert _bits_equal(part.params["embed"], full.params["embed"])
        lower = lambda p, k=k: jax.tree.map(lambda a: a[: k - 1], p["blocks"])  # noqa: E731
        upper = lambda p, k=k: jax.tree.map(lambda a: a[k - 1 :], p["blocks"])  # noqa: E731
        # pretraining the layers above did not change the lower ones, bit for bit ...
        assert _bits_equal(lower(part.params), lower(full.params))
        np.testing.assert_array_equal(part.losses[:k], full.losses[:k])
        # ... and the layers not pretrained are returned as given
        assert _bits_equal(upper(part.params), upper(params))
        assert _bits_equal(part.params["head"], params["head"])
        assert np.all(np.isnan(part.losses[k:])) and np.all(np.isnan(part.loss_after[k:]))
    assert not _bits_equal(full.params["blocks"], params["blocks"])
    assert _bits_equal(full.params["head"], params["head"])


def test_pretrained_block_written_back_at_its_depth_index(setup):
    # Manual greedy step for block 2: its input is block 1's output (pretrained embed and
    # block 1), its decoder ends in the sigmoid that produced that input ("mirror").
    model, x, params, full = setup
    block = Block(**model.block_fields(), parent=None)
    embed = nn.Dense(WIDTH, parent=None)
    at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
    h = embed.apply({"params": full.params["embed"]}, x)
    h = block.apply({"params": at(full.params["blocks"], 0)}, h)[0]
    encode = lambda p, h: block.apply({"params": p}, h)[0]  # noqa: E731
    key = jax.random.fold_in(jax.random.key(CFG.seed), 2)
    fit = jax.jit(lambda p, h: pretrain_layer(encode, p, h, CFG, key, output_fn=jax.nn.sigmoid))(
        at(params["blocks"], 1), h
    )
    kernel = lambda p: np.asarray(p["dense"]["kernel"])  # noqa: E731
    manual = kernel(fit.params)
    np.testing.assert_allclose(kernel(at(full.params["blocks"], 1)), manual, rtol=1e-3, atol=1e-4)
    for other in (0, 2):
        assert not np.allclose(kernel(at(full.params["blocks"], other)), manual, atol=1e-2)
    np.testing.assert_allclose(full.losses[2], np.asarray(fit.losses), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(full.input_var[2], float(jnp.mean(jnp.var(h, axis=0))), rtol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("steps_per_layer", 0),
        ("batch_size", 1.5),
        ("optim", "adam"),
        ("noise", -0.1),
        ("noise", 1.0),  # mask: a probability < 1
        ("corruption", "dropout"),
        ("tied", 1),
        ("decoder_activation", "sigmoid"),
        ("seed", -1),
    ],
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"PretrainConfig.{field}"):
        PretrainConfig(**{field: value})


def test_gaussian_noise_may_exceed_one():
    assert PretrainConfig(noise=2.0, corruption="gaussian").noise == 2.0


def test_unsupported_models_and_arguments_raise(setup):
    _, x, params, _ = setup
    for field, value in (("norm", "layer"), ("residual", "plain")):
        model = MLPStack(depth=2, width=8, **{field: value})
        with pytest.raises(ValueError, match=f"{field}="):
            pretrain(model, {}, x, CFG)
    model = EXP.make_model(DEPTH, WIDTH)
    with pytest.raises(ValueError, match="batch_size"):
        pretrain(model, params, x[: BATCH - 1], CFG)
    with pytest.raises(ValueError, match="num_layers"):
        pretrain(model, params, x, CFG, num_layers=DEPTH + 2)
    with pytest.raises(ValueError, match="tied"):
        pretrain(MLPStack(depth=2, width=8, activation="maxout"), {}, x, CFG)
    with pytest.raises(ValueError, match="MLPStack"):
        pretrain(lambda p, x: x, {}, x, CFG)


def test_experiment_pretraining_rescues_the_deep_sigmoid_stack(tmp_path, cache_dir):
    exp = EXP
    result = exp.run(**exp.TEST_SIZE, diagnostics_every=0, out=tmp_path, cache_dir=cache_dir, verbose=False)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert (tmp_path / "pretraining.png").stat().st_size > 0
    depth = exp.TEST_SIZE["depth"]
    scratch, pre = result["arms"]["scratch"], result["arms"]["pretrained"]
    # 1. gradients reach block 1 after pretraining; from scratch they vanish through the sigmoids
    assert result["block1_grad_pretrained_over_scratch"] > 10
    assert pre["grad_norm_start"][1] == pytest.approx(
        result["block1_grad_pretrained_over_scratch"] * scratch["grad_norm_start"][1]
    )
    ratios = result["block1_over_top_block_grad"]
    assert ratios["scratch"] < 0.01 < 0.1 < ratios["pretrained"]
    assert len(scratch["grad_norm_start"]) == depth + 2
    # 2. same fine-tuning budget: scratch stays near chance, the pretrained net learns
    assert scratch["final_train_loss"] > 2.2  # ln 10 = 2.30
    assert pre["final_train_loss"] < scratch["final_train_loss"] - 0.5
    assert result["test_accuracy_gain"] > 0.1
    # 3. every block's autoencoder explains most of its input's variance
    assert result["pretraining"]["max_fvu_blocks"] < 0.2


class _UserMLP(nn.Module):
    """A researcher's own linen MLP with changing widths (no gradflow stack)."""

    @nn.compact
    def __call__(self, x):
        h = nn.tanh(nn.Dense(12)(x))
        h = nn.tanh(nn.Dense(8)(h))
        return nn.Dense(3)(h)


def test_a_users_linen_mlp_is_pretrained_layer_by_layer(setup):
    _, x, _, _ = setup
    model = _UserMLP()
    params = model.init(jax.random.key(0), x[:2])["params"]
    cfg = PretrainConfig(steps_per_layer=20, batch_size=BATCH, tied=False, seed=5)
    res = jax.device_get(pretrain(model, params, x, cfg))
    assert res.layers == ("Dense_0", "Dense_1") and res.losses.shape == (2, 20)
    assert _bits_equal(res.params["Dense_2"], params["Dense_2"])  # the supervised layer stays
    # the oracle, written without the chain: layer 2 reconstructs Dense_0's output (the cut is
    # the module's output; the tanh after it belongs to the next layer's map)
    d0, d1 = nn.Dense(12, parent=None), nn.Dense(8, parent=None)
    key = jax.random.key(cfg.seed)
    fit0 = pretrain_layer(
        lambda p, h: d0.apply({"params": p}, h), params["Dense_0"], x, cfg, jax.random.fold_in(key, 0)
    )
    h1 = d0.apply({"params": fit0.params}, x)
    fit1 = pretrain_layer(
        lambda p, h: d1.apply({"params": p}, jnp.tanh(h)),
        params["Dense_1"],
        h1,
        cfg,
        jax.random.fold_in(key, 1),
    )
    for name, fit in (("Dense_0", fit0), ("Dense_1", fit1)):
        np.testing.assert_allclose(res.params[name]["kernel"], fit.params["kernel"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res.losses[1], fit1.losses, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"num_layers must be an integer in \[1, 2\]"):
        pretrain(model, params, x, cfg, num_layers=3)
    conv = _UserCNN()  # checked on the host before anything compiles
    with pytest.raises(ValueError, match="tied=True a Dense"):
        pretrain(conv, conv.init(jax.random.key(0), x[:2, :, None])["params"], x[..., None], CFG)


class _UserCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(2, (3,))(x))
        return nn.Dense(3)(h.reshape(h.shape[0], -1))
