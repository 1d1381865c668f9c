"""The layer-chain interface: any model as an ordered list of named layer maps h_l = f_l(h_{l-1}).

A `Chain` is what every part of gradflow that speaks of "layers" asks for: the spectra engine
(products of the layer Jacobians A_l = d h_l / d h_{l-1}), per-layer gradients of a loss with
respect to the states (`state_gradients`), LSUV and the experiments. It is

    h_0 = chain.h0,   h_l = f_l(h_{l-1}),   l = 1 .. chain.depth,

grouped into `Segment`s. A segment is either one layer, whose input and output shapes may differ
(a strided conv, a flatten, a classifier), or a run of identical layers with one state shape and
their parameters stacked on a leading axis, walked by one `lax.scan` (gradflow's scanned blocks,
the transition of a recurrent cell through time), so depth 1000 compiles as fast as depth 10.
Every layer map is `segment.step(segment.shared, params_l, h)`, where `step` is a static,
hashable function (equal models give equal steps, so jitted consumers compile once) and `shared`
and `params_l` are traced pytrees.

Where chains come from (`chain(model, variables, x, layers=...)`):
- gradflow's stacks (`MLPStack`, `RNNStack`, `LSTMStack`, `GRUStack`) build their own: the
  repeated part as one scanned segment (MLP: the blocks, h_0 = embed(x), `readout` = the head,
  or with layers=("embed", "blocks", "head") the whole model from x to y; recurrent: the
  transition through time on the flat carry, fed x_t).
- any `flax.linen.Module`: by default the layers are the outputs of its top-level submodules'
  `__call__`, in call order (`nn.intercept_methods`, no edit of the model); `layers=[...]` picks
  other cut points by module path ("Conv_0", "stage2/block1") or by `cut` marker name. Code
  between two cuts (activations, reshapes, pooling) belongs to the next layer's map. If the
  model computes anything after the last cut, that remainder is a final layer named "output",
  so the chain always runs from x to the model's output y.
- a plain function `f(params, x)` (or a `flax.nnx` module, through `nnx.split`/`nnx.merge`)
  whose layer boundaries are marked with `cut(h, "name")`, an identity marker. An nnx module
  without markers is cut at its top-level submodules' outputs, named by attribute ("stem",
  "blocks.0" for a list of them).
- an nnx model in flax's linen bridge (`nnx.bridge.to_linen(Net, ...)`, how the trainer takes
  one) builds the nnx module inside its call, where no linen interception reaches; that call
  is run with an `nnx_method` (the bridge's own argument) that reports the nnx module's
  top-level submodules' outputs as linen submodule calls are reported, named as for an nnx
  module ("stem", "blocks.0"; "net/stem" inside a linen model); their parameters are the
  bridge's variables at that path (params["blocks"][0]).

Layer l's map of an adapted model is the whole model run with cut l-1's output replaced by h
and cut l's output returned: under `jit` everything outside that stretch is dead code.

Validity: the product A_L ... A_1 is the model's Jacobian only if every path from x to y passes
through every cut. A skip connection that bypasses a cut (y = x + block(x) with the cut inside)
makes a layer depend on the input other than through its own input; `chain` checks this (with
h_{l-1} held fixed, d f_l / d x must vanish, by a random-direction jvp at the chain's states)
and raises naming the cut and suggesting the enclosing block.

States are arrays of any shape (a (1, 28, 28, 1) image batch of one is fine); consumers flatten
them, so Jacobians are over all their entries. BatchNorm: `train=False` (default) uses the
running statistics; `train=True` the batch statistics (the batch map, examples coupled).
Dropout must be off: a chain is a deterministic map.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gradflow.nn._access import kernel_paths as kernel_paths
from gradflow.nn._access import layer_map as layer_map
from gradflow.nn._access import layer_variables as layer_variables
from gradflow.nn._access import subtree as subtree
from gradflow.nn._access import with_layer_variables as with_layer_variables
from gradflow.nn._access import with_subtree as with_subtree
from gradflow.nn._cuts import (
    _check_arrays,
    _CutLayer,
    _NnxApply,
    _options,
    _param_path,
    _probe,
    _select,
)
from gradflow.nn._cuts import call_order as call_order
from gradflow.nn._cuts import cut as cut
from gradflow.nn._cuts import cut_shapes as cut_shapes
from gradflow.nn._cuts import perturbed_apply as perturbed_apply
from gradflow.nn._cuts import takes_train as takes_train
from gradflow.nn._walk import _walk_jit
from gradflow.nn._walk import inputs as inputs
from gradflow.nn._walk import outputs as outputs
from gradflow.nn._walk import walk as walk

Step = Callable[[Any, Any, jax.Array], jax.Array]

# `layers=WHOLE`: the model from its input x to its output y, every part a layer (a stack's input
# projection and head included; an adapted model's default cuts, which already run x -> y).
WHOLE = "whole"


def layer_key(layers: Sequence[str] | str | None) -> tuple[str, ...] | str | None:
    """`layers` as a hashable value (a jit cache key): None, `WHOLE`, or a tuple of names."""
    if layers is None or layers == WHOLE:
        return layers
    return (layers,) if isinstance(layers, str) else tuple(layers)


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers h = step(shared, params[i], h), i = 0 .. depth - 1 (see the module docstring).

    Attributes:
      step: static, hashable (shared, params_l, h) -> h.
      shared: pytree passed to every layer (traced).
      params: None, or a pytree whose leaves have a leading axis of length `depth`.
      names: one name per layer.
      param_path: where this segment's own variables live in each collection of the model's
        variables (variables["params"][*param_path], ...), or None if it has none of its own
        (`layer_variables` reads them, `with_layer_variables` writes them).
      stacked: those variables carry a leading depth axis (one slice per layer: a scanned run).
      scope: the module path at which the layer's own module runs inside `step`: () for a
        module applied on its own (gradflow's blocks), param_path for an adapted model's layer
        (the whole model runs). So the submodule whose params sit at param_path + sub is called
        at path scope + sub while the step runs (how LSUV finds a layer's Dense/Conv output).
    """

    step: Step
    shared: Any
    params: Any
    names: tuple[str, ...]
    param_path: tuple[str, ...] | None = None
    stacked: bool = False
    scope: tuple[str, ...] = ()

    @property
    def depth(self) -> int:
        return len(self.names)

    def layer_params(self, i: int) -> Any:
        """The per-layer parameters of layer i (0-based within the segment)."""
        return None if self.params is None else jax.tree.map(lambda a: a[i], self.params)


@dataclasses.dataclass(frozen=True)
class Chain:
    """A model as named layer maps from h0 (see the module docstring).

    Attributes:
      segments: the layers, in order.
      h0: the state entering layer 1.
      readout: optional map from the last state to the model output, for stacks whose head is
        not a layer of the chain (MLPStack); None where the last layer's output is the output.
    """

    segments: tuple[Segment, ...]
    h0: jax.Array
    readout: Callable[[jax.Array], jax.Array] | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        """Layer names, in order."""
        return tuple(n for seg in self.segments for n in seg.names)

    @property
    def depth(self) -> int:
        return sum(seg.depth for seg in self.segments)

    def states(self) -> tuple[jax.Array, ...]:
        """The layer outputs, one stacked array per segment: (depth_s, *state shape)."""
        return tuple(_walk_jit(*self.parts(), self.h0, observe=outputs)[1])

    def final(self) -> jax.Array:
        """h_L."""
        return _walk_jit(*self.parts(), self.h0)[0]

    def perturbed_final(self, perturbations: Sequence[jax.Array], h0_perturbation: Any = 0.0) -> jax.Array:
        """h_L with perturbations[s][i] added to the output of layer i of segment s (and to h0).

        With zero perturbations this is `final()`; its gradient with respect to them is dL/dh_l
        at every layer (`state_gradients`).
        """
        if len(perturbations) != len(self.segments):
            raise ValueError(f"{len(perturbations)} perturbations for {len(self.segments)} segments")
        h0 = self.h0 + h0_perturbation
        return _walk_jit(*self.parts(), h0, perturbations=tuple(perturbations))[0]

    def state_sizes(self) -> np.ndarray:
        """N_0 .. N_L: the number of values in h_0 and in each layer's output (by shape only)."""
        sizes = [int(np.prod(self.h0.shape))]
        for hs in jax.eval_shape(self.states):
            sizes += [int(np.prod(hs.shape[1:]))] * int(hs.shape[0])
        return np.asarray(sizes)

    def parts(self) -> tuple[tuple, tuple, tuple]:
        """(static ((step, depth), ...), traced shared parts, traced params) per segment: what
        compiled walks over the chain (the forward walk, the spectra engines) take."""
        steps = tuple((seg.step, seg.depth) for seg in self.segments)
        return steps, tuple(seg.shared for seg in self.segments), tuple(seg.params for seg in self.segments)

    def state_gradients(self, loss: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        """dL/dh_0 and dL/dh_l for every layer, L = loss(h_L), in one backward pass.

        The gradient with respect to zero perturbations added to every state (no model edit).

        Returns:
          (dL/dh0 with h0's shape, one (depth_s, *state shape) array per segment).
        """
        zeros = [jnp.zeros((seg.depth, *shape), self.h0.dtype) for seg, shape in self._out_shapes()]
        g0, g = jax.grad(lambda e0, e: loss(self.perturbed_final(e, e0)), argnums=(0, 1))(
            jnp.zeros_like(self.h0), zeros
        )
        return g0, g

    def _out_shapes(self) -> list[tuple[Segment, tuple[int, ...]]]:
        shapes = [s.shape[1:] for s in jax.eval_shape(self.states)]
        return list(zip(self.segments, shapes, strict=True))


def chain(
    model: Any,
    variables: Any,
    x: jax.Array,
    *,
    layers: Sequence[str] | None = None,
    train: bool = False,
    check: bool = True,
) -> Chain:
    """Any model as a `Chain` of named layer maps (see the module docstring).

    Args:
      model: a gradflow stack, a `flax.linen.Module` (an `nnx.bridge.to_linen` model: cut at
        its nnx module's top-level submodules), a `flax.nnx.Module` (cut markers, else its
        top-level submodules), or a plain function f(params, x) with `cut` markers.
      variables: the model's variables (linen: {"params": ..., "batch_stats": ...}; a plain
        function: its params; nnx: ignored, pass None).
      x: one input as the model takes it; the chain starts from it (stacks: from embed(x)).
      layers: cut points by module path or marker name (default: see the module docstring).
        `MLPStack`: which of its parts are layers, any of "embed", "blocks", "head" with
        "blocks" among them (default: the blocks, h0 = embed(x), the head as readout);
        recurrent stacks: None (their layers are the time steps). `WHOLE` ("whole"): the model
        from x to its output, whatever it is (consumers that treat every layer, as LSUV does).
      train: BatchNorm batch statistics (the batch map) instead of running averages.
      check: verify that no skip connection bypasses a cut (one jitted jvp per layer).

    Returns:
      The chain, from h0 = x (adapters) to the model output.
    """
    if builds_chain(model):
        return model.chain(variables, x, train=train, layers=layers)
    if layers == WHOLE:
        layers = None
    try:
        from flax import nnx

        if isinstance(model, nnx.Module):
            graphdef, state = nnx.split(model)
            nnx_name = type(model).__name__
            model, variables = _NnxApply(graphdef), state
            if not any(kind == "cut" for kind, _, _ in _probe(model, variables, jnp.asarray(x), ())[0].seen):
                model = _NnxApply(graphdef, children=True)  # no markers: its submodules' outputs
                try:
                    _probe(model, variables, jnp.asarray(x), ())
                except ValueError as e:  # the wrapped submodules went where only modules go
                    raise ValueError(
                        f"{nnx_name}: cutting this nnx module at its submodules failed ({e}); "
                        "mark its layer boundaries with gradflow.nn.cut(h, name) in __call__"
                    ) from e
    except ImportError:  # pragma: no cover - flax without nnx
        pass
    if isinstance(model, nn.Module):
        options, what = _options(model, variables, train), type(model).__name__
    elif callable(model):
        options, what = (), getattr(model, "__name__", type(model).__name__)
    else:
        raise ValueError(
            f"cannot cut {type(model).__name__} into layers: pass a linen/nnx module or a function"
        )
    x = jnp.asarray(x)
    events, out = _probe(model, variables, x, options)
    cuts = _select(events, layers, what)
    _check_arrays(events, cuts)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise ValueError(f"{what} returns {type(out).__name__}, not an array")
    names = list(cuts)
    if cuts[-1] not in events.returned:  # the model computes more after the last cut
        names.append("output")
    params = variables.get("params", {}) if isinstance(variables, dict) else {}
    segments = []
    for i, name in enumerate(names):
        path = _param_path(model, name, params)
        step = _CutLayer(model, cuts, i, options)
        segments.append(
            Segment(
                step=step,
                shared=(variables, x),
                params=None,
                names=(name,),
                param_path=path,
                scope=path or (),
            )
        )
    result = Chain(segments=tuple(segments), h0=x)
    if check:
        _check_no_bypass(result)
    return result


def provides_chain(method: Callable) -> Callable:
    """Mark a linen module's `chain(variables, x, *, train, layers)` method as gradflow's own
    layer decomposition (gradflow's stacks); `chain` then asks the model instead of cutting it."""
    method.__gradflow_chain__ = True
    return method


def builds_chain(model: Any) -> bool:
    """Whether `model` builds its own chain (a gradflow stack), as opposed to being cut into one.

    A user model's own method that happens to be called `chain` does not count.
    """
    method = getattr(type(model), "chain", None)
    return isinstance(model, nn.Module) and getattr(method, "__gradflow_chain__", False)


@functools.partial(jax.jit, static_argnums=0)
def _bypass_norms(steps: tuple[Step, ...], shared: tuple, h0: jax.Array, key: jax.Array) -> jax.Array:
    """max |d f_l / d x . v| with h_{l-1} held fixed, for layers 2 .. L (v a random direction)."""
    h, out = h0, []
    for i, (step, sh) in enumerate(zip(steps, shared, strict=True)):
        h_next = step(sh, None, h)
        if i > 0:
            variables, x = sh
            v = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            _, t = jax.jvp(
                lambda x_, variables=variables, h=h, step=step: step((variables, x_), None, h), (x,), (v,)
            )
            out.append(jnp.max(jnp.abs(t)) / (jnp.max(jnp.abs(h_next)) + 1e-30))
        h = h_next
    return jnp.stack(out) if out else jnp.zeros((0,), h0.dtype)


def _check_no_bypass(c: Chain) -> None:
    if not jnp.issubdtype(c.h0.dtype, jnp.floating):
        return  # integer inputs (token ids) cannot be perturbed: nothing to check against
    steps = tuple(seg.step for seg in c.segments)
    shared = tuple(seg.shared for seg in c.segments)
    norms = np.asarray(_bypass_norms(steps, shared, c.h0, jax.random.key(0)))
    for i, value in enumerate(norms, start=1):
        if not np.isfinite(value):
            raise ValueError(
                f"layer {c.layers[i]!r} computes non-finite values at the chain's states "
                "(NaN/Inf in its parameters or its input)"
            )
        if value != 0.0:
            name, prev = c.layers[i], c.layers[i - 1]
            enclosing = prev.split("/")[0] if "/" in prev else None
            hint = f" (e.g. {enclosing!r})" if enclosing and enclosing != prev else ""
            raise ValueError(
                f"the cut at {prev!r} is bypassed: layer {name!r} depends on the model input other "
                "than through it (a skip connection around the cut), so the product of layer "
                f"Jacobians would not be the model's Jacobian; cut at the enclosing block{hint} instead"
            )
