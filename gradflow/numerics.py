"""Numerically honest reductions for quantities that span hundreds of orders of magnitude.

Gradient norms of deep saturating nets fall below 1e-19, where squaring an element underflows
in float32 (1e-38), so `jnp.linalg.norm` returns 0 for a perfectly representable vector.
Scaling by the largest magnitude first keeps every representable norm representable.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


def x64() -> contextlib.AbstractContextManager:
    """Context manager enabling float64 in jax (theory, references, small exact checks)."""
    if hasattr(jax, "enable_x64"):
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older jax

    return enable_x64()


def stable_norm(x: ArrayLike) -> jax.Array:
    """The Euclidean norm of all of `x`, computed as m * ||x / m|| with m = max |x|.

    Exact for any x whose norm is representable; 0 for x == 0; nan/inf propagate.
    """
    x = jnp.asarray(x)
    m = jnp.max(jnp.abs(x))
    safe = jnp.where(m > 0, m, 1.0)
    scaled = jnp.where(jnp.isfinite(safe), x / safe, x)
    return jnp.where(jnp.isfinite(safe), safe * jnp.sqrt(jnp.sum(scaled * scaled)), m)
