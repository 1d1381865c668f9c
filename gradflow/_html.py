"""Rich display in Jupyter (`_repr_html_`): a compact table and an inline figure, no extra package.

Hand-written because it is two small functions: an HTML table of already formatted cells and a
matplotlib figure as an inline PNG (base64), which is what IPython's own display does.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], caption: str = "") -> str:
    """An HTML table; cells are shown as `str(cell)`, escaped."""
    esc = lambda v: html.escape(str(v))  # noqa: E731
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(fig, dpi: int = 80) -> str:
    """A matplotlib figure as an inline PNG `<img>` (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"/>'
