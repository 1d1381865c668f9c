"""examples/quickstart.py (a jupytext notebook) runs at test size, its claims hold, and the
results it displays (`_repr_html_`) show the results' own numbers."""

import pathlib
import re
import runpy

import pytest

NOTEBOOK = pathlib.Path(__file__).parent.parent / "examples" / "quickstart.py"


def _cells(html: str) -> list[list[str]]:
    """The body rows of the first HTML table, as text cells."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    return [re.findall(r"<td>(.*?)</td>", row) for row in body.split("</tr>") if "<td>" in row]


def _columns(html: str) -> list[str]:
    return re.findall(r"<th>(.*?)</th>", html.split("</thead>", 1)[0])


@pytest.fixture(scope="module")
def notebook():
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADFLOW_QUICK", "1")
    try:
        yield runpy.run_path(str(NOTEBOOK))
    finally:
        mp.undo()


def test_the_quickstart_claims_hold_at_test_size(notebook):
    at_init = notebook["spectra_at_init"]
    # ordered < critical < chaotic: the last layer's largest singular value grows with sigma_w
    assert at_init[0.8].log_max[-1] < at_init[1.0].log_max[-1] < at_init[1.5].log_max[-1]
    assert at_init[0.8].log_max[-1] < 0 < at_init[1.5].log_max[-1]
    best = notebook["swept"].rows()[0]
    assert best["best"] and best["test_accuracy"] > 0.3  # a trained digits net (chance 0.1)


def test_displayed_tables_are_the_results_numbers(notebook):
    res = notebook["spectra_at_init"][1.0]
    html = res._repr_html_()
    rows = _cells(html)
    assert len(rows) == len(res.depths) and '<img src="data:image/png;base64,' in html
    last = rows[-1]
    assert int(last[0]) == res.depths[-1] and last[1] == res.layers[-1]
    assert float(last[3]) == pytest.approx(res.log_max[-1], abs=1e-3) and float(last[4]) == pytest.approx(
        res.log_min[-1], abs=1e-3
    )
    assert "natural log" in html and "forward" in html

    run = notebook["runs"][1.0]
    html = run._repr_html_()
    rows = _cells(html)
    assert [int(r[0]) for r in rows] == [r["epoch"] for r in run.history]
    assert [float(r[1]) for r in rows] == pytest.approx([r["loss"] for r in run.history], rel=1e-3)
    assert f"test accuracy {run.test['accuracy']:.4g}" in html and "finished" in html

    swept = notebook["swept"]
    html = swept._repr_html_()
    rows = _cells(html)
    ranked = swept.rows()
    assert [int(r[1]) for r in rows] == [r["run"] for r in ranked] and rows[0][0] == "*"
    cols = _columns(html)
    for r, want in zip(rows, ranked):
        i = want["run"]
        for name in ("test_accuracy", "loss"):
            got = float(r[cols.index(name)])
            assert got == pytest.approx(float(swept.epochs[name][i, -1]), rel=5e-3), name  # shown to 3 digits
        g = swept.epochs["grad_norm"][i, 0]
        assert float(r[cols.index("grad_first_over_last")]) == pytest.approx(g[0] / g[-1], rel=5e-3)
    acc = [float(r[cols.index("test_accuracy")]) for r in rows]
    assert len(rows) == len(swept.hparams.seed) == 6 and acc == sorted(acc, reverse=True)
