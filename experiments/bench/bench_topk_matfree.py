"""gradflow's matrix-free topk against matfree's partial SVD (Golub-Kahan), side by side.

1. A 20-layer tanh CNN (`ConvStack`, 16 x 16 x 8 states: N = 2048): the top 16 singular
   values of J_l = dh_l/dh_0 at every layer. gradflow: `model_spectra(method="topk", k=16)`,
   all layers in one call. matfree: `eig.svd_partial(decomp.bidiag(n))` on the chained jvp
   (its vjp made by JAX) at each layer, for n = 32, 64, 128 and 256 Krylov steps (one jvp and
   one vjp each). The reference is gradflow's exact engine (all 2048 values, every layer; timed once).
   Printed: wall time (compile included, then warm), jvp+vjp products used, and the largest error of
   log sigma_1..16 over all layers.
2. A 200-layer sigmoid MLP (width 64): the top 4 singular values of J_200, of order e^-290, far
   below float32's smallest number (e^-103): matfree's products underflow to zero; gradflow's
   log-scaled product does not (against its exact engine).

matfree is not a gradflow dependency (it is in the dev extra, for this benchmark).

    python experiments/bench/bench_topk_matfree.py [--depth 20] [--size 16] [--channels 8] [--k 16]
        [--steps 32 64 128 256]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow import initializers as gi
from gradflow import spectra
from gradflow.nn import ConvStack, MLPStack, chain
from gradflow.spectra._topk import default_oversample


def _timed(fn, warm: bool = True):
    """(result, first call s, warm call s; the warm call is skipped, NaN, when warm=False)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    if not warm:
        return out, first, float("nan")
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return out, first, time.perf_counter() - t0


def _forward_map(c):
    """h0 -> h_l of a one-segment chain, l traced (a scan masked past l: one compile)."""
    (seg,) = c.segments

    def f(h0, l):
        def body(h, xs):
            p, i = xs
            return jnp.where(i < l, seg.step(seg.shared, p, h), h), None

        return lax.scan(body, h0, (seg.params, jnp.arange(seg.depth)))[0]

    return f


def _matfree_top(f, h0, depths, k, num_matvecs):
    from matfree import decomp, eig

    svd = eig.svd_partial(decomp.bidiag(num_matvecs))

    @jax.jit
    def one(l, v0):
        _, jvp = jax.linearize(lambda h: f(h, l), h0)
        _, s, _ = svd(lambda v: jvp(v.reshape(h0.shape)).reshape(-1), v0)
        with np.errstate(divide="ignore"):
            return jnp.log(jnp.sort(s)[::-1][:k])

    v0 = jax.random.normal(jax.random.key(3), (h0.size,), h0.dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    return jnp.stack([one(jnp.int32(l), v0) for l in depths])


def cnn(args):
    model = ConvStack(
        depth=args.depth, channels=args.channels, spatial_dims=2, padding="circular",
        activation="tanh", num_outputs=None, kernel_init=gi.gaussian(1.05),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (args.size, args.size, args.channels))
    variables = model.init(jax.random.key(1), x)
    c = chain(model, variables, x)
    n = int(c.h0.size)
    depths = list(range(1, args.depth + 1))
    print(
        f"1. {args.depth}-layer tanh CNN, {args.size}x{args.size}x{args.channels} states (N = {n}): top {args.k} at every layer"
    )
    exact, t_exact, w_exact = _timed(  # the reference, timed once: Jacobi on 2048 rows at every layer
        lambda: spectra.model_spectra(model, variables, x, method="exact").log_singular_values, warm=False
    )
    ref = np.asarray(exact)[:, : args.k]
    rows = [
        ("gradflow exact (all N, the reference)", t_exact, w_exact, f"{n} rows x {args.depth} layers", 0.0)
    ]
    top, t_top, w_top = _timed(
        lambda: spectra.model_spectra(model, variables, x, method="topk", k=args.k).log_singular_values
    )
    m = args.k + default_oversample(args.k)
    rows.append(
        (
            "gradflow topk",
            t_top,
            w_top,
            f"{m} rows down + {2 * m} up per round",
            float(np.max(np.abs(np.asarray(top) - ref))),
        )
    )
    f = _forward_map(c)
    for steps in args.steps:
        got, t, w = _timed(lambda steps=steps: _matfree_top(f, c.h0, depths, args.k, steps))
        err = float(np.max(np.abs(np.asarray(got) - ref)))
        rows.append(
            (f"matfree svd_partial, {steps} Krylov steps", t, w, f"{steps} jvp + {steps} vjp per depth", err)
        )
    print(
        f"{'method':42s} {'first s':>8s} {'warm s':>8s} {'x topk':>7s}  {'products':36s} {'max |err| log sigma':>20s}"
    )
    for name, t, w, prods, err in rows:
        print(f"{name:42s} {t:8.2f} {w:8.2f} {w / w_top:7.2f}  {prods:36s} {err:20.2e}")


def sigmoid(args):
    depth, width = 200, 64
    model = MLPStack(
        depth=depth, width=width, activation="sigmoid", kernel_init=gi.gaussian(1.0), num_outputs=None
    )
    x = jax.random.normal(jax.random.key(0), (1, width))
    variables = model.init(jax.random.key(1), x)
    c = chain(model, variables, x[0])
    exact = spectra.model_spectra(model, variables, x[0], method="exact", depths=[depth]).log_singular_values[
        0, :4
    ]
    top = spectra.model_spectra(
        model, variables, x[0], method="topk", k=4, depths=[depth]
    ).log_singular_values[0]
    got = _matfree_top(_forward_map(c), c.h0, [depth], 4, 16)[0]
    print(f"\n2. {depth}-layer sigmoid MLP, width {width}: top 4 log sigma of J_{depth}")
    print(f"   gradflow exact  {np.round(np.asarray(exact), 2)}")
    print(
        f"   gradflow topk   {np.round(np.asarray(top), 2)}  (max |diff| {float(np.max(np.abs(top - exact))):.1e})"
    )
    print(
        f"   matfree, 16 steps {np.asarray(got)}  (its float32 products underflow: sigma ~ e^{float(exact[0]):.0f})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, default in [("depth", 20), ("size", 16), ("channels", 8), ("k", 16)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument(
        "--steps", type=int, nargs="+", default=[32, 64, 128, 256], help="matfree's Krylov steps"
    )
    a = parser.parse_args()
    cnn(a)
    sigmoid(a)
