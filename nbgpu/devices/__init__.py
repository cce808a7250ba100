"""The GPU inventory: one interface, two backends (NVML and simulated GPUs). No torch here."""

from __future__ import annotations

from .model import GPU, GPUProcess, Inventory, MIGDevice
from .nvml import NVMLReader
from .simulated import SimulatedGPUs, SimulateSpecError, parse_simulate_spec

_nvml = NVMLReader()
_simulated: SimulatedGPUs | None = None


def read() -> Inventory:
    """The current reading of every GPU, from the simulated set when one is active, else from NVML."""
    return _simulated.read() if _simulated is not None else _nvml.read()


def simulated() -> SimulatedGPUs | None:
    """The active simulated GPUs, or None when the inventory comes from NVML."""
    return _simulated


def simulate(spec: str | None) -> SimulatedGPUs | None:
    """Replace the inventory with simulated GPUs ('4x24GiB', '2xA100-80GB', ...); None or 'off' returns to NVML."""
    global _simulated
    if spec is not None and not isinstance(spec, str):
        raise SimulateSpecError(f"simulate takes a spec such as '4x24GiB' (or 'off'), not {type(spec).__name__}")
    if spec is None or spec.strip().lower() == "off":
        _simulated = None
        return None
    new = SimulatedGPUs(spec)  # parse first: a bad spec leaves the current state as it was
    _simulated = new
    return new


__all__ = ["GPU", "GPUProcess", "Inventory", "MIGDevice", "NVMLReader", "SimulatedGPUs", "SimulateSpecError",
           "parse_simulate_spec", "read", "simulate", "simulated"]
