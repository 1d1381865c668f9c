"""gradflow.store: a crash or a second writer loses no finished record; no run reads another's."""

import json
import os

import numpy as np
import pytest

from gradflow.store import RunStore, load_arrays, read_records


def test_records_survive_a_torn_line_and_a_rerun_redoes_it(tmp_path):
    runs = RunStore(tmp_path, {"a": 1})
    runs.append("log", {"i": 0})
    runs.append("log", {"i": 1})
    runs.close()
    with (tmp_path / "log.jsonl").open("a") as f:
        f.write('{"i": 2, "tr')  # a crash mid-write
    with pytest.warns(UserWarning, match="torn last line"):
        assert read_records(tmp_path, "log") == [{"i": 0}, {"i": 1}]  # read-only: the file stays
    assert (tmp_path / "log.jsonl").read_text().endswith('"tr')
    runs = RunStore(tmp_path, {"a": 1})
    with pytest.warns(UserWarning, match="torn last line"):
        assert runs.records("log") == [{"i": 0}, {"i": 1}]  # the writer cuts the torn tail ...
    runs.append("log", {"i": 2})  # ... so the redone record lands on a line of its own
    assert [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()] == [
        {"i": 0},
        {"i": 1},
        {"i": 2},
    ]
    runs.close()


def test_one_writer_at_a_time(tmp_path):
    first = RunStore(tmp_path, {"a": 1})
    with pytest.raises(ValueError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        RunStore(tmp_path, {"a": 1})
    first.close()
    RunStore(tmp_path, {"a": 1}).close()  # released


def test_another_config_is_refused_or_restarted_never_mixed(tmp_path):
    runs = RunStore(tmp_path, {"a": 1})
    runs.append("log", {"i": 0})
    runs.save_arrays("g0", x=np.arange(3))
    runs.close()
    with pytest.raises(ValueError, match="another config"):
        RunStore(tmp_path, {"a": 2})
    assert read_records(tmp_path, "log") == [{"i": 0}]  # the refused run touched nothing
    runs = RunStore(tmp_path, {"a": 2}, on_mismatch="restart")
    assert runs.records("log") == [] and load_arrays(tmp_path) == {}  # nothing of the old run
    assert json.loads((tmp_path / "config.json").read_text()) == {"a": 2}
    runs.close()


def test_arrays_are_written_whole_and_bad_paths_are_named(tmp_path):
    runs = RunStore(tmp_path / "run", {"a": 1})
    runs.save_arrays("g0", x=np.arange(4.0), y=np.eye(2))
    runs.save_arrays("g1", z=np.ones(3))
    got = load_arrays(tmp_path / "run")
    np.testing.assert_array_equal(got["x"], np.arange(4.0))
    assert sorted(got) == ["x", "y", "z"]
    assert not [p for p in os.listdir(tmp_path / "run" / "arrays") if p.startswith(".")]  # no temp files left
    runs.close()
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot write the run directory"):
        RunStore(tmp_path / "file" / "run", {"a": 1})


def test_damage_and_orphaned_records_are_refused_by_name(tmp_path):
    runs = RunStore(tmp_path / "a", {"a": 1})
    for i in range(3):
        runs.append("log", {"i": i})
    runs.close()
    path = tmp_path / "a" / "log.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", lines[2]]) + "\n")  # damage, not a crash
    with pytest.raises(ValueError, match=r"log.jsonl: line 2 is not a JSON record"):
        read_records(tmp_path / "a", "log")
    # records or checkpoints without the config.json that says whose they are
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds checkpoints but no config.json"):
        RunStore(tmp_path / "b", {"a": 1})
    RunStore(
        tmp_path / "b", {"a": 1}, fresh=True, clear=("checkpoints",)
    ).close()  # unless told to start afresh
    assert not (tmp_path / "b" / "checkpoints").exists()
    # a mismatch names the differing field, both values
    with pytest.raises(ValueError, match=r"a: stored 1, now 2"):
        RunStore(tmp_path / "b", {"a": 2})
