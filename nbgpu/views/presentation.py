"""What every view shares: the SIMULATED badge, the palette, sizes as text, HTML tables, and how a Plotly figure is
shown (as Plotly's own output type, which JupyterLab, Notebook 7, VS Code and nbgpu's static tour draw with the
plotly.js they carry: no figure ever loads plotly.js from a CDN)."""

from __future__ import annotations

import functools
from html import escape

from ..units import GiB

SIMULATED = "SIMULATED"
BADGE = ("<span class='nbgpu-simulated' style='background:#f59e0b;color:white;padding:1px 6px;border-radius:3px'>"
         "SIMULATED</span> ")
WARN = "#b45309"
OVER = "#D62728"
PALETTE = ["#4C78A8", "#F58518", "#72B7B2", "#B279A2", "#9D755D", "#54A24B", "#EECA3B", "#FF9DA6"]
PLOTLY_MIME = "application/vnd.plotly.v1+json"


def badge(simulated: bool, what: str = "") -> str:
    """The SIMULATED badge (and what it means here) for simulated data; empty for real GPUs."""
    if not simulated:
        return ""
    return BADGE + (f"<span style='color:{WARN}'>{escape(what)}</span> " if what else "")


def title_suffix(simulated: bool, what: str = "ran on the CPU") -> str:
    """For a figure's title: ' — SIMULATED (ran on the CPU)'."""
    return f" — {SIMULATED} ({what})" if simulated else ""


def gib(nbytes) -> float | None:
    return None if nbytes is None else nbytes / GiB


def used_of_total(used, total) -> str:
    """'3.1 / 80 GiB'; 'n/a' where the total is not known."""
    if total is None:
        return "n/a"
    return f"{(used or 0) / GiB:.1f} / {total / GiB:.0f} GiB"


def table(head: list[str], rows: list[list[str]], styles: list[str] | None = None) -> str:
    """An HTML table of escaped text; `styles` (one per row) for the rows' <tr> style."""
    th = "".join(f"<th style='text-align:left'>{escape(h)}</th>" for h in head)
    body = []
    for i, row in enumerate(rows):
        style = f" style='{styles[i]}'" if styles and styles[i] else ""
        tds = "".join(f"<td style='text-align:left'>{escape(str(c))}</td>" for c in row)
        body.append(f"<tr{style}>{tds}</tr>")
    return f"<table style='font-size:12px'><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def pairs(items) -> str:
    """A two-column table of (name, value) text."""
    return "<table>" + "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(v)}</td></tr>"
                               for k, v in items) + "</table>"


def figure_bundle(fig) -> dict:
    """A Plotly figure as a display bundle: Plotly's own output type, and its title as plain text."""
    import json

    data = json.loads(fig.to_json())
    data["config"] = {"displaylogo": False}
    return {PLOTLY_MIME: data, "text/plain": f"<figure: {fig.layout.title.text or 'plot'}>"}


def figure_widget(fig):
    """`plotly.graph_objects.FigureWidget(fig)` whose comm opens with the figure already in its state.

    plotly sets the traces it syncs (`_widget_data`) after ipywidgets has opened the comm, so they reach the front
    end in a second message. anywidget applies that message only once the widget's module (5 MB) has loaded, and
    drops it when loading takes more than 2 s; plotly's view never redraws on it. A view created while the module
    loads (a slow machine, a busy browser) then draws an empty plot. Opening the comm last removes the race."""
    return _figure_widget_class()(fig)


@functools.cache
def _figure_widget_class():
    import plotly.graph_objects as go

    class FigureWidget(go.FigureWidget):
        """A FigureWidget that opens its comm at the end of its construction, not in the middle of it."""

        _constructing = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._constructing = False
            self.open()

        def open(self):
            if not self._constructing:
                super().open()

    return FigureWidget


def show(html: str | None = None, figures=()) -> None:
    """Display HTML, then each Plotly figure as Plotly's own output type."""
    from IPython.display import HTML, display

    if html:
        display(HTML(html))
    for fig in figures:
        if fig is not None:
            display(figure_bundle(fig), raw=True)
