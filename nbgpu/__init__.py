"""nbgpu: see, choose, plan, load, benchmark and monitor several GPUs from a notebook.

`import nbgpu` and `%load_ext nbgpu` stay cheap: torch, transformers, accelerate and plotly are imported only
when a feature that needs them is first used (the names below are resolved on first access).
"""

from __future__ import annotations

import importlib

from .devices import DEFAULT_SPEC, topology
from .devices import simulate as _simulate_backend
from .errors import UsageError
from .gpu_table import GPUTable, gpus
from .units import format_size, parse_size
from .visibility import Visibility, cuda_driver_initialized, use

__version__ = "0.1.0"

# name -> module that defines it; imported on first use
_LAZY = {
    "plan": "nbgpu.planning",
    "Plan": "nbgpu.planning",
    "load": "nbgpu.running",
    "bench": "nbgpu.running",
    "compare": "nbgpu.running",
    "predict": "nbgpu.running",
    "BenchResult": "nbgpu.running",
    "monitor": "nbgpu.monitoring",
    "Monitor": "nbgpu.monitoring",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbgpu' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def simulate(spec: str | None = DEFAULT_SPEC) -> GPUTable:
    """Replace the inventory with simulated GPUs ('4xL4' by default, '2xA100-80GB:nvlink', '2xL4:pcie', 'H100',
    '4x24GiB', '24GiB,80GiB'; grammar in nbgpu.devices.simulated); `simulate("off")` returns to the real GPUs through
    NVML. Returns the new GPU table."""
    _simulate_backend(spec)
    return gpus()


def _jupyter_server_extension_points():
    """The jupyter-server extension behind the JupyterLab GPU panel (enabled with the package)."""
    return [{"module": "nbgpu.server"}]


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "nbgpu"}]


def load_ipython_extension(ipython):
    from .magics import register
    from .views.registry import register as register_views

    register(ipython)
    register_views(ipython)


__all__ = ["BenchResult", "GPUTable", "Monitor", "Plan", "UsageError", "Visibility", "bench", "compare",
           "cuda_driver_initialized", "format_size", "gpus", "load", "monitor", "parse_size", "plan", "predict",
           "simulate", "topology", "use"]


def _register_views():
    from .views.registry import register_if_running

    register_if_running()


_register_views()
