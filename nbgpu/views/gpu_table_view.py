"""`%gpus` as HTML: the GPU table, with the GPUs this kernel sees highlighted, and the cuda:N mapping of a choice."""

from __future__ import annotations

from html import escape

from . import presentation

SEEN = "background:#e8f5e9;font-weight:600"
UNSEEN = "color:#777"


def gpu_table_html(table) -> str:
    inv = table.inventory
    if not len(inv):
        return f"<div><b>nbgpu:</b> {escape(inv.message or 'no GPU found')}</div>"
    head = "".join(f"<th style='text-align:left'>{escape(c)}</th>" for c in table.columns)
    body = []
    for g, row in zip(inv, table.rows()):
        style = SEEN if table.visibility.alias(g.index) is not None else UNSEEN
        cells = "".join(f"<td style='text-align:left'>{escape(c).replace('; ', '<br>')}</td>" for c in row)
        errors = escape("; ".join(f"{k}: {v}" for k, v in g.errors.items()))
        body.append(f"<tr class='nbgpu-gpu' data-gpu='{g.index}' style='{style}' title='{errors}'>{cells}</tr>")
    vis = table.visibility
    foot = escape(vis.header())
    if vis.note:
        foot += f"<br><span style='color:{presentation.WARN}'>{escape(vis.note)}</span>"
    return (f"<div>{presentation.badge(inv.simulated)}<b>{escape(table.title())}</b>"
            f"<table style='font-size:12px'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f"<div style='font-size:12px'>Highlighted: GPUs this kernel sees. {foot}</div></div>")


def visibility_html(vis) -> str:
    items = "".join(f"<li><code>{escape(line)}</code></li>" for line in vis.lines())
    note = f"<div style='color:{presentation.WARN}'>{escape(vis.note)}</div>" if vis.note else ""
    links = f"<div>links: {escape(vis.links)}</div>" if vis.links else ""
    head = f"{presentation.badge(vis.simulated)}<code>{escape(vis.header())}</code>"
    return f"<div>{head}<ul>{items}</ul>{links}{note}</div>"
