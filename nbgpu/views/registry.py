"""How nbgpu's objects display in IPython: the views layer registers a formatter per type, by name.

Data objects (plans, reports, results, the monitor) know nothing of how they are drawn. `register(ipython)` runs
when the extension loads and when `nbgpu` is imported inside a running IPython; it imports no view module (and so
no plotly) until an object is first displayed. In a kernel the widget view is used where a type has one; in a
terminal only the text form (the object's repr) shows.

Each entry: (module of the type, type name, "module:function" of the view). A `widget` view displays itself (it
calls IPython's display: HTML, then figures as Plotly's own output type, or a widget); an `html` view returns HTML
(no figure) for the text/html formatter, which is what a static renderer without a kernel shows.
"""

from __future__ import annotations

import importlib

# (type's module, type's name) -> "nbgpu.views.<module>:<function>"
HTML: dict[tuple[str, str], str] = {
    ("nbgpu.devices.topology", "Topology"): "nbgpu.views.topology_view:topology_html",
    ("nbgpu.planning.plan", "Plan"): "nbgpu.views.plan_view:plan_html",
    ("nbgpu.gpu_table", "GPUTable"): "nbgpu.views.gpu_table_view:gpu_table_html",
    ("nbgpu.visibility", "Visibility"): "nbgpu.views.gpu_table_view:visibility_html",
    ("nbgpu.running.report", "LoadReport"): "nbgpu.views.load_view:load_html",
    ("nbgpu.running.bench", "BenchResult"): "nbgpu.views.bench_view:bench_html",
    ("nbgpu.running.bench", "Sweep"): "nbgpu.views.bench_view:sweep_html",
    ("nbgpu.running.compare", "Comparison"): "nbgpu.views.bench_view:compare_html",
    ("nbgpu.running.timeline", "Timeline"): "nbgpu.views.bench_view:timeline_html",
    ("nbgpu.monitoring", "Monitor"): "nbgpu.views.monitor_view:monitor_html",
}
# in a kernel: HTML and figures (Plotly's own output type) or widgets
WIDGET: dict[tuple[str, str], str] = {
    ("nbgpu.planning.plan", "Plan"): "nbgpu.views.plan_view:display_plan",
    ("nbgpu.running.report", "LoadReport"): "nbgpu.views.load_view:show_load",
    ("nbgpu.running.bench", "BenchResult"): "nbgpu.views.bench_view:show_bench",
    ("nbgpu.running.bench", "Sweep"): "nbgpu.views.bench_view:show_sweep",
    ("nbgpu.running.compare", "Comparison"): "nbgpu.views.bench_view:show_compare",
    ("nbgpu.running.timeline", "Timeline"): "nbgpu.views.bench_view:show_timeline",
    ("nbgpu.monitoring", "Monitor"): "nbgpu.views.monitor_view:display_monitor",
}


def _resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _lazy(path: str):
    def call(obj):
        return _resolve(path)(obj)

    call.__qualname__ = call.__name__ = path.split(":")[1]
    return call


def in_kernel(ipython) -> bool:
    """True in a Jupyter kernel (widgets can show), False in terminal IPython."""
    return getattr(ipython, "kernel", None) is not None


def register(ipython) -> None:
    """Register every view with this IPython (idempotent)."""
    if ipython is None:
        return
    formatters = ipython.display_formatter.formatters
    for (module, name), path in HTML.items():
        formatters["text/html"].for_type_by_name(module, name, _lazy(path))
    if in_kernel(ipython):
        display = ipython.display_formatter.ipython_display_formatter
        for (module, name), path in WIDGET.items():
            display.for_type_by_name(module, name, _lazy(path))


def register_if_running() -> None:
    """Called on `import nbgpu`: register with the running IPython, if any (IPython is not imported here)."""
    import sys

    if "IPython" not in sys.modules:
        return
    get_ipython = getattr(sys.modules["IPython"], "get_ipython", None)
    if get_ipython is not None:
        register(get_ipython())
