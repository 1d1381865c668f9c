"""Per-layer Jacobian spectra: gradflow's exact engine vs what a researcher would write.

Side by side, in one run, on a tanh net h_l = tanh(W_l h_{l-1}), W_l ~ N(0, sigma_w^2 / N):
- baseline: for each l, `jax.jacfwd` of the first l layers, then `jnp.linalg.svd` (O(L^2));
- scan+SVD: accumulate every J_l in one scan (L x N x N held), then batched SVD (float32);
- gradflow: `spectra.jacobian_spectra` (log-scaled, QR+LQ-preconditioned Jacobi with banded
  sweeps where the non-orthogonal pairs lie near the diagonal, streaming), at
  every depth, at L/8 evenly spaced depths, and at depth L only (between requested depths a
  layer costs the QR + LQ re-factoring alone);
- gradflow (previous engine): QR-preconditioned Jacobi with a rotation accumulator and a
  verification sweep, kept here (`legacy_step`) to measure old against new in the same process.
It prints wall times and ratios, the per-layer cost against one N x N QR and SVD, the Jacobi sweeps
per layer, how the cost scales with L and N, and accuracy: the error in log sigma against a float64
scan+SVD where float64 is itself reliable, and the smallest singular value at depth L from each
method (the float32 product's SVD reports noise).

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
from gradflow.spectra import _jacobi


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


def _legacy_sweep(c, s, acc):
    """The previous engine's sweep: swaps by select, rotation accumulator, in-sweep max cosine."""
    h = c.shape[0] // 2

    def rot(ct, cb, st, sb, at, ab):
        swap = (sb > st)[:, None]
        ci, cj = jnp.where(swap, cb, ct), jnp.where(swap, ct, cb)
        si, sj = jnp.where(swap[:, 0], sb, st), jnp.where(swap[:, 0], st, sb)
        a, b, g = jnp.sum(ci * ci, 1), jnp.sum(cj * cj, 1), jnp.sum(ci * cj, 1)
        r = jnp.exp(jnp.minimum(sj - si, 0.0))
        z = r * r * b - a
        sgn = jnp.where(z >= 0, 1.0, -1.0) * jnp.where(g >= 0, 1.0, -1.0)
        den = jnp.abs(z) + jnp.sqrt(z * z + 4.0 * (r * g) ** 2)
        tau = jnp.where(g != 0, sgn * 2.0 * jnp.abs(g) / jnp.where(den > 0, den, 1.0), 0.0)
        t = r * tau
        cs = 1.0 / jnp.sqrt(1.0 + t * t)
        ni, nj = cs[:, None] * (ci - (r * t)[:, None] * cj), cs[:, None] * (tau[:, None] * ci + cj)
        cos = jnp.abs(g) / jnp.sqrt(jnp.maximum(a * b, 1e-30))
        ai, aj = jnp.where(swap, ab, at), jnp.where(swap, at, ab)
        sn = (cs * t)[:, None]
        acc_i, acc_j = cs[:, None] * ai - sn * aj, sn * ai + cs[:, None] * aj
        return (
            jnp.where(swap, nj, ni),
            jnp.where(swap, ni, nj),
            jnp.where(swap, acc_j, acc_i),
            jnp.where(swap, acc_i, acc_j),
            jnp.max(cos),
        )

    def body(carry, _):
        ct, cb, st, sb, at, ab, off = carry
        ct, cb, at, ab, cos = rot(ct, cb, st, sb, at, ab)
        ct, cb = _jacobi._next_arrangement(ct, cb)
        st, sb = _jacobi._next_arrangement(st, sb)
        at, ab = _jacobi._next_arrangement(at, ab)
        return (ct, cb, st, sb, at, ab, jnp.maximum(off, cos)), None

    carry = (c[:h], c[h:], s[:h], s[h:], acc[:h], acc[h:], jnp.zeros((), c.dtype))
    (ct, cb, _, _, at, ab, off), _ = lax.scan(body, carry, None, length=c.shape[0] - 1)
    c, s = _jacobi.renormalize(jnp.concatenate([ct, cb]), s)
    return c, s, off, jnp.concatenate([at, ab])


def legacy_step(y, s):
    """The previous engine's layer step (even N, finite scales): QR, then Jacobi + accumulator."""
    m = y.shape[0]
    tol = 8.0 * m * float(jnp.finfo(y.dtype).eps)
    order = jnp.argsort(-s)
    y, s = y[order], s[order]
    q, r = jnp.linalg.qr(y.T)
    c, s = _jacobi.renormalize(jnp.triu(r * jnp.exp(jnp.minimum(s[None, :] - s[:, None], 0.0))), s)

    def body(state):
        c, s, acc, _, k = state
        c, s, off, acc = _legacy_sweep(c, s, acc)
        return c, s, acc, off, k + 1

    state = (c, s, jnp.eye(m, dtype=y.dtype), jnp.asarray(jnp.inf, y.dtype), 0)
    c, s, acc, _, k = lax.while_loop(lambda st: (st[3] > tol) & (st[4] < 30), body, state)
    return acc @ q.T, s, k


def new_step(y, s):
    q, c, s = _jacobi.precondition(y, s)
    c, s, k = _jacobi.orthogonalize(c, s)
    return c @ q.T, s, k


def engine(layer_step):
    """All per-layer log spectra with a given layer step, and the Jacobi sweeps it took per layer."""

    @jax.jit
    def run(w, h0):
        _, hs = lax.scan(lambda h, w_l: (step(w_l, h), h), h0, w)

        def body(carry, xs):
            c, s = carry
            w_l, h = xs
            _, jvp = jax.linearize(lambda x: step(w_l, x), h)
            c, s, k = layer_step(jax.vmap(jvp)(c), s)
            return (c, s), (jnp.sort(s)[::-1], k)

        n = h0.shape[0]
        _, out = lax.scan(body, (jnp.eye(n, dtype=h0.dtype), jnp.zeros(n, h0.dtype)), (w, hs))
        return out

    return run


def timed(fn, *args, repeats=3):
    """(output, best wall time of `repeats` calls after a compiling one)."""
    out = jax.block_until_ready(fn(*args))  # compile + run
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return out, best


def gradflow_spectra(**options):
    """(w, h0) -> log singular values from `spectra.jacobian_spectra(step, w, h0, **options)`."""
    return lambda w, h: jnp.asarray(spectra.jacobian_spectra(step, w, h, **options).log_singular_values)


def weights(depth, width, sigma_w, seed=0):
    w = sigma_w * jax.random.normal(jax.random.key(seed), (depth, width, width)) / np.sqrt(width)
    return w, jax.random.normal(jax.random.key(seed + 1), (width,))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--sigma-w", type=float, default=1.05)
    p.add_argument("--legacy-depth", type=int, default=16, help="depth for old vs new (old is slow)")
    p.add_argument("--skip-baseline", action="store_true", help="the O(L^2) baseline is slow at large L")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--skip-topk", action="store_true")
    a = p.parse_args()
    L, n = a.depth, a.width
    w, h0 = weights(L, n, a.sigma_w)
    print(f"device {jax.devices()[0].platform}; tanh net L={L}, N={n}, sigma_w={a.sigma_w}")

    ours, t_ours = timed(gradflow_spectra(), w, h0)
    every = max(1, L // 8)
    some = list(range(every, L + 1, every))
    _, t_some = timed(gradflow_spectra(depths=some), w, h0)
    _, t_last = timed(gradflow_spectra(depths=[L]), w, h0)
    sv32, t_scan = timed(scan_svd, w, h0)
    rows = [
        ("gradflow exact, all L depths", t_ours),
        (f"gradflow exact, {len(some)} depths", t_some),
        ("gradflow exact, depth L only", t_last),
        ("scan + batched SVD (float32)", t_scan),
    ]
    if not a.skip_baseline:
        _, t_base = timed(baseline, w, h0, repeats=1)
        rows.insert(0, ("baseline: jacfwd per l + SVD", t_base))
    ref = rows[0][1]
    print(f"\n{'method':32s} {'time s':>8} {'baseline/this':>14}")
    for name, t in rows:
        print(f"{name:32s} {t:>8.3f} {ref / t:>14.2f}")

    a_nn = jax.random.normal(jax.random.key(2), (n, n))
    qr, svd = jax.jit(jnp.linalg.qr), jax.jit(lambda m: jnp.linalg.svd(m, compute_uv=False))
    _, t_qr = timed(qr, a_nn)
    _, t_svd = timed(svd, a_nn)
    c0 = jnp.linalg.qr(a_nn)[0]
    _, t_sweep = timed(jax.jit(_jacobi.sweep), c0, jnp.zeros(n))
    band = max(1, n // 12)
    _, t_band = timed(jax.jit(_jacobi.banded_sweep), c0, jnp.zeros(n), band)
    (_, sweeps), _ = timed(engine(new_step), w, h0)
    per, carry = t_ours / L, t_last / L
    print(
        f"\nper layer, spectrum read at every layer: {per * 1e3:.2f} ms; one {n}x{n} QR "
        f"{t_qr * 1e3:.2f} ms (ratio {per / t_qr:.1f}); one SVD {t_svd * 1e3:.2f} ms (ratio "
        f"{per / t_svd:.1f}); one full Jacobi sweep {t_sweep * 1e3:.2f} ms, one banded sweep of "
        f"band {band} {t_band * 1e3:.2f} ms; sweeps (full or banded) per layer: mean "
        f"{np.mean(sweeps):.2f}, first {int(sweeps[0])}, last {int(sweeps[-1])}"
    )
    print(
        f"per layer between requested depths (QR + LQ re-factoring, no Jacobi): {carry * 1e3:.2f} ms "
        f"(ratio to one QR {carry / t_qr:.1f})"
    )

    if a.legacy_depth:
        lw, lh = w[: a.legacy_depth], h0
        (old, k_old), t_old = timed(engine(legacy_step), lw, lh, repeats=1)
        (new, k_new), t_new = timed(engine(new_step), lw, lh)
        print(
            f"\nold vs new engine at L={a.legacy_depth}, N={n}: old {t_old:.3f} s "
            f"({np.mean(k_old):.2f} sweeps/layer incl. the verification sweep), new {t_new:.3f} s "
            f"({np.mean(k_new):.2f} sweeps/layer); old/new {t_old / t_new:.2f}; "
            f"max |log s_old - log s_new| = {np.abs(np.asarray(old) - np.asarray(new)).max():.1e}"
        )

    if not a.skip_scaling:
        print("\nscaling of gradflow exact (all per-layer spectra), seconds (per layer in ms):")
        for ll, nn in [(16, 64), (64, 64), (256, 64), (16, 128), (64, 128), (16, 256)]:
            ws, hs = weights(ll, nn, a.sigma_w, seed=3)
            _, t = timed(gradflow_spectra(), ws, hs)
            print(f"  L={ll:4d} N={nn:4d}: {t:7.3f} s ({t / ll * 1e3:7.2f} ms/layer)")

    if not a.skip_topk:
        tl, tn, tk = 32, 1024, 16
        ws, hs = weights(tl, tn, a.sigma_w, seed=4)
        top = gradflow_spectra(depths=[tl], method="topk", k=tk)
        t0 = time.perf_counter()
        jax.block_until_ready(top(ws, hs))  # compiles
        t1 = time.perf_counter()
        jax.block_until_ready(top(ws, hs))
        first, t_top = t1 - t0, time.perf_counter() - t1
        print(
            f"\nmatrix-free top-{tk} at L={tl}, N={tn} (depth {tl}): {t_top:.2f} s "
            f"({t_top / tl * 1e3:.0f} ms/layer over all refinement rounds; first call +{first - t_top:.1f} s compile)"
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
