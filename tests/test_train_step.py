"""gradflow.train.state, .step and .loop: the config, the pure step and epoch, batching, skipping a non-finite step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _datasets import classification, regression

from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import (
    NONFINITE_KINDS,
    TrainConfig,
    epoch_batches,
    init_state,
    make_train_step,
    run_keys,
)


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="task.*classification.*'ranking'"):
        TrainConfig(task="ranking")
    with pytest.raises(ValueError, match="on_nonfinite"):
        TrainConfig(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="batch_size.*0"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="diagnostics_every"):
        TrainConfig(diagnostics_every=-1)
    with pytest.raises(ValueError, match="optim"):
        TrainConfig(optim="adam")


def test_loss_decreases_and_second_call_does_not_recompile():
    x, y = regression(0, 128)
    model = MLPStack(depth=2, width=16, activation="tanh", num_outputs=1)
    cfg = TrainConfig(task="regression", diagnostics_every=0, optim=OptimConfig("adam", 1e-2))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x)
    step = jax.jit(make_train_step(model, tx, cfg))
    losses = []
    for _ in range(80):
        state, metrics = step(state, (x, y))
        losses.append(float(metrics["loss"]))
    assert step._cache_size() == 1
    assert int(state.step) == 80
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_skip_mode_drops_exactly_the_nonfinite_update(optimizer):
    x, y = classification(5, 96)
    model = MLPStack(depth=3, width=8, activation="relu", num_outputs=3)
    cfg = TrainConfig(diagnostics_every=0, on_nonfinite="skip", optim=OptimConfig(optimizer, 0.01))
    tx = make_optimizer(cfg.optim)
    state = init_state(model, tx, run_keys(0)[0], x[:32])
    step = jax.jit(make_train_step(model, tx, cfg))
    b0, b1, b2 = [(x[i : i + 32], y[i : i + 32]) for i in (0, 32, 64)]
    bad = (b1[0].at[3, 2].set(jnp.inf), b1[1])
    s, skipped = state, 0
    for batch in (b0, bad, b2):
        s, m = step(s, batch)
        skipped += int(m["skipped"])
        if not bool(m["finite"]):
            assert (
                int(m["nonfinite_layer"]) == 0 and NONFINITE_KINDS[int(m["nonfinite_kind"])] == "activation"
            )
    ref = state
    for batch in (b0, b2):
        ref, _ = step(ref, batch)
    assert skipped == 1 and step._cache_size() == 1
    # Adam's moments and count, too, are those of the two finite steps only
    jax.tree.map(np.testing.assert_array_equal, (s.params, s.opt_state), (ref.params, ref.opt_state))


def test_epoch_batches_are_a_pure_function_of_key_and_epoch():
    n, bs = 23, 5
    x = jnp.arange(n, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    y = jnp.arange(n, dtype=jnp.int32)
    key = jax.random.key(4)
    xb, yb = epoch_batches(x, y, key, 2, bs)
    assert xb.shape == (4, 5, 3) and yb.shape == (4, 5)  # the remainder is dropped
    seen = np.asarray(yb).ravel()
    assert len(set(seen.tolist())) == 20  # no example twice
    np.testing.assert_array_equal(np.asarray(xb)[..., 0].ravel(), seen)  # x and y stay paired
    np.testing.assert_array_equal(epoch_batches(x, y, key, 2, bs)[1], yb)  # a resumed run: the same epoch
    for k, e in ((key, 3), (jax.random.key(5), 2)):
        assert not np.array_equal(epoch_batches(x, y, k, e, bs)[1], yb)


def test_bad_data_and_hparams_are_named_before_anything_compiles():
    from gradflow.train import fit, grid, sweep

    model = MLPStack(depth=2, width=8, num_outputs=3)
    x, y = classification(0, 64)
    cfg = TrainConfig(epochs=1, batch_size=16)
    bad = {
        "labels in \\[0, 3\\], outside \\[0, 3\\)": (x, y.at[0].set(3), None, None),
        "labels in \\[-1, 2\\]": (x, y.at[0].set(-1), None, None),
        "integer class labels of shape \\(N,\\).*float32": (x, y.astype(jnp.float32), None, None),
        "integer class labels.*\\(64, 3\\)": (x, jax.nn.one_hot(y, 3).astype(jnp.int32), None, None),
        "y_train has shape \\(63,\\)": (x, y[:63], None, None),
        "x_train holds NaN/Inf \\(first at example 5\\)": (x.at[5, 2].set(jnp.nan), y, None, None),
        "x_test holds NaN/Inf": (x, y, x.at[0, 0].set(jnp.inf), y),
        "x_test is empty": (x, y, x[:0], y[:0]),
        "y_test has shape \\(10,\\)": (x, y, x, y[:10]),
        "x_test's examples have shape \\(7,\\)": (x, y, x[:, :7], y),
        # per-feature logits (1, F, 3) ask for per-position labels (N, F)
        "labels of shape \\(N, \\d+\\) .* logits for one example are \\(1, \\d+, 3\\)": (
            x[:, :, None],
            y,
            None,
            None,
        ),
        "batch_size=16 exceeds the 8": (x[:8], y[:8], None, None),
        "both x_test and y_test": (x, y, x, None),
    }
    for message, data in bad.items():
        with pytest.raises(ValueError, match=message):
            fit(model, cfg, data, progress=False)
    with pytest.raises(ValueError, match="y_train has shape"):  # the sweep path too
        sweep(model, cfg, (x, y[:3], None, None), grid(cfg))
    with pytest.raises(ValueError, match=r"hparams.lr must be finite and > 0, got \[-0.1"):
        sweep(model, cfg, (x, y, None, None), grid(cfg, lr=[-0.1, 0.1]))
    clipped = TrainConfig(
        epochs=1, batch_size=16, optim=OptimConfig("sgd", 0.1, clip="global_norm", clip_value=1.0)
    )
    with pytest.raises(ValueError, match=r"hparams.clip_value must be > 0 \(inf: no clipping\), got \[nan"):
        sweep(model, clipped, (x, y, None, None), grid(clipped, clip_value=[float("nan"), float("inf")]))
