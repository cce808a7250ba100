"""Pictures of `nbgpu.bench` and `nbgpu.compare`: the figures, the roofline, and who was busy when."""

from __future__ import annotations

from html import escape

from .load_view import SIM_BADGE, figure_html

_COLORS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#84cc16", "#ec4899"]


def timeline_figure(timeline):
    import plotly.graph_objects as go

    fig = go.Figure()
    for iv in timeline.intervals:
        fig.add_bar(y=[f"cuda:{iv.cuda_index}"], x=[iv.end_ms - iv.start_ms], base=[iv.start_ms], orientation="h",
                    marker_color=_COLORS[iv.cuda_index % len(_COLORS)], showlegend=False,
                    hovertemplate=f"{escape(iv.modules)}<br>%{{base:.3f}} .. {iv.end_ms:.3f} ms<extra></extra>")
    busy = ", ".join(f"cuda:{k} {v:.0%}" for k, v in timeline.busy().items())
    title = f"One decode step ({timeline.step_ms:.2f} ms): busy {busy}"
    if timeline.simulated:
        title += " — SIMULATED (ran on CPU)"
    fig.update_layout(title=title, xaxis_title="ms", barmode="overlay", height=120 + 40 * len(timeline.busy()),
                      margin=dict(t=50, b=40), yaxis=dict(autorange="reversed"))
    return fig


def bench_figure(result):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=("per-token latency (ms)", "decode tokens/s"))
    fig.add_histogram(x=[x * 1e3 for x in result.step_latencies], nbinsx=40, row=1, col=1, name="latency",
                      marker_color="#2563eb", showlegend=False)
    names, values, colors = ["measured"], [result.decode_tokens_per_s], ["#2563eb"]
    if result.roofline is not None and result.roofline.tokens_per_s:
        names.append("bandwidth bound (estimate)")
        values.append(result.roofline.tokens_per_s)
        colors.append("#d1d5db")
    fig.add_trace(go.Bar(x=names, y=values, marker_color=colors, showlegend=False,
                         hovertemplate="%{x}: %{y:,.1f} tokens/s<extra></extra>"), row=1, col=2)
    title = result.label + (" — SIMULATED (ran on CPU)" if result.simulated else "")
    fig.update_layout(title=title, height=340, margin=dict(t=70, b=40))
    return fig


def _table(pairs) -> str:
    return "<table>" + "".join(f"<tr><th style='text-align:left'>{escape(k)}</th><td>{escape(v)}</td></tr>"
                               for k, v in pairs) + "</table>"


def _roofline_text(bound) -> str:
    rate = "n/a (bandwidth unknown)" if bound.tokens_per_s is None else f"{bound.tokens_per_s:,.0f} tokens/s"
    reached = "" if bound.fraction is None else f", reached {bound.fraction:.1%}"
    sim = " for the simulated GPUs (the run was on the CPU)" if bound.simulated else ""
    return f"{rate}{reached}{sim}; {bound.note}"


def bench_html(result) -> str:
    from ..units import format_size

    lo, hi = result.decode_spread
    pairs = [
        ("mode", f"{'compiled (static cache)' if result.compiled else 'eager'}, batch {result.batch}, prompt "
                 f"{result.prompt_len}, {result.new_tokens} new tokens"),
        ("runs", f"{result.repeats} measured after {result.warmup} warm-up (discarded)"),
        ("time to first token", f"{result.ttft_s * 1e3:.1f} ms"),
        ("prefill", f"{result.prefill_tokens_per_s:,.0f} tokens/s"),
        ("decode", f"{result.decode_tokens_per_s:,.1f} tokens/s (runs {lo:,.1f} .. {hi:,.1f})"),
        ("per-token latency", f"p50 {result.latency_p50_s * 1e3:.2f} ms, p90 {result.latency_p90_s * 1e3:.2f} ms"),
    ]
    if result.peak_memory:
        pairs.append(("peak memory (torch)",
                      ", ".join(f"cuda:{k} {format_size(v, 'auto')}" for k, v in result.peak_memory.items())))
    if result.roofline is not None:
        pairs.append(("roofline (estimate)", _roofline_text(result.roofline)))
    if result.timeline is not None:
        busy = ", ".join(f"cuda:{k} {v:.0%}" for k, v in result.timeline.busy().items())
        pairs.append(("busy in one decode step", busy))
    sim = f"<div>{SIM_BADGE}</div>" if result.simulated else ""
    parts = [f"<div><b>{escape(result.label)}</b>{sim}{_table(pairs)}", figure_html(bench_figure(result))]
    if result.timeline is not None and result.timeline.intervals:
        parts.append(figure_html(timeline_figure(result.timeline)))
    return "".join(parts) + "</div>"


def compare_figure(comparison):
    from plotly.subplots import make_subplots

    rows = comparison.rows()
    metrics = [("decode_tok_s", "decode tokens/s"), ("prefill_tok_s", "prefill tokens/s"),
               ("ttft_ms", "time to first token (ms)"), ("latency_p50_ms", "per-token latency p50 (ms)")]
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[t for _, t in metrics])
    for i, row in enumerate(rows):
        for col, (key, _) in enumerate(metrics, start=1):
            fig.add_bar(x=[key.split("_")[0]], y=[row[key]], name=row["run"], legendgroup=row["run"],
                        showlegend=col == 1, marker_color=_COLORS[i % len(_COLORS)], row=1, col=col,
                        hovertemplate=f"{escape(row['run'])}: %{{y:,.2f}}<extra></extra>")
    title = "nbgpu.compare" + (" — includes SIMULATED runs (ran on CPU)" if comparison.simulated else "")
    fig.update_layout(barmode="group", title=title, height=380, margin=dict(t=80, b=40))
    fig.update_xaxes(showticklabels=False)
    return fig


def compare_html(comparison) -> str:
    from ..running.compare import COLUMNS

    def cell(key, v):
        if v is None:
            return "n/a"
        if key == "roofline_fraction":
            return f"{v:.1%}"
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    columns = [*COLUMNS, "simulated"]
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell(c, r[c]))}</td>" for c in columns) + "</tr>"
                   for r in comparison.rows())
    sim = f"<div>{SIM_BADGE}</div>" if comparison.simulated else ""
    return f"<div>{sim}<table><tr>{head}</tr>{body}</table>{figure_html(compare_figure(comparison))}</div>"
