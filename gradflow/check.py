"""Gradient checking: a hand-written backward pass against autodiff, autodiff against finite differences.

The commonest bug in a hand-written backward pass is one that still "trains" a little: a sign,
a transposed matrix, a derivative applied twice. `compare_gradients` names the parameter leaf
where it happens. Per leaf (named by its pytree path) it reports

    rel_error = ||g_user - g_auto|| / max(||g_auto||, ||g_user||, tiny)

with g_auto = `jax.grad(loss_fn)(params)` and the norms from `gradflow.numerics.stable_norm`
(no underflow for tiny gradients). The error is 0 for identical gradients, 1 for a leaf the
user left at zero, 2 for a flipped sign, and never more than 2.

For small problems (by default <= 2000 parameters in all) it also checks the reference itself:
a central finite difference of `loss_fn` in float64 against `jax.grad` in float64, per leaf,
which catches a loss function that autodiff cannot see through (a `stop_gradient`, a wrong
`custom_vjp`). Finite differences are unreliable next to a kink (ReLU at exactly 0): with the
default step a pre-activation within ~1e-6 of a kink can fail that check spuriously.

`gradient_errors` is the pure, jit-able core; `compare_gradients` wraps it into a report.

Example:
  >>> import jax.numpy as jnp
  >>> loss = lambda p: jnp.sum(p["w"] ** 2)
  >>> params = {"w": jnp.array([1.0, 2.0])}
  >>> compare_gradients(loss, params, {"w": 2 * params["w"]}).passed
  True
  >>> compare_gradients(loss, params, {"w": -2 * params["w"]}).failed
  ('w',)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gradflow.numerics import stable_norm, x64

PyTree = Any
LossFn = Callable[[PyTree], jax.Array]

FD_AUTO_MAX_PARAMS = 2000  # fd_check=None runs the finite-difference check up to this many parameters
_FD_CHUNK = 64  # finite-difference evaluations vmapped together


class LeafCheck(NamedTuple):
    """The verdict for one parameter leaf.

    Attributes:
      name: the leaf's pytree path ("w1" for a top-level key, "['layer1']['kernel']" deeper).
      shape: the leaf's shape.
      rel_error: ||g_user - g_auto|| / max(||g_auto||, ||g_user||, tiny), in [0, 2] (nan if
        either gradient is not finite).
      auto_norm: ||g_auto||.
      user_norm: ||g_user||.
      passed: rel_error <= rtol.
      fd_rel_error: the same relative error between float64 central finite differences and
        float64 autodiff; None when the finite-difference check did not run.
      fd_passed: fd_rel_error <= fd_rtol; None when the check did not run.
    """

    name: str
    shape: tuple[int, ...]
    rel_error: float
    auto_norm: float
    user_norm: float
    passed: bool
    fd_rel_error: float | None = None
    fd_passed: bool | None = None


@dataclasses.dataclass(frozen=True)
class GradientCheck:
    """The result of `compare_gradients`: one `LeafCheck` per leaf, in pytree order.

    Attributes:
      leaves: the per-leaf records.
      loss: loss_fn(params).
      rtol: the tolerance on the user-vs-autodiff relative error.
      fd_rtol: the tolerance on the finite-difference-vs-autodiff relative error, or None
        when the finite-difference check did not run.
    """

    leaves: tuple[LeafCheck, ...]
    loss: float
    rtol: float
    fd_rtol: float | None = None

    @property
    def passed(self) -> bool:
        """True when every leaf passes (and, where it ran, the finite-difference check too)."""
        return all(leaf.passed and leaf.fd_passed is not False for leaf in self.leaves)

    @property
    def failed(self) -> tuple[str, ...]:
        """Names of the leaves whose user gradient fails the tolerance."""
        return tuple(leaf.name for leaf in self.leaves if not leaf.passed)

    @property
    def errors(self) -> dict[str, float]:
        """Leaf name -> user-vs-autodiff relative error."""
        return {leaf.name: leaf.rel_error for leaf in self.leaves}

    @property
    def fd_errors(self) -> dict[str, float] | None:
        """Leaf name -> finite-difference-vs-autodiff relative error (None if not run)."""
        if self.fd_rtol is None:
            return None
        return {leaf.name: leaf.fd_rel_error for leaf in self.leaves}

    def __getitem__(self, name: str) -> LeafCheck:
        for leaf in self.leaves:
            if leaf.name == name:
                return leaf
        raise KeyError(f"no leaf {name!r}; leaves: {', '.join(leaf.name for leaf in self.leaves)}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable summary (nan becomes None)."""

        def num(v):
            return None if v is None or not math.isfinite(v) else v

        return {
            "passed": self.passed,
            "loss": num(self.loss),
            "rtol": self.rtol,
            "fd_rtol": self.fd_rtol,
            "leaves": {
                leaf.name: {
                    "shape": list(leaf.shape),
                    "rel_error": num(leaf.rel_error),
                    "auto_norm": num(leaf.auto_norm),
                    "user_norm": num(leaf.user_norm),
                    "passed": leaf.passed,
                    "fd_rel_error": num(leaf.fd_rel_error),
                    "fd_passed": leaf.fd_passed,
                }
                for leaf in self.leaves
            },
        }

    def __str__(self) -> str:
        fd = self.fd_rtol is not None
        head = ["leaf", "shape", "|g_auto|", "|g_user|", "rel.err", "ok"] + (
            ["fd rel.err", "fd ok"] if fd else []
        )
        rows = []
        for leaf in self.leaves:
            row = [
                leaf.name,
                str(leaf.shape),
                f"{leaf.auto_norm:.3e}",
                f"{leaf.user_norm:.3e}",
                f"{leaf.rel_error:.2e}",
                "yes" if leaf.passed else "NO",
            ]
            if fd:
                row += [f"{leaf.fd_rel_error:.2e}", "yes" if leaf.fd_passed else "NO"]
            rows.append(row)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [fmt.format(*r).rstrip() for r in [head, *rows]]
        tol = f"rtol {self.rtol:g}" + (f", fd rtol {self.fd_rtol:g}" if fd else ", no fd check")
        verdict = "PASS" if self.passed else "FAIL"
        lines.append(f"{verdict} ({tol}; loss {self.loss:.6g})")
        return "\n".join(lines)


def leaf_name(path: tuple) -> str:
    """A readable name for a pytree key path: the bare key at top level, `keystr` deeper."""
    if not path:
        return "params"
    if len(path) == 1:
        (k,) = path
        if isinstance(k, jax.tree_util.DictKey) and isinstance(k.key, str):
            return k.key
        if isinstance(k, jax.tree_util.GetAttrKey):
            return k.name
    return jax.tree_util.keystr(path)


def _check_structure(params: PyTree, grads: PyTree) -> list[str]:
    """Leaf names of `params`; ValueError naming the leaf where `grads` does not match it."""
    p_flat, p_def = jax.tree_util.tree_flatten_with_path(params)
    g_flat, g_def = jax.tree_util.tree_flatten_with_path(grads)
    p_names = [leaf_name(path) for path, _ in p_flat]
    g_names = [leaf_name(path) for path, _ in g_flat]
    if p_def != g_def:
        missing = [n for n in p_names if n not in g_names]
        extra = [n for n in g_names if n not in p_names]
        if missing:
            raise ValueError(f"grads has no leaf {missing[0]!r} (params leaves: {', '.join(p_names)})")
        if extra:
            raise ValueError(
                f"grads has a leaf {extra[0]!r} that params lacks (params leaves: {', '.join(p_names)})"
            )
        raise ValueError(f"grads' tree structure {g_def} differs from params' {p_def}")
    for name, (_, p), (_, g) in zip(p_names, p_flat, g_flat):
        if jnp.shape(p) != jnp.shape(g):
            raise ValueError(
                f"leaf {name!r}: grads has shape {jnp.shape(g)}, params has shape {jnp.shape(p)}"
            )
        if not jnp.issubdtype(jnp.result_type(p), jnp.inexact):
            raise ValueError(f"leaf {name!r}: params must be floating point, got {jnp.result_type(p)}")
    return p_names


def _relative_error(g_ref: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(||g - g_ref|| / max(||g_ref||, ||g||, tiny), ||g_ref||, ||g||) in their common dtype."""
    g_ref, g = jnp.asarray(g_ref), jnp.asarray(g)
    dt = jnp.result_type(g_ref, g)
    g_ref, g = g_ref.astype(dt), g.astype(dt)
    n_ref, n = stable_norm(g_ref), stable_norm(g)
    denom = jnp.maximum(jnp.maximum(n_ref, n), jnp.finfo(dt).tiny)
    return stable_norm(g - g_ref) / denom, n_ref, n


@functools.partial(jax.jit, static_argnums=0)  # reused across calls with the same loss_fn
def _jit_stats(loss_fn: LossFn, params: PyTree, grads: PyTree):
    return _stats(loss_fn, params, grads)


def _stats(loss_fn: LossFn, params: PyTree, grads: PyTree):
    loss, auto = jax.value_and_grad(loss_fn)(params)
    rel, n_auto, n_user = (
        jax.tree.map(lambda a, g, i=i: _relative_error(a, g)[i], auto, grads) for i in range(3)
    )
    return loss, rel, n_auto, n_user


def gradient_errors(loss_fn: LossFn, params: PyTree, grads: PyTree) -> PyTree:
    """Per-leaf relative error of `grads` against `jax.grad(loss_fn)(params)`; pure and jit-able.

    Args:
      loss_fn: params -> scalar loss; must be differentiable by `jax.grad`.
      params: a pytree of floating-point arrays.
      grads: a pytree with the same structure and leaf shapes (e.g. from a hand-written
        backward pass).

    Returns:
      A pytree shaped like `params` whose leaves are scalars
      ||g_user - g_auto|| / max(||g_auto||, ||g_user||, tiny), in [0, 2].

    Raises:
      ValueError: `grads` differs from `params` in tree structure or in a leaf's shape (the
        message names the leaf); checked at trace time, so also under `jax.jit`.
    """
    _check_structure(params, grads)
    return _stats(loss_fn, params, grads)[1]


@functools.partial(jax.jit, static_argnums=0)
def _fd_and_auto(loss_fn: LossFn, params: PyTree, fd_eps: jax.Array) -> tuple[PyTree, PyTree]:
    """(autodiff gradient, central finite-difference gradient), both shaped like `params`."""
    flat, unravel = ravel_pytree(params)
    n = flat.size

    def f(v):
        return loss_fn(unravel(v))

    def one(i):  # central difference along coordinate i, with the exactly representable step
        h = fd_eps * jnp.maximum(1.0, jnp.abs(flat[i]))
        xp, xm = flat.at[i].add(h), flat.at[i].add(-h)
        return (f(xp) - f(xm)) / (xp[i] - xm[i])

    n_chunks = -(-n // _FD_CHUNK)
    idx = jnp.minimum(jnp.arange(n_chunks * _FD_CHUNK), n - 1).reshape(n_chunks, _FD_CHUNK)
    fd = jax.lax.map(jax.vmap(one), idx).reshape(-1)[:n]
    return unravel(jax.grad(f)(flat)), unravel(fd)


def _fd_relative_errors(loss_fn: LossFn, params: PyTree, fd_eps: float) -> list[float]:
    """Per-leaf relative error between float64 central differences and float64 autodiff."""
    with x64():
        p64 = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
        auto, fd = _fd_and_auto(loss_fn, p64, jnp.asarray(fd_eps, jnp.float64))
        errs = jax.tree.map(lambda a, b: _relative_error(a, b)[0], auto, fd)
        return [float(e) for e in jax.tree.leaves(errs)]


def compare_gradients(
    loss_fn: LossFn,
    params: PyTree,
    grads: PyTree,
    *,
    rtol: float = 1e-4,
    fd_check: bool | None = None,
    fd_eps: float = 1e-6,
    fd_rtol: float = 1e-6,
) -> GradientCheck:
    """Check a user-supplied gradient against autodiff, leaf by leaf.

    Args:
      loss_fn: params -> scalar loss (jit-able; it is traced under `jax.jit`).
      params: a pytree of floating-point arrays.
      grads: the gradient to check (same structure and leaf shapes as `params`), e.g. what a
        hand-written backward pass subtracts (times the learning rate) from each parameter.
      rtol: a leaf passes when its relative error is <= rtol.
      fd_check: also check `jax.grad` against central finite differences in float64. None:
        only when `params` has <= 2000 elements in all (it costs 2 loss evaluations per element).
      fd_eps: the finite-difference step, relative: h = fd_eps * max(1, |theta_i|).
      fd_rtol: a leaf passes the finite-difference check when its relative error is <= fd_rtol.
        The loss is evaluated in float64, but constants it closes over keep their precision.

    Returns:
      A `GradientCheck`: `.passed`, `.failed`, `.errors`, per-leaf `.leaves`, and a table as str.

    Raises:
      ValueError: structure or shape mismatch between `grads` and `params` (naming the leaf),
        or non-floating parameters.
    """
    if not rtol >= 0:
        raise ValueError(f"rtol must be >= 0, got {rtol}")
    if not fd_eps > 0:
        raise ValueError(f"fd_eps must be > 0, got {fd_eps}")
    names = _check_structure(params, grads)
    try:
        hash(loss_fn)  # it is a static argument of the jitted cores
    except TypeError:
        loss_fn = functools.partial(loss_fn)  # hashable by identity
    loss, rel, n_auto, n_user = _jit_stats(loss_fn, params, grads)
    rel, n_auto, n_user = (list(map(float, jax.tree.leaves(t))) for t in (rel, n_auto, n_user))
    shapes = [tuple(int(s) for s in jnp.shape(p)) for p in jax.tree.leaves(params)]
    size = sum(int(np.prod(s)) for s in shapes)
    run_fd = size <= FD_AUTO_MAX_PARAMS if fd_check is None else bool(fd_check)
    fd = _fd_relative_errors(loss_fn, params, fd_eps) if run_fd else [None] * len(names)
    leaves = tuple(
        LeafCheck(
            name=name,
            shape=shape,
            rel_error=r,
            auto_norm=na,
            user_norm=nu,
            passed=bool(r <= rtol),
            fd_rel_error=e,
            fd_passed=None if e is None else bool(e <= fd_rtol),
        )
        for name, shape, r, na, nu, e in zip(names, shapes, rel, n_auto, n_user, fd)
    )
    return GradientCheck(leaves=leaves, loss=float(loss), rtol=rtol, fd_rtol=fd_rtol if run_fd else None)
