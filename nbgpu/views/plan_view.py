"""Views of a Plan: the placement along the model's depth, stacked memory bars per GPU, and an editor with one
handle per GPU boundary. Static HTML where there are no widgets."""

from __future__ import annotations

from html import escape

from ..planning.positions import beyond
from ..units import GiB
from . import presentation
from .memory_bars import memory_bars

_OFFLOAD_COLORS = {"cpu": "#7F7F7F", "disk": "#3B3B3B"}


def _device_label(plan, dev) -> str:
    return f"cuda:{dev}" if isinstance(dev, int) else str(dev)


def _color(dev) -> str:
    if isinstance(dev, int):
        return presentation.PALETTE[dev % len(presentation.PALETTE)]
    return _OFFLOAD_COLORS.get(dev, "#000")


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
    if plan.parallel == "tensor":  # every GPU holds a 1/tp slice of every unit: one row per GPU
        n = plan.tp
        return [dict(name=f"cuda:{i}", x=[w / n for w in widths], base=[b / n for b in starts],
                     y=[f"cuda:{i}"] * len(units), marker_color=_color(i),
                     hovertext=[f"{u.name} ({u.cls})<br>a 1/{n} slice on cuda:{i}" for u in units])
                for i in range(n)]
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
        tensor = plan.parallel == "tensor"
        title = f"Tensor parallel: a slice of every layer on every GPU{sim}" if tensor else \
            f"Placement along the depth{sim}"
        fig.update_layout(barmode="overlay", height=140 + (30 * plan.tp if tensor else 30), title=title,
                          xaxis_title="GiB of weights on each GPU, input -> output", yaxis_visible=tensor,
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
    return memory_bars(labels, segments, capacity, fig=fig, over=[d.over for d in plan.devices],
                       title=f"Memory per GPU{sim}: weights exact, the rest estimated")


def status_html(plan) -> str:
    from ..units import format_size

    if plan.fits:
        text, color = "fits", "#2E7D32"
    else:
        text, color = f"does not fit: {format_size(plan.missing())} missing", presentation.OVER
    w = plan.workload
    how = f"tensor parallel over {plan.tp} GPUs" if plan.parallel == "tensor" else f"strategy {plan.strategy}" \
        if isinstance(plan.strategy, str) else "placed by hand"
    head = (f"{plan.source_label}: {plan.dtype}, batch {w.batch} x ({w.prompt_len} prompt + {w.new_tokens} new) "
            f"tokens, {how}")
    counts = ", ".join(f"cuda:{i}: {c}" for i, c in enumerate(plan.layer_counts()))
    pos = beyond(plan)
    warn = "" if pos is None else (f"<br><b style='color:{presentation.WARN}'>seq_len {plan.seq_len} exceeds the "
                                   f"model's positions, {escape(str(pos))}: engines refuse it (see the "
                                   "explanation)</b>")
    return (f"<div>{presentation.badge(plan.simulated)}<b>{escape(head)}</b><br>"
            f"layers per GPU: {counts} &middot; <b style='color:{color}'>{escape(text)}</b>{warn}</div>")


def memory_html(plan) -> str:
    """Each GPU's figures as a table (what the bars draw)."""
    from ..units import format_size

    head = ["GPU", "weights", "KV cache", "activations", "allocator", "context", "communication", "others",
            "driver", "total", "budget", "over"]
    rows = [[d.label, *(format_size(v) for v in (d.weights, d.kv_cache, d.activations, d.allocator, d.context,
                                                   d.communication, d.others, d.driver_reserved, d.total, d.budget,
                                                   d.over))] for d in plan.devices]
    return presentation.table(head, rows, [f"color:{presentation.OVER}" if d.over else "" for d in plan.devices])


def plan_html(plan) -> str:
    """Static HTML (what a renderer without a kernel shows): status, each GPU's memory, the explanation."""
    return f"{status_html(plan)}{memory_html(plan)}<pre>{escape(plan.explain())}</pre>"


class PlanEditor:
    """One handle per GPU boundary (the number of decoder layers before it); moving one re-plans the split and
    redraws the placement, the bars and the feasibility in place."""

    def __init__(self, plan):
        import ipywidgets as w

        self.plan = plan
        # drawn first, then made widgets: the figures travel in the state the widgets open with
        self.placement = presentation.figure_widget(placement_figure(plan))
        self.bars = presentation.figure_widget(bars_figure(plan))
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
    """In a kernel: the editor (a handle per GPU boundary) where widgets work and the plan is a layer split; else the
    status, the placement and the memory bars as figures, and the explanation."""
    from IPython.display import display

    if widgets_available() and plan.parallel == "layers" and len(plan.gpus) > 1:
        display(PlanEditor(plan).widget)
    else:
        presentation.show(status_html(plan), [placement_figure(plan), bars_figure(plan)])
        presentation.show(f"<pre>{escape(plan.explain())}</pre>")
