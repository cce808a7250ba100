"""Simulated GPUs as the Jupyter server sees them: every kernel's published memory on one set of GPUs.

Each kernel simulates its own GPUs (`%gpus --simulate`); the server reads what each one published
(`nbgpu.devices.published`) and lays the kernels that simulate the same GPUs side by side, one process per kernel,
as NVML would show processes sharing real GPUs. Kernels that simulate other GPUs are left out and named in
`Inventory.message`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from .model import GPUProcess, Inventory
from .published import KernelState
from .simulated import CONTEXT_BYTES, SimulatedGPUs, parse_simulate_spec


def _same_gpus(a: str, b: str) -> bool:
    try:
        return [d[:2] for d in parse_simulate_spec(a)] == [d[:2] for d in parse_simulate_spec(b)]
    except ValueError:
        return False


def pick_spec(states: Mapping[int, KernelState]) -> str | None:
    """The simulate spec of the kernel that published last (for a server that simulates nothing itself)."""
    simulating = [s for s in states.values() if s.simulate]
    return max(simulating, key=lambda s: s.time).simulate if simulating else None


def simulated_inventory(spec: str, states: Mapping[int, KernelState]) -> Inventory:
    """`spec`'s simulated GPUs holding what every kernel that simulates the same GPUs placed on them."""
    base = SimulatedGPUs(spec).read()
    sharing = [s for s in states.values() if s.simulate and _same_gpus(s.simulate, spec)]
    others = sorted((s.pid, s.simulate) for s in states.values() if s.simulate and not _same_gpus(s.simulate, spec))
    gpus = []
    for g in base.gpus:
        processes, util = [], 0
        for s in sorted(sharing, key=lambda s: s.pid):
            placed = s.allocated.get(g.index, 0)
            if placed > 0:  # a process that placed something also holds a CUDA context, as SimulatedGPUs shows
                processes.append(GPUProcess(s.pid, "python", "compute", placed + CONTEXT_BYTES))
            util += s.utilization.get(g.index, 0)
        used = sum(p.used_memory for p in processes)
        util = min(util, 100)
        gpus.append(replace(g, memory_used=used, memory_free=max(g.memory_total - used, 0), utilization=util,
                            temperature=35 + util // 2, power_draw=60.0 + 3 * util, pstate=0 if util else 8,
                            processes=tuple(processes)))
    message = None
    if others:
        message = "; ".join(f"kernel process {pid} simulates {theirs}, not {spec}: its memory is not shown here"
                            for pid, theirs in others)
    return replace(base, gpus=tuple(gpus), message=message)


__all__ = ["pick_spec", "simulated_inventory"]
