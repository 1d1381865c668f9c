"""Post-LN vs pre-LN Transformers: per-block gradient norms at initialization, and warm-up-free Adam.

Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture"): with LayerNorm
after each residual addition (post-LN, the original Transformer) the gradient of the last
blocks' parameters at initialization is large, O(d sqrt(ln d)) at any depth L, while with
LayerNorm inside the residual branches (pre-LN) it is O(d sqrt(ln d / L)); so the
last-block gradient ratio post / pre grows with depth (their Theorem 1: like sqrt(L)), post-LN's
gradients grow toward the last blocks, and post-LN needs a learning-rate warm-up that pre-LN
does without.

The nets are `gradflow.nn.TransformerStack`s with a per-token head (`pool=False`), ReLU MLPs and
Xavier-uniform weights as in the paper, unit-scale token embeddings (one-hot tokens through a
Dense map with N(0, 1) weights: the original's sqrt(d)-scaled embeddings), on a per-token task:
reverse a sequence of random tokens (y_t = x_{T-1-t}, which needs attention). Measured:

- at initialization, per block l, ||dL/dtheta_l|| over all of block l's parameters: the
  trainer's `grad_norm` diagnostic, averaged over `batches` batches and `seeds` inits, at each
  of `depths`;
- the last-block ratio post / pre at each depth, beside sqrt(L);
- training with Adam at a constant learning rate `lr` from step 0 (no warm-up), and post-LN
  with a linear warm-up over the first `warmup` steps (then constant, optax's
  `warmup_constant` written as a `warmup_cosine` whose cosine is flat: see `_warmup`): the
  per-token test accuracy after `epochs`.

Expected (the full run, width 64, 4 heads, T = 16, vocabulary 16): post-LN's gradient norms
rise toward the last blocks (last / first > 1) and pre-LN's fall (last / first < 1, roughly like
1 / sqrt(l): a pre-LN block's branch Jacobian shrinks as the residual stream grows, Xiong's
flat pre-LN profile is at d = 512, L = 6); the post / pre last-block ratio is at or above sqrt(L).

Measured (the full run, 2 seeds x 4 batches of 32, on a 2-core CPU), depths 6 / 12 / 24:
  post-LN last / first block   1.87 / 1.27 / 1.43
  pre-LN  last / first block   0.68 / 0.48 / 0.37
  last block post / pre        3.62 / 3.59 / 5.88   (sqrt L: 2.45 / 3.46 / 4.90)
The ratio is above sqrt(L) at every depth, but not monotone in L at this width (6 -> 12 is flat).
Training (depth 12, 10 epochs of Adam at lr 1e-3, per-token test accuracy after epoch 1 -> 10;
chance 1/16): post-LN 0.129 -> 0.184, pre-LN 0.190 -> 0.176, post-LN with warm-up 0.179 ->
0.189. None of the three learns the reversal in this budget, so the training arm shows no
placement effect here: reported, not asserted (the test runs the initialization half only).

Run: `python experiments/ln_placement.py [--out DIR] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np

from gradflow.nn import TransformerStack
from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import TrainConfig, fit, init_state, make_train_step, run_keys


def model(ln: str, depth: int, width: int, heads: int, vocab: int, seq_len: int) -> TransformerStack:
    """A post- or pre-LN Transformer with a per-token head: the paper's Xavier weights, ReLU MLPs."""
    xavier = nn.initializers.xavier_uniform()
    return TransformerStack(
        depth=depth,
        width=width,
        heads=heads,
        max_len=seq_len,
        activation="relu",
        ln=ln,
        num_outputs=vocab,
        pool=False,
        kernel_init=xavier,
        input_init=nn.initializers.normal(1.0),  # one-hot rows: unit-scale embeddings
        head_init=xavier,
    )


def reversal(num: int, seq_len: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot token sequences (num, T, vocab) and their reversals as labels (num, T)."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(num, seq_len))
    return np.eye(vocab, dtype=np.float32)[ids], ids[:, ::-1].copy()


def init_grad_norms(net: TransformerStack, x: np.ndarray, y: np.ndarray, batch: int, seed: int) -> np.ndarray:
    """Per-block ||dL/dtheta_l|| at initialization (the trainer's diagnostic), mean over the batches of x."""
    cfg = TrainConfig(batch_size=batch, seed=seed, optim=OptimConfig("sgd", 1e-3))
    tx = make_optimizer(cfg.optim)
    state = init_state(net, tx, run_keys(seed)[0], x[:batch])
    step = jax.jit(make_train_step(net, tx, cfg))
    norms = [
        np.asarray(step(state, (x[i : i + batch], y[i : i + batch]))[1]["grad_norm"])
        for i in range(0, len(x) - batch + 1, batch)
    ]
    return np.mean(norms, axis=0)


def _warmup(lr: float, steps: int, total: int) -> OptimConfig:
    # optax.warmup_cosine_decay_schedule with end_value = peak: linear warm-up, then constant
    return OptimConfig("adam", lr, schedule="warmup_cosine", warmup_steps=steps, total_steps=total)


def run(
    depths: tuple[int, ...] = (6, 12, 24),
    width: int = 64,
    heads: int = 4,
    seq_len: int = 16,
    vocab: int = 16,
    batch: int = 32,
    batches: int = 4,
    seeds: int = 2,
    train_depth: int = 12,
    lr: float = 1e-3,
    epochs: int = 10,
    train_samples: int = 4096,
    warmup: int = 200,
    seed: int = 0,
    out: str | pathlib.Path = "runs/ln_placement",
    verbose: bool = True,
) -> dict:
    """Gradient profiles at init and warm-up-free training; writes out/result.json and out/ln_placement.png."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = reversal(batch * batches, seq_len, vocab, seed)
    result: dict = {
        "depths": list(depths),
        "width": width,
        "heads": heads,
        "seq_len": seq_len,
        "vocab": vocab,
        "init": {},
        "train": {},
    }
    for depth in depths:
        row = {}
        for ln in ("post", "pre"):
            net = model(ln, depth, width, heads, vocab, seq_len)
            g = np.mean([init_grad_norms(net, x, y, batch, seed + s) for s in range(seeds)], axis=0)
            row[ln] = g.tolist()
        row["last_ratio"] = row["post"][-1] / row["pre"][-1]
        row["sqrt_depth"] = float(np.sqrt(depth))
        result["init"][str(depth)] = row
        if verbose:
            post, pre = np.asarray(row["post"]), np.asarray(row["pre"])
            print(
                f"L={depth:3d}: post-LN last/first {post[-1] / post[0]:.2f}, pre-LN last/first "
                f"{pre[-1] / pre[0]:.2f}; last block post/pre {row['last_ratio']:.2f} (sqrt L {np.sqrt(depth):.2f})"
            )

    x_tr, y_tr = reversal(train_samples, seq_len, vocab, seed + 1)
    x_te, y_te = reversal(1024, seq_len, vocab, seed + 2)
    total = epochs * (train_samples // batch)
    arms = {}  # epochs=0: gradients at initialization only
    if epochs:
        arms = {
            "post": ("post", OptimConfig("adam", lr)),
            "pre": ("pre", OptimConfig("adam", lr)),
            "post_warmup": ("post", _warmup(lr, warmup, total + 1)),
        }
    for arm, (ln, optim) in arms.items():
        net = model(ln, train_depth, width, heads, vocab, seq_len)
        cfg = TrainConfig(epochs=epochs, batch_size=batch, seed=seed, diagnostics_every=0, optim=optim)
        res = fit(net, cfg, (x_tr, y_tr, x_te, y_te), progress=False)
        hist = res.history
        result["train"][arm] = {
            "train_loss": [float(h["loss"]) for h in hist],
            "test_accuracy": [float(h["test_accuracy"]) for h in hist],
            "diverged": res.stopped,
        }
        if verbose:
            print(
                f"{arm:12s} lr {lr:g}: test accuracy by epoch {np.round(result['train'][arm]['test_accuracy'], 3)}"
            )
    result["train_depth"], result["lr"], result["warmup"] = train_depth, lr, warmup
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "ln_placement.png")
    return result


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for depth, row in result["init"].items():
        for ln, style in (("post", "-"), ("pre", "--")):
            g = np.asarray(row[ln])
            axes[0].semilogy(
                np.arange(1, len(g) + 1), g, style, marker="o", ms=2, label=f"{ln}-LN, L={depth}"
            )
    axes[0].set(
        xlabel="block l", ylabel="||dL/dtheta_l|| at initialization", title="Per-block gradient norms"
    )
    for arm, r in result["train"].items():  # empty with epochs=0
        axes[1].plot(
            np.arange(1, len(r["test_accuracy"]) + 1), r["test_accuracy"], marker="o", ms=3, label=arm
        )
    axes[1].set(
        xlabel="epoch",
        ylabel="per-token test accuracy",
        title=f"Adam lr {result['lr']:g}, no warm-up (L={result['train_depth']})",
    )
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


QUICK = dict(
    depths=(4, 16),
    width=16,
    heads=2,
    seq_len=8,
    vocab=8,
    batch=16,
    batches=2,
    seeds=1,
    train_depth=4,
    epochs=2,
    train_samples=512,
    warmup=20,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ln_placement", help="output directory")
    parser.add_argument("--quick", action="store_true", help="the test-sized run")
    args = parser.parse_args(argv)
    run(**(QUICK if args.quick else {}), out=args.out)


if __name__ == "__main__":
    main()
