"""Test-sized run of the LayerNorm-placement experiment (Xiong et al. 2020), asserting its claims."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import init_state, run_keys


def _loss(net, params, xb, yb):
    logp = jax.nn.log_softmax(net.apply({"params": params}, xb))
    return -jnp.mean(jnp.take_along_axis(logp, yb[..., None], axis=-1))


def test_post_ln_gradients_grow_toward_the_last_blocks_and_warm_up_free_adam_jolts_its_loss(
    load_experiment, tmp_path
):
    exp = load_experiment("ln_placement")
    cfg = exp.QUICK
    result = exp.run(**cfg, out=tmp_path, verbose=False)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert (tmp_path / "ln_placement.png").stat().st_size > 0

    # 1. at initialization (Xiong et al.'s Theorem 1)
    ratios = []
    for depth in cfg["depths"]:
        row = result["init"][str(depth)]
        post, pre = np.asarray(row["post"]), np.asarray(row["pre"])
        assert post.shape == pre.shape == (depth,)
        # post-LN's profile rises toward the last blocks relative to pre-LN's
        assert post[-1] / post[0] > 1.5 * (pre[-1] / pre[0])
        assert pre[-1] < pre[0]
        ratios.append(row["last_ratio"])
    # the last block's gradient: post-LN over pre-LN above 1 and growing with depth
    assert 1.0 < ratios[0] < ratios[1]

    # the trainer's per-block grad_norm (per-token logits, labels (N, T)) against jax.grad by hand
    depth, batch = cfg["depths"][0], cfg["batch"]
    net = exp.model("post", depth, cfg["width"], cfg["heads"], cfg["vocab"], cfg["seq_len"])
    x, y = exp.reversal(batch * cfg["batches"], cfg["seq_len"], cfg["vocab"], 0)
    params = init_state(net, make_optimizer(OptimConfig("sgd", 1e-3)), run_keys(0)[0], x[:batch]).params
    norms = []
    for i in range(0, len(x), batch):
        g = jax.grad(lambda p, xb, yb: _loss(net, p, xb, yb))(params, x[i : i + batch], y[i : i + batch])
        leaves = jax.tree.leaves(g["blocks"])
        norms.append(np.sqrt(sum(np.sum(np.asarray(a).reshape(depth, -1) ** 2, axis=1) for a in leaves)))
    np.testing.assert_allclose(result["init"][str(depth)]["post"], np.mean(norms, axis=0), rtol=1e-4)

    # 2. warm-up-free Adam on the histogram task
    train, lrs, stalled = result["train"], result["lrs"], result["stalled_loss"]
    # the stalled loss is the entropy of the labels' marginal (Binomial(T - 1, 1 / vocab))
    _, labels = exp.counts(200_000, result["train_seq_len"], result["train_vocab"], 7)
    p = np.bincount(labels.ravel(), minlength=result["train_seq_len"]) / labels.size
    assert abs(stalled + np.sum(p[p > 0] * np.log(p[p > 0]))) < 2e-3
    hi = lrs.index(3e-3)
    loss = {arm: np.asarray(r["loss"]) for arm, r in train.items()}
    # warm-up-free Adam at lr 3e-3: post-LN's loss jumps far above its start within the first
    # steps, pre-LN's does not rise above its start, nor post-LN's under a linear warm-up (the
    # full run's longer training, where post-LN then stalls at `stalled`, is reported, not tested)
    # (by more than the batch-to-batch spread of the loss, ~15% here: each step sees a new batch)
    assert loss["post"][hi].max() > 1.5 * loss["post"][hi, 0]
    assert loss["pre"][hi].max() < 1.25 * loss["pre"][hi, 0]
    assert loss["post_warmup"][hi].max() < 1.25 * loss["post_warmup"][hi, 0]

    # the Adam runs' first update against jax.grad + optax.adam by hand
    tc = result["train_seq_len"], result["train_vocab"]
    xs, ys = exp.counts(8, *tc, 1)
    net = exp.model("post", 2, 16, 2, tc[1], tc[0], classes=tc[0])
    got = exp.adam_runs(net, exp.optim(1.0, 0), (3e-3,), xs[None, :4], ys[None, :4], xs[4:], ys[4:], 0)
    params = init_state(net, optax.adam(3e-3), run_keys(0)[0], xs[:4]).params
    np.testing.assert_allclose(got["loss"][0, 0], _loss(net, params, xs[:4], ys[:4]), rtol=1e-5)
    tx = optax.adam(3e-3)
    upd, _ = tx.update(jax.grad(lambda p: _loss(net, p, xs[:4], ys[:4]))(params), tx.init(params), params)
    after = optax.apply_updates(params, upd)
    np.testing.assert_allclose(got["test_loss"][0], _loss(net, after, xs[4:], ys[4:]), rtol=1e-5)
