"""The GPU inventory: one interface, two backends (NVML and simulated GPUs). No torch here."""

from __future__ import annotations

from . import published
from .model import GPU, GPUProcess, Inventory, MIGDevice
from .nvml import NVMLReader
from .simulated import DEFAULT_SPEC, SimulatedGPUs, SimulateSpecError, parse_simulate_spec
from .topology import GPUInterconnect, Link, Topology

_nvml = NVMLReader()
_simulated: SimulatedGPUs | None = None


def read() -> Inventory:
    """The current reading of every GPU, from the simulated set when one is active, else from NVML."""
    return _simulated.read() if _simulated is not None else _nvml.read()


def topology() -> Topology:
    """The links between the GPUs (as `nvidia-smi topo -m`), from the simulated set when one is active, else from
    NVML. Read on first use and kept: links do not change while the process runs."""
    return _simulated.topology() if _simulated is not None else _nvml.topology()


def simulated() -> SimulatedGPUs | None:
    """The active simulated GPUs, or None when the inventory comes from NVML."""
    return _simulated


def simulate(spec: str | None) -> SimulatedGPUs | None:
    """Replace the inventory with simulated GPUs ('4xL4', '2xA100-80GB:nvlink', '4x24GiB', ...; the grammar is in
    simulated.py); None or 'off' returns to NVML."""
    global _simulated
    if spec is not None and not isinstance(spec, str):
        raise SimulateSpecError(f"simulate takes a spec such as '4x24GiB' (or 'off'), not {type(spec).__name__}")
    if spec is None or spec.strip().lower() == "off":
        _simulated = None
        published.changed()
        return None
    new = SimulatedGPUs(spec)  # parse first: a bad spec leaves the current state as it was
    _simulated = new
    published.changed()
    return new


__all__ = ["DEFAULT_SPEC", "GPU", "GPUInterconnect", "GPUProcess", "Inventory", "Link", "MIGDevice", "NVMLReader",
           "SimulateSpecError", "SimulatedGPUs", "Topology", "parse_simulate_spec", "read", "simulate", "simulated",
           "topology"]
