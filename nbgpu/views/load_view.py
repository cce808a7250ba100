"""The picture of `nbgpu.load`: per GPU, the plan's figures beside the measured memory (table and grouped bars)."""

from __future__ import annotations

from html import escape

from ..units import format_size
from . import presentation


def _s(x) -> str:
    return format_size(x, "auto")


def load_figure(report):
    import plotly.graph_objects as go

    names = [f"cuda:{g.cuda_index}" + (" (simulated)" if report.simulated else "") for g in report.gpus]
    series = [
        ("planned weights", [g.planned_weights for g in report.gpus], "#93c5fd"),
        ("loaded tensors", [g.weights for g in report.gpus], "#2563eb"),
        ("allocated (torch)", [g.allocated for g in report.gpus], "#1e3a8a"),
        ("reserved (torch)", [g.reserved for g in report.gpus], "#6366f1"),
        ("NVML: this process", [g.nvml_process for g in report.gpus], "#f59e0b"),
        ("planned total (the plan's run)", [g.planned_total for g in report.gpus], "#d1d5db"),
    ]
    fig = go.Figure()
    for label, values, color in series:
        if all(v is None for v in values):
            continue
        fig.add_bar(name=label, x=names, y=[presentation.gib(v) for v in values], marker_color=color,
                    hovertemplate="%{x}: %{y:.2f} GiB<extra>" + label + "</extra>")
    title = "Memory per GPU after load: plan vs measured" + presentation.title_suffix(
        report.simulated, "ran on the CPU; tensors' bytes, not GPU memory")
    fig.update_layout(barmode="group", title=title, yaxis_title="GiB", height=360, margin=dict(t=60, b=40))
    return fig


def load_html(report) -> str:
    head = ["GPU", "planned weights", "loaded tensors", "allocated (torch)", "vs plan", "reserved (torch)",
            "peak reserved", "NVML this process", "NVML GPU used", "planned total"]
    rows = []
    for g in report.gpus:
        diff = "n/a" if g.difference is None else f"{g.difference:+.1%}"
        cells = [f"cuda:{g.cuda_index} = GPU {g.gpu_index} {g.gpu_name or ''}", _s(g.planned_weights),
                 _s(g.weights), _s(g.allocated) if g.allocated is not None else "n/a (CPU)",
                 diff, _s(g.reserved), _s(g.peak_reserved), _s(g.nvml_process), _s(g.nvml_used),
                 _s(g.planned_total)]
        tds = "".join(f"<td style='{'color:#b91c1c;font-weight:bold' if g.off_plan and i == 4 else ''}'>"
                      f"{escape(c)}</td>" for i, c in enumerate(cells))
        rows.append(f"<tr class='nbgpu-load-row'>{tds}</tr>")
    table = f"<table><tr>{''.join(f'<th>{escape(h)}</th>' for h in head)}</tr>{''.join(rows)}</table>"
    title = f"<b>nbgpu.load</b> <code>{escape(report.source)}</code> — {report.dtype}, {report.seconds:.1f} s"
    sim = presentation.badge(report.simulated, "ran on the CPU: memory recorded on the simulated GPUs as planned; "
                                               "figures are tensors' bytes")
    offload = ""
    if report.cpu_weights or report.disk_weights:
        where = "on the CPU (no GPU)" if not report.gpus else "offloaded to"
        offload = f"<div>{where}: {_s(report.cpu_weights)} CPU, {_s(report.disk_weights)} disk</div>"
    warns = "".join(f"<div style='color:#b91c1c'>warning: {escape(w)}</div>" for w in report.warnings)
    return f"<div>{title}<div>{sim}</div>{table}{offload}{warns}</div>"


def show_load(report) -> None:
    presentation.show(load_html(report), [load_figure(report)] if report.gpus else [])
