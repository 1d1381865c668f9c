"""The trainer's view of a model's layers (`Layout`), asked of its layer chain, and which
per-layer diagnostics (`gradflow.train.diagnostics`) the model can give.

`layout(model, variables, x)` cuts the model's layer chain (`gradflow.nn.chain`) once per input
shape (structure only) and summarizes it; nothing here reads a model's parameter names. The
per-layer rows (`Layout.layers`) are the chain's layers that own parameters (an `MLPStack`'s
blocks on their depth axis, a user's linen model's submodules), or the top-level parameter
entries where the chain's layers share their parameters (a recurrent cell through time); the
entries (`Layout.entries`, in the order their modules run) are the layers of non-finite
location. A diagnostic a model cannot give is named in `Layout.omitted` with the reason.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradflow import activations
from gradflow.nn.chains import builds_chain, call_order
from gradflow.nn.chains import chain as make_chain
from gradflow.nn.mlp import PREACT as PREACT
from gradflow.nn.mlp import STATE as STATE

_MODULE_ACTIVATIONS = ("prelu", "rrelu", "maxout")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Which parameters and states make up each layer of a model: asked of its layer chain.

    Attributes:
      entries: the top-level parameter entries in creation order, as (key, names, stacked):
        an entry that a chain segment stacks on its depth axis (MLPStack's blocks) has one name
        per layer; any other entry is one layer named by its key. Their concatenated names are
        the layers of non-finite location (`names`).
      layers: the layers of the per-layer diagnostics, as (param path, names, stacked): the
        chain's layers that own parameters (blocks of a stack; a linen model's submodules),
        or, for a chain whose layers share their parameters (a recurrent cell through time),
        the top-level entries.
      cuts: the cut points of an adapted model (dL/dh_l by perturbations at each), or None.
      sown: the entries whose blocks perturb their output under `STATE` (a gradflow stack's
        layers: MLPStack's and TransformerStack's blocks, ConvStack's stages and down blocks), in
        order, as (key, stacked); () where there are none.
      preact: those blocks also sow and perturb their activation's input `PREACT` (not
        attention-only Transformer blocks).
      omitted: per-layer diagnostics not recorded for this model, with the reason.
    """

    entries: tuple[tuple[str, tuple[str, ...], bool], ...]
    layers: tuple[tuple[tuple[str, ...], tuple[str, ...], bool], ...]
    cuts: tuple[str, ...] | None = None
    sown: tuple[tuple[str, bool], ...] = ()
    preact: bool = False
    omitted: tuple[tuple[str, str], ...] = ()

    @property
    def names(self) -> list[str]:
        """Layer names in the order of `locate_nonfinite` (index = position)."""
        return [n for _, names, _ in self.entries for n in names]

    @property
    def num_layers(self) -> int:
        """Length of the per-layer diagnostics."""
        return sum(len(names) for _, names, _ in self.layers)

    @property
    def layer_names(self) -> list[str]:
        """Names of the per-layer diagnostics' rows."""
        return [n for _, names, _ in self.layers for n in names]

    def diagnostics(self) -> tuple[str, ...]:
        """The per-layer diagnostics recorded for this model (see the module docstring)."""
        gone = {name for name, _ in self.omitted}
        return tuple(n for n in LAYER_DIAGNOSTICS if n not in gone)


LAYER_DIAGNOSTICS = (
    "grad_norm",
    "update_ratio",
    "weight_norm",
    "state_grad_norm",
    "preact_grad_norm",
    "preact_mean",
    "preact_var",
    "saturated",
    "dead",
)
_PREACT_DIAGNOSTICS = ("preact_grad_norm", "preact_mean", "preact_var", "saturated", "dead")


def layout(model: Any, variables: Any, x: Any) -> Layout:
    """The `Layout` of `model`, from its layer chain on an input like x (structure only).

    Args:
      model: a gradflow stack or any linen model `gradflow.nn.chain` can cut.
      variables: its variables (or {"params": ...}); may be tracers.
      x: a batch of inputs (the chain is cut on its first example, batch axis kept).
    """
    variables = variables if "params" in variables else {"params": variables}
    params = variables["params"]
    x = jnp.asarray(x)
    c = make_chain(model, variables, x if builds_chain(model) else x[:1], check=False)
    own = [seg for seg in c.segments if seg.param_path is not None]
    stacked = {seg.param_path[0]: seg for seg in own if len(seg.param_path) == 1 and seg.stacked}
    order = call_order(model, variables, x if builds_chain(model) else x[:1])
    keys = [k for k in order if k in params] + [k for k in params if k not in order]
    entries = tuple((k, stacked[k].names, True) if k in stacked else (k, (k,), False) for k in keys)
    if own:
        layers = tuple((seg.param_path, seg.names, seg.stacked) for seg in own)
    else:
        layers = tuple(((k,), names, st) for k, names, st in entries)
    adapted = not builds_chain(model)
    sown = tuple((seg.param_path[0], seg.stacked) for seg in own) if not adapted else ()
    preact = bool(sown) and getattr(model, "activation", None) is not None
    omitted = []
    if preact and activation_fn(model) is None:
        why = f"the activation {model.activation!r} has no elementwise derivative to test for saturation"
        omitted += [("saturated", why), ("dead", why)]
    if not preact:
        if sown:
            why = "the blocks have no activation (attention-only): state_grad_norm gives dL/dh_l instead"
        elif own:
            why = (
                "the model does not expose its activations' inputs (gradflow's stacks do); "
                "state_grad_norm gives dL/dh_l at every layer instead"
            )
        else:
            why = "a recurrent cell's pre-activations stay inside flax's cell"
        omitted += [(n, why) for n in _PREACT_DIAGNOSTICS]
    if not own:
        why = "the chain's layers share their parameters (through time): see spectra or chain.state_gradients"
        omitted.append(("state_grad_norm", why))
    return Layout(
        entries=entries,
        layers=layers,
        cuts=tuple(c.layers) if adapted else None,
        sown=sown,
        preact=preact,
        omitted=tuple(omitted),
    )


def blank_diagnostics(lay: Layout, dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """NaN-filled diagnostics (the values of a step that records none)."""
    out = {name: jnp.full((lay.num_layers,), jnp.nan, dtype) for name in lay.diagnostics()}
    return {**out, "grad_norm_global": jnp.full([], jnp.nan, dtype)}


def activation_fn(model: Any) -> Callable | None:
    """The elementwise activation of a stack (`model.activation`), or None if there is none."""
    act = getattr(model, "activation", None)
    if act is None or (isinstance(act, str) and act in _MODULE_ACTIVATIONS):
        return None
    return activations.get(act) if isinstance(act, str) else act
