"""Small synthetic datasets the training tests share (imported by the test modules)."""

import jax
import jax.numpy as jnp


def classification(seed, n, d=8, c=3):
    """Linearly separable labels: y = argmax(x @ w)."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    return x, jnp.argmax(x @ jax.random.normal(kw, (d, c)), axis=-1)


def regression(seed, n, d=8):
    """Teacher-student: y = tanh(x @ w)."""
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    return x, jnp.tanh(x @ jax.random.normal(kw, (d, 1)))[:, 0]
