"""Test-sized run of the LayerNorm-placement experiment (Xiong et al. 2020), asserting its claims."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import init_state, run_keys


def test_post_ln_gradients_grow_toward_the_last_blocks_against_pre_ln(load_experiment, tmp_path):
    exp = load_experiment("ln_placement")
    cfg = {**exp.QUICK, "epochs": 0}  # gradients at initialization only
    result = exp.run(**cfg, out=tmp_path, verbose=False)
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert (tmp_path / "ln_placement.png").stat().st_size > 0
    ratios = []
    for depth in cfg["depths"]:
        row = result["init"][str(depth)]
        post, pre = np.asarray(row["post"]), np.asarray(row["pre"])
        assert post.shape == pre.shape == (depth,)
        # post-LN's profile rises toward the last blocks relative to pre-LN's
        assert post[-1] / post[0] > 1.5 * (pre[-1] / pre[0])
        assert pre[-1] < pre[0]
        ratios.append(row["last_ratio"])
    # the last block's gradient: post-LN over pre-LN above 1 and growing with depth (Xiong's Theorem 1)
    assert 1.0 < ratios[0] < ratios[1]

    # the trainer's per-block grad_norm (per-token logits, labels (N, T)) against jax.grad by hand
    depth, batch = cfg["depths"][0], cfg["batch"]
    net = exp.model("post", depth, cfg["width"], cfg["heads"], cfg["vocab"], cfg["seq_len"])
    x, y = exp.reversal(batch * cfg["batches"], cfg["seq_len"], cfg["vocab"], 0)
    params = init_state(net, make_optimizer(OptimConfig("sgd", 1e-3)), run_keys(0)[0], x[:batch]).params

    def loss(p, xb, yb):
        logp = jax.nn.log_softmax(net.apply({"params": p}, xb))
        return -jnp.mean(jnp.take_along_axis(logp, yb[..., None], axis=-1))

    norms = []
    for i in range(0, len(x), batch):
        g = jax.grad(loss)(params, x[i : i + batch], y[i : i + batch])["blocks"]
        leaves = jax.tree.leaves(g)
        norms.append(np.sqrt(sum(np.sum(np.asarray(a).reshape(depth, -1) ** 2, axis=1) for a in leaves)))
    np.testing.assert_allclose(result["init"][str(depth)]["post"], np.mean(norms, axis=0), rtol=1e-4)
