"""gradflow.distributed: real processes on localhost (gloo) give what one process gives."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradflow import distributed
from gradflow.distributed import _settings


def test_settings_come_from_arguments_or_the_environment_and_bad_ones_are_named(monkeypatch):
    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    assert _settings(None, None, None) == (None, None, None)  # one process
    assert _settings("10.0.0.1:1234", 4, 3) == ("10.0.0.1:1234", 4, 3)
    assert _settings("auto", None, None) == ("auto", None, None)
    for args, match in [
        (("localhost", 2, 0), "host:port"),
        (("localhost:99999", 2, 0), "host:port"),
        (("localhost:80", 2, 2), r"process_id must be in 0..1 for 2 processes, got 2"),
        (("localhost:80", 0, 0), "num_processes must be an integer >= 1"),
        (("localhost:80", 2, None), "process_id is not"),
        ((None, 2, 0), "need a coordinator"),
    ]:
        with pytest.raises(ValueError, match=match):
            _settings(*args)
    monkeypatch.setenv("GRADFLOW_COORDINATOR", "127.0.0.1:5000")
    monkeypatch.setenv("GRADFLOW_NUM_PROCESSES", "3")
    monkeypatch.setenv("GRADFLOW_PROCESS_ID", "two")
    with pytest.raises(ValueError, match=r"process_id must be an integer >= 0, got 'two'"):
        _settings(None, None, None)
    monkeypatch.setenv("GRADFLOW_PROCESS_ID", "2")
    assert _settings(None, None, None) == ("127.0.0.1:5000", 3, 2)
    assert _settings(None, None, 1) == ("127.0.0.1:5000", 3, 1)  # an argument beats the environment


def _problem():
    """A small sweep and a batch of spectra, the same in every process (seeded)."""
    from gradflow.nn import MLPStack
    from gradflow.optim import OptimConfig
    from gradflow.train import TrainConfig, grid

    rng = np.random.default_rng(3)
    x = rng.normal(size=(96, 6)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(6, 3)), axis=-1).astype(np.int32)
    model = MLPStack(depth=2, width=8, activation="tanh", num_outputs=3)
    cfg = TrainConfig(epochs=2, batch_size=16, diagnostics_every=0, optim=OptimConfig("sgd", 0.1))
    hp = grid(cfg, seeds=[0, 1, 2, 3, 4], lr=[0.1])  # 5 runs over 4 devices: padded to 8
    # spectra of 6 random tanh nets (depth 4, width 6), one per seed
    w = rng.normal(size=(6, 4, 6, 6)).astype(np.float32) * 1.3 / np.sqrt(6)
    h0 = rng.normal(size=(6, 6)).astype(np.float32)
    return model, cfg, (x[:64], y[:64], x[64:], y[64:]), hp, {"w": w}, h0


def _step(p, h):
    return jnp.tanh(p["w"] @ h)


_CLI_SWEEP = [
    "sweep",
    "--model.depth",
    "2",
    "--model.width",
    "8",
    "--num-samples",
    "200",
    "--train.epochs",
    "1",
]
_CLI_SWEEP += ["--seeds", "0", "1", "2", "--lr", "1e-3", "3e-3", "--runs-per-call", "4"]

_WORKER = """
import sys
import numpy as np
from gradflow import distributed
assert distributed.initialize(heartbeat_timeout_s=20)
import jax
sys.path.insert(0, {tests!r})
from test_distributed import _problem, _step
from gradflow import spectra
from gradflow.train import sweep
assert jax.process_count() == 2 and len(jax.devices()) == 4 and len(jax.local_devices()) == 2
model, cfg, data, hp, params, h0 = _problem()
res = sweep(model, cfg, data, hp)
assert res.num_devices == 4
given = sweep(model, cfg, data, hp, init_variables=model.init(jax.random.key(5), data[0][:16]))
logs = distributed.vmap_sharded(lambda p, h: spectra.log_singular_values(_step, p, h), (params, h0))
told = distributed.broadcast_json({{"from": jax.process_index()}})
from gradflow import cli
assert cli.main({sweep!r} + ["--out", {out!r} + "/sweep"]) == 0  # process 0 writes, in 2 calls
np.savez({out!r} + f"/process{{jax.process_index()}}.npz", loss=res.epochs["loss"], logs=logs,
         head=res.params["head"]["kernel"], told=told["from"], given=given.epochs["loss"])
print("OK", flush=True)
"""


@pytest.mark.slow
def test_two_processes_give_what_one_process_gives(tmp_path):
    """2 processes x 2 CPU devices (gloo collectives over loopback) run a 5-run sweep (from its
    seeds' initializations and from given variables) and a 6-seed batch of spectra sharded over all 4 devices; every process gets every result, equal to
    this process's unsharded run to rounding, and the spectra equal a float64 brute force."""
    code = textwrap.dedent(_WORKER).format(
        tests=os.path.dirname(__file__), out=str(tmp_path), sweep=_CLI_SWEEP
    )
    with distributed.local_processes(
        [sys.executable, "-c", code], 2, devices_per_process=2, stdout=tmp_path
    ) as ps:
        codes = [p.wait(timeout=300) for p in ps]
    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    got = [np.load(tmp_path / f"process{i}.npz") for i in range(2)]
    assert int(got[0]["told"]) == int(got[1]["told"]) == 0  # broadcast_json: process 0's object
    # gradflow sweep: 6 runs in 2 calls of 4 over the 4 devices, written by process 0 alone, the
    # records those of one process
    from gradflow import cli

    assert "process 1: 6 runs in" in logs[1] and "process 0 writes" in logs[1]
    calls = [json.loads(line) for line in (tmp_path / "sweep" / "calls.jsonl").read_text().splitlines()]
    assert [(c["runs"], c["devices"]) for c in calls] == [([0, 4], 4), ([4, 6], 4)]
    assert cli.main([*_CLI_SWEEP, "--out", str(tmp_path / "sweep1")]) == 0
    many, one = np.load(tmp_path / "sweep" / "epochs.npz"), np.load(tmp_path / "sweep1" / "epochs.npz")
    assert many["loss"].shape == (6, 1)
    for k in one.files:
        np.testing.assert_allclose(many[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)

    from gradflow import spectra
    from gradflow.train import sweep

    model, cfg, data, hp, params, h0 = _problem()
    one = sweep(model, cfg, data, hp, shard=False)
    assert got[0]["loss"].shape == (5, 2)
    assert not np.allclose(one.epochs["loss"][0], one.epochs["loss"][1])  # the seeds differ
    variables = model.init(jax.random.key(5), data[0][:16])  # replicated over the processes' devices
    given = sweep(model, cfg, data, hp, init_variables=variables, shard=False).epochs["loss"]
    alone = jax.vmap(lambda p, h: spectra.log_singular_values(_step, p, h))(params, jnp.asarray(h0))
    for g in got:
        np.testing.assert_allclose(g["loss"], one.epochs["loss"], rtol=1e-5)
        np.testing.assert_allclose(g["given"], given, rtol=1e-5)
        np.testing.assert_allclose(g["head"], one.params["head"]["kernel"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g["logs"], np.asarray(alone), rtol=1e-5, atol=1e-5)
    # the oracle: J_l = prod diag(1 - h_k^2) W_k, in float64, by numpy's SVD
    for s in range(6):
        h, jac = h0[s].astype(np.float64), np.eye(6)
        for l in range(4):
            w = params["w"][s, l].astype(np.float64)
            h = np.tanh(w @ h)
            jac = (1 - h**2)[:, None] * w @ jac
            np.testing.assert_allclose(
                got[1]["logs"][s, l], np.log(np.linalg.svd(jac, compute_uv=False)), atol=2e-5
            )


@pytest.mark.slow
def test_a_dead_process_ends_the_others_and_a_rerun_resumes_from_the_records(tmp_path):
    """A 2-process `gradflow atlas` (2 groups): process 1 is killed with SIGKILL once the first
    group's row is written. JAX's coordination service ends process 0 within the heartbeat
    timeout, naming the dead task; the row stays, and a rerun (one process) keeps it and adds
    the other."""
    import json
    import time

    from gradflow import cli

    out = tmp_path / "atlas"
    flags = ["atlas", "--activations", "relu", "--inits", "he", "--archs", "plain", "--depths", "4", "6"]
    flags += ["--width", "8", "--epochs", "1", "--train-samples", "200", "--out", str(out)]
    argv = [sys.executable, "-m", "gradflow.cli", *flags, "--heartbeat-timeout-s", "5"]
    results = out / "results.jsonl"
    with distributed.local_processes(argv, 2, devices_per_process=2, stdout=tmp_path) as ps:
        t0 = time.monotonic()
        while not (results.exists() and results.read_text().endswith("\n")):
            assert ps[0].poll() is None and time.monotonic() - t0 < 240, (
                tmp_path / "process0.log"
            ).read_text()[-3000:]
            time.sleep(0.05)
        ps[1].kill()
        killed = time.monotonic()
        code = ps[0].wait(timeout=60)
        waited = time.monotonic() - killed
    log = (tmp_path / "process0.log").read_text()
    assert code != 0 and waited < 30, (code, waited)
    assert "another task died" in log and "stopped sending heartbeats" in log, log[-3000:]
    kept = results.read_text()
    names = {"relu-he-plain-L4", "relu-he-plain-L6"}
    first = [json.loads(line)["name"] for line in kept.splitlines()]
    assert len(first) == 1 and first[0] in names, first  # the groups may finish in any order
    assert cli.main(flags) == 0
    after = results.read_text()
    assert after.startswith(kept)  # the dead run's row is kept as written, not measured again
    assert sorted(json.loads(line)["name"] for line in after.splitlines()) == sorted(names)


def test_the_cli_refuses_bad_host_flags_before_any_work(tmp_path, capsys, monkeypatch):
    from gradflow import cli

    for k in distributed.ENV:
        monkeypatch.delenv(k, raising=False)
    out = tmp_path / "never"
    for flags, match in [
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "host:port"),
        (["--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "5"], "0..1"),
        (["--num-processes", "2"], "need a coordinator"),
    ]:
        for command in ("sweep", "atlas"):
            with pytest.raises(SystemExit) as e:
                cli.main([command, *flags, "--out", str(out)])
            assert e.value.code == 2 and match in capsys.readouterr().err
    assert not out.exists()  # refused before anything was made


@pytest.mark.slow
def test_processes_started_with_other_flags_all_stop_naming_them(tmp_path):
    """Process 1 is given other seeds than process 0: both exit with 2 before training, saying
    which process differs, and nothing is written."""
    out = tmp_path / "sweep"
    argv = [sys.executable, "-c", _DIFFERENT_FLAGS.format(out=str(out))]
    with distributed.local_processes(argv, 2, stdout=tmp_path) as ps:
        codes = [p.wait(timeout=120) for p in ps]
    logs = [(tmp_path / f"process{i}.log").read_text() for i in range(2)]
    assert codes == [2, 2], logs
    for log in logs:
        assert "processes [1] were given another config than process 0" in log, log[-2000:]
    assert not (out / "calls.jsonl").exists()


_DIFFERENT_FLAGS = """
import os
from gradflow import cli
seeds = ["0", "1"] if os.environ["GRADFLOW_PROCESS_ID"] == "0" else ["0", "2"]
argv = ["sweep", "--model.depth", "2", "--model.width", "8", "--num-samples", "200", "--seeds", *seeds]
raise SystemExit(cli.main([*argv, "--out", {out!r}]))
"""
