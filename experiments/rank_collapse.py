"""Rank collapse in a pre-LN Transformer stack, with and without residuals (Dong et al. 2021).

"Attention is not all you need: pure attention loses rank doubly exponentially with depth":
stacking self-attention blocks without skip connections drives every token's representation to
the same vector (the token matrix X_l tends to 1 x^T), while the skip connections keep it from
collapsing. The model is a researcher's own flax.linen stack (no gradflow inside): token
embeddings -> L pre-LN blocks h = h + MHA(LN(h)) [+ h + MLP(LN(h))] -> a linear readout, on a
toy sequence task (sequences of tokens from a small vocabulary, embedded by a fixed random
table). gradflow cuts it at its blocks (`gradflow.nn.chain`: the skip connections lie inside
each block, so the cuts are valid) and measures, at initialization,

- per block, the relative residual res(X_l) = ||X_l - 1 mean(X_l)||_F / ||X_l||_F (0 iff all
  tokens are equal) and the mean pairwise cosine similarity of the tokens
  (`gradflow.signal.token_measures`, in the states' float32: below ~1e-7 res is rounding);
- per block, the forward spectra of d h_l / d x (`gradflow.spectra.model_spectra`), exact (the
  test checks them against a float64 jacfwd + SVD of the blocks composed by hand).

Claims: without residuals res(X_l) falls by orders of magnitude over the depth and the tokens'
cosine similarity goes to 1, and the end-to-end Jacobian loses rank with them (its singular
values beyond the first d fall below 1e-3 of the largest); with residuals res(X_l) stays of
order one. Measured at initialization only.

Run: `python experiments/rank_collapse.py [--out DIR] [--quick]`.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import flax.linen as nn
import jax
import numpy as np

from gradflow import signal, spectra


class Block(nn.Module):
    """A pre-LN Transformer block; without `residual`, the branches replace the stream."""

    heads: int
    residual: bool = True
    mlp: bool = True

    @nn.compact
    def __call__(self, h):
        d = h.shape[-1]
        a = nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(h))
        h = h + a if self.residual else a
        if self.mlp:
            m = nn.Dense(d)(nn.gelu(nn.Dense(4 * d)(nn.LayerNorm()(h))))
            h = h + m if self.residual else m
        return h


class Transformer(nn.Module):
    """L blocks on embedded tokens (B, T, d), then a per-token linear readout to the vocabulary."""

    depth: int
    heads: int
    vocab: int
    residual: bool = True
    mlp: bool = True

    @nn.compact
    def __call__(self, x):
        for _ in range(self.depth):
            x = Block(self.heads, self.residual, self.mlp)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def tokens(seq_len: int, vocab: int, dim: int, seed: int) -> jax.Array:
    """One toy sequence: random tokens embedded by a fixed random table, shape (1, T, d)."""
    k_ids, k_table = jax.random.split(jax.random.key(seed))
    ids = jax.random.randint(k_ids, (1, seq_len), 0, vocab)
    return jax.random.normal(k_table, (vocab, dim))[ids]


def run(
    depth: int = 24,
    dim: int = 32,
    heads: int = 4,
    seq_len: int = 16,
    vocab: int = 32,
    seed: int = 0,
    out: str | pathlib.Path = "runs/rank_collapse",
    verbose: bool = True,
) -> dict:
    """Both stacks; writes out/result.json, out/rank_collapse.png and out/spectra_<arm>.npz."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x = tokens(seq_len, vocab, dim, seed)
    result: dict = {"depth": depth, "dim": dim, "heads": heads, "seq_len": seq_len, "arms": {}}
    for arm, residual in (("residual", True), ("no_residual", False)):
        model = Transformer(depth, heads, vocab, residual=residual, mlp=residual)  # pure attention without
        variables = model.init(jax.random.key(seed + 1), x)
        blocks = [f"Block_{i}" for i in range(depth)]
        stats = signal.token_measures(model, variables, x, layers=blocks)
        res = spectra.model_spectra(model, variables, x, layers=blocks)
        res.save(out / f"spectra_{arm}.npz")
        logs = res.log_singular_values[:depth]
        result["arms"][arm] = {
            "res": stats["residual"][:depth].tolist(),
            "cosine": stats["cosine"][:depth].tolist(),
            "log_smax": logs[:, 0].tolist(),
            # how much of the end-to-end Jacobian is left beyond its first d directions
            "log_tail_over_max": float(logs[depth - 1, dim] - logs[depth - 1, 0]),
        }
        if verbose:
            print(
                f"{arm:12s} res(X_l) first {stats['residual'][0]:.3g} last {stats['residual'][depth - 1]:.3g}; "
                f"cosine last {stats['cosine'][depth - 1]:.4f}"
            )
    (out / "result.json").write_text(json.dumps(result, indent=2))
    _plot(result, out / "rank_collapse.png")
    return result


def _plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arm, r in result["arms"].items():
        layers = np.arange(1, len(r["res"]) + 1)
        axes[0].semilogy(layers, r["res"], "o-", ms=3, label=arm)
        axes[1].plot(layers, r["cosine"], "o-", ms=3, label=arm)
    axes[0].set(xlabel="block l", ylabel="res(X_l) = ||X - 1 mean||_F / ||X||_F", title="Token rank collapse")
    axes[1].set(xlabel="block l", ylabel="mean pairwise cosine", title="Token similarity")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


QUICK = dict(depth=4, dim=8, heads=2, seq_len=6, vocab=8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/rank_collapse", help="output directory")
    parser.add_argument("--quick", action="store_true", help="the test-sized stack")
    args = parser.parse_args(argv)
    run(**(QUICK if args.quick else {}), out=args.out)


if __name__ == "__main__":
    main()
