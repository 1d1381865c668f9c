"""gradflow.train.sweep: jit(vmap(run)) equals the per-run loop; sharded equals unsharded."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig
from gradflow.train import (
    Hparams,
    SweepPoint,
    TrainConfig,
    fit,
    grid,
    init_variables,
    run_keys,
    sweep,
    sweep_points,
)


def _data():
    kx, kw = jax.random.split(jax.random.key(11))
    x = jax.random.normal(kx, (160, 6))
    y = jnp.argmax(x @ jax.random.normal(kw, (6, 3)), axis=-1)
    return x[:128], y[:128], x[128:], y[128:]


def test_grid_is_the_cartesian_product_with_config_defaults():
    cfg = TrainConfig(seed=4, optim=OptimConfig("sgd", 0.1, clip="global_norm", clip_value=2.0))
    hp = grid(cfg, seeds=[0, 1, 2], lr=[0.1, 0.2])
    assert isinstance(hp, Hparams) and all(a.shape == (6,) for a in hp)
    np.testing.assert_array_equal(hp.seed, [0, 1, 2, 0, 1, 2])
    np.testing.assert_allclose(hp.lr, [0.1] * 3 + [0.2] * 3)
    np.testing.assert_allclose(hp.clip_value, 2.0)
    np.testing.assert_allclose(grid(cfg).seed, [4])


def _scaled(init, scale):
    def scaled_init(key, shape, dtype=jnp.float32):
        return scale * init(key, shape, dtype)

    return scaled_init


def test_vmapped_sweep_equals_the_per_config_loop():
    data = _data()
    base = TrainConfig(
        epochs=3,
        batch_size=32,
        diagnostics_every=0,
        optim=OptimConfig("momentum", 0.05, clip="global_norm", clip_value=1.0),
    )
    cfg = lambda seed, lr, clip: TrainConfig(  # noqa: E731
        **{
            **base.__dict__,
            "seed": seed,
            "optim": OptimConfig("momentum", lr, clip="global_norm", clip_value=clip),
        }
    )
    tanh = MLPStack(depth=2, width=16, activation="tanh", num_outputs=3)
    relu = MLPStack(depth=3, width=16, activation="relu", num_outputs=3)
    points = [
        SweepPoint(tanh, cfg(0, 0.05, 1.0)),
        SweepPoint(tanh, cfg(1, 0.05, 1.0)),
        SweepPoint(tanh, cfg(0, 0.2, 0.1)),
        SweepPoint(tanh, cfg(2, 0.05, 1.0), weight_scale=1.5),
        SweepPoint(relu, cfg(0, 0.05, 1.0)),  # another structure: a second vmapped group
    ]
    results = sweep_points(points, data)
    assert [r["group"] for r in results] == [0, 0, 0, 0, 1]
    for p, r in zip(points, results):
        model = p.model
        if p.weight_scale != 1.0:  # the loop's model draws the scaled kernels itself
            model = model.clone(kernel_init=_scaled(nn.initializers.lecun_normal(), p.weight_scale))
        ref = fit(model, p.cfg, data)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), r["params"], ref.state.params
        )
        np.testing.assert_allclose(r["epochs"]["loss"], [h["loss"] for h in ref.history], rtol=1e-5)
        np.testing.assert_allclose(r["epochs"]["test_accuracy"], [h["test_accuracy"] for h in ref.history])
    # the configurations really differ
    assert not np.allclose(results[0]["epochs"]["loss"], results[2]["epochs"]["loss"])


def test_sweep_from_given_variables_equals_sweep_from_the_seed():
    data = _data()
    model = MLPStack(depth=2, width=8, activation="tanh", num_outputs=3)
    cfg = TrainConfig(epochs=2, batch_size=32, diagnostics_every=2, optim=OptimConfig("adam", 1e-2))
    hp = grid(cfg, seeds=[3], weight_scale=[1.0, 1.7])
    variables = init_variables(model, run_keys(3)[0], data[0][:32])  # the draw of seed 3
    given = sweep(model, cfg, data, hp, init_variables=variables)
    seeded = sweep(model, cfg, data, hp)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), given.params, seeded.params
    )
    np.testing.assert_allclose(given.epochs["grad_norm"], seeded.epochs["grad_norm"], rtol=1e-6)
    assert not np.allclose(given.epochs["loss"][0], given.epochs["loss"][1])  # weight_scale applied
    bad = jax.tree.map(lambda a: a, variables)
    bad["params"]["head"]["kernel"] = bad["params"]["head"]["kernel"][:, :2]
    with pytest.raises(ValueError, match=r"\['head'\]\['kernel'\] has shape \(8, 2\)"):
        sweep(model, cfg, data, hp, init_variables=bad)


@pytest.mark.slow
def test_sweep_tanh50_script_writes_one_heatmap_per_run(load_experiment, tmp_path):
    script = load_experiment("sweep_tanh50")
    result = script.main(epochs=1, width=8, depth=3, num_samples=500, out=tmp_path)
    assert result.epochs["grad_norm"].shape == (32, 1, 3)  # 8 lr x 4 seeds, epochs, layers
    assert np.isfinite(result.epochs["grad_norm"][:8]).all()  # the smallest lr trains finitely
    assert (tmp_path / "grad_norms.png").stat().st_size > 0
