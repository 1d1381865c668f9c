"""Per-layer Jacobian spectra: gradflow's exact engine vs what a researcher would write.

Side by side, in one run, on a tanh net h_l = tanh(W_l h_{l-1}), W_l ~ N(0, sigma_w^2 / N):
- baseline: for each l, `jax.jacfwd` of the first l layers, then `jnp.linalg.svd` (O(L^2));
- scan+SVD: accumulate every J_l in one scan (L x N x N held), then batched SVD (float32);
- gradflow: `spectra.jacobian_spectra` (log-scaled, QR-preconditioned Jacobi, streaming).
It prints wall times and ratios, the per-layer cost against one N x N QR and SVD, and accuracy:
the error in log sigma against a float64 scan+SVD where float64 is itself reliable, and the
smallest singular value at depth L from each method (the float32 product's SVD reports noise).

    python experiments/bench/bench_spectra.py [--depth 64] [--width 256] [--sigma-w 1.05]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from gradflow import spectra
from gradflow.numerics import x64


def step(w, h):
    return jnp.tanh(w @ h)


def baseline(w, h0):
    @jax.jit
    def svals_upto(w, h0, l):
        f = lambda h: lax.fori_loop(0, l, lambda i, h: step(w[i], h), h)  # noqa: E731
        return jnp.linalg.svd(jax.jacfwd(f)(h0), compute_uv=False)

    return jnp.stack([svals_upto(w, h0, l) for l in range(1, w.shape[0] + 1)])


@jax.jit
def scan_svd(w, h0):
    def body(carry, w_l):
        h, j = carry
        a = jax.jacfwd(lambda x: step(w_l, x))(h)
        j = a @ j
        return (step(w_l, h), j), j

    n = h0.shape[0]
    _, js = lax.scan(body, (h0, jnp.eye(n, dtype=h0.dtype)), w)
    return jnp.linalg.svd(js, compute_uv=False)


def timed(fn, *args):
    out = jax.block_until_ready(fn(*args))  # compile + run
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--sigma-w", type=float, default=1.05)
    p.add_argument("--skip-baseline", action="store_true", help="the O(L^2) baseline is slow at large L")
    a = p.parse_args()
    L, n = a.depth, a.width
    w = a.sigma_w * jax.random.normal(jax.random.key(0), (L, n, n)) / np.sqrt(n)
    h0 = jax.random.normal(jax.random.key(1), (n,))
    print(f"device {jax.devices()[0].platform}; tanh net L={L}, N={n}, sigma_w={a.sigma_w}")

    ours, t_ours = timed(
        lambda w, h: jnp.asarray(spectra.jacobian_spectra(step, w, h).log_singular_values), w, h0
    )
    sv32, t_scan = timed(scan_svd, w, h0)
    rows = [("gradflow exact (log-Jacobi)", t_ours), ("scan + batched SVD (float32)", t_scan)]
    if not a.skip_baseline:
        _, t_base = timed(baseline, w, h0)
        rows.insert(0, ("baseline: jacfwd per l + SVD", t_base))
    ref = rows[0][1]
    print(f"\n{'method':32s} {'time s':>8} {'baseline/this':>14}")
    for name, t in rows:
        print(f"{name:32s} {t:>8.3f} {ref / t:>14.2f}")

    a_nn = jax.random.normal(jax.random.key(2), (n, n))
    qr, svd = jax.jit(jnp.linalg.qr), jax.jit(lambda m: jnp.linalg.svd(m, compute_uv=False))
    _, t_qr = timed(qr, a_nn)
    _, t_svd = timed(svd, a_nn)
    print(
        f"\nper layer: gradflow {t_ours / L * 1e3:.2f} ms; one {n}x{n} QR {t_qr * 1e3:.2f} ms "
        f"(ratio {t_ours / L / t_qr:.1f}); one SVD {t_svd * 1e3:.2f} ms (ratio {t_ours / L / t_svd:.1f})"
    )

    with x64():
        sv64 = np.asarray(
            scan_svd(jnp.asarray(np.asarray(w), jnp.float64), jnp.asarray(np.asarray(h0), jnp.float64))
        )
    log64 = np.log(sv64)
    ok = log64 > log64[:, :1] - 25.0  # float64 SVD of the product is reliable here
    err = np.abs(np.asarray(ours) - log64)[ok].max()
    print(
        f"\naccuracy vs float64 where reliable: max |log s - log s64| = {err:.2e} over {ok.mean():.0%} of values"
    )
    print(
        f"smallest singular value at depth {L}: float32 product SVD {float(sv32[-1, -1]):.3e}, "
        f"float64 product SVD {sv64[-1, -1]:.3e}, gradflow {np.exp(float(ours[-1, -1])):.3e} "
        f"(log {float(ours[-1, -1]):.2f})"
    )


if __name__ == "__main__":
    main()
