import io
import re

from rich.console import Console

from gradflow import progress


def _console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), record=True, force_terminal=terminal, force_jupyter=False, width=100)


def test_plain_output_names_each_stage_and_item_with_elapsed_time_and_eta():
    console = _console(terminal=False)
    with progress.stage("compiling 2 nets", console=console):
        pass
    items = list(progress.track([10, 20, 30], "seeds", console=console))
    assert items == [10, 20, 30]
    lines = console.export_text().splitlines()
    assert lines[0] == "compiling 2 nets ..."
    assert re.fullmatch(r"compiling 2 nets: \d+\.\d s", lines[1])
    assert re.fullmatch(r"seeds: 1/3, \d+\.\d s elapsed, eta 0:00:\d\d", lines[2])
    assert re.fullmatch(r"seeds: 2/3, \d+\.\d s elapsed, eta 0:00:\d\d", lines[3])
    assert re.fullmatch(r"seeds: 3/3, \d+\.\d s elapsed", lines[4])
    assert len(lines) == 5


def test_terminal_output_keeps_one_line_per_stage_and_loop_and_nests():
    console = _console(terminal=True)
    for _ in progress.track(range(2), "configs", console=console):
        with progress.stage("training", console=console):
            pass
    text = console.export_text()  # the live display's frames (cursor moves stripped), then the lines
    assert "configs  ━" in text and "1/2" in text and "eta 0:00:00" in text  # the bar, with its ETA
    assert len(re.findall(r"training: \d+\.\d s", text)) == 2
    assert re.search(r"configs: 2 done in \d+\.\d s", text)
    assert progress._live is None  # the display is closed with the outermost call


def test_a_failing_stage_says_so_and_raises():
    console = _console(terminal=False)
    try:
        with progress.stage("measuring", console=console):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    else:
        raise AssertionError("the stage swallowed the error")
    assert re.search(r"^measuring: failed after \d+\.\d s$", console.export_text(), flags=re.M)


def test_verbose_false_prints_nothing(capsys):
    with progress.stage("quiet", verbose=False):
        pass
    assert list(progress.track(range(3), "quiet", verbose=False)) == [0, 1, 2]
    assert capsys.readouterr().out == ""
