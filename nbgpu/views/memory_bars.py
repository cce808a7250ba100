"""Stacked memory bars per device against its capacity, red where a device is over. Reusable by any view:

    fig = memory_bars(["cuda:0", "cuda:1"], {"weights": [8e9, 7e9], "KV cache": [1e9, 1e9]}, [24e9, 24e9])
    memory_bars(labels, new_segments, capacity, fig=fig)   # update an existing (Figure)Widget in place
"""

from __future__ import annotations

from ..units import GiB
from .presentation import OVER, PALETTE

COLORS = {"weights": "#4C78A8", "KV cache": "#F58518", "activations": "#72B7B2", "allocator": "#EECA3B",
          "context": "#B279A2", "communication": "#E45756", "others": "#9D755D", "driver": "#BAB0AC",
          "reserve": "#D4D4D4", "free": "#F2F2F2"}


def memory_bars(labels: list[str], segments: dict[str, list[float]], capacity: list[float], *,
                title: str | None = None, fig=None, free: bool = True, over: list[float] | None = None):
    """Bars of stacked `segments` (name -> bytes per device) with a capacity tick per device. A 'free' segment
    fills up to capacity; a device whose segments exceed its capacity gets a red 'over' segment and a red label.
    With `fig` (a Figure or FigureWidget made by this function) the traces are updated in place."""
    import plotly.graph_objects as go

    totals = [sum(vals[i] for vals in segments.values()) for i in range(len(labels))]
    if over is None:  # callers with a rule of their own (a plan's DeviceBudget.over) pass it
        over = [max(0.0, t - c) for t, c in zip(totals, capacity)]
    shown = [f"<span style='color:{OVER}'>{lab} OVER</span>" if o else lab for lab, o in zip(labels, over)]
    series = dict(segments)
    if free:
        series["free"] = [max(0.0, c - t) for t, c in zip(totals, capacity)]
    series["over budget"] = over
    bars = []
    for k, (name, vals) in enumerate(series.items()):
        gib = [v / GiB for v in vals]
        color = OVER if name == "over budget" else COLORS.get(name, PALETTE[k % len(PALETTE)])
        bars.append(dict(name=name, x=shown, y=gib, marker_color=color,
                         hovertemplate=f"{name}: %{{y:.2f}} GiB<extra>%{{x}}</extra>"))
    cap = dict(name="budget", x=shown, y=[c / GiB for c in capacity],
               hovertemplate="budget: %{y:.2f} GiB<extra>%{x}</extra>")
    if fig is not None and len(fig.data) == len(bars) + 1:
        with fig.batch_update():
            for trace, new in zip(fig.data, bars + [cap]):
                trace.x, trace.y = new["x"], new["y"]
        return fig
    fig = fig if fig is not None else go.Figure()
    for b in bars:
        fig.add_trace(go.Bar(**b))
    fig.add_trace(go.Scatter(**cap, mode="markers", marker=dict(symbol="line-ew-open", size=40, color="black",
                                                                  line=dict(width=3))))
    fig.update_layout(barmode="stack", title=title, yaxis_title="GiB", height=320, margin=dict(l=50, r=20, t=40, b=40),
                      legend=dict(orientation="h", y=-0.2))
    return fig
