"""Spectra of deep linear circular CNNs: the FFT path against the general engine and jacfwd + SVD.

Side by side, in one run:
1. test size (a 2-D circular conv stack, 6x6x3 states, depth 4): `spectra.conv_spectra` (per
   frequency, log-scaled), `spectra.model_spectra` of the same linear `ConvStack` (the general
   chain engine on the 108 x 108 layer Jacobians) and dense `jax.jacfwd` + SVD of each product;
   wall times (compile included, then warm), their ratios, and the largest disagreement;
2. where the FFT path's time goes (16 x 16 x 16 states, Gaussian kernels), for its two walks of
   each frequency's product: "chain" (the general engine's walk on the real 2C x 2C form: QR + LQ
   a layer, what conv_spectra ran before) and "qr" (one complex C x C QR a layer): compile (cold
   minus warm), the cost of a layer (warm, depth 1000 against 200), of one Jacobi readout (10
   requested depths against 1), and float64 / complex128 against float32 / complex64;
3. both walks at depth `--depth` (default 10,000) on 16 x 16 x 16 states (N = 4096): Gaussian
   kernels at sigma_w = 1 and delta-orthogonal ones at gain 1, the spectrum at the last layer,
   before ("chain") and after ("qr") side by side in float32, each one's largest error against
   the "qr" walk in float64 / complex128 (which agrees with the "chain" walk in float64 to 1e-11
   at depth 300); the general engine on the whole model would walk 10,000 Jacobians of
   4096 x 4096.
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
from gradflow.numerics import x64


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
    rows = []
    for name, fn in [
        (
            "fft (conv_stack_spectra)",
            lambda: spectra.conv_stack_spectra(model, variables, x).log_singular_values,
        ),
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


def _kernels(init, depth, c, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(2), depth)
    return jax.vmap(lambda k: init(k, (3, 3, c, c), dtype))(keys)


def profile(args):
    """Where the time goes, per walk: compile, a layer, a readout, float64."""
    n, c = args.n, args.channels
    short, long_ = 200, 1000
    print(f"2. where the time goes: {n}x{n}x{c} states, Gaussian kernels (warm calls unless said)")
    print(f"   {'walk':6s} {'compile s':>9s} {'ms / layer':>10s} {'readout ms':>10s} {'f64 / f32':>9s}")
    kernels = _kernels(gi.gaussian(1.0), long_, c)
    for method in ("chain", "qr"):
        run = lambda k, depths, method=method: spectra.conv_spectra(k, (n, n), depths=depths, method=method)  # noqa: E731
        _, cold = timed(run, kernels[:short], [short])
        _, warm_short = timed(run, kernels[:short], [short])
        _, warm_long = timed(run, kernels, [long_])
        per_layer = (warm_long - warm_short) / (long_ - short)
        _, ten = timed(run, kernels[:short], list(range(short - 9, short + 1)))
        _, ten = timed(run, kernels[:short], list(range(short - 9, short + 1)))
        readout = (ten - warm_short) / 9
        with x64():
            k64 = jnp.asarray(np.asarray(kernels[:short]), jnp.float64)
            timed(run, k64, [short])
            _, warm64 = timed(run, k64, [short])
        print(
            f"   {method:6s} {cold - warm_short:9.2f} {1e3 * per_layer:10.2f} {1e3 * readout:10.1f}"
            f" {warm64 / warm_short:9.2f}"
        )


def deep(args):
    n, c, depth = args.n, args.channels, args.depth
    print(f"3. FFT path at depth {depth}, {n}x{n}x{c} states (N = {n * n * c}), spectrum of J_L (cold calls)")
    print(
        f"   {'kernels':22s} {'chain s':>8s} {'qr s':>7s} {'chain / qr':>10s}   max |log sigma - float64's|: chain, qr"
    )
    for name, init in [
        ("gaussian(1.0)", gi.gaussian(1.0)),
        ("delta_orthogonal(1.0)", gi.delta_orthogonal(1.0)),
    ]:
        kernels = _kernels(init, depth, c)
        before, t_before = timed(spectra.conv_spectra, kernels, (n, n), depths=[depth], method="chain")
        after, t_after = timed(spectra.conv_spectra, kernels, (n, n), depths=[depth], method="qr")
        with x64():
            k64 = jnp.asarray(np.asarray(kernels), jnp.float64)
            ref = spectra.conv_spectra(k64, (n, n), depths=[depth]).log_singular_values
        err = [np.max(np.abs(r.log_singular_values - ref)) for r in (before, after)]
        print(
            f"   {name:22s} {t_before:8.1f} {t_after:7.1f} {t_before / t_after:10.1f}   {err[0]:.2e}, {err[1]:.2e}"
            f"   (log sigma in [{ref[0, -1]:.3f}, {ref[0, 0]:.3f}])"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=10_000)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--channels", type=int, default=16)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    small(args)
    profile(args)
    deep(args)


if __name__ == "__main__":
    main()
