"""The one forward pass over a layer chain's parts, observed layer by layer.

Every consumer that runs a chain forward (its states and output, dL/dh_l by zero perturbations,
the spectra engines' linearization points, LSUV's per-layer variances, the atlas's finiteness
check) calls `walk` with its own observer instead of writing the loop again: a segment of one
layer is applied as it is (its state may change shape), a run of identical layers is one
`lax.scan`, so the walk compiles as fast at depth 1000 as at depth 10.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

Step = Callable[[Any, Any, jax.Array], jax.Array]


def outputs(step: Step, shared: Any, p: Any, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`walk` observer: record each layer's output."""
    h_next = step(shared, p, h)
    return h_next, h_next


def inputs(step: Step, shared: Any, p: Any, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`walk` observer: record each layer's input (what the spectra engines linearize at)."""
    return step(shared, p, h), h


def _no_record(step: Step, shared: Any, p: Any, h: jax.Array) -> tuple[jax.Array, None]:
    return step(shared, p, h), None


def walk(
    steps: tuple[tuple[Step, int], ...],
    shared: tuple,
    params: tuple,
    h0: jax.Array,
    *,
    observe: Callable | tuple[Callable, ...] | None = None,
    perturbations: tuple | None = None,
    upto: int | None = None,
) -> tuple[jax.Array, list]:
    """The one forward pass over a chain's parts (`Chain.parts()`): pure, for use under jit.

    Args:
      steps, shared, params: `Chain.parts()`.
      h0: the state entering layer 1.
      observe: (step, shared, params_l, h) -> (h_next, record), run for every layer in place
        of the step (`outputs`, `inputs`, or a consumer's own: LSUV's variance, a finiteness
        flag), or one such function per segment; None records nothing.
      perturbations: None, or one (depth_s, *state shape) array per segment added to the
        layers' outputs (`Chain.state_gradients`).
      upto: walk only the segments that begin before layer `upto` (1-based; default all).

    Returns:
      (the last state walked, one stacked (depth_s, ...) record per walked segment; None
      entries where `observe` is None).
    """
    observe = _no_record if observe is None else observe
    observers = observe if isinstance(observe, tuple) else (observe,) * len(steps)
    eps_all = (None,) * len(steps) if perturbations is None else perturbations
    h, out, at = h0, [], 0
    for (step, depth), sh, ps, eps, observe in zip(steps, shared, params, eps_all, observers, strict=True):
        if upto is not None and at >= upto:
            break
        at += depth

        def body(h, xs, step=step, sh=sh, observe=observe):
            p, e = xs
            h, rec = observe(step, sh, p, h)
            return (h if e is None else h + e), rec

        if depth == 1:  # one layer, whose state may change shape: no loop (its carry would)
            h, rec = body(h, jax.tree.map(lambda a: a[0], (ps, eps)))
            out.append(jax.tree.map(lambda a: a[None], rec))
            continue
        h, recs = lax.scan(body, h, (ps, eps), length=depth)
        out.append(recs)
    return h, out


# One compiled program per chain structure: called eagerly (states, final, a user's script),
# the walk would otherwise compile each op of each unrolled layer, and the scans, one by one.
_walk_jit = jax.jit(walk, static_argnames=("steps", "observe", "upto"))
