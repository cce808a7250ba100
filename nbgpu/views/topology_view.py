"""The picture of `nbgpu.topology()` / `%gpus --topo`: nvidia-smi's matrix as an HTML table, coloured from NVLink
(green) to the link between CPU sockets (red), its legend, and each pair's estimated bandwidth and latency."""

from __future__ import annotations

from html import escape

from ..devices.topology import LEGEND
from . import presentation

# by the link's code (Link.code), best to worst
COLORS = {"X": "#e5e7eb", "NV": "#86efac", "PIX": "#d9f99d", "PXB": "#fef08a", "PHB": "#fde68a", "NODE": "#fed7aa",
          "SYS": "#fecaca", None: "#ffffff"}
_TD = "padding:2px 8px;text-align:center;border:1px solid #d1d5db"


def _cell(topo, a: int, b: int) -> str:
    if a == b:
        return f"<td style='{_TD};background:{COLORS['X']}'>X</td>"
    lk = topo.link(a, b)
    tip = f"{lk.kind}; {lk.medium((topo.gpu(a), topo.gpu(b)))}"
    return f"<td style='{_TD};background:{COLORS.get(lk.code, '#ffffff')}' title='{escape(tip)}'>{lk.label}</td>"


def topology_html(topo) -> str:
    if not topo.gpus:
        return f"<div><b>nbgpu:</b> {escape(topo.message or 'no GPU found')}</div>"
    badge = presentation.badge(topo.simulated)
    head = "".join(f"<th style='{_TD}'>GPU{g.index}</th>" for g in topo.gpus)
    body = []
    for g in topo.gpus:
        cells = "".join(_cell(topo, g.index, other.index) for other in topo.gpus)
        numa = "N/A" if g.numa_node is None else g.numa_node
        body.append(f"<tr><th style='{_TD}'>GPU{g.index}</th>{cells}<td style='{_TD}'>{escape(g.cpu_affinity or 'N/A')}"
                    f"</td><td style='{_TD}'>{numa}</td></tr>")
    legend = "".join(f"<li><code>{escape(code)}</code> = {escape(text)}</li>" for code, text in LEGEND)
    links = "".join(f"<li><code>{escape(line)}</code></li>" for line in topo.link_lines())
    errors = "".join(f"<li>{escape(line)}</li>" for line in topo.error_lines())
    errors = f"<div style='color:#b45309'>Not available:<ul>{errors}</ul></div>" if errors else ""
    return (f"<div>{badge}<b>{escape(topo.title())}</b>"
            f"<table style='font-size:12px;border-collapse:collapse'><thead><tr><th></th>{head}"
            f"<th style='{_TD}'>CPU Affinity</th><th style='{_TD}'>NUMA Affinity</th></tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
            f"<details style='font-size:12px'><summary>Legend</summary><ul>{legend}</ul></details>"
            f"<details style='font-size:12px' open><summary>Links: estimates from published figures, not measured"
            f"</summary><ul>{links}</ul></details>{errors}</div>")
