"""Views of a Plan: the placement along the model's depth, stacked memory bars per GPU, and an editor with one
handle per GPU boundary. Static HTML where there are no widgets."""

from __future__ import annotations

from html import escape

from ..planning.positions import beyond
from ..units import GiB
from .memory_bars import _PALETTE, memory_bars

_OFFLOAD_COLORS = {"cpu": "#7F7F7F", "disk": "#3B3B3B"}


def _device_label(plan, dev) -> str:
    return f"cuda:{dev}" if isinstance(dev, int) else str(dev)


def _color(dev) -> str:
    return _PALETTE[dev % len(_PALETTE)] if isinstance(dev, int) else _OFFLOAD_COLORS.get(dev, "#000")


def placement_traces(plan) -> list[dict]:
    """One horizontal bar trace per device: every unit along the depth, width = its size (min width for tiny)."""
    units = plan.units
    largest = max((u.size for u in units), default=1) or 1
    widths = [max(u.size, largest * 0.02) / GiB for u in units]
    starts, pos = [], 0.0
    for w in widths:
        starts.append(pos)
        pos += w
    by_dev: dict = {}
    for u, w, s in zip(units, widths, starts):
        dev = plan.assignment[u.name]
        t = by_dev.setdefault(dev, dict(x=[], base=[], text=[]))
        t["x"].append(w)
        t["base"].append(s)
        t["text"].append(f"{u.name} ({u.cls})<br>{u.size / GiB:.3f} GiB on {_device_label(plan, dev)}")
    order = sorted(by_dev, key=lambda d: (not isinstance(d, int), str(d) if not isinstance(d, int) else d))
    return [dict(name=_device_label(plan, d), x=by_dev[d]["x"], base=by_dev[d]["base"],
                 y=["model"] * len(by_dev[d]["x"]), hovertext=by_dev[d]["text"], marker_color=_color(d))
            for d in order]


def placement_figure(plan, fig=None):
    import plotly.graph_objects as go

    traces = placement_traces(plan)
    fig = fig if fig is not None else go.Figure()
    with fig.batch_update():
        fig.data = ()
        for t in traces:
            fig.add_trace(go.Bar(orientation="h", hoverinfo="text", marker_line_width=0.5,
                                 marker_line_color="white", **t))
        sim = " (simulated GPUs)" if plan.simulated else ""
        fig.update_layout(barmode="overlay", height=170, title=f"Placement along the depth{sim}",
                          xaxis_title="GiB of weights, input -> output", yaxis_visible=False,
                          margin=dict(l=20, r=20, t=40, b=40), legend=dict(orientation="h", y=-0.6))
    return fig


def bar_inputs(plan):
    labels = [f"{d.label}" for d in plan.devices]
    segments = {
        "weights": [d.weights for d in plan.devices],
        "KV cache": [d.kv_cache for d in plan.devices],
        "activations": [d.activations for d in plan.devices],
        "allocator": [d.allocator for d in plan.devices],
        "context": [d.context for d in plan.devices],
    }
    if any(d.communication for d in plan.devices):
        segments["communication"] = [d.communication for d in plan.devices]
    segments["others"] = [d.others for d in plan.devices]
    if any(d.driver_reserved for d in plan.devices):
        segments["driver"] = [d.driver_reserved for d in plan.devices]
    segments["reserve"] = [d.reserve for d in plan.devices]
    return labels, segments, [d.capacity for d in plan.devices]


def bars_figure(plan, fig=None):
    labels, segments, capacity = bar_inputs(plan)
    sim = " (simulated GPUs)" if plan.simulated else ""
    return memory_bars(labels, segments, capacity, fig=fig,
                       title=f"Memory per GPU{sim}: weights exact, the rest estimated")


def status_html(plan) -> str:
    from ..units import format_size

    if plan.fits:
        text, color = "fits", "#2E7D32"
    else:
        text, color = f"does not fit: {format_size(plan.missing())} missing", "#D62728"
    sim = "<b style='color:#b45309'>SIMULATED GPUs</b> &middot; " if plan.simulated else ""
    counts = ", ".join(f"cuda:{i}: {c}" for i, c in enumerate(plan.layer_counts()))
    pos = beyond(plan)
    warn = "" if pos is None else (f"<br><b style='color:#b45309'>seq_len {plan.seq_len} exceeds the model's "
                                   f"positions, {escape(str(pos))}: engines refuse it (see the explanation)</b>")
    return (f"<div>{sim}<b>{escape(plan.summary_lines()[0].removeprefix('[simulated GPUs] '))}</b><br>"
            f"layers per GPU: {counts} &middot; <b style='color:{color}'>{escape(text)}</b>{warn}</div>")


def plan_html(plan, include_plotlyjs="cdn") -> str:
    """Static HTML: status, placement, memory bars and the explanation (no widgets needed)."""
    place = placement_figure(plan).to_html(include_plotlyjs=include_plotlyjs, full_html=False)
    bars = bars_figure(plan).to_html(include_plotlyjs=False, full_html=False)
    return f"{status_html(plan)}{place}{bars}<pre>{escape(plan.explain())}</pre>"


class PlanEditor:
    """One handle per GPU boundary (the number of decoder layers before it); moving one re-plans the split and
    redraws the placement, the bars and the feasibility in place."""

    def __init__(self, plan):
        import ipywidgets as w
        import plotly.graph_objects as go

        self.plan = plan
        self.placement = placement_figure(plan, go.FigureWidget())
        self.bars = bars_figure(plan, go.FigureWidget())
        self.status = w.HTML(status_html(plan))
        self.message = w.HTML("")
        total = sum(plan.layer_counts())
        self.handles = []
        cum = 0
        for k, c in enumerate(plan.layer_counts()[:-1]):
            cum += c
            s = w.IntSlider(value=cum, min=0, max=total, description=f"cuda:{k}|{k + 1}",
                            continuous_update=False, layout=w.Layout(width="520px"))
            s.observe(self._on_change, names="value")
            self.handles.append(s)
        self.widget = w.VBox([self.status, *self.handles, self.message, self.placement, self.bars])

    def boundaries(self) -> list[int]:
        return [h.value for h in self.handles]

    def set_boundaries(self, cuts: list[int]) -> None:
        """Layers before each boundary (cumulative), as the handles show them."""
        total = sum(self.plan.layer_counts())
        cuts = [min(max(c, 0), total) for c in cuts]
        for i in range(1, len(cuts)):
            cuts[i] = max(cuts[i], cuts[i - 1])
        counts = [b - a for a, b in zip([0, *cuts], [*cuts, total])]
        from ..errors import UsageError

        try:
            self.plan.set_boundaries(counts)
            self.message.value = ""
        except UsageError as exc:
            self.message.value = f"<span style='color:#D62728'>{escape(str(exc))}</span>"
        self.redraw()

    def _on_change(self, _change) -> None:
        self.set_boundaries(self.boundaries())

    def redraw(self) -> None:
        placement_figure(self.plan, self.placement)
        bars_figure(self.plan, self.bars)
        self.status.value = status_html(self.plan)


def widgets_available() -> bool:
    try:
        import anywidget  # noqa: F401
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def display_plan(plan) -> None:
    from IPython.display import HTML, display

    if widgets_available():
        display(PlanEditor(plan).widget)
    else:
        display(HTML(plan_html(plan)))
