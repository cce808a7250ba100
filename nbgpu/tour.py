"""Run a notebook headless and write it as one self-contained HTML page, figures included.

Widgets cannot render in a static page, so every Plotly FigureWidget is read back from the kernel after the run
(its final figure, as drawn) and written as a plain Plotly figure; other widgets are drawn from the widget state
nbclient records (HTML, labels, slider values, containers). plotly.js is embedded once, so the page works offline.
"""

from __future__ import annotations

import html
import json
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
QUICKSTART = NOTEBOOKS / "00_quickstart.ipynb"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
PLOTLY_JSON = "application/vnd.plotly.v1+json"
_CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc=\"https://cdn\.plot\.ly/[^\"]*\"[^>]*>\s*</script>", re.I)

# run in the kernel after the notebook: the final figure of every live FigureWidget, by widget model id
_READ_FIGURES = """
def _nbgpu_read_figures():
    import json
    import plotly.graph_objects as go
    from ipywidgets.widgets import widget
    print(json.dumps({mid: go.Figure(w).to_json() for mid, w in list(widget._instances.items())
                      if isinstance(w, go.FigureWidget)}))
_nbgpu_read_figures()
del _nbgpu_read_figures
"""


@contextmanager
def _environment(extra: dict[str, str]):
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _kernel_manager():
    """A python3 kernel of this very interpreter (a user-level 'python3' kernelspec may point elsewhere)."""
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.kernel_spec.argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    return km


@contextmanager
def _shut_down(km):
    """nbclient leaves a kernel it was given running (owns_km is False): stop it, and its processes, at the end."""
    try:
        yield
    finally:
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def execute(path=QUICKSTART, *, timeout: int = 600, simulate: str | None = None, read_figures: bool = False,
            then: tuple[str, ...] | list[str] = ()):
    """Execute a notebook top to bottom in a fresh python3 kernel of this environment, in the notebook's folder.

    `simulate` sets NBGPU_SIMULATE for the kernel (the course notebooks then use simulated GPUs even where real
    ones exist). `then`: code run afterwards in the same kernel, each as a cell appended to the returned notebook
    (an error there is recorded in its outputs, not raised). Returns the executed notebook; with `read_figures`,
    also {widget model id: figure JSON}. Raises nbclient's CellExecutionError at the first notebook cell that fails.
    """
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    km = _kernel_manager()
    client = NotebookClient(nb, timeout=timeout, km=km, store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    figures: dict[str, str] = {}
    with _environment({"NBGPU_SIMULATE": simulate} if simulate else {}), _shut_down(km):
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                client.execute_cell(cell, index)
            for source in then:
                extra = nbformat.v4.new_code_cell(source, metadata={"tags": ["raises-exception"]})
                nb.cells.append(extra)
                client.execute_cell(extra, len(nb.cells) - 1)
            client.set_widgets_metadata()
            if read_figures:
                probe = nbformat.v4.new_code_cell(_READ_FIGURES)
                nb.cells.append(probe)
                try:
                    client.execute_cell(probe, len(nb.cells) - 1, store_history=False)
                finally:
                    nb.cells.pop()
                text = "".join(o.get("text", "") for o in probe.outputs if o.get("name") == "stdout")
                figures = json.loads(text or "{}")
    return (nb, figures) if read_figures else nb


def error_outputs(nb) -> list[str]:
    """Every error a run left in the outputs: exceptions, and tracebacks printed to stderr."""
    found = []
    for index, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                found.append(f"cell {index}: {out.get('ename')}: {out.get('evalue')}")
            elif out.get("output_type") == "stream" and out.get("name") == "stderr" \
                    and "Traceback" in out.get("text", ""):
                found.append(f"cell {index}: traceback on stderr: {out['text'][-500:]}")
    return found


# --- static HTML ---------------------------------------------------------------------------------------------

def _figure_html(figure_json: str) -> str:
    import plotly.io as pio

    return pio.from_json(figure_json).to_html(include_plotlyjs=False, full_html=False,
                                              config={"displaylogo": False})


def _widget_html(model_id: str, state: dict, figures: dict, depth: int = 0) -> str:
    """A widget as static HTML: figures from the kernel, the rest from the recorded widget state."""
    if model_id in figures:
        return _figure_html(figures[model_id])
    model = state.get(model_id)
    if model is None or depth > 20:
        return "<div><i>(widget not available in a static page)</i></div>"
    s = model.get("state", {})
    name = model.get("model_name", "")
    if "_widget_data" in s and "_widget_layout" in s:  # a FigureWidget no longer alive in the kernel
        return _figure_html(json.dumps({"data": s["_widget_data"], "layout": s["_widget_layout"]}))
    if "children" in s:
        inner = "".join(_widget_html(c.removeprefix("IPY_MODEL_"), state, figures, depth + 1) for c in s["children"])
        style = "display:flex;gap:8px;flex-wrap:wrap" if name == "HBoxModel" else ""
        return f"<div style='{style}'>{inner}</div>"
    if name == "OutputModel":
        return "".join(_output_html(o, state, figures) for o in s.get("outputs", []))
    if name in ("HTMLModel", "HTMLMathModel"):
        return f"<div>{s.get('value', '')}</div>"
    description = html.escape(str(s.get("description", "")))
    if "value" in s and not isinstance(s["value"], (dict, list)):
        return f"<div><code>{description} {html.escape(str(s['value']))}</code></div>"
    return ""


def _output_html(out: dict, state: dict, figures: dict) -> str:
    kind = out.get("output_type")
    if kind == "stream":
        cls = "stderr" if out.get("name") == "stderr" else "stdout"
        return f"<pre class='{cls}'>{html.escape(out.get('text', ''))}</pre>"
    if kind == "error":
        return f"<pre class='error'>{html.escape(out.get('ename', ''))}: {html.escape(out.get('evalue', ''))}</pre>"
    data = out.get("data", {})
    if WIDGET_VIEW in data:
        return _widget_html(data[WIDGET_VIEW]["model_id"], state, figures)
    if PLOTLY_JSON in data:
        return _figure_html(json.dumps(data[PLOTLY_JSON]))
    if "text/html" in data:
        return f"<div class='html'>{_CDN_SCRIPT.sub('', _text(data['text/html']))}</div>"
    for mime in ("image/png", "image/jpeg"):
        if mime in data:
            return f"<img src='data:{mime};base64,{_text(data[mime]).strip()}'>"
    if "image/svg+xml" in data:
        return _text(data["image/svg+xml"])
    if "text/plain" in data:
        return f"<pre>{html.escape(_text(data['text/plain']))}</pre>"
    return ""


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
.cell { margin: 1.2em 0; } pre { background: #f6f8fa; padding: .6em; overflow-x: auto; font-size: 13px; }
pre.input { border-left: 3px solid #4C78A8; } pre.stderr { background: #fff4e5; } pre.error { background: #fde2e2; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #ddd; padding: 2px 6px; }
.note { color: #b45309; }
"""


def to_html(nb, figures: dict | None = None, title: str = "nbgpu tour") -> str:
    """The executed notebook as one HTML page: markdown, code, and every output with its figures."""
    import mistune
    import plotly.offline

    figures = figures or {}
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    parts = []
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            parts.append(f"<div class='cell md'>{mistune.html(cell.source)}</div>")
        elif cell.cell_type == "code":
            outs = "".join(_output_html(o, state, figures) for o in cell.get("outputs", []))
            parts.append(f"<div class='cell'><pre class='input'>{html.escape(cell.source)}</pre>{outs}</div>")
    plotly_js = plotly.offline.get_plotlyjs()
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style><script type='text/javascript'>{plotly_js}</script></head>"
            f"<body>{''.join(parts)}</body></html>")


def tour(out, notebook=QUICKSTART, *, simulate: str | None = None, timeout: int = 600) -> list[str]:
    """Run the quick start (or another notebook) headless and write it as HTML to `out`. Returns the errors found
    in its outputs (empty when it ran cleanly)."""
    from nbclient.exceptions import CellExecutionError

    from .files import write_text

    try:
        nb, figures = execute(notebook, timeout=timeout, simulate=simulate, read_figures=True)
    except CellExecutionError as err:
        write_text(out, f"<pre>{html.escape(str(err))}</pre>")
        return [str(err)]
    write_text(out, to_html(nb, figures, title=f"nbgpu: {Path(notebook).stem}"))  # whole page, then one rename
    return error_outputs(nb)

