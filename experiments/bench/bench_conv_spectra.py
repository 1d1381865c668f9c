"""Spectra of deep linear circular CNNs: the FFT path against the general engine and jacfwd + SVD.

Side by side, in one run:
1. test size (a 2-D circular conv stack, 6x6x3 states, depth 4): `spectra.conv_spectra` (per
   frequency, log-scaled), `spectra.model_spectra` of the same linear `ConvStack` (the general
   chain engine on the 108 x 108 layer Jacobians) and dense `jax.jacfwd` + SVD of each product;
   wall times (compile included, then warm), their ratios, and the largest disagreement;
2. the FFT path alone at depth `--depth` (default 10,000) on 16 x 16 x 16 states (N = 4096):
   Gaussian kernels at sigma_w = 1 and delta-orthogonal ones at gain 1, the spectrum at the last
   layer; the general engine would walk 10,000 Jacobians of 4096 x 4096.
(`bench_stacks.py` times ConvStack's compile at depth 10 / 100 / 1000.)

    python experiments/bench/bench_conv_spectra.py [--depth 10000] [--n 16] [--channels 16]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gradflow import initializers as gi
from gradflow import spectra
from gradflow.nn import ConvStack


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(getattr(out, "log_singular_values", out))
    return out, time.perf_counter() - start


def dense_products(model, variables, x, depth):
    """log sigma of each product by jacfwd of the first l blocks and SVD (float32)."""
    from gradflow.nn import chain

    c = chain(model, variables, x)
    seg = c.segments[0]

    @jax.jit
    def svals(h0):
        rows = []
        for i in range(depth):
            f = lambda z, i=i: _walk(seg, z.reshape(h0.shape), i + 1).ravel()  # noqa: E731
            rows.append(jnp.log(jnp.linalg.svd(jax.jacfwd(f)(h0.ravel()), compute_uv=False)))
        return jnp.stack(rows)

    return svals(c.h0)


def _walk(seg, h, depth):
    for i in range(depth):
        h = seg.step(None, seg.layer_params(i), h)
    return h


def small(args):
    model = ConvStack(
        depth=4, channels=3, kernel_size=3, spatial_dims=2, activation="identity", num_outputs=None,
        kernel_init=gi.gaussian(1.2), bias_init=nn.initializers.normal(0.3),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (6, 6, 3))
    variables = model.init(jax.random.key(1), x)
    kernels = variables["params"]["stage1"]["conv"]["kernel"]
    rows = []
    for name, fn in [
        ("fft (conv_spectra)", lambda: spectra.conv_spectra(kernels, (6, 6)).log_singular_values),
        (
            "general engine (model_spectra)",
            lambda: spectra.model_spectra(model, variables, x).log_singular_values,
        ),
        ("jacfwd + SVD", lambda: dense_products(model, variables, x, 4)),
    ]:
        out, cold = timed(fn)
        _, warm = timed(fn)
        rows.append((name, np.asarray(out), cold, warm))
    ref = rows[0][1]
    print("1. 2-D circular linear conv stack, 6x6x3 states (N = 108), depth 4")
    print(f"   {'method':32s} {'cold s':>8s} {'warm s':>8s} {'warm / fft':>10s} {'max |d log sigma|':>18s}")
    for name, out, cold, warm in rows:
        print(
            f"   {name:32s} {cold:8.3f} {warm:8.4f} {warm / rows[0][3]:10.1f} {np.max(np.abs(out - ref)):18.2e}"
        )


def deep(args):
    n, c, depth = args.n, args.channels, args.depth
    keys = jax.random.split(jax.random.key(2), depth)
    print(f"2. FFT path at depth {depth}, {n}x{n}x{c} states (N = {n * n * c}), spectrum of J_L")
    for name, init in [
        ("gaussian(1.0)", gi.gaussian(1.0)),
        ("delta_orthogonal(1.0)", gi.delta_orthogonal(1.0)),
    ]:
        kernels = jax.vmap(lambda k, init=init: init(k, (3, 3, c, c)))(keys)
        res, seconds = timed(spectra.conv_spectra, kernels, (n, n), depths=[depth])
        logs = res.log_singular_values[0]
        print(
            f"   {name:22s} {seconds:7.1f} s   log sigma_max {logs[0]:9.3f}   log sigma_min {logs[-1]:10.3f}"
            f"   spread e^{logs[0] - logs[-1]:.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    small(args)
    deep(args)


if __name__ == "__main__":
    main()
