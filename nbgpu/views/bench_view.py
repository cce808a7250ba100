"""Pictures of `nbgpu.bench`, batch sweeps and `nbgpu.compare`: the figures, the roofline, and who was busy when."""

from __future__ import annotations

from html import escape

from ..units import format_size
from . import presentation

_COLORS = ["#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6", "#06b6d4", "#84cc16", "#ec4899"]
_CATEGORY_COLORS = {"matrix": "#2563eb", "communication": "#ef4444", "other": "#10b981", "idle": "#d1d5db"}


def timeline_figure(timeline):
    import plotly.graph_objects as go

    fig = go.Figure()
    for iv in timeline.intervals:
        fig.add_bar(y=[f"cuda:{iv.cuda_index}"], x=[iv.end_ms - iv.start_ms], base=[iv.start_ms], orientation="h",
                    marker_color=_COLORS[iv.cuda_index % len(_COLORS)], showlegend=False,
                    hovertemplate=f"{escape(iv.modules)}<br>%{{base:.3f}} .. {iv.end_ms:.3f} ms<extra></extra>")
    busy = ", ".join(f"cuda:{k} {v:.0%}" for k, v in timeline.busy().items())
    title = f"One decode step ({timeline.step_ms:.2f} ms): busy {busy}" + presentation.title_suffix(timeline.simulated)
    fig.update_layout(title=title, xaxis_title="ms", barmode="overlay", height=120 + 40 * len(timeline.busy()),
                      margin=dict(t=50, b=40), yaxis=dict(autorange="reversed"))
    return fig


def breakdown_figure(timeline):
    """Per GPU, where one decode step went: matrix products, communication, other kernels, idle."""
    import plotly.graph_objects as go

    if not timeline.breakdown:
        return None
    devices = [f"cuda:{d}" for d in timeline.breakdown]
    fig = go.Figure()
    for cat, color in _CATEGORY_COLORS.items():
        fig.add_bar(name=cat, y=devices, x=[cats.get(cat, 0.0) for cats in timeline.breakdown.values()],
                    orientation="h", marker_color=color, hovertemplate="%{y}: %{x:.2f} ms " + cat + "<extra></extra>")
    fig.update_layout(barmode="stack", title="Where one decode step's time went (ms)" +
                      presentation.title_suffix(timeline.simulated), height=130 + 40 * len(devices),
                      xaxis_title="ms", yaxis=dict(autorange="reversed"), margin=dict(t=50, b=40))
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
    fig.update_layout(title=result.label + presentation.title_suffix(result.simulated), height=340,
                      margin=dict(t=70, b=40))
    return fig


def roofline_text(r) -> str:
    """The roofline's fields as one line: the bound, the fraction reached, and each GPU's bytes and bandwidth."""
    bound = "bandwidth unknown" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f} tokens/s"
    reached = "" if r.fraction is None else f", reached {r.fraction:.1%}"
    per = "; ".join(f"cuda:{g.cuda_index} {format_size(g.weights + g.kv_cache, 'auto')} at "
                    f"{'n/a' if not g.bandwidth else f'{g.bandwidth / 1e12:.2f} TB/s'}" for g in r.gpus)
    return f"{bound}{reached} — {per} ({r.note})"


def bench_html(result) -> str:
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
        pairs.append(("roofline (estimate)", roofline_text(result.roofline)))
    if result.timeline is not None:
        pairs.append(("busy in one decode step",
                      ", ".join(f"cuda:{k} {v:.0%}" for k, v in result.timeline.busy().items())))
    notes = "".join(f"<div style='color:{presentation.WARN}'>{escape(n)}</div>" for n in result.notes)
    sim = presentation.badge(result.simulated, "ran on the CPU")
    return f"<div><b>{escape(result.label)}</b> {sim}{presentation.pairs(pairs)}{notes}</div>"


def show_bench(result) -> None:
    t = result.timeline
    figures = [bench_figure(result)]
    if t is not None and t.intervals:
        figures += [timeline_figure(t), breakdown_figure(t)]
    presentation.show(bench_html(result), figures)


def timeline_html(timeline) -> str:
    sim = presentation.badge(timeline.simulated, "ran on the CPU")
    rows = [[f"cuda:{d}", f"{b:.0%}", *(f"{timeline.breakdown.get(d, {}).get(c, 0.0):.2f}" if timeline.breakdown
                                          else "n/a" for c in _CATEGORY_COLORS)]
            for d, b in timeline.busy().items()]
    table = presentation.table(["GPU", "busy", *(f"{c} ms" for c in _CATEGORY_COLORS)], rows)
    return (f"<div>{sim}<b>One decode step: {timeline.step_ms:.2f} ms</b>{table}"
            f"<div style='font-size:11px'>{escape(timeline.note)}</div></div>")


def show_timeline(timeline) -> None:
    presentation.show(timeline_html(timeline), [timeline_figure(timeline), breakdown_figure(timeline)])


def compare_figure(comparison):
    from plotly.subplots import make_subplots

    rows = comparison.rows()
    metrics = [("decode_tok_s", "decode tokens/s"), ("prefill_tok_s", "prefill tokens/s"),
               ("ttft_ms", "time to first token (ms)"), ("latency_p50_ms", "per-token latency p50 (ms)")]
    # two by two: four titles side by side overlap in a notebook's width
    fig = make_subplots(rows=2, cols=2, subplot_titles=[t for _, t in metrics], vertical_spacing=0.16)
    for i, row in enumerate(rows):
        for k, (key, _) in enumerate(metrics):
            fig.add_bar(x=[key.split("_")[0]], y=[row[key]], name=row["run"], legendgroup=row["run"],
                        showlegend=k == 0, marker_color=_COLORS[i % len(_COLORS)], row=k // 2 + 1, col=k % 2 + 1,
                        hovertemplate=f"{escape(row['run'])}: %{{y:,.2f}}<extra></extra>")
    title = "nbgpu.compare" + presentation.title_suffix(comparison.simulated, _compare_caption(rows))
    fig.update_layout(barmode="group", title=title, height=560, margin=dict(t=80, b=40))
    fig.update_xaxes(showticklabels=False)
    return fig


def _compare_caption(rows) -> str:
    """What a comparison with simulated runs shows: modelled timings, or the CPU's own clock."""
    if any(r["timing"] == "modelled" for r in rows):
        return "the models ran on the CPU; timings modelled for the simulated GPUs"
    return "includes runs on the CPU"


def compare_html(comparison) -> str:
    from ..running.compare import COLUMNS

    def cell(key, v):
        if v is None:
            return "n/a"
        if key == "roofline_fraction":
            return f"{v:.1%}"
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    columns = [*COLUMNS, "simulated"]
    data = comparison.rows()
    rows = [[cell(c, r[c]) for c in columns] for r in data]
    sim = presentation.badge(comparison.simulated, _compare_caption(data))
    return f"<div>{sim}{presentation.table(columns, rows)}</div>"


def show_compare(comparison) -> None:
    presentation.show(compare_html(comparison), [compare_figure(comparison)])


def sweep_figure(sweep):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.add_scatter(x=[r.batch for r in sweep], y=[r.decode_tokens_per_s for r in sweep], mode="lines+markers",
                    name="decode tokens/s", hovertemplate="batch %{x}: %{y:,.1f} tokens/s<extra></extra>")
    fig.update_layout(title=f"{sweep.label}: decode tokens/s by batch" +
                      presentation.title_suffix(any(r.simulated for r in sweep)),
                      xaxis=dict(title="batch", type="log"), yaxis_title="tokens/s", height=320)
    return fig


def sweep_html(sweep) -> str:
    rows = [[r.batch, f"{r.decode_tokens_per_s:,.1f}", f"{r.latency_p50_s * 1e3:.2f}"] for r in sweep]
    sim = presentation.badge(any(r.simulated for r in sweep), "ran on the CPU")
    return f"<div><b>{escape(sweep.label)}</b> {sim}" + \
        presentation.table(["batch", "decode tokens/s", "per-token p50 ms"], rows) + "</div>"


def show_sweep(sweep) -> None:
    presentation.show(sweep_html(sweep), [sweep_figure(sweep)] if sweep else [])
