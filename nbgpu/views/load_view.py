"""The picture of `nbgpu.load`: per GPU, the plan's figures beside the measured memory (table and grouped bars)."""

from __future__ import annotations

from html import escape

from ..units import GiB, format_size

SIM_BADGE = "<b style='color:#b45309'>SIMULATED GPUs — ran on CPU</b>"


def figure_html(fig) -> str:
    return fig.to_html(full_html=False, include_plotlyjs="cdn", config={"displaylogo": False})


def _s(x) -> str:
    return format_size(x, "auto")


def _gb(x):
    return None if x is None else x / GiB


def load_figure(report):
    import plotly.graph_objects as go

    names = [f"cuda:{g.cuda_index}" + (" (simulated)" if report.simulated else "") for g in report.gpus]
    series = [
        ("planned weights", [g.planned_weights for g in report.gpus], "#93c5fd"),
        ("loaded tensors", [g.weights for g in report.gpus], "#2563eb"),
        ("allocated (torch)", [g.allocated for g in report.gpus], "#1e3a8a"),
        ("reserved (torch)", [g.reserved for g in report.gpus], "#6366f1"),
        ("NVML: this process", [g.nvml_process for g in report.gpus], "#f59e0b"),
        ("planned total (batch, seq_len)", [g.planned_total for g in report.gpus], "#d1d5db"),
    ]
    fig = go.Figure()
    for label, values, color in series:
        if all(v is None for v in values):
            continue
        fig.add_bar(name=label, x=names, y=[_gb(v) for v in values], marker_color=color,
                    hovertemplate="%{x}: %{y:.2f} GiB<extra>" + label + "</extra>")
    title = "Memory per GPU after load: plan vs measured"
    if report.simulated:
        title += " — SIMULATED GPUs (ran on CPU; tensors' bytes, not GPU memory)"
    fig.update_layout(barmode="group", title=title, yaxis_title="GiB", height=360, margin=dict(t=60, b=40))
    return fig


def load_html(report) -> str:
    head = ["GPU", "planned weights", "loaded tensors", "allocated (torch)", "vs plan", "reserved (torch)",
            "peak reserved", "NVML this process", "NVML GPU used", "planned total"]
    rows = []
    for g in report.gpus:
        diff = "n/a" if g.difference is None else f"{g.difference:+.1%}"
        warn = g.difference is not None and abs(g.difference) > 0.05
        cells = [f"cuda:{g.cuda_index} = GPU {g.gpu_index} {g.gpu_name or ''}", _s(g.planned_weights),
                 _s(g.weights), _s(g.allocated) if g.allocated is not None else "n/a (CPU)",
                 diff, _s(g.reserved), _s(g.peak_reserved), _s(g.nvml_process), _s(g.nvml_used),
                 _s(g.planned_total)]
        tds = "".join(f"<td style='{'color:#b91c1c;font-weight:bold' if warn and i == 4 else ''}'>{escape(c)}</td>"
                      for i, c in enumerate(cells))
        rows.append(f"<tr>{tds}</tr>")
    table = (f"<table><tr>{''.join(f'<th>{escape(h)}</th>' for h in head)}</tr>{''.join(rows)}</table>")
    title = f"<b>nbgpu.load</b> <code>{escape(report.source)}</code> — {report.dtype}, {report.seconds:.1f} s"
    sim = f"<div>{SIM_BADGE}: memory recorded on the simulated GPUs as planned; figures are tensors' bytes</div>" \
        if report.simulated else ""
    offload = ""
    if report.cpu_weights or report.disk_weights:
        where = "on the CPU (no GPU)" if not report.gpus else "offloaded to"
        offload = f"<div>{where}: {_s(report.cpu_weights)} CPU, {_s(report.disk_weights)} disk</div>"
    warns = "".join(f"<div style='color:#b91c1c'>warning: {escape(w)}</div>" for w in report.warnings)
    return f"<div>{title}{sim}{table}{offload}{warns}{figure_html(load_figure(report))}</div>"
