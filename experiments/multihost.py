"""Four processes as four hosts: `gradflow sweep` and a batch of spectra over one device mesh.

Starts 4 processes x 2 CPU devices on this machine (`distributed.local_processes`: loopback
only, gloo collectives), as one would start one process per host with --coordinator,
--num-processes and --process-id (here they come from GRADFLOW_* variables):

1. `gradflow sweep` (8 seeds x 4 learning rates of a 16-layer tanh MLP on digits, Adam): 32 runs
   sharded over the 8 devices; process 0 alone writes `<out>/sweep4/`. The same command as one
   process with 8 devices (`<out>/sweep8/`) is the same SPMD program: every record must be
   equal bit for bit. As one process with one device (`<out>/sweep1/`, unsharded) it is another
   XLA program, whose rounding differs; Adam at these learning rates amplifies that to losses
   ~10% apart by the end of epoch 1, which is the runs' own sensitivity, not the split (the
   test-sized SGD sweep of tests/test_distributed.py agrees with one device to 1e-5).
2. `distributed.vmap_sharded(spectra.log_singular_values)`: per-layer spectra of 24 random
   tanh nets (depth 32, width 16, one per seed, weight scale 1.1 near the edge of chaos) split
   over all devices, against the same vmapped call in one process and a float64 numpy SVD of the
   explicit Jacobian product (on the singular values that product resolves: the smallest reach
   e^-90, far below float64's floor of ~1e-16 of the largest).

Measured on a 2-core CPU (idle): the 4-process sweep is bit for bit the 1 x 8 sweep; its spectra
are within 2.1e-5 (relative) of one process's and 5.6e-5 of float64's; 47 s for the 4-process
sweep against 14 s as 1 x 8 (38 s against 12 s in a later run: four processes each compiling on two shared cores).

    python experiments/multihost.py [--processes 4] [--devices-per-process 2] [--out runs/multihost]
        [--depth 16] [--epochs 3] [--nets 24] [--net-depth 32]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

WIDTH = 16  # of the spectra's nets


def _sweep_flags(depth: int, epochs: int) -> list[str]:
    """`gradflow sweep` of 8 seeds x 4 learning rates (Adam) of a tanh MLP on digits."""
    flags = ["sweep", "--dataset", "digits", "--model.depth", str(depth), "--model.width", "32"]
    flags += ["--model.activation", "tanh", "--train.epochs", str(epochs), "--train.batch-size", "64"]
    return [*flags, "--seeds", *map(str, range(8)), "--lr", "0.01", "0.03", "0.1", "0.3", "--fresh"]


def _nets(nets: int, depth: int) -> tuple[dict, np.ndarray]:
    """The spectra problem, the same in every process: `nets` tanh nets and their inputs."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(nets, depth, WIDTH, WIDTH)) * 1.1 / np.sqrt(WIDTH)
    return {"w": w.astype(np.float32)}, rng.normal(size=(nets, WIDTH)).astype(np.float32)


def _step(p, h):
    import jax.numpy as jnp

    return jnp.tanh(p["w"] @ h)


def spectra_worker(out: str, nets: int, depth: int) -> None:
    """One process of the spectra run: every process computes its shard, process 0 writes all."""
    from gradflow import distributed

    distributed.initialize()
    from gradflow import spectra

    params, h0 = _nets(nets, depth)
    t0 = time.perf_counter()
    logs = distributed.vmap_sharded(lambda p, h: spectra.log_singular_values(_step, p, h), (params, h0))
    if distributed.is_writer():
        np.savez(out, logs=logs, seconds=time.perf_counter() - t0)


def _float64(params: dict, h0: np.ndarray) -> np.ndarray:
    """log singular values of J_l = prod_k diag(1 - h_k^2) W_k, in float64 by numpy's SVD."""
    nets, depth = params["w"].shape[:2]
    logs = np.empty((nets, depth, WIDTH))
    for s in range(nets):
        h, jac = h0[s].astype(np.float64), np.eye(WIDTH)
        for layer in range(depth):
            w = params["w"][s, layer].astype(np.float64)
            h = np.tanh(w @ h)
            jac = (1 - h**2)[:, None] * w @ jac
            logs[s, layer] = np.log(np.linalg.svd(jac, compute_uv=False))
    return logs


def main(
    processes: int = 4,
    devices_per_process: int = 2,
    out: str = "runs/multihost",
    depth: int = 16,
    epochs: int = 3,
    nets: int = 24,
    net_depth: int = 32,
) -> dict:
    import jax

    from gradflow import cli, distributed, progress, spectra

    root = pathlib.Path(out)
    root.mkdir(parents=True, exist_ok=True)
    report = {}

    seconds = {}
    for name, procs, devs in (
        ("sweep4", processes, devices_per_process),
        ("sweep8", 1, processes * devices_per_process),
    ):
        t0 = time.perf_counter()
        argv = [sys.executable, "-m", "gradflow.cli", *_sweep_flags(depth, epochs), "--out", str(root / name)]
        with progress.stage(f"{name}: the 32-run sweep on {procs} processes x {devs} devices"):
            with distributed.local_processes(argv, procs, devices_per_process=devs, stdout=root) as ps:
                codes = [p.wait(timeout=1800) for p in ps]
        if codes != [0] * procs:
            raise SystemExit(f"sweep ({procs} x {devs}): exit codes {codes}; see {root}/process*.log")
        seconds[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with progress.stage("sweep1: the same sweep in this process, 1 device"):
        assert cli.main([*_sweep_flags(depth, epochs), "--out", str(root / "sweep1")]) == 0
    seconds["sweep1"] = time.perf_counter() - t0
    runs = {name: np.load(root / name / "epochs.npz") for name in seconds}
    a, b, c = runs["sweep4"], runs["sweep8"], runs["sweep1"]
    report["sweep"] = dict(
        bitwise=all(np.array_equal(a[k], b[k], equal_nan=True) for k in b.files),
        loss_diff=float(np.max(np.abs(a["loss"] - c["loss"]) / np.abs(c["loss"]))),
        first_loss_diff=float(np.max(np.abs(a["loss"][:, 0] - c["loss"][:, 0]) / np.abs(c["loss"][:, 0]))),
        seconds=seconds,
    )

    t0 = time.perf_counter()
    argv = [sys.executable, __file__, "--spectra-worker", str(root / "spectra.npz")]
    argv += ["--nets", str(nets), "--net-depth", str(net_depth)]
    stage = progress.stage(f"spectra of {nets} nets on {processes} processes x {devices_per_process} devices")
    with (
        stage,
        distributed.local_processes(
            argv, processes, devices_per_process=devices_per_process, stdout=root
        ) as ps,
    ):
        codes = [p.wait(timeout=1800) for p in ps]
    if codes != [0] * processes:
        raise SystemExit(f"spectra: exit codes {codes}; see {root}/process*.log")
    many = time.perf_counter() - t0
    got = np.load(root / "spectra.npz")["logs"]
    params, h0 = _nets(nets, net_depth)
    t0 = time.perf_counter()
    with progress.stage(f"spectra of {nets} nets in this process"):
        alone = np.asarray(jax.vmap(lambda p, h: spectra.log_singular_values(_step, p, h))(params, h0))
    one = time.perf_counter() - t0
    with progress.stage("the float64 reference (numpy SVDs)"):
        ref = _float64(params, h0)
    # float64's explicit product resolves singular values down to ~1e-16 of the largest only;
    # gradflow's engine goes on in log space (its smallest here are far below that)
    resolved = ref > ref[..., :1] - np.log(1e8)
    report["spectra"] = dict(
        rel_diff=float(np.max(np.abs(got - alone) / np.maximum(np.abs(alone), 1.0))),
        diff_float64=float(np.max(np.abs(got - ref)[resolved])),
        smallest=float(got.min()),
        smallest_float64=float(ref.min()),
        seconds_many=many,
        seconds_one=one,
    )

    layout = f"{processes} processes x {devices_per_process} devices"
    s, p = report["sweep"], report["spectra"]
    t = s["seconds"]
    print(
        f"gradflow sweep, 32 runs: {layout} ({t['sweep4']:.1f} s), 1 process x {processes * devices_per_process} ({t['sweep8']:.1f} s), 1 x 1 ({t['sweep1']:.1f} s)"
    )
    print(
        f"  {layout} vs 1 x {processes * devices_per_process}: every record bit for bit equal: {s['bitwise']}"
    )
    print(
        f"  vs 1 x 1 (unsharded, another XLA program): loss of epoch 1 within {s['first_loss_diff']:.1e} (relative), "
        f"of every epoch within {s['loss_diff']:.1e} (training amplifies rounding)"
    )
    print(
        f"spectra of {nets} tanh nets, depth {net_depth}, width {WIDTH}: {layout} ({p['seconds_many']:.1f} s with start-up) vs one process ({p['seconds_one']:.1f} s)"
    )
    print(f"  log singular values within {p['rel_diff']:.1e} (relative, of max(1, |value|))")
    print(
        f"  vs a float64 SVD of the explicit product, on the values it resolves (within 1e8 of the largest): "
        f"{p['diff_float64']:.1e}; smallest log singular value {p['smallest']:.1f} (float64 product: {p['smallest_float64']:.1f}, its rounding floor)"
    )
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--out", default="runs/multihost")
    for name, default in [("depth", 16), ("epochs", 3), ("nets", 24), ("net_depth", 32)]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--spectra-worker", help=argparse.SUPPRESS)  # one process: where to write
    a = parser.parse_args()
    if a.spectra_worker:
        spectra_worker(a.spectra_worker, a.nets, a.net_depth)
    else:
        main(a.processes, a.devices_per_process, a.out, a.depth, a.epochs, a.nets, a.net_depth)
