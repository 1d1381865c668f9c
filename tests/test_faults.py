"""Real processes killed with SIGKILL at each kind of point of a training run, a second writer,
and a dead writer's lock: every rerun ends bit-identical to the uninterrupted run
(experiments/fault_trials.py at test size; its default run draws random kill plans)."""

import json
import os
import re

import pytest

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL and flock are POSIX")


@pytest.fixture(scope="module")
def faults(load_experiment):
    exp = load_experiment("fault_trials")
    return exp, exp.uninterrupted()


def test_kill_9_anywhere_then_rerun_is_the_uninterrupted_run(tmp_path, faults):
    exp, whole = faults
    plan = [
        ("metrics", 1, 0.0),  # epoch 1's metrics line half written
        ("between", 2, 0.0),  # epoch 2 recorded, its checkpoint never written
        ("checkpoint", 3, 0.0),  # SIGKILL from a timer as orbax starts writing epoch 3
        ("checkpoint", 4, 0.03),  # ... 30 ms into the write of epoch 4 (it takes about 50 ms)
        ("time", 0, 4.0),  # 4 s after the start: during start-up, the resume or training
    ]
    row = exp.trial(tmp_path / "run", plan, whole)
    metrics, between = row["kills"][:2]
    # what the kills left: a torn tail, and a record whose checkpoint never landed
    assert (
        metrics["killed"] and metrics["torn"] and metrics["records"] == [0] and metrics["checkpoints"] == [0]
    )
    assert between["records"] == [0, 1, 2] and between["checkpoints"] == [0, 1] and not between["torn"]
    for kill in row["kills"]:
        assert kill["clean_records"], kill  # each epoch's record once, in order, after every kill
    assert all(k["checkpoints"] for k in row["kills"])  # a finished checkpoint survives every kill
    assert row["bit_identical"] and row["same_losses"] and row["records_in_order"]
    assert row["records_agree_with_checkpoints"]
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(exp.EPOCHS))
    assert [r["loss"] for r in lines] == [h["loss"] for h in whole.history]


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path, faults):
    exp, whole = faults
    row = exp.two_writers(tmp_path / "run", whole)
    assert re.search(rf"in use by another process \(pid {row['holder_pid']}\)", row["refused"])
    assert row["bit_identical"] and row["records_in_order"] and row["same_losses"]
