"""Weight initializers with the `jax.nn.initializers` signature `init(key, shape, dtype)`.

Flax accepts every one of them as `kernel_init`. Conventions (those of `jax.nn.initializers`):
a dense kernel has shape (fan_in, fan_out); a convolution kernel (*spatial, in, out), with
fan_in = in * prod(spatial) and fan_out = out * prod(spatial).

Gaussian weights in the mean-field sense, `gaussian(sigma_w)`, have variance
sigma_w^2 / fan_in; biases from `bias(sigma_b)` have standard deviation sigma_b.

The named schemes reuse `jax.nn.initializers.variance_scaling`; their "normal" variants
draw from a truncated normal rescaled to the stated variance, as jax does. `gaussian` draws
from a true normal, as random-matrix theory assumes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gradflow import activations
from gradflow.theory import quadrature as _quadrature

Initializer = Callable[..., jax.Array]
_jinit = jax.nn.initializers


def _checked(init: Initializer, name: str, min_rank: int = 2, square_last: bool = False) -> Initializer:
    """Wrap `init` so a bad shape raises a ValueError naming the initializer and the shape."""

    def checked(key, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(s) for s in shape)
        if len(shape) < min_rank:
            raise ValueError(f"{name} needs a kernel of rank >= {min_rank}, got shape {shape}")
        if any(s <= 0 for s in shape):
            raise ValueError(f"{name}: every dimension must be positive, got shape {shape}")
        return init(key, shape, dtype)

    checked.__name__ = name
    return checked


def variance_scaling(scale: float, mode: str, distribution: str, name: str = "variance_scaling"):
    """`jax.nn.initializers.variance_scaling` with gradflow's shape checks."""
    if scale <= 0 or not math.isfinite(scale):
        raise ValueError(f"{name}: scale must be positive and finite, got {scale}")
    return _checked(_jinit.variance_scaling(scale, mode, distribution), name)


def glorot_uniform(gain: float = 1.0) -> Initializer:
    """U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))  (Glorot & Bengio 2010)."""
    return variance_scaling(gain**2, "fan_avg", "uniform", "glorot_uniform")


def glorot_normal(gain: float = 1.0) -> Initializer:
    """Variance gain^2 * 2 / (fan_in + fan_out)  (Glorot & Bengio 2010)."""
    return variance_scaling(gain**2, "fan_avg", "truncated_normal", "glorot_normal")


def he_uniform(gain: float = math.sqrt(2.0)) -> Initializer:
    """U(-a, a), a = gain * sqrt(3 / fan_in); the default gain sqrt(2) is He et al. 2015."""
    return variance_scaling(gain**2, "fan_in", "uniform", "he_uniform")


def he_normal(gain: float = math.sqrt(2.0)) -> Initializer:
    """Variance gain^2 / fan_in; the default gain sqrt(2) is He et al. 2015."""
    return variance_scaling(gain**2, "fan_in", "truncated_normal", "he_normal")


def lecun_uniform(gain: float = 1.0) -> Initializer:
    """U(-a, a), a = gain * sqrt(3 / fan_in)  (LeCun et al. 1998)."""
    return variance_scaling(gain**2, "fan_in", "uniform", "lecun_uniform")


def lecun_normal(gain: float = 1.0) -> Initializer:
    """Variance gain^2 / fan_in  (LeCun et al. 1998; the SELU initializer)."""
    return variance_scaling(gain**2, "fan_in", "truncated_normal", "lecun_normal")


def orthogonal(gain: float = 1.0) -> Initializer:
    """Haar-random orthogonal matrix times `gain`: W^T W = gain^2 I (Saxe et al. 2014)."""
    return _checked(_jinit.orthogonal(gain), "orthogonal")


def delta_orthogonal(gain: float = 1.0) -> Initializer:
    """Conv kernel (*spatial, C_in, C_out) zero except its spatial centre, gain * Q (Xiao et al. 2018).

    Q is a Haar-random C_in x C_out matrix with orthonormal rows (C_in <= C_out). A circular
    convolution with this kernel maps the channels at every position by gain * Q, so all its
    singular values equal `gain`: a deep linear delta-orthogonal CNN is an isometry times
    gain^L. In the mean-field sense it is `gaussian(gain)`: an output's C_in nonzero weights
    have variance gain^2 / C_in, summing to gain^2 as the k^d C_in weights of variance
    gain^2 / (k^d C_in) do, so the variance map and chi_1 are the same and the critical gain of
    an activation is `critical(activation, sigma_b).sigma_w` (`critical_delta_orthogonal`).

    Wraps `jax.nn.initializers.delta_orthogonal(scale=gain)`, whose argument multiplies Q (its
    docstring calls it the bound of a uniform distribution); jax puts Q at index (k - 1) // 2,
    the centre of an odd kernel.

    Raises:
      ValueError: a gain that is not positive and finite, a kernel of rank not 3, 4 or 5, or
        C_in > C_out (no C_in orthonormal rows fit in C_out dimensions).
    """
    if not (gain > 0 and math.isfinite(gain)):
        raise ValueError(f"delta_orthogonal: gain must be positive and finite, got {gain}")
    inner = _jinit.delta_orthogonal(gain)

    def init(key, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        if len(shape) not in (3, 4, 5):
            raise ValueError(
                f"delta_orthogonal needs a conv kernel (*spatial, C_in, C_out) with 1 to 3 spatial "
                f"axes, got shape {tuple(shape)}"
            )
        if shape[-2] > shape[-1]:
            raise ValueError(
                f"delta_orthogonal needs C_in <= C_out, got C_in={shape[-2]} > C_out={shape[-1]} "
                f"(shape {tuple(shape)}): use a Gaussian or orthogonal-on-fan-in init for this layer"
            )
        return inner(key, shape, dtype)

    return _checked(init, "delta_orthogonal", min_rank=3)


def critical_delta_orthogonal(activation: str | Callable, sigma_b: float = 0.0) -> Initializer:
    """`delta_orthogonal` at the order-to-chaos transition: gain = `critical`(activation, sigma_b).sigma_w.

    Carries `.sigma_w`, `.sigma_b` and `.bias_init` as `critical` does. With tanh at small
    sigma_b this is the initialization that trains 10,000-layer vanilla CNNs (Xiao et al. 2018).
    """
    crit = critical(activation, sigma_b)
    init = delta_orthogonal(crit.sigma_w)
    init.sigma_w, init.sigma_b, init.bias_init = crit.sigma_w, sigma_b, crit.bias_init
    return init


def gaussian(sigma_w: float) -> Initializer:
    """Mean-field Gaussian weights: N(0, sigma_w^2 / fan_in)  (Poole et al. 2016)."""
    return variance_scaling(sigma_w**2, "fan_in", "normal", "gaussian")


def bias(sigma_b: float = 0.0) -> Initializer:
    """Bias initializer N(0, sigma_b^2); zeros when sigma_b == 0."""
    if sigma_b < 0 or not math.isfinite(sigma_b):
        raise ValueError(f"bias: sigma_b must be >= 0 and finite, got {sigma_b}")
    if sigma_b == 0:
        return _jinit.zeros
    return _jinit.normal(sigma_b)


def second_moment(activation: str | Callable, q: float = 1.0, **params) -> float:
    """E[phi(sqrt(q) z)^2], z ~ N(0, 1), by quadrature in float64."""
    fn, kinks = activations.resolve(activation, **params)
    return _quadrature.precise(_quadrature.gaussian_expectation, lambda x: fn(x) ** 2, q, kinks)


def gain(activation: str | Callable, **params) -> float:
    """The gain that keeps the pre-activation second moment at 1 through a layer.

    With weights of variance gain^2 / fan_in and unit-variance Gaussian pre-activations
    z, the next pre-activations have second moment gain^2 * E[phi(z)^2]; this returns
    gain = 1 / sqrt(E[phi(z)^2]), computed by quadrature for any activation (no table).
    It gives sqrt(2) for relu, 1 for identity, sqrt(2 / (1 + a^2)) for leaky relu with
    slope a, and 1.5927 for tanh (PyTorch's 5/3 is a heuristic, not this fixed point).

    For positively homogeneous activations (relu, leaky relu, identity) this is also the
    critical sigma_w of mean-field theory (chi_1 = 1); for others the two differ.
    """
    m2 = second_moment(activation, 1.0, **params)
    if not m2 > 0:
        raise ValueError(f"activation {activation!r} has E[phi(z)^2] = {m2}; no gain preserves the variance")
    return 1.0 / math.sqrt(m2)


def critical(activation: str | Callable, sigma_b: float = 0.0) -> Initializer:
    """Gaussian weights at the order-to-chaos transition (chi_1 = 1) for `activation`.

    Kernel N(0, sigma_w*^2 / fan_in) with sigma_w* = `gradflow.theory.critical_sigma_w`
    (activation, sigma_b), the edge of chaos of Poole et al. 2016 / Schoenholz et al. 2017,
    computed in float64. The returned initializer carries the matching pieces as attributes:
    `.sigma_w` (sigma_w*), `.sigma_b`, and `.bias_init` (= `bias(sigma_b)`), e.g.
    `nn.Dense(w, kernel_init=init, bias_init=init.bias_init)`.

    For relu, leaky relu and identity at sigma_b = 0 it coincides with `gain(activation)`.

    Raises:
      ValueError: unknown activation, negative sigma_b, or no critical point at sigma_b (gelu
        below sigma_b ~ 0.42, swish below ~ 0.75: the message names the smallest sigma_b that
        has one).
    """
    from gradflow import theory  # lazy: theory is heavier and imports the activations registry

    if sigma_b < 0 or not math.isfinite(sigma_b):
        raise ValueError(f"critical: sigma_b must be >= 0 and finite, got {sigma_b}")
    sigma_w = _quadrature.precise(theory.critical_sigma_w, activation, sigma_b)
    if not math.isfinite(sigma_w):
        raise ValueError(f"critical: {_no_critical_point(activation, sigma_b)}")
    init = variance_scaling(sigma_w**2, "fan_in", "normal", "critical")
    init.sigma_w, init.sigma_b, init.bias_init = sigma_w, sigma_b, bias(sigma_b)
    return init


def _no_critical_point(activation: str | Callable, sigma_b: float) -> str:
    """Why there is no edge of chaos at sigma_b, and the smallest sigma_b on a grid that has one."""
    import numpy as np

    from gradflow import theory

    grid = np.round(np.concatenate([np.arange(0.05, 1.0001, 0.05), [1.5, 2.0, 3.0]]), 2)
    with _quadrature.x64():
        found = np.asarray(theory.critical_sigma_w(activation, grid))
    ok = np.isfinite(found) & (grid > sigma_b)
    hint = (
        f"the smallest sigma_b on a grid (0.05 steps to 1, then 1.5, 2, 3) with one is {grid[ok][0]:.2f} (sigma_w = {found[ok][0]:.4f})"
        if ok.any()
        else "none exists for sigma_b up to 3"
    )
    return (
        f"{activation!r} has no critical sigma_w at sigma_b={sigma_b}: chi_1 at the fixed point reached "
        "from q0 = 1 does not pass continuously through 1 for sigma_w in [0.01, 100] (it jumps across 1 "
        f"where the fixed point with chi_1 = 1 is unstable, as for gelu and swish at small sigma_b); {hint}"
    )


_NAMED: dict[str, Callable[..., Initializer]] = {
    "glorot_uniform": glorot_uniform,
    "glorot_normal": glorot_normal,
    "he_uniform": he_uniform,
    "he_normal": he_normal,
    "lecun_uniform": lecun_uniform,
    "lecun_normal": lecun_normal,
    "orthogonal": orthogonal,
    "delta_orthogonal": delta_orthogonal,
    "critical_delta_orthogonal": critical_delta_orthogonal,
    "gaussian": gaussian,
    "critical": critical,
}
_ALIASES = {
    "xavier_uniform": "glorot_uniform",
    "xavier_normal": "glorot_normal",
    "kaiming_uniform": "he_uniform",
    "kaiming_normal": "he_normal",
}


def register(name: str, builder: Callable[..., Initializer]) -> None:
    """Add a named initializer builder to the registry used by `get` (and configs, the CLI)."""
    _NAMED[name] = builder


def names() -> list[str]:
    """Registered initializer names (aliases included), sorted."""
    return sorted([*_NAMED, *_ALIASES])


def get(name: str, **params) -> Initializer:
    """The initializer `name` built with `params`, e.g. `get("gaussian", sigma_w=1.5)`.

    Raises:
      ValueError: unknown name (listing the known ones) or bad parameters.
    """
    canonical = _ALIASES.get(name, name)
    if canonical not in _NAMED:
        raise ValueError(f"unknown initializer {name!r}; known initializers: {', '.join(names())}")
    try:
        return _NAMED[canonical](**params)
    except TypeError as e:
        raise ValueError(f"initializer {name!r}: bad parameters {params}: {e}") from None


def chrono_lstm(cell_params: Any, t_max: int, key: jax.Array) -> Any:
    """Chrono initialization of a flax `LSTMCell`'s gates (Tallec & Ollivier 2018).

    Forget-gate biases log U(1, t_max - 1) and input-gate biases their negatives, so that the
    cell keeps its memory for ~t_max steps at initialization (the gated path through c that
    lets an LSTM carry gradients through time). A transform of the cell's initialized params
    ("hf", "hi": flax's gate names), not an `init(key, shape)`: flax gives every gate the same
    `bias_init`, and chrono ties two gates to one draw. With an `LSTMStack`:
    `stack.with_cell_params(variables, chrono_lstm(stack.cell_params(variables), T, key))`.

    Args:
      cell_params: the LSTMCell's params.
      t_max: the longest memory wanted, in time steps (>= 2).
      key: for the uniform draw.
    """
    b = jnp.log(
        jax.random.uniform(key, cell_params["hf"]["bias"].shape, minval=1.0, maxval=max(t_max - 1, 2))
    )
    return {**cell_params, "hf": {**cell_params["hf"], "bias": b}, "hi": {**cell_params["hi"], "bias": -b}}
