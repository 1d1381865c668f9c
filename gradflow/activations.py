"""Elementwise activations as pure functions, and a registry to look them up by name.

Every function takes an array of any shape and returns one of the same shape (except
`maxout`, which reduces the feature axis by its number of pieces). They are plain `jnp`
code, so `jit`, `vmap` and `grad` go through them.

The registry is how the rest of gradflow names activations (configs, the CLI, theory)::

    >>> from gradflow import activations
    >>> f = activations.get("leaky_relu", negative_slope=0.2)
    >>> float(f(-1.0))
    -0.2

Each registered activation also records the points where it is not smooth (`kinks`), so
that Gaussian quadrature in `gradflow.theory` splits its integrals there.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gradflow._checks import nearest

Array = jax.Array
Activation = Callable[..., Array]

# The self-normalizing constants of Klambauer et al. 2017 (eq. 14), to the digits of
# the paper; `gradflow.theory.selu_constants` derives them from the fixed-point equations.
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def identity(x: ArrayLike) -> Array:
    """The linear map: x."""
    return jnp.asarray(x)


# jax differentiates sigmoid as s (1 - s) and tanh as 1 - tanh^2: both cancel catastrophically
# for saturated units (float32 returns exactly 0 for sigmoid'(17) = 4e-8 and tanh'(9) = 6e-8),
# which turns the tiny-but-nonzero Jacobians of saturated nets into exact zeros. The rules below
# are accurate to rounding over the whole float32 range.
@jax.custom_jvp
def sigmoid(x: ArrayLike) -> Array:
    """Logistic sigmoid 1 / (1 + exp(-x)); its derivative s(x) s(-x) is at most 1/4 (at x = 0).

    Differentiates as s(x) * s(-x), accurate for saturated units (jax's s (1 - s) is not).
    """
    return jax.nn.sigmoid(x)


@sigmoid.defjvp
def _sigmoid_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return sigmoid(x), jax.nn.sigmoid(x) * jax.nn.sigmoid(-x) * t


@jax.custom_jvp
def tanh(x: ArrayLike) -> Array:
    """Hyperbolic tangent; its derivative sech(x)^2 is at most 1 (at x = 0).

    Differentiates as 1 / cosh(x)^2, accurate for saturated units (jax's 1 - tanh^2 is not).
    """
    return jnp.tanh(x)


@tanh.defjvp
def _tanh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return tanh(x), t / jnp.cosh(x) ** 2


def hard_tanh(x: ArrayLike) -> Array:
    """clip(x, -1, 1)."""
    return jax.nn.hard_tanh(x)


def relu(x: ArrayLike) -> Array:
    """max(x, 0)."""
    return jax.nn.relu(x)


def leaky_relu(x: ArrayLike, negative_slope: float = 0.01) -> Array:
    """x if x > 0 else negative_slope * x."""
    return jax.nn.leaky_relu(x, negative_slope)


def elu(x: ArrayLike, alpha: float = 1.0) -> Array:
    """x if x > 0 else alpha * (exp(x) - 1)  (Clevert et al. 2016)."""
    return jax.nn.elu(x, alpha)


def selu(x: ArrayLike) -> Array:
    """scale * elu(x, alpha) with the self-normalizing constants (Klambauer et al. 2017)."""
    x = jnp.asarray(x)
    return SELU_SCALE * jnp.where(x > 0, x, SELU_ALPHA * jnp.expm1(jnp.minimum(x, 0.0)))


def gelu(x: ArrayLike, approximate: bool = False) -> Array:
    """x * Phi(x) (Hendrycks & Gimpel 2016); `approximate=True` uses the tanh formula."""
    return jax.nn.gelu(x, approximate=approximate)


def silu(x: ArrayLike) -> Array:
    """x * sigmoid(x), also called swish."""
    return jax.nn.silu(x)


def softplus(x: ArrayLike) -> Array:
    """log(1 + exp(x))."""
    return jax.nn.softplus(x)


def erf(x: ArrayLike) -> Array:
    """The error function, a sigmoid-shaped activation with closed-form Gaussian integrals."""
    return jax.scipy.special.erf(x)


def rrelu(
    x: ArrayLike,
    *,
    key: ArrayLike | None = None,
    lower: float = 1.0 / 8.0,
    upper: float = 1.0 / 3.0,
    train: bool = False,
) -> Array:
    """Randomized leaky ReLU (Xu et al. 2015).

    In training (`train=True`, `key` required) each negative element gets its own slope
    drawn from U(lower, upper); in evaluation the slope is the mean (lower + upper) / 2.
    """
    if not 0.0 <= lower <= upper:
        raise ValueError(f"rrelu needs 0 <= lower <= upper, got lower={lower}, upper={upper}")
    x = jnp.asarray(x)
    if train:
        if key is None:
            raise ValueError("rrelu(train=True) needs a PRNG `key` to draw the slopes")
        slope = jax.random.uniform(key, x.shape, x.dtype, lower, upper)
    else:
        slope = (lower + upper) / 2.0
    return jnp.where(x >= 0, x, slope * x)


def maxout(x: ArrayLike, num_pieces: int = 2, axis: int = -1) -> Array:
    """Maxout (Goodfellow et al. 2013): max over `num_pieces` consecutive groups of `axis`.

    Shape: (..., num_pieces * M) -> (..., M). Feature j of the output is the max of input
    features j * num_pieces ... (j + 1) * num_pieces - 1.
    """
    x = jnp.asarray(x)
    axis = axis % x.ndim
    n = x.shape[axis]
    if num_pieces < 1 or n % num_pieces:
        raise ValueError(f"maxout: axis {axis} has size {n}, not a multiple of num_pieces={num_pieces}")
    shape = x.shape[:axis] + (n // num_pieces, num_pieces) + x.shape[axis + 1 :]
    return jnp.max(x.reshape(shape), axis=axis + 1)


@dataclasses.dataclass(frozen=True)
class Spec:
    """A registered activation: its function and the points where it is not smooth.

    `kinks` maps the activation's keyword parameters to the pre-activation values at which
    the function or its first derivative jumps (e.g. relu -> (0.0,)).
    """

    fn: Activation
    kinks: Callable[..., tuple[float, ...]] = lambda **_: ()
    elementwise: bool = True


_AT_ZERO = lambda **_: (0.0,)  # noqa: E731

_REGISTRY: dict[str, Spec] = {
    "identity": Spec(identity),
    "sigmoid": Spec(sigmoid),
    "tanh": Spec(tanh),
    "hard_tanh": Spec(hard_tanh, lambda **_: (-1.0, 1.0)),
    "relu": Spec(relu, _AT_ZERO),
    "leaky_relu": Spec(leaky_relu, _AT_ZERO),
    "elu": Spec(elu, _AT_ZERO),
    "selu": Spec(selu, _AT_ZERO),
    "gelu": Spec(gelu),
    "silu": Spec(silu),
    "softplus": Spec(softplus),
    "erf": Spec(erf),
    "rrelu": Spec(rrelu, _AT_ZERO),
    "maxout": Spec(maxout, elementwise=False),
}
_ALIASES = {"linear": "identity", "swish": "silu", "hardtanh": "hard_tanh", "lrelu": "leaky_relu"}


def names() -> list[str]:
    """The registered activation names (aliases included), sorted."""
    return sorted([*_REGISTRY, *_ALIASES])


def _spec(name: str) -> Spec:
    canonical = _ALIASES.get(name, name)
    if canonical not in _REGISTRY:
        raise ValueError(
            f"unknown activation {name!r}{nearest(name, names())}; known activations: {', '.join(names())}"
        )
    return _REGISTRY[canonical]


def _check_params(name: str, fn: Callable, params: dict) -> None:
    allowed = [p for p in inspect.signature(fn).parameters if p != "x"]
    bad = [p for p in params if p not in allowed]
    if bad:
        raise ValueError(
            f"activation {name!r} has no parameter {', '.join(map(repr, bad))}; "
            f"its parameters are: {', '.join(allowed) or '(none)'}"
        )


def get(name: str, **params) -> Activation:
    """The activation called `name`, with keyword `params` bound.

    Args:
      name: a registered name or alias (see `names()`).
      **params: the activation's keyword parameters, e.g. `negative_slope=0.2`.

    Raises:
      ValueError: unknown name (the message lists the known ones) or unknown parameter.
    """
    spec = _spec(name)
    _check_params(name, spec.fn, params)
    return functools.partial(spec.fn, **params) if params else spec.fn


def kinks(name: str, **params) -> tuple[float, ...]:
    """Pre-activation values at which the activation `name` (with `params`) is not smooth."""
    spec = _spec(name)
    _check_params(name, spec.fn, params)
    return tuple(spec.kinks(**params))


@dataclasses.dataclass(frozen=True)
class Kinked:
    """A user activation with the pre-activation values where it is not smooth declared.

    `gradflow.theory` splits its Gaussian integrals at `kinks` (and at 0), which keeps them
    exact to ~1e-12 in float64; a kink it does not know of costs algebraic convergence: for
    selu(x - 0.5), errors of ~1e-6 in the length map and 1-2% in chi_1 (tested). Build with
    `with_kinks`; calls go to `fn`.
    """

    fn: Activation
    kinks: tuple[float, ...]

    def __call__(self, x: ArrayLike) -> Array:
        return self.fn(x)


def with_kinks(fn: Activation, kinks: tuple[float, ...] | list[float]) -> Kinked:
    """`fn` with the points where it or its derivative jumps, for theory's quadrature.

    Example: `theory.chi1(with_kinks(lambda x: selu(x - 0.5), [0.5]), 1.0, 0.0)`.
    """
    if not callable(fn):
        raise ValueError(f"with_kinks needs a callable activation, got {fn!r}")
    ks = tuple(float(k) for k in kinks)
    bad = [k for k in ks if k != k or abs(k) == float("inf")]
    if bad:
        raise ValueError(f"with_kinks: kinks must be finite numbers, got {list(kinks)}")
    return Kinked(fn, ks)


def resolve(activation: str | Activation, **params) -> tuple[Activation, tuple[float, ...]]:
    """A registry name (with its keyword `params` bound) or a callable -> (function, kinks).

    A plain user callable is assumed smooth except possibly at 0 (quadrature splits there,
    which costs nothing for a smooth function and is exact for ReLU-like kinks): declare
    kinks elsewhere with `with_kinks`. A callable takes no `params` (bind them yourself).
    """
    if isinstance(activation, str):
        return get(activation, **params), kinks(activation, **params)
    if isinstance(activation, Kinked):
        if params:
            raise ValueError(f"params {sorted(params)} apply to registry names only")
        return activation.fn, tuple(sorted({0.0, *activation.kinks}))
    if callable(activation):
        if params:
            raise ValueError(
                f"params {sorted(params)} apply to registry names only, not to the callable {activation!r}"
            )
        return activation, (0.0,)
    raise ValueError(f"activation must be a registry name or a callable, got {activation!r}")
