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
Dense map with N(0, 1) weights: the original's sqrt(d)-scaled embeddings). Measured:

- at initialization, on a per-token reversal task (y_t = x_{T-1-t}), per block l,
  ||dL/dtheta_l|| over all of block l's parameters: the trainer's `grad_norm` diagnostic,
  averaged over `batches` batches and `seeds` inits, at each of `depths`; and the last-block
  ratio post / pre at each depth, beside sqrt(L);
- what warm-up-free Adam does to each: from one initialization, `steps` Adam steps (one fresh
  batch per step, `adam_runs`: the trainer's step in a `lax.scan`, vmapped over the learning
  rates `lrs`) at a constant learning rate from step 0, for post-LN, pre-LN, and post-LN with a
  linear warm-up over `warmup` steps; on the histogram task (y_t = how often x_t occurs in its
  sequence, minus one: needs attention, learnable in a few hundred steps), per step the batch's
  loss before the update, after the last step the held-out loss and accuracy. A run that has
  learned nothing of its input sits at the entropy of the labels' marginal, Binomial(T - 1,
  1 / vocab) (`marginal_entropy`: 1.196 nats at T = vocab = 8, accuracy 0.39 by always
  predicting "once").

Expected (the full run, width 64, 4 heads): post-LN's gradient norms rise toward the last blocks
(last / first > 1) and pre-LN's fall (last / first < 1, roughly like 1 / sqrt(l): a pre-LN
block's branch Jacobian shrinks as the residual stream grows, Xiong's flat pre-LN profile is at
d = 512, L = 6); the post / pre last-block ratio is at or above sqrt(L). Adam normalizes each
coordinate, so post-LN's larger gradients do not make its first steps larger; what differs is
what equal-sized steps do to the function: Xiong's account is that without warm-up post-LN's
first updates unsettle it, and warm-up or pre-LN avoid that.

Measured (the full run; 2-core CPU shared with other jobs, 4 min 20 s wall, 2 min 44 s CPU):
  at initialization (T = 16, vocabulary 16, 2 seeds x 4 batches of 32), depths 6 / 12 / 24:
    post-LN last / first block   1.87 / 1.27 / 1.43
    pre-LN  last / first block   0.68 / 0.48 / 0.37
    last block post / pre        3.62 / 3.59 / 5.88   (sqrt L: 2.45 / 3.46 / 4.90)
  The ratio is above sqrt(L) at every depth, but not monotone in L at this width (6 -> 12 is flat).
  warm-up-free Adam (depth 6, T = vocabulary = 8, batches of 32, 300 steps, 100-step warm-up),
  held-out loss (accuracy) at lr 1e-3 / 3e-3 / 1e-2:
    post-LN              0.647 (0.72) / 1.199 (0.39) / 1.202 (0.38)
    pre-LN               0.133 (0.96) / 0.194 (0.92) / 1.174 (0.42)
    post-LN + warm-up    0.051 (0.98) / 0.182 (0.93) / 1.196 (0.41)
  and the largest per-step loss over the run (the first loss is 2.01 for post-LN, 3.02 for
  pre-LN): post-LN 2.22 / 3.81 / 6.40, its third step's batch; pre-LN 3.02 / 3.02 / 3.26;
  post-LN + warm-up 2.01 at every lr.
So: at lr 3e-3 without warm-up, post-LN's second update throws its loss up (2.0 -> 3.8) and it then
stalls at the label marginal's entropy (1.196) for all 300 steps, where pre-LN, with the same
steps, learns the task (accuracy 0.92); a linear warm-up rescues post-LN (0.93), and at lr 1e-3
it helps too (0.98 against 0.72 without). At 1e-2 all three stall. The test-sized run
asserts the first-steps half (post-LN's jump at lr 3e-3; none for pre-LN or with warm-up), the
stalled loss against the labels' empirical entropy, and the Adam runs' first step against
jax.grad + optax.adam by hand; the 300-step stall is the full run's, not asserted.

Run: `python experiments/ln_placement.py [--out DIR] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import flax.linen as nn
import jax
import numpy as np

from gradflow import progress
from gradflow.nn import TransformerStack
from gradflow.optim import OptimConfig, make_optimizer
from gradflow.train import TrainConfig, evaluate, init_state, make_train_step, run_keys


def model(
    ln: str, depth: int, width: int, heads: int, vocab: int, seq_len: int, classes: int | None = None
) -> TransformerStack:
    """A post- or pre-LN Transformer with a per-token head (`classes` outputs, default `vocab`):
    the paper's Xavier weights, ReLU MLPs."""
    xavier = nn.initializers.xavier_uniform()
    return TransformerStack(
        depth=depth,
        width=width,
        heads=heads,
        max_len=seq_len,
        activation="relu",
        ln=ln,
        num_outputs=classes or vocab,
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


def counts(num: int, seq_len: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One-hot token sequences (num, T, vocab) and, per token, how often it occurs in its sequence
    minus one (num, T), a class in [0, T): the histogram task, which needs attention (by content)."""
    ids = np.random.default_rng(seed).integers(0, vocab, size=(num, seq_len))
    return np.eye(vocab, dtype=np.float32)[ids], (ids[:, :, None] == ids[:, None, :]).sum(-1) - 1


def marginal_entropy(seq_len: int, vocab: int) -> float:
    """Entropy (nats) of the histogram task's labels: count - 1 ~ Binomial(T - 1, 1 / vocab).

    A net that predicts this marginal for every token (it has learned nothing of the input) sits at
    this cross-entropy: the loss of a stalled run."""
    q = 1 / vocab
    p = [math.comb(seq_len - 1, k) * q**k * (1 - q) ** (seq_len - 1 - k) for k in range(seq_len)]
    return -sum(pk * math.log(pk) for pk in p if pk > 0)


def optim(lr: float, warmup: int) -> OptimConfig:
    """Adam at a constant learning rate from step 0 (warmup=0), or after a linear warm-up."""
    if not warmup:
        return OptimConfig("adam", lr)
    # optax.warmup_cosine_decay_schedule with a cosine far longer than any run here: linear
    # warm-up over `warmup` steps, then constant (to 1e-6 relative over 1e3 warm-ups)
    return OptimConfig("adam", lr, schedule="warmup_cosine", warmup_steps=warmup, total_steps=1000 * warmup)


def adam_runs(
    net: TransformerStack,
    optim_cfg: OptimConfig,
    lrs: tuple[float, ...],
    x: np.ndarray,
    y: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    seed: int,
) -> dict[str, np.ndarray]:
    """Adam from one initialization at each of `lrs` (vmapped), one fresh batch x[t] per step.

    Args:
      net: the model.
      optim_cfg: the optimizer; its lr is replaced by each of `lrs` (`make_optimizer(cfg, lr=lr)`).
      lrs: peak learning rates (S,).
      x, y: the step batches (steps, B, T, vocab) and labels (steps, B, T).
      x_test, y_test: the held-out set, evaluated after the last step.
      seed: the initialization's seed (the same draw for every lr).

    Returns:
      {"loss": (S, steps) training loss of each step's batch before its update,
       "test_loss", "test_accuracy": (S,) after the last step}.
    """
    cfg = TrainConfig(batch_size=x.shape[1], seed=seed, diagnostics_every=0, optim=optim_cfg)

    def one(lr):
        tx = make_optimizer(optim_cfg, lr=lr)
        step = make_train_step(net, tx, cfg)
        state = init_state(net, tx, run_keys(seed)[0], x[0])
        state, metrics = jax.lax.scan(lambda s, b: step(s, b), state, (x, y))
        test = evaluate(net, state, x_test, y_test, cfg)
        return metrics["loss"], test["loss"], test["accuracy"]

    loss, test_loss, test_acc = jax.jit(jax.vmap(one))(np.asarray(lrs, np.float32))
    return {
        "loss": np.asarray(loss),
        "test_loss": np.asarray(test_loss),
        "test_accuracy": np.asarray(test_acc),
    }


def run(
    depths: tuple[int, ...] = (6, 12, 24),
    width: int = 64,
    heads: int = 4,
    seq_len: int = 16,
    vocab: int = 16,
    batch: int = 32,
    batches: int = 4,
    seeds: int = 2,
    train_depth: int = 6,
    train_width: int = 64,
    train_heads: int = 4,
    train_seq_len: int = 8,
    train_vocab: int = 8,
    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2),
    steps: int = 300,
    warmup: int = 100,
    test_samples: int = 1024,
    seed: int = 0,
    out: str | pathlib.Path = "runs/ln_placement",
    verbose: bool = True,
) -> dict:
    """Gradient profiles at init and warm-up-free Adam; writes out/result.json and out/ln_placement.png."""
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
    for depth in progress.track(depths, "gradients at initialization, by depth", verbose=verbose):
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

    x_tr, y_tr = counts(steps * batch, train_seq_len, train_vocab, seed + 1)
    x_tr, y_tr = x_tr.reshape(steps, batch, *x_tr.shape[1:]), y_tr.reshape(steps, batch, -1)
    x_te, y_te = counts(test_samples, train_seq_len, train_vocab, seed + 2)
    arms = {"post": ("post", 0), "pre": ("pre", 0), "post_warmup": ("post", warmup)}
    for arm, (ln, w) in progress.track(
        arms.items(), f"Adam runs ({len(lrs)} learning rates each)", verbose=verbose
    ):
        net = model(
            ln, train_depth, train_width, train_heads, train_vocab, train_seq_len, classes=train_seq_len
        )
        r = adam_runs(net, optim(1.0, w), lrs, x_tr, y_tr, x_te, y_te, seed)
        result["train"][arm] = {k: v.tolist() for k, v in r.items()}
        if verbose:
            for i, lr in enumerate(lrs):
                print(
                    f"{arm:12s} lr {lr:g}: loss step 1 {r['loss'][i, 0]:.3f}, max {r['loss'][i].max():.2f}; "
                    f"test loss {r['test_loss'][i]:.3f}, accuracy {r['test_accuracy'][i]:.3f}"
                )
    result.update(
        train_depth=train_depth,
        train_width=train_width,
        train_heads=train_heads,
        train_seq_len=train_seq_len,
        train_vocab=train_vocab,
        lrs=list(lrs),
        steps=steps,
        warmup=warmup,
        stalled_loss=marginal_entropy(train_seq_len, train_vocab),
    )
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "ln_placement.png")
    return result


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    for depth, row in result["init"].items():
        for ln, style in (("post", "-"), ("pre", "--")):
            g = np.asarray(row[ln])
            axes[0].semilogy(
                np.arange(1, len(g) + 1), g, style, marker="o", ms=2, label=f"{ln}-LN, L={depth}"
            )
    axes[0].set(
        xlabel="block l", ylabel="||dL/dtheta_l|| at initialization", title="Per-block gradient norms"
    )
    train, lrs = result["train"], result["lrs"]
    colors = {"post": "C3", "pre": "C0", "post_warmup": "C2"}
    labels = {"post": "post-LN", "pre": "pre-LN", "post_warmup": f"post-LN, {result['warmup']}-step warm-up"}
    # the learning rate where warm-up-free post-LN falls furthest behind pre-LN
    gap = np.asarray(train["post"]["test_loss"]) - np.asarray(train["pre"]["test_loss"])
    i = int(np.argmax(gap))
    width = max(1, result["steps"] // 30)
    for arm, r in train.items():
        loss = np.asarray(r["loss"][i])
        steps = np.arange(1, len(loss) + 1)
        axes[1].loglog(steps, loss, color=colors[arm], lw=0.6, alpha=0.45)
        smooth = np.convolve(loss, np.ones(width) / width, mode="valid")
        axes[1].loglog(steps[width - 1 :], smooth, color=colors[arm], lw=1.6, label=labels[arm])
        axes[2].semilogx(lrs, r["test_loss"], "o-", color=colors[arm], label=labels[arm])
    for ax in axes[1:]:
        ax.axhline(result["stalled_loss"], color="gray", ls=":", label="stalled: label marginal's entropy")
    axes[1].set(
        xlabel="Adam step (its batch's loss before the update)",
        ylabel=f"training loss (nats; thin: per step, thick: mean of {width})",
        title=f"Adam lr {lrs[i]:g} from step 0 (L={result['train_depth']})",
    )
    axes[2].set(
        xlabel="peak learning rate",
        ylabel="held-out loss (nats)",
        yscale="log",
        title=f"After {result['steps']} Adam steps",
    )
    for ax in axes:
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
    train_width=64,
    lrs=(3e-3,),
    steps=12,  # the first steps only: where warm-up-free post-LN's loss jumps
    warmup=50,
    test_samples=64,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ln_placement", help="output directory")
    parser.add_argument("--quick", action="store_true", help="the test-sized run")
    args = parser.parse_args(argv)
    run(**(QUICK if args.quick else {}), out=args.out)


if __name__ == "__main__":
    main()
