"""A chain layer's own variables, wherever the model keeps them: read, write, train one layer.

What consumers that change a layer's parameters use (LSUV rescales a layer's kernel, pretraining
trains one layer as an autoencoder, the atlas and sweeps scale every kernel): they ask a
`gradflow.nn.chains.Segment` where its variables live (`param_path`, `stacked`) instead of reading
a model's parameter names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import jax

if TYPE_CHECKING:
    from gradflow.nn.chains import Segment


def subtree(tree: Any, path: Sequence[Any]) -> Any:
    """The subtree of nested dicts `tree` at `path` (a `param_path`, a `kernel_paths` entry)."""
    for key in path:
        tree = tree[key]
    return tree


def with_subtree(tree: Any, path: Sequence[Any], value: Any) -> Any:
    """A copy of nested dicts `tree` with the subtree at `path` replaced by `value`."""
    if not path:
        return value
    head, *rest = path
    return {**tree, head: with_subtree(tree[head], rest, value)}


def layer_variables(variables: Any, seg: Segment, i: int, collection: str = "params") -> Any:
    """Layer i of `seg`'s own variables in `collection` (a subtree of variables[collection])."""
    if seg.param_path is None:
        raise ValueError(f"layer {seg.names[i]!r} has no variables of its own")
    tree = subtree(variables[collection], seg.param_path)
    return jax.tree.map(lambda a: a[i], tree) if seg.stacked else tree


def with_layer_variables(
    variables: Any, seg: Segment, i: int | None, new: Any, collection: str = "params"
) -> Any:
    """A copy of `variables` with layer i of `seg`'s own variables in `collection` set to `new`
    (i=None: all of the segment's, stacked as they are stored)."""
    if seg.param_path is None:
        raise ValueError(f"layer {seg.names[i or 0]!r} has no variables of its own")
    tree = variables[collection]
    if seg.stacked and i is not None:
        new = jax.tree.map(lambda a, b: a.at[i].set(b), subtree(tree, seg.param_path), new)
    return {**variables, collection: with_subtree(tree, seg.param_path, new)}


def layer_map(variables: Any, seg: Segment, i: int) -> Callable[[Any, jax.Array], jax.Array]:
    """Layer i of `seg` as a function (own params, h) -> h_next of its own "params" (the rest of
    the model held as in `variables`): what a layer-wise procedure (pretraining) trains."""
    if seg.param_path is None:
        raise ValueError(f"layer {seg.names[i]!r} has no variables of its own")
    if seg.params is None:  # an adapted model's layer: its variables are the shared ones
        _, x = seg.shared
        return lambda own, h: seg.step((with_layer_variables(variables, seg, i, own), x), None, h)
    p = seg.layer_params(i)
    return lambda own, h: seg.step(seg.shared, {**p, "params": own}, h)


def kernel_paths(params: Any) -> list[tuple[str, ...]]:
    """Paths in a params tree of its leaves named "kernel" (flax's Dense/Conv weights)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [tuple(str(getattr(k, "key", k)) for k in path) for path, _ in leaves]
    return [p for p in paths if p[-1] == "kernel"]
