"""`nbgpu.gpus()`: the inventory as a table, marking which GPUs this kernel sees and their cuda:N alias, and naming
the notebook behind each process that is a Jupyter kernel (`nbgpu.kernels`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import devices, kernels, visibility
from .devices import GPU, Inventory
from .units import format_size


def _na(value, fmt="{}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _on_off(flag: bool | None) -> str:
    return "n/a" if flag is None else ("on" if flag else "off")


def _memory(g: GPU) -> str:
    if g.memory_total is None:
        return "n/a"
    return f"{format_size(g.memory_used)} / {format_size(g.memory_total, digits=0)}"


def _who(p, owners: Mapping[int, kernels.ProcessOwner]) -> str:
    """The notebook of a kernel's process, else its command line, else NVML's process name."""
    owner = owners.get(p.pid)
    label = (owner.label if owner else None) or p.name or "n/a"
    return label if len(label) <= 80 else label[:79] + "…"


def _processes(g: GPU, own_pid: int, owners: Mapping[int, kernels.ProcessOwner]) -> list[str]:
    if g.processes is None:
        return ["n/a"]
    return [f"{p.pid}{' (this kernel)' if p.pid == own_pid else ''} {_who(p, owners)} {p.kind} "
            f"{format_size(p.used_memory, 'MiB', 0)}" for p in g.processes]


COLUMNS = ["GPU", "cuda", "name", "UUID", "bus id", "memory used/total", "util", "temp", "power", "perf",
           "persist", "cc", "MIG", "processes"]


def _row(g: GPU, alias: str | None, own_pid: int, owners: Mapping[int, kernels.ProcessOwner]) -> list[str]:
    power = "n/a" if g.power_draw is None else f"{g.power_draw:.0f} / {_na(g.power_limit, '{:.0f}')} W"
    return [
        str(g.index), alias or "-", g.name or "n/a", g.uuid or "n/a", g.pci_bus_id or "n/a", _memory(g),
        _na(g.utilization, "{}%"), _na(g.temperature, "{}C"), power, g.pstate_label,
        _on_off(g.persistence_mode), g.compute_capability_label, _on_off(g.mig_mode),
        "; ".join(_processes(g, own_pid, owners)) or "none",
    ]


@dataclass(frozen=True)
class GPUTable:
    """One reading of the inventory plus this kernel's visibility: a sequence of GPUs that displays as the table."""

    inventory: Inventory
    visibility: visibility.Visibility
    owners: Mapping[int, kernels.ProcessOwner] = field(default_factory=dict)  # pid -> notebook or command line

    @property
    def gpus(self) -> tuple[GPU, ...]:
        return self.inventory.gpus

    def __len__(self) -> int:
        return len(self.inventory.gpus)

    def __iter__(self):
        return iter(self.inventory.gpus)

    def __getitem__(self, index):
        return self.inventory.gpus[index]

    def rows(self) -> list[list[str]]:
        pid = os.getpid()
        return [_row(g, self.visibility.alias(g.index), pid, self.owners) for g in self.inventory]

    @property
    def columns(self) -> list[str]:
        return list(COLUMNS)

    def title(self) -> str:
        inv = self.inventory
        if inv.simulated:
            sim = devices.simulated()
            return f"SIMULATED GPUs ({sim.spec_text if sim else ''}) - not real hardware"
        return f"NVIDIA driver {inv.driver_version or 'n/a'}, CUDA {inv.cuda_driver_version or 'n/a'}"

    def __repr__(self) -> str:
        if not len(self.inventory):
            return self.inventory.message or "no GPU found"
        rows = [COLUMNS] + self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
        lines = [self.title()]
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
        lines.append(self.visibility.header())
        if self.visibility.note:
            lines.append(self.visibility.note)
        return "\n".join(lines)


def gpus() -> GPUTable:
    """Every GPU on the machine (or the simulated set), with what runs on it and which ones this kernel sees."""
    inv = devices.read()
    owners = kernels.owners(p.pid for g in inv for p in (g.processes or ()))
    return GPUTable(inv, visibility.current(inv), owners)
