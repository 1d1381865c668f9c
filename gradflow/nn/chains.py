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
  repeated part as one scanned segment (MLP: the blocks, h_0 = embed(x), `readout` = the head;
  recurrent: the transition through time on the flat carry, fed x_t).
- any `flax.linen.Module`: by default the layers are the outputs of its top-level submodules'
  `__call__`, in call order (`nn.intercept_methods`, no edit of the model); `layers=[...]` picks
  other cut points by module path ("Conv_0", "stage2/block1") or by `cut` marker name. Code
  between two cuts (activations, reshapes, pooling) belongs to the next layer's map. If the
  model computes anything after the last cut, that remainder is a final layer named "output",
  so the chain always runs from x to the model's output y.
- a plain function `f(params, x)` (or a `flax.nnx` module, through `nnx.split`/`nnx.merge`)
  whose layer boundaries are marked with `cut(h, "name")`, an identity marker.

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

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from jax import lax

Step = Callable[[Any, Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Segment:
    """Layers h = step(shared, params[i], h), i = 0 .. depth - 1 (see the module docstring).

    Attributes:
      step: static, hashable (shared, params_l, h) -> h.
      shared: pytree passed to every layer (traced).
      params: None, or a pytree whose leaves have a leading axis of length `depth`.
      names: one name per layer.
      param_path: where this segment's trainable parameters live in variables["params"]
        (stacked on the depth axis when depth > 1), or None if it has none of its own.
    """

    step: Step
    shared: Any
    params: Any
    names: tuple[str, ...]
    param_path: tuple[str, ...] | None = None

    @property
    def depth(self) -> int:
        return len(self.names)

    def layer_params(self, i: int) -> Any:
        """The per-layer parameters of layer i (0-based within the segment)."""
        return None if self.params is None else jax.tree.map(lambda a: a[i], self.params)

    def run(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(output, inputs): the segment's output and the stacked inputs of its layers (depth, *h.shape)."""
        if self.depth == 1:
            return self.step(self.shared, self.layer_params(0), h), h[None]
        return lax.scan(lambda h, p: (self.step(self.shared, p, h), h), h, self.params, length=self.depth)


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
        out, h = [], self.h0
        for seg in self.segments:
            if seg.depth == 1:
                h = seg.step(seg.shared, seg.layer_params(0), h)
                out.append(h[None])
            else:
                h, hs = lax.scan(lambda h, p, seg=seg: (seg.step(seg.shared, p, h),) * 2, h, seg.params)
                out.append(hs)
        return tuple(out)

    def final(self) -> jax.Array:
        """h_L."""
        h = self.h0
        for seg in self.segments:
            h = seg.run(h)[0]
        return h

    def perturbed_final(self, perturbations: Sequence[jax.Array], h0_perturbation: Any = 0.0) -> jax.Array:
        """h_L with perturbations[s][i] added to the output of layer i of segment s (and to h0).

        With zero perturbations this is `final()`; its gradient with respect to them is dL/dh_l
        at every layer (`state_gradients`).
        """
        h = self.h0 + h0_perturbation
        for seg, eps in zip(self.segments, perturbations, strict=True):
            if seg.depth == 1:
                h = seg.step(seg.shared, seg.layer_params(0), h) + eps[0]
            else:

                def body(h, xs, seg=seg):
                    p, e = xs
                    return seg.step(seg.shared, p, h) + e, None

                h, _ = lax.scan(body, h, (seg.params, eps), length=seg.depth)
        return h

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


# --- cut markers -------------------------------------------------------------------------------

_HOOK: contextvars.ContextVar = contextvars.ContextVar("gradflow_cut_hook", default=None)


def cut(h: jax.Array, name: str) -> jax.Array:
    """Mark a layer boundary named `name` in a model's forward code: the identity on h.

    `gradflow.nn.chain` cuts a plain function, an nnx module or a linen model at these markers.
    """
    hook = _HOOK.get()
    return h if hook is None else hook(name, h)


@contextlib.contextmanager
def _hooked(hook: Callable[[str, Any], Any]):
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


class _Events:
    """Counts cut events in call order; substitutes one, records others (a single forward run).

    Written by hand because flax's interception sees linen submodule calls only, not `cut`
    markers in plain functions; one event stream serves both.
    """

    def __init__(
        self,
        wanted: tuple[str, ...] | None,
        substitute: tuple[int, Any] | None = None,
        add: Sequence[jax.Array] | None = None,
    ):
        self.wanted = wanted  # None: record every module call and marker (a probe)
        self.substitute = substitute
        self.add = add  # perturbations added to the wanted events' outputs, in order
        self.seen: list[tuple[str, str, Any]] = []  # (kind, name, value) in completion order
        self._counts: dict[str, int] = {}

    def name(self, base: str) -> str:
        n = self._counts.get(base, 0) + 1
        self._counts[base] = n
        return base if n == 1 else f"{base}#{n}"

    def hit(self, kind: str, name: str, compute: Callable[[], Any]) -> Any:
        """The value of a cut event: computed, or the substitute if it is the one to replace."""
        if self.wanted is not None and name not in self.wanted:
            return compute()
        if self.substitute is not None and len(self.seen) == self.substitute[0]:
            value = self.substitute[1]
        else:
            value = compute()
        if self.add is not None:
            value = value + self.add[len(self.seen)]
        self.seen.append((kind, name, value))
        return value


def _run(target: Any, variables: Any, x: Any, options: tuple, events: _Events, full: bool = False) -> Any:
    """The model's output, with `events` told of every cut (linen module calls and markers).

    full: return `apply`'s whole result ((output, mutated collections) when some are mutable).
    """

    def on_cut(name, h):
        return events.hit("cut", events.name(name), lambda: h)

    if isinstance(target, nn.Module):

        def interceptor(next_fun, args, kwargs, context):
            path = context.module.path
            if context.method_name != "__call__" or not path:
                return next_fun(*args, **kwargs)
            return events.hit("module", events.name("/".join(path)), lambda: next_fun(*args, **kwargs))

        opts = dict(options)
        mutable = opts.pop("mutable", False)
        with _hooked(on_cut), nn.intercept_methods(interceptor):
            out = target.apply(variables, x, mutable=mutable, **opts)
        return out[0] if mutable else out
    with _hooked(on_cut):
        return target(variables, x)


@dataclasses.dataclass(frozen=True)
class _CutLayer:
    """Layer `index` of an adapted model: cut index-1's output := h, return cut index's output
    (the model's output for the last layer). Frozen, so equal models give equal, hashable steps."""

    target: Any
    cuts: tuple[str, ...]
    index: int
    options: tuple = ()

    def __call__(self, shared: Any, _: Any, h: jax.Array) -> jax.Array:
        variables, x = shared
        if self.index == 0:
            x = h  # the first layer's input is the model input itself
        events = _Events(self.cuts, None if self.index == 0 else (self.index - 1, h))
        out = _run(self.target, variables, x, self.options, events)
        if self.index == len(self.cuts):
            return out
        return events.seen[self.index][2]


@dataclasses.dataclass(frozen=True)
class _NnxApply:
    """An nnx module as a pure function of its state: (state, x) -> merge(graphdef, state)(x)."""

    graphdef: Any

    def __call__(self, state: Any, x: jax.Array) -> jax.Array:
        from flax import nnx

        return nnx.merge(self.graphdef, state)(x)


def takes_train(model: nn.Module) -> bool:
    """Whether a linen model's `__call__` takes a `train` argument (gradflow passes it where it does)."""
    return "train" in inspect.signature(type(model).__call__).parameters


def perturbed_apply(
    model: nn.Module,
    cuts: tuple[str, ...],
    perturbations: Sequence[jax.Array],
    variables: Any,
    x: Any,
    **kwargs,
) -> Any:
    """`model.apply(variables, x, **kwargs)` with perturbations[i] added to the output of cut i.

    With zero perturbations this is the model itself; the gradient of a loss with respect to
    them is dL/dh_l at every cut (the trainer's per-layer state gradients), with no model edit.
    """
    events = _Events(cuts, add=perturbations)
    return _run(model, variables, x, tuple(kwargs.items()), events, full=True)


def cut_shapes(model: nn.Module, cuts: tuple[str, ...], variables: Any, x: Any, **kwargs) -> list:
    """The shapes of the cuts' outputs when the model runs on x (the perturbations' shapes)."""
    found: list = []

    def forward(variables, x):
        events = _Events(cuts)
        out = _run(model, variables, x, tuple(kwargs.items()), events)
        found.extend(jax.ShapeDtypeStruct(v.shape, v.dtype) for _, _, v in events.seen)
        return out

    jax.eval_shape(forward, variables, x)
    return found


def call_order(model: nn.Module, variables: Any, x: Any) -> list[str]:
    """The model's top-level submodules in the order their calls complete (one abstract forward).

    The order computations run in, where a params dict's own order may be sorted (jax sorts
    dict keys whenever it rebuilds a tree).
    """
    events, _ = _probe(model, variables, x, _options(model, variables, False))
    order: list[str] = []
    for _, name, _ in events.seen:
        top = name.split("#")[0].split("/")[0]
        if top not in order:
            order.append(top)
    return order


def _options(model: nn.Module, variables: Any, train: bool) -> tuple:
    """apply() keyword arguments: `train` if the model's __call__ takes it, mutable batch stats."""
    if train and not takes_train(model):
        raise ValueError(f"train=True, but {type(model).__name__}.__call__ takes no `train` argument")
    opts = {"train": train} if takes_train(model) else {}
    if train and "batch_stats" in variables:
        opts["mutable"] = ("batch_stats",)
    return tuple(sorted(opts.items()))


def _probe(target: Any, variables: Any, x: jax.Array, options: tuple) -> tuple[_Events, Any]:
    """Every module call and cut marker of one forward pass, by shape (no computation)."""
    events = _Events(None)

    def forward(variables, x):
        out = _run(target, variables, x, options, events)
        return out, [v for _, _, v in events.seen]

    try:
        out, _ = jax.eval_shape(forward, variables, x)
    except flax_errors.InvalidRngError as e:
        raise ValueError(
            "the model asked for a PRNG stream while being cut into layers (dropout in training "
            "mode?): a chain is a deterministic map; use train=False / deterministic settings"
        ) from e
    except (TypeError, ValueError, flax_errors.FlaxError) as e:
        raise ValueError(
            f"running the model on x of shape {tuple(jnp.shape(x))} failed ({type(e).__name__}: {e}); "
            "pass one input as the model takes it (a batch of one is fine)"
        ) from e
    return events, out


def _select(events: _Events, layers: Sequence[str] | None, what: str) -> tuple[str, ...]:
    markers = [n for k, n, _ in events.seen if k == "cut"]
    modules = [n for k, n, _ in events.seen if k == "module"]
    if layers is None:
        if markers:
            return tuple(markers)
        top = tuple(n for n in modules if "/" not in n.split("#")[0])
        if not top:
            raise ValueError(
                f"{what} has no submodules or cut markers to split it into layers; mark layer "
                "boundaries with gradflow.nn.cut(h, name) or pass layers=[...]"
            )
        return top
    if isinstance(layers, str):
        layers = [layers]
    layers = tuple(layers)
    known = markers + modules
    missing = [n for n in layers if n not in known]
    if missing:
        raise ValueError(f"layers {missing} are not in {what}; its cut points are: {', '.join(known)}")
    for a in layers:
        for b in layers:
            if a != b and b.startswith(a + "/"):
                raise ValueError(f"layers {a!r} and {b!r} overlap (one is inside the other); pick one")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers repeat a name: {list(layers)}")
    order = [n for _, n, _ in events.seen if n in layers]
    return tuple(order)


def _check_arrays(events: _Events, cuts: tuple[str, ...]) -> None:
    for _, name, value in events.seen:
        if name in cuts and not isinstance(value, jax.Array):
            raise ValueError(
                f"layer {name!r} returns {type(value).__name__}, not an array: a chain's states are "
                "arrays; cut at a module that returns one (or at a cut marker)"
            )


def _param_path(target: Any, name: str, params: Any) -> tuple[str, ...] | None:
    if not isinstance(target, nn.Module) or name == "output":
        return None
    path = tuple(name.split("#")[0].split("/"))
    tree = params
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return path


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
      model: a gradflow stack, a `flax.linen.Module`, a `flax.nnx.Module` (cut markers), or a
        plain function f(params, x) with `cut` markers.
      variables: the model's variables (linen: {"params": ..., "batch_stats": ...}; a plain
        function: its params; nnx: ignored, pass None).
      x: one input as the model takes it; the chain starts from it (stacks: from embed(x)).
      layers: cut points by module path or marker name (default: see the module docstring).
        Gradflow stacks have fixed layers; pass None.
      train: BatchNorm batch statistics (the batch map) instead of running averages.
      check: verify that no skip connection bypasses a cut (one jitted jvp per layer).

    Returns:
      The chain, from h0 = x (adapters) to the model output.
    """
    if isinstance(model, nn.Module) and hasattr(model, "chain") and callable(model.chain):
        if layers is not None:
            raise ValueError(f"{type(model).__name__} has fixed layers (its blocks); pass layers=None")
        return model.chain(variables, x, train=train)
    try:
        from flax import nnx

        if isinstance(model, nnx.Module):
            graphdef, state = nnx.split(model)
            model, variables = _NnxApply(graphdef), state
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
    if not _same_output(model, variables, x, options, cuts):
        names.append("output")
    params = variables.get("params", {}) if isinstance(variables, dict) else {}
    segments = tuple(
        Segment(
            step=_CutLayer(model, cuts, i, options),
            shared=(variables, x),
            params=None,
            names=(name,),
            param_path=_param_path(model, name, params),
        )
        for i, name in enumerate(names)
    )
    result = Chain(segments=segments, h0=x)
    if check:
        _check_no_bypass(result)
    return result


def _same_output(model, variables, x, options, cuts) -> bool:
    """True iff the model returns the last cut's output itself (no code after the last cut)."""

    def forward(variables, x):
        events = _Events(cuts)
        out = _run(model, variables, x, options, events)
        return out is events.seen[-1][2]

    flag = []

    def traced(variables, x):
        flag.append(forward(variables, x))
        return 0.0

    jax.eval_shape(traced, variables, x)
    return bool(flag[0])


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
        if not value == 0.0:  # NaN counts as a dependence too
            name, prev = c.layers[i], c.layers[i - 1]
            enclosing = prev.split("/")[0] if "/" in prev else None
            hint = f" (e.g. {enclosing!r})" if enclosing and enclosing != prev else ""
            raise ValueError(
                f"the cut at {prev!r} is bypassed: layer {name!r} depends on the model input other "
                "than through it (a skip connection around the cut), so the product of layer "
                f"Jacobians would not be the model's Jacobian; cut at the enclosing block{hint} instead"
            )
