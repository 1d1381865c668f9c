"""How an adapted model is cut: cut markers, the event stream of one forward pass, layer maps.

The machinery behind `gradflow.nn.chain` for models gradflow did not build: one forward pass
of the model with every cut point (a linen submodule call, seen through `nn.intercept_methods`,
or a `cut` marker) reported in order to an `_Events` object, which records, substitutes or
perturbs the values there. Layer l's map (`_CutLayer`) substitutes cut l-1 and records cut l;
the trainer's state gradients perturb every cut (`perturbed_apply`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import errors as flax_errors

_HOOK: contextvars.ContextVar = contextvars.ContextVar("gradflow_cut_hook", default=None)


def cut(h: jax.Array, name: str) -> jax.Array:
    """Mark a layer boundary named `name` in a model's forward code: the identity on h.

    `gradflow.nn.chain` cuts a plain function, an nnx module or a linen model at these markers.
    """
    hook = _HOOK.get()
    return h if hook is None else hook(name, h)


@contextlib.contextmanager
def _hooked(hook: Callable[..., Any]):
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


class _Stop(Exception):
    """Raised once the last event a run needs is recorded: the rest of the model is not traced."""


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
        stop: int | None = None,
    ):
        self.wanted = wanted  # None: record every module call and marker (a probe)
        self.substitute = substitute
        self.add = add  # perturbations added to the wanted events' outputs, in order
        self.stop = stop  # raise _Stop once this (0-based) wanted event is recorded
        self.seen: list[tuple[str, str, Any]] = []  # (kind, name, value) in completion order
        self.returned: set[str] = set()  # a probe: the events whose value the model returns
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
        if self.stop is not None and len(self.seen) > self.stop:
            raise _Stop
        return value


def _run(target: Any, variables: Any, x: Any, options: tuple, events: _Events, full: bool = False) -> Any:
    """The model's output, with `events` told of every cut (linen module calls and markers).

    full: return `apply`'s whole result ((output, mutated collections) when some are mutable).
    None where `events.stop` ended the run early.
    """
    try:
        return _run_events(target, variables, x, options, events, full)
    except _Stop:
        return None


def _run_events(target: Any, variables: Any, x: Any, options: tuple, events: _Events, full: bool) -> Any:

    def on_cut(name, h, kind="cut"):
        return events.hit(kind, events.name(name), lambda: h)

    if isinstance(target, nn.Module):

        def interceptor(next_fun, args, kwargs, context):
            path = context.module.path
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            if _is_to_linen(context.module):  # an nnx model in flax's bridge: cut at its submodules
                method = _AnnouncingMethod(kwargs.get("nnx_method"), "/".join(path))
                kwargs = {**kwargs, "nnx_method": method}
            if not path:
                return next_fun(*args, **kwargs)
            return events.hit("module", events.name("/".join(path)), lambda: next_fun(*args, **kwargs))

        opts = dict(options)
        mutable = opts.pop("mutable", False)
        with _hooked(on_cut), nn.intercept_methods(interceptor):
            out = target.apply(variables, x, mutable=mutable, **opts)
        return out if full or not mutable else out[0]
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
        last = self.index == len(self.cuts)
        # A layer before the last stops the model's forward code at its cut: tracing the layers
        # after it (all dropped) cost most of a deep adapted model's tracing time.
        events = _Events(
            self.cuts, None if self.index == 0 else (self.index - 1, h), stop=None if last else self.index
        )
        out = _run(self.target, variables, x, self.options, events)
        return out if last else events.seen[self.index][2]


@dataclasses.dataclass(frozen=True)
class _NnxApply:
    """An nnx module as a pure function of its state: (state, x) -> merge(graphdef, state)(x).

    children: mark the output of each top-level submodule's call as a cut named by its attribute
    ("a", "blocks.2" for a list), the default layers of an nnx model without `cut` markers:
    nnx has no method interception like linen's, so the merged copy's submodules are wrapped.
    """

    graphdef: Any
    children: bool = False

    def __call__(self, state: Any, x: jax.Array) -> jax.Array:
        from flax import nnx

        module = nnx.merge(self.graphdef, state)
        if self.children:
            _announce_children(module, "", "cut")
        return module(x)


def _announce_children(module: Any, prefix: str, kind: str) -> dict[str, Any]:
    """Wrap `module`'s top-level submodules (attributes, and the items of an nnx.List/Dict) so
    that each call's output is reported as an event of `kind` named by its attribute ("l1",
    "blocks.0"), after `prefix` + "/" if given. Returns the attributes replaced (to restore)."""
    from flax import nnx

    def announced(v: Any, name: str) -> Any:
        if not isinstance(v, nnx.Module):
            return v
        return _Announced(v, f"{prefix}/{name}" if prefix else name, kind)

    replaced = {}
    for name, value in list(vars(module).items()):
        if isinstance(value, (list, tuple, nnx.List)):  # nnx.List is itself a Module
            if any(isinstance(v, nnx.Module) for v in value):
                replaced[name] = value
                object.__setattr__(module, name, [announced(v, f"{name}.{i}") for i, v in enumerate(value)])
        elif isinstance(value, nnx.Dict):
            replaced[name] = value
            object.__setattr__(module, name, {k: announced(v, f"{name}.{k}") for k, v in value.items()})
        elif isinstance(value, nnx.Module):
            replaced[name] = value
            object.__setattr__(module, name, announced(value, name))
    return replaced


@dataclasses.dataclass(frozen=True)
class _Announced:
    """A submodule whose call's output is reported as an event named `name` (a `cut` marker, or
    a "module" event like a linen submodule's call: see `_announce_children`)."""

    module: Any
    name: str
    kind: str = "cut"

    def __call__(self, *args, **kwargs):
        out = self.module(*args, **kwargs)
        hook = _HOOK.get()
        return out if hook is None else hook(self.name, out, self.kind)

    def __getattr__(self, attr: str) -> Any:  # its parameters and methods (tied weights, ...)
        return getattr(self.module, attr)


def _is_to_linen(module: Any) -> bool:
    """Whether a linen module is flax's bridge of an nnx model (`nnx.bridge.ToLinen`/`to_linen`)."""
    try:
        from flax.nnx import bridge
    except ImportError:  # pragma: no cover - flax without nnx
        return False
    return isinstance(module, bridge.ToLinen)


@dataclasses.dataclass(frozen=True)
class _AnnouncingMethod:
    """The `nnx_method` given to an `nnx.bridge.ToLinen` call while gradflow runs it: the nnx
    module's own method (None: `__call__`), with its top-level submodules' outputs reported as
    module events, as a linen model's submodule calls are through `nn.intercept_methods`.

    ToLinen builds the nnx module afresh on each call and reads its state back after the method
    returns, so the submodules are put back before that.
    """

    method: Any
    prefix: str

    def __call__(self, module: Any, *args, **kwargs) -> Any:
        method = "__call__" if self.method is None else self.method
        method = getattr(type(module), method) if isinstance(method, str) else method
        replaced = _announce_children(module, self.prefix, "module")
        try:
            return method(module, *args, **kwargs)
        finally:
            for name, value in replaced.items():
                object.__setattr__(module, name, value)


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
    params = variables.get("params", {}) if isinstance(variables, dict) else {}
    for _, name, _ in events.seen:
        top = name.split("#")[0].split("/")[0]
        if top not in params and top.split(".")[0] in params:  # "blocks.0" of an nnx model
            top = top.split(".")[0]
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
        # the cuts whose output the model returns as it is (no code after them)
        events.returned = {name for _, name, v in events.seen if v is out}
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


def _param_path(target: Any, name: str, params: Any) -> tuple[Any, ...] | None:
    """Where cut `name`'s own parameters sit in `params`: its module path ("stage2/block1"), an
    nnx attribute path in flax's bridge ("blocks.0": params["blocks"][0]); None if nowhere."""
    if not isinstance(target, nn.Module) or name == "output":
        return None
    path: list[Any] = []
    tree = params
    for part in name.split("#")[0].split("/"):
        for key in [part] if isinstance(tree, dict) and part in tree else part.split("."):
            if isinstance(tree, dict) and key not in tree and key.isdigit():
                key = int(key)  # an nnx.List item: the bridge keys it by its index
            if not isinstance(tree, dict) or key not in tree:
                return None
            path.append(key)
            tree = tree[key]
    return tuple(path)
