"""The live widget of `nbgpu.monitor()`: memory bars per GPU, metrics over time, the process list.

It only draws the monitor's samples (called from the poller thread, redrawn inside `batch_update`); closing the
widget stops the monitor. Simulated GPUs are labelled as such in the header, the titles and the bar labels.
"""

from __future__ import annotations

import threading
import time
from html import escape

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ..monitoring import Monitor, Sample
from ..units import GiB
from . import presentation

MIN_REDRAW = 0.2  # seconds between redraws, whatever the polling interval (each redraw sends the whole history)
_METRIC = {  # metric -> (title, unit, value of a GPUSample)
    "memory": ("memory used", "GiB", lambda g: None if g.memory_used is None else g.memory_used / GiB),
    "utilization": ("utilisation", "%", lambda g: g.utilization),
    "temperature": ("temperature", "°C", lambda g: g.temperature),
    "power": ("power draw", "W", lambda g: g.power_draw),
}
_PARTS = (("this kernel", "memory_this_kernel", "#2563eb"), ("other processes + driver", "memory_other", "#f59e0b"),
          ("free", "memory_free", "#d1d5db"))


def _bar_label(g) -> str:
    return g.label + (" (simulated)" if g.simulated else "") + (" · memory n/a" if g.memory_total is None else "")


class MonitorView:
    """ipywidgets + Plotly FigureWidgets drawing one Monitor."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self._lock = threading.Lock()
        self._gpus: tuple[int, ...] | None = None
        self._last_draw = 0.0
        self.header = W.HTML()
        self.stop_button = W.Button(description="Stop", tooltip="stop polling (the history is kept)",
                                    layout=W.Layout(width="80px"))
        self.stop_button.on_click(lambda _: self.monitor.stop())
        self.bars = go.Figure()
        self.series = go.Figure()
        self.processes = W.HTML()
        # the first sample is drawn before the figures become widgets, so it travels in the state they open with
        if (sample := monitor.latest) is not None:
            self.draw(sample, force=True)
        self.bars, self.series = presentation.figure_widget(self.bars), presentation.figure_widget(self.series)
        self.widget = W.VBox([W.HBox([self.header, self.stop_button]), self.bars, self.series, self.processes])
        self.widget.observe(self._on_comm, names="comm")
        self._watch_frontend_close()
        monitor.subscribe(self)
        self._draw_header()

    # --- the monitor's calls ---------------------------------------------------------------------------

    def draw(self, sample: Sample, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < MIN_REDRAW:
            return
        with self._lock:
            self._last_draw = now
            samples = self.monitor.samples
            gpus = tuple(g.gpu for g in sample.gpus)
            if gpus != self._gpus:
                self._layout(sample)
            self._draw_bars(sample)
            self._draw_series(samples)
            self.processes.value = _process_table(sample)
            self._draw_header()

    def failed(self, error) -> None:
        """A poll failed: the status line says so (the error is kept in the monitor's `errors`)."""
        with self._lock:
            self._draw_header()

    def stopped(self, reason: str) -> None:
        self.stop_button.disabled = True
        self._draw_header()

    def close(self) -> None:
        self.monitor.unsubscribe(self)
        for w in (self.header, self.stop_button, self.bars, self.series, self.processes, self.widget):
            w.close()

    # --- closing the widget stops the monitor ----------------------------------------------------------

    def _on_comm(self, change) -> None:
        if change["new"] is None:  # Widget.close() from Python
            self.monitor.stop(reason="widget closed")

    def _watch_frontend_close(self) -> None:
        comm = getattr(self.widget, "comm", None)
        if comm is not None and hasattr(comm, "on_close"):  # the front end closed the widget's comm
            comm.on_close(lambda _msg: self.monitor.stop(reason="widget closed"))

    # --- drawing --------------------------------------------------------------------------------------

    def _title(self, sample: Sample) -> str:
        return "SIMULATED GPUs (not real hardware)" if sample.simulated else "GPUs"

    def _layout(self, sample: Sample) -> None:
        self._gpus = tuple(g.gpu for g in sample.gpus)
        n = max(len(sample.gpus), 1)
        bars = go.Figure(layout=dict(
            barmode="stack", height=70 + 32 * n, margin=dict(l=10, r=10, t=30, b=30),
            title=dict(text=f"Memory per GPU, GiB · {self._title(sample)}", font=dict(size=13)),
            yaxis=dict(autorange="reversed"), legend=dict(orientation="h", y=-0.25), template="plotly_white"))
        for name, _, color in _PARTS:
            bars.add_bar(name=name, orientation="h", marker_color=color, x=[], y=[],
                         hovertemplate="%{y}: %{x:.2f} GiB " + name + "<extra></extra>")
        metrics = self.monitor.show or ("utilization",)
        series = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                               subplot_titles=[f"{_METRIC[m][0]} ({_METRIC[m][1]})" for m in metrics])
        # the legend goes under the plots, so it never covers the first subplot's title
        series.update_layout(height=110 + 160 * len(metrics), margin=dict(l=10, r=10, t=40, b=20),
                             template="plotly_white", legend=dict(orientation="h", y=-0.12, yanchor="top"),
                             title=dict(text=f"Over time · {self._title(sample)}", font=dict(size=13)))
        palette = qualitative.Plotly
        for row, metric in enumerate(metrics, start=1):
            for k, g in enumerate(sample.gpus):
                series.add_scatter(x=[], y=[], mode="lines", name=_bar_label(g), legendgroup=str(g.gpu),
                                   showlegend=row == 1, line=dict(color=palette[k % len(palette)]),
                                   row=row, col=1)
            if metric == "utilization":
                series.update_yaxes(range=[0, 105], row=row, col=1)
        for fig, new in ((self.bars, bars), (self.series, series)):
            with fig.batch_update():
                fig.data = ()
                fig.layout = new.layout
            fig.add_traces(new.data)

    def _draw_bars(self, sample: Sample) -> None:
        labels = [_bar_label(g) for g in sample.gpus]
        with self.bars.batch_update():
            for trace, (_, attr, _) in zip(self.bars.data, _PARTS):
                trace.y = labels
                trace.x = [(getattr(g, attr) or 0) / GiB for g in sample.gpus]
            self.bars.data[-1].text = [_memory_text(g) for g in sample.gpus]
            self.bars.data[-1].textposition = "inside"

    def _draw_series(self, samples: list[Sample]) -> None:
        # numpy arrays: plotly checks and sends them whole (lists are walked item by item, ~10x slower)
        times = np.array([s.datetime for s in samples], dtype="datetime64[ms]")
        column = {gpu: k for k, gpu in enumerate(self._gpus)}
        metrics = self.monitor.show or ("utilization",)
        values = np.full((len(metrics), len(self._gpus), len(samples)), np.nan)
        for t, s in enumerate(samples):
            for g in s.gpus:
                if (k := column.get(g.gpu)) is not None:
                    for row, metric in enumerate(metrics):
                        v = _METRIC[metric][2](g)
                        if v is not None:
                            values[row, k, t] = v
        with self.series.batch_update():
            for trace, ys in zip(self.series.data, values.reshape(-1, len(samples))):
                trace.x, trace.y = times, ys

    def _draw_header(self) -> None:
        m = self.monitor
        sample = m.latest
        badge = presentation.badge(sample is not None and sample.simulated)
        state = "running" if m.running else (m.stopped_because or "stopped")
        when = f" · last {sample.datetime:%H:%M:%S}" if sample is not None else ""
        errors = ""
        if m.errors:
            last = m.errors[-1]
            errors = (f"<div style='color:#b91c1c'>{len(m.errors)} error(s) kept in <code>.errors</code>; last: "
                      f"{escape(last.message)}</div>")
        na = ""
        if sample is not None:
            notes = [f"{g.label}: {k} n/a ({v})" for g in sample.gpus for k, v in g.errors.items()]
            if notes:
                na = f"<div style='color:#92400e;font-size:11px'>{escape('; '.join(notes[:6]))}</div>"
        self.header.value = (f"<div>{badge}<b>nbgpu monitor</b> · {escape(state)} · every {m.interval:g} s · "
                             f"{len(m.samples)} samples{when}{errors}{na}</div>")


def _memory_text(g) -> str:
    return presentation.used_of_total(g.memory_used, g.memory_total)


def _process_table(sample: Sample) -> str:
    rows = []
    for g in sample.gpus:
        if g.processes is None:
            rows.append(f"<tr><td>{escape(g.label)}</td><td colspan=4>process list n/a</td></tr>")
            continue
        for p in g.processes:
            own = p.pid in g.own_pids
            style = " style='background:#dbeafe;font-weight:600'" if own else ""
            mem = "n/a" if p.used_memory is None else f"{p.used_memory / 1024**2:,.0f} MiB"
            owner = sample.owners.get(p.pid)
            who = (owner.label if owner is not None else None) or ""
            rows.append(f"<tr{style}><td>{escape(g.label)}</td><td>{p.pid}{' (this kernel)' if own else ''}</td>"
                        f"<td>{escape(p.name or 'n/a')}</td><td title='{escape(who)}'>{escape(_short(who))}</td>"
                        f"<td>{mem}</td></tr>")
    if not rows:
        return "<div style='font-size:12px;color:#777'>No process is using the GPUs.</div>"
    return ("<table style='font-size:12px'><thead><tr><th>GPU</th><th>pid</th><th>process</th>"
            "<th>notebook / command</th><th>memory</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def view_of(monitor) -> MonitorView:
    """The monitor's widget view (one per monitor: built on first display, reused after)."""
    found = next((v for v in monitor.subscribers if isinstance(v, MonitorView)), None)
    return found if found is not None else MonitorView(monitor)


def widget_of(monitor):
    return view_of(monitor).widget


def monitor_html(monitor) -> str:
    """The status and the latest sample as text lines (a terminal, or where widgets cannot show)."""
    from ..monitoring import sample_lines

    sample = monitor.latest
    body = "" if sample is None else "<br>".join(escape(line) for line in sample_lines(sample, monitor.show))
    style = "font-family:monospace;font-size:12px"
    return f"<div><b>{escape(monitor.status())}</b><div style='{style}'>{body}</div></div>"


def display_monitor(monitor) -> None:
    """In a kernel: the live widget; if it cannot be built (no plotly/ipywidgets), the HTML, and why in .errors."""
    from IPython.display import display

    try:
        widget = widget_of(monitor)
    except Exception as err:  # the text still shows; the reason is kept, never printed into a cell
        monitor.record_error("view", err)
        display({"text/plain": repr(monitor), "text/html": monitor_html(monitor)}, raw=True)
        return
    display(widget)
