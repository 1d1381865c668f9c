"""Trainer overhead and sweep speed-up, side by side in one run.

(a) Step time of `gradflow.train`'s epoch (`make_train_epoch`, one `lax.scan`) against a
    hand-written flax + optax `jit(lax.scan)` loop doing the same work (same model, optimizer
    and batches, per-step loss and accuracy; no diagnostics, no NaN check), with the trainer's
    diagnostics off, every 10 steps and every step. Claim (trainer issue): diagnostics off
    within 1.1x of the hand loop. Run at the default width 128 and at width 32, where a fixed
    per-step cost shows most.
(b) S configurations (default 64 = 8 learning rates x 8 seeds) of a 20-layer tanh MLP trained
    200 steps: one vmapped `train.sweep` call against a Python loop of `train.fit` calls.
    Reference (issue, H100): 0.16 s vmapped vs 2.6 s looped, 16.6x.

Compile times (first call minus a steady call) are printed for both. Timings are the best of
`--repeats` calls, taken in turns across the variants of (a), so that other processes on a
shared machine disturb them less and disturb all variants alike.

    python experiments/bench/bench_trainer.py [--width 128 32] [--depth 8] [--batch 128 32]
        [--sweep-width 32] [--sweep-configs 64] [--sweep-steps 200]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from gradflow import train
from gradflow.nn import MLPStack
from gradflow.optim import OptimConfig, make_optimizer


def _timed(fn, *args, repeats: int) -> tuple[float, float]:
    """(first call, best of `repeats` later calls) in seconds."""
    return _timed_in_turns({"": (fn, args)}, repeats)[""]


def _timed_in_turns(runs: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (first call, best later call)} for {name: (fn, args)}, the later calls in turns."""
    first = {}
    for name, (fn, args) in runs.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first[name] = time.perf_counter() - t0
    best = dict.fromkeys(runs, np.inf)
    for _ in range(repeats):
        for name, (fn, args) in runs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: (first[name], best[name]) for name in runs}


def overhead(depth: int, width: int, batch: int, steps: int, repeats: int) -> None:
    model = MLPStack(depth=depth, width=width, activation="tanh", num_outputs=10)
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (steps * batch, width))
    y = jax.random.randint(ky, (steps * batch,), 0, 10)
    optim = OptimConfig("adam", 1e-3)
    tx = make_optimizer(optim)
    init_key, data_key = train.run_keys(0)
    state = train.init_state(model, tx, init_key, x[:batch])
    batches = train.epoch_batches(x, y, data_key, 0, batch)

    @jax.jit
    def hand_epoch(params, opt_state, batches):
        def step(carry, b):
            params, opt_state = carry

            def loss_fn(p):
                logits = model.apply({"params": p}, b[0], train=True)
                return optax.softmax_cross_entropy_with_integer_labels(logits, b[1]).mean(), logits

            (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == b[1])
            return (optax.apply_updates(params, updates), opt_state), (loss, accuracy)

        return lax.scan(step, (params, opt_state), batches)

    runs = {"hand-written": (hand_epoch, (state.params, state.opt_state, batches))}
    for k, name in [
        (0, "trainer, diagnostics off"),
        (10, "trainer, every 10 steps"),
        (1, "trainer, every step"),
    ]:
        cfg = train.TrainConfig(batch_size=batch, diagnostics_every=k, optim=optim)
        runs[name] = (jax.jit(train.make_train_epoch(model, tx, cfg)), (state, batches))
    print(f"(a) MLPStack(depth={depth}, width={width}), batch {batch}, Adam, {steps} steps per call")
    times = _timed_in_turns(runs, repeats)
    hand = times["hand-written"][1]
    for name, (first, best) in times.items():
        print(
            f"  {name:26s} {best / steps * 1e3:8.3f} ms/step   x{best / hand:5.2f}   "
            f"compile ~{first - best:5.2f} s"
        )


def sweep_speedup(depth: int, width: int, configs: int, steps: int, batch: int, repeats: int) -> None:
    lrs = np.geomspace(1e-3, 1e-1, 8)
    seeds = list(range(max(1, configs // len(lrs))))
    epochs = 10
    n = steps // epochs * batch
    kx, kw = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (n + 256, 40))
    y = jnp.argmax(x @ jax.random.normal(kw, (40, 10)), axis=-1)
    data = (x[:n], y[:n], x[n:], y[n:])
    model = MLPStack(depth=depth, width=width, activation="tanh", num_outputs=10)
    cfg = train.TrainConfig(
        epochs=epochs, batch_size=batch, diagnostics_every=0, optim=OptimConfig("sgd", 0.01)
    )
    hp = train.grid(cfg, seeds=seeds, lr=lrs)
    S = len(hp.seed)

    def vmapped():
        return train.sweep(model, cfg, data, hp).epochs["loss"]

    def looped():
        out = []
        for seed, lr in zip(hp.seed, hp.lr):
            c = train.TrainConfig(
                epochs=epochs,
                batch_size=batch,
                seed=int(seed),
                diagnostics_every=0,
                optim=OptimConfig("sgd", float(lr)),
            )
            out.append([h["loss"] for h in train.fit(model, c, data, progress=False).history])
        return np.asarray(out)

    print(
        f"(b) {S} configs of MLPStack(depth={depth}, width={width}, tanh), {steps} SGD steps of batch {batch}"
    )
    v_first, v_best = _timed(vmapped, repeats=repeats)
    l_first, l_best = _timed(looped, repeats=max(1, repeats // 3))
    print(f"  vmapped train.sweep   {v_best:8.3f} s   compile ~{v_first - v_best:5.2f} s")
    print(f"  Python loop of train  {l_best:8.3f} s   compile ~{l_first - l_best:5.2f} s")
    print(f"  speed-up {l_best / v_best:5.1f}x (issue's H100 reference: 2.6 s / 0.16 s = 16.6x)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, nargs="+", default=[128, 32], help="widths for (a)")
    parser.add_argument("--batch", type=int, nargs="+", default=[128, 32], help="one per width")
    parser.add_argument("--steps", type=int, default=100, help="steps per timed call in (a)")
    parser.add_argument("--sweep-depth", type=int, default=20)
    parser.add_argument("--sweep-width", type=int, default=32)
    parser.add_argument("--sweep-configs", type=int, default=64)
    parser.add_argument("--sweep-steps", type=int, default=200)
    parser.add_argument("--sweep-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip", choices=["a", "b"], default=None, help="leave out one part")
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{len(jax.devices())}")
    if args.skip != "a":
        if len(args.batch) != len(args.width):
            parser.error(f"--batch needs one value per --width ({len(args.width)}), got {args.batch}")
        for width, batch in zip(args.width, args.batch):
            overhead(args.depth, width, batch, args.steps, args.repeats)
    if args.skip != "b":
        sweep_speedup(
            args.sweep_depth,
            args.sweep_width,
            args.sweep_configs,
            args.sweep_steps,
            args.sweep_batch,
            args.repeats,
        )


if __name__ == "__main__":
    main()
