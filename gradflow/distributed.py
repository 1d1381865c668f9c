"""Several processes, one device mesh: `jax.distributed` set-up and the batch axis sharded over it.

gradflow's batched work (a sweep's runs, spectra of many seeds or configurations) is a
`jit(vmap(f))` over one leading axis. Here that axis is laid over a 1-D `Mesh` of every device of
every process (`jax.devices()` after `jax.distributed.initialize`), with `NamedSharding(mesh,
P("batch"))`; the batch is padded to a multiple of the device count by repeating its last item,
and the padding is dropped from the results. Inputs are built with
`jax.make_array_from_callback`, so each process supplies only the shards its own devices hold;
results come back to every process through `multihost_utils.process_allgather`. Every process
runs the same calls with the same arguments (SPMD); `is_writer()` says which one writes files.

Set-up (`initialize`): a coordinator address `host:port` (process 0 listens there), the number of
processes and this one's id, from arguments or from `GRADFLOW_COORDINATOR`,
`GRADFLOW_NUM_PROCESSES` and `GRADFLOW_PROCESS_ID`; `coordinator="auto"` leaves them to JAX's
cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU). On CPUs the cross-process collectives
are JAX's gloo. A process that dies is noticed by JAX's coordination service within
`heartbeat_timeout_s`; it then ends the other processes with the message "Terminating process
because the JAX distributed service detected fatal errors ... another task died" (this is JAX's
own behaviour: there is no Python exception to catch). Whatever was written before that (the
atlas's records) stays, and a rerun resumes from it.

`local_processes` starts N copies of a command on this machine (loopback only), which is how the
tests, `experiments/multihost.py` and `experiments/bench/bench_multihost.py` try several hosts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gradflow import store
from gradflow._checks import check_int

AXIS = "batch"  # the mesh axis of the batched (vmapped) dimension
ENV = ("GRADFLOW_COORDINATOR", "GRADFLOW_NUM_PROCESSES", "GRADFLOW_PROCESS_ID")


def _settings(
    coordinator: str | None, num_processes: int | None, process_id: int | None
) -> tuple[str | None, int | None, int | None]:
    """The (coordinator, num_processes, process_id) to use, from the arguments or the environment,
    checked: a ValueError names the bad one before anything starts."""
    env = dict(
        zip(("coordinator", "num_processes", "process_id"), (os.environ.get(k) for k in ENV), strict=True)
    )
    coordinator = coordinator if coordinator is not None else env["coordinator"]
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError("num_processes and process_id need a coordinator address (host:port, or 'auto')")
        return None, None, None
    if coordinator == "auto":  # the cluster says; what is given anyway is passed on, checked
        for name, given in (("num_processes", num_processes), ("process_id", process_id)):
            if given is not None:
                check_int(name, given, 1 if name == "num_processes" else 0)
        return coordinator, num_processes, process_id
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator must be host:port (port 1..65535) or 'auto', got {coordinator!r}")
    values = {}
    for name, given, lo in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
        raw = given if given is not None else env[name]
        if raw is None:
            raise ValueError(f"coordinator {coordinator!r} is given but {name} is not")
        if isinstance(raw, str):  # from the environment
            raw = int(raw) if raw.strip().isdigit() else raw
        values[name] = check_int(name, raw, lo)
    if values["process_id"] >= values["num_processes"]:
        raise ValueError(
            f"process_id must be in 0..{values['num_processes'] - 1} for {values['num_processes']} processes, "
            f"got {values['process_id']}"
        )
    return coordinator, values["num_processes"], values["process_id"]


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout_s: int = 100,
    initialization_timeout_s: int = 300,
) -> bool:
    """Join this process to a multi-process run (`jax.distributed.initialize`), or do nothing.

    Call it before anything else uses jax (the CLI does, from its --coordinator, --num-processes
    and --process-id flags). Arguments left None are read from GRADFLOW_COORDINATOR,
    GRADFLOW_NUM_PROCESSES and GRADFLOW_PROCESS_ID; with no coordinator anywhere this is a
    single-process run and nothing happens.

    Args:
      coordinator: "host:port" of process 0's coordination service, or "auto" (JAX's cluster
        detection), or None.
      num_processes: processes in the run, >= 1.
      process_id: this process's id, 0..num_processes - 1; process 0 writes the files.
      heartbeat_timeout_s: a process silent this long is taken as dead, and the others end.
      initialization_timeout_s: how long to wait for every process to join.

    Returns:
      True if a multi-process run was joined.
    """
    coordinator, num_processes, process_id = _settings(coordinator, num_processes, process_id)
    if coordinator is None:
        return False
    if jax.distributed.is_initialized():  # joined already (a script that then calls the CLI)
        return True
    check_int("heartbeat_timeout_s", heartbeat_timeout_s, 1)
    check_int("initialization_timeout_s", initialization_timeout_s, 1)
    kwargs: dict[str, Any] = {
        "heartbeat_timeout_seconds": heartbeat_timeout_s,
        "initialization_timeout": initialization_timeout_s,
    }
    if coordinator != "auto":
        kwargs["coordinator_address"] = coordinator
    kwargs.update(
        {k: v for k, v in (("num_processes", num_processes), ("process_id", process_id)) if v is not None}
    )
    jax.distributed.initialize(**kwargs)
    return True


def is_writer() -> bool:
    """Whether this process writes results: process 0 (always, in a single-process run)."""
    return jax.process_index() == 0


def broadcast_json(obj: Any) -> Any:
    """Process 0's JSON-able `obj` on every process (others pass anything, e.g. None): how
    process 0, which reads the run store, tells the others what is already done."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    mine = np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_writer() else np.zeros(0, np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(mine.size)))
    buf = np.zeros(size, np.uint8)
    buf[: mine.size] = mine
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))).decode())


class WriterStore(NamedTuple):
    """A run store as one process of a run sees it: process 0 holds the `store.RunStore`
    (`runs`) and writes; on the others `runs` is None and writing does nothing. `done`: the
    records of the log named at opening, the same on every process."""

    runs: store.RunStore | None
    done: list[dict]

    def append(self, name: str, record: dict) -> None:
        if self.runs is not None:
            self.runs.append(name, record)

    def save_arrays(self, name: str, **arrays: Any) -> None:
        if self.runs is not None:
            self.runs.save_arrays(name, **arrays)

    def close(self) -> None:
        if self.runs is not None:
            self.runs.close()


def same_everywhere(what: str, obj: Any) -> None:
    """Raise a ValueError on every process unless every process holds the same JSON-able `obj`
    (e.g. its command's config: processes started with different flags would otherwise run
    mismatched programs or write one grid's results under another's name)."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = np.frombuffer(hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).digest(), np.uint8)
    every = np.asarray(multihost_utils.process_allgather(digest))  # (processes, 32)
    differ = [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
    if differ:
        raise ValueError(
            f"processes {differ} were given another {what} than process 0: start every process "
            "with the same command (only the host flags differ)"
        )


def on_writer(fn: Callable[[], Any]) -> Any:
    """`fn()` run by process 0 alone; its JSON-able result on every process, or its ValueError or
    OSError raised on every process alike (as a ValueError with its message), so that no process
    goes on to a collective the others never reach. One process: `fn()` itself."""
    if jax.process_count() == 1:
        return fn()
    told = None
    if is_writer():
        try:
            told = {"value": fn()}
        except (ValueError, OSError) as e:
            told = {"error": str(e)}
    told = broadcast_json(told)
    if "error" in told:
        raise ValueError(told["error"])
    return told["value"]


def writer_store(run_dir: Any, config: dict, log: str, **kwargs: Any) -> WriterStore:
    """Open the run store `run_dir` on process 0 (`store.RunStore(run_dir, config, **kwargs)`)
    and tell every process the records of its log `log` (what is already done), by `on_writer`.
    Every process must pass the same `config` (checked); a refusal (another config stored,
    another writer, an unreadable directory) is raised on every process alike."""
    same_everywhere("config", config)
    opened: list[store.RunStore] = []

    def open_store() -> list[dict]:
        opened.append(store.RunStore(run_dir, config, **kwargs))
        return opened[0].records(log)

    records = on_writer(open_store)
    return WriterStore(opened[0] if opened else None, records)


def mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The 1-D batch mesh over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(list(devices) if devices is not None else jax.devices()), (AXIS,))


def pad(tree: Any, multiple: int) -> tuple[Any, int]:
    """Host arrays padded along their leading axis to a multiple of `multiple` (the last item
    repeated); returns the padded tree and the original length."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError("pad: the batched arguments hold no arrays")
    n = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else 0
    if n == 0 or any(np.ndim(a) == 0 or np.shape(a)[0] != n for a in leaves):
        raise ValueError(
            f"batched arrays must share one leading axis, got shapes {[np.shape(a) for a in leaves]}"
        )
    extra = (-n) % multiple
    padded = jax.tree.map(
        lambda a: np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[-1:], extra, axis=0)]), tree
    )
    return padded, n


def put(tree: Any, m: Mesh, *, batched: bool) -> Any:
    """Host arrays (the same on every process) as global arrays on mesh `m`: split along the
    leading axis (`batched`) or replicated. Each process fills only its own devices' shards."""
    sharding = NamedSharding(m, P(AXIS) if batched else P())

    def one(a: Any) -> jax.Array:
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(one, tree)


def gather(tree: Any, n: int | None = None) -> Any:
    """Global arrays as host numpy arrays on every process, cut to the first `n` items."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    else:
        tree = jax.device_get(tree)
    return jax.tree.map(lambda a: np.asarray(a)[:n] if n is not None else np.asarray(a), tree)


def vmap_sharded(
    fn: Callable,
    batched: Any,
    replicated: Any = (),
    *,
    devices: Sequence[jax.Device] | None = None,
    compiler_options: Mapping[str, Any] | None = None,
) -> Any:
    """`jit(vmap(fn))(batched, replicated)` with the batch sharded over every process's devices.

    E.g. spectra of 64 seeds over all hosts:
    `vmap_sharded(lambda p, h0: spectra.log_singular_values(step, p, h0), (params_S, h0_S))`.

    Args:
      fn: `fn(*batched_item, *replicated)`, pure and jit-able.
      batched: a tuple of pytrees whose leaves share a leading axis S (host arrays, the same on
        every process).
      replicated: a tuple of pytrees passed whole to every item.
      devices: the mesh's devices (default `jax.devices()`, every process's).
      compiler_options: XLA options of the compiled call.

    Returns:
      fn's outputs stacked on a leading axis S, as host numpy arrays (on every process).
    """
    m = mesh(devices)
    padded, n = pad(tuple(batched), m.size)
    vfn = jax.vmap(lambda b, r: fn(*b, *r), in_axes=(0, None))
    out = jax.jit(
        vfn, out_shardings=NamedSharding(m, P(AXIS)), compiler_options=dict(compiler_options or {}) or None
    )(put(padded, m, batched=True), put(tuple(replicated), m, batched=False))
    return gather(out, n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_processes(
    argv: Sequence[str],
    num_processes: int,
    *,
    devices_per_process: int = 1,
    env: Mapping[str, str] | None = None,
    stdout: Any = None,
) -> Iterator[list[subprocess.Popen]]:
    """Start `num_processes` copies of `argv` on this machine as one multi-process JAX run.

    Each gets GRADFLOW_COORDINATOR (a free loopback port), GRADFLOW_NUM_PROCESSES,
    GRADFLOW_PROCESS_ID and `--xla_force_host_platform_device_count=devices_per_process` CPU
    devices; `argv` must call `initialize()` (the gradflow CLI does). Yields the `Popen`s; on exit
    any still running is killed.

    Args:
      argv: the command, e.g. [sys.executable, "-m", "gradflow.cli", "sweep", ...].
      num_processes: processes, >= 1.
      devices_per_process: CPU devices each, >= 1.
      env: extra environment variables.
      stdout: where each process's stdout and stderr go: None (inherited) or a directory path
        (files `<dir>/process<i>.log`).
    """
    check_int("num_processes", num_processes, 1)
    check_int("devices_per_process", devices_per_process, 1)
    coordinator = f"127.0.0.1:{_free_port()}"
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for i in range(num_processes):
            e = {**os.environ, **(env or {})}
            flags = [
                f for f in e.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f
            ]
            e["XLA_FLAGS"] = " ".join(
                [*flags, f"--xla_force_host_platform_device_count={devices_per_process}"]
            )
            e.update(
                JAX_PLATFORMS="cpu",
                GRADFLOW_COORDINATOR=coordinator,
                GRADFLOW_NUM_PROCESSES=str(num_processes),
                GRADFLOW_PROCESS_ID=str(i),
            )
            out = None
            if stdout is not None:
                out = open(os.path.join(stdout, f"process{i}.log"), "w")  # noqa: SIM115 - closed below
                logs.append(out)
            procs.append(
                subprocess.Popen(list(argv), env=e, stdout=out, stderr=subprocess.STDOUT if out else None)
            )
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
