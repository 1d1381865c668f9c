"""The atlas's verdict: vanishing / exploding / healthy from a configuration's measured numbers."""

from __future__ import annotations

import math

import numpy as np

_LOG100 = math.log(100.0)


ISOMETRIC_SPREAD = 16.0


COLLAPSED_RESIDUAL = 1e-3


VERDICT_RULE = (
    "vanishing if the RMS singular value of the end-to-end Jacobian at init is below 1e-2, or the "
    "first layer's gradient is below 1e-2 of the last layer's; exploding if either is above 1e2 "
    "(the Jacobian decides when they disagree), or when the forward activations themselves "
    "overflow float32; otherwise healthy, 'near-isometric' when all "
    "singular values lie within a factor e^16 of each other, else 'spreads' (dead ReLU units "
    "make the spread infinite). Transformers whose last block's tokens have collapsed to one vector "
    "(rank-collapse residual ||X - 1 xbar^T||_F / ||X||_F below 1e-3, Dong et al. 2021) are "
    "'vanishing (rank collapse)': every direction but the mean token's is lost. Recurrent nets are judged by the largest singular value through "
    "time, the direction a gradient can still come back along."
)


def verdict(
    log_rms: float,
    log_grad_ratio: float | None,
    log_spread: float,
    overflow: bool = False,
    token_residual: float | None = None,
) -> str:
    """The label of a configuration from its numbers.

    log_rms: log of the RMS singular value of the end-to-end Jacobian at init (1/2 log mean
    sigma^2); log_grad_ratio: log of first-layer / last-layer gradient norm in training (or
    through time); log_spread: log sigma_max / sigma_min; overflow: the forward pass itself
    left float32's range (inf/nan activations), so the Jacobian there is meaningless;
    token_residual: a Transformer's rank-collapse residual at its last block (`gradflow.signal`).
    - "exploding (activations overflow)" if overflow;
    - "vanishing (rank collapse)" if token_residual < `COLLAPSED_RESIDUAL` (the tokens are one
      vector: what reaches the output no longer depends on which token was where);
    - "vanishing" if the RMS singular value is below 1e-2, or the first layer's gradient is
      below 1e-2 of the last layer's (a factor 100 over the depth);
    - "exploding" if either is above 1e2;
    - otherwise "healthy", qualified "(near-isometric)" when all singular values lie within a
      factor e^16 (~1e7, float32's precision) of each other, else "(spreads)": a Gaussian
      tanh net at criticality spreads over e^130 by depth 50 at width 32, an orthogonal one
      stays within e^12; dead ReLU units make the spread infinite.
    The Jacobian decides when the two disagree.
    """
    if overflow:
        return "exploding (activations overflow)"
    if token_residual is not None and token_residual < COLLAPSED_RESIDUAL:
        return "vanishing (rank collapse)"
    g = log_grad_ratio if log_grad_ratio is not None and math.isfinite(log_grad_ratio) else 0.0
    if log_rms < -_LOG100 or (log_rms <= _LOG100 and g < -_LOG100):
        return "vanishing"
    if log_rms > _LOG100 or g > _LOG100:
        return "exploding"
    if log_spread < ISOMETRIC_SPREAD:
        return "healthy (near-isometric)"
    return "healthy (spreads)"


def _log_rms(logs: np.ndarray) -> float:
    x = 2.0 * np.asarray(logs, np.float64)
    m = np.max(x)
    if not np.isfinite(m):
        return float(m)
    return 0.5 * float(m + np.log(np.mean(np.exp(x - m))))


def _finite_spread(logs: np.ndarray) -> float:
    logs = np.asarray(logs)
    return float(logs[0] - logs[-1]) if np.isfinite(logs[-1]) else math.inf
