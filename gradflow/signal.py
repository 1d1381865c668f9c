"""Signal-propagation measures of token states, per layer: rank collapse, token similarity, attention entropy.

For a token matrix X (T x D, one row per token; any leading batch axes are averaged over):

- `rank_collapse_residual`: res(X) = ||X - 1 xbar^T||_F / ||X||_F with xbar the mean token
  (Dong, Cordonnier & Loukas 2021): 0 iff every token is the same vector. Pure self-attention
  drives it to 0 doubly exponentially in depth; skip connections and MLPs stop it.
- `token_cosine`: the mean cosine similarity over the T (T - 1) ordered pairs of distinct tokens
  (1 when the tokens are parallel: the collapse seen by a LayerNorm'd network).
- `attention_entropy`: the mean over heads and queries of -sum_k a_qk log a_qk of attention
  weights (..., H, T_q, T_k): log T_k for uniform attention, 0 for one-hot.

All three are pure jnp functions, usable inside `jit` and `vmap`. `token_measures` applies them
to every layer of a model's chain (`gradflow.nn.chain`: gradflow's `TransformerStack` or a
user's own attention model), with the attention weights that flax's `MultiHeadDotProductAttention`
sows (`sow_weights=True`, as `TransformerBlock` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gradflow.nn.chains import chain as make_chain
from gradflow.nn.transformer import TransformerStack


def _tokens(x: ArrayLike, what: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[-2] < 2:
        raise ValueError(f"{what} needs token states (..., T, D) with T >= 2, got shape {x.shape}")
    return x


def rank_collapse_residual(x_TxD: ArrayLike) -> jax.Array:
    """||X - 1 xbar^T||_F / ||X||_F, averaged over leading axes (0 for X = 0)."""
    x = _tokens(x_TxD, "rank_collapse_residual")
    centred = x - jnp.mean(x, axis=-2, keepdims=True)
    num = jnp.sqrt(jnp.sum(centred**2, axis=(-2, -1)))
    den = jnp.sqrt(jnp.sum(x**2, axis=(-2, -1)))
    return jnp.mean(jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0))


def token_cosine(x_TxD: ArrayLike) -> jax.Array:
    """Mean cosine similarity of distinct token pairs, averaged over leading axes."""
    x = _tokens(x_TxD, "token_cosine")
    t = x.shape[-2]
    norms = jnp.sqrt(jnp.sum(x**2, axis=-1, keepdims=True))
    u = x / jnp.where(norms > 0, norms, 1.0)
    gram = u @ jnp.swapaxes(u, -1, -2)
    off = jnp.sum(gram, axis=(-2, -1)) - jnp.trace(gram, axis1=-2, axis2=-1)
    return jnp.mean(off / (t * (t - 1)))


def attention_entropy(weights_HxTxT: ArrayLike) -> jax.Array:
    """Mean entropy (nats) of each query's attention distribution over the keys."""
    a = jnp.asarray(weights_HxTxT)
    if a.ndim < 2:
        raise ValueError(f"attention_entropy needs weights (..., T_q, T_k), got shape {a.shape}")
    terms = jnp.where(a > 0, -a * jnp.log(jnp.where(a > 0, a, 1.0)), 0.0)
    return jnp.mean(jnp.sum(terms, axis=-1))


def _attention_weights(model: Any, variables: Any, x: jax.Array) -> list[jax.Array]:
    """Every sown "attention_weights" array, in the order the modules were created."""
    _, state = model.apply(variables, x, mutable=["intermediates"])
    leaves = jax.tree_util.tree_flatten_with_path(state.get("intermediates", {}))[0]
    return [a for path, a in leaves if any(getattr(k, "key", None) == "attention_weights" for k in path)]


def token_measures(
    model: Any, variables: Any, x: ArrayLike, *, layers: Sequence[str] | None = None
) -> dict[str, Any]:
    """res(X_l) and the token cosine of every layer's output, and the attention entropy of each
    sown attention module.

    Args:
      model, variables, x: as `gradflow.nn.chain` takes them (x one sequence or a batch); the
        layers' states must be token matrices (..., T, D).
      layers: the chain's cut points (default: its default layers, a stack's blocks).

    Returns:
      {"layers": names, "residual": (L,), "cosine": (L,), "attention_entropy": (A,)} with A the
      number of attention modules that sow their weights (a `TransformerStack`: one per block;
      a user's linen model: one per sowing module, in creation order).
    """
    x = jnp.asarray(x)
    c = make_chain(model, variables, x, layers=layers)
    states = [h for seg_states in c.states() for h in seg_states]
    if any(h.ndim < 2 or h.shape[-2] < 2 for h in states):
        shapes = sorted({tuple(h.shape) for h in states})
        raise ValueError(
            f"token_measures needs every layer's state to be tokens (..., T >= 2, D); got {shapes}"
        )
    entropies = []
    if isinstance(model, nn.Module):
        for a in _attention_weights(model, variables, x):
            entropies += (
                list(jax.vmap(attention_entropy)(a))
                if isinstance(model, TransformerStack)
                else [attention_entropy(a)]
            )
    return {
        "layers": c.layers,
        "residual": np.asarray([rank_collapse_residual(h) for h in states]),
        "cosine": np.asarray([token_cosine(h) for h in states]),
        "attention_entropy": np.asarray(entropies),
    }
