"""Who holds which GPU: one reading of the GPUs with every process named (notebook, kernel or command line), and
which GPUs each kernel sees. What the JupyterLab GPU panel draws; built by the server extension.

The GPUs are the real ones (NVML), or simulated ones when `simulate` is given (the server's NBGPU_SIMULATE), or when
there is no NVIDIA GPU and kernels publish simulated GPUs: then every kernel's simulated memory is shown together
(`nbgpu.devices.simulated_shared`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import psutil

from . import devices, kernels, visibility
from .devices import Inventory
from .devices.published import KernelState
from .devices.simulated import SimulatedGPUs
from .devices.simulated_shared import pick_spec, simulated_inventory


@dataclass(frozen=True)
class KernelView:
    """A kernel as the panel shows it: where it runs, and which GPUs it sees (cuda:N -> GPU index)."""

    kernel: kernels.Kernel
    this_server: bool
    visible_devices: str | None = None
    device_order: str | None = None
    visible_from: str = "unknown"  # "kernel" (published by nbgpu), "environment" (at kernel start), "unknown"
    devices: tuple[tuple[int, int], ...] = ()  # (N of cuda:N, physical GPU index)
    simulate: str | None = None  # the kernel's simulate spec, when it simulates GPUs


@dataclass(frozen=True)
class Occupancy:
    time: float
    inventory: Inventory
    owners: Mapping[int, kernels.ProcessOwner]
    kernels: tuple[KernelView, ...]
    simulate: str | None = None
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict:
        inv = self.inventory
        gpus = []
        for g in inv:
            procs = None
            if g.processes is not None:
                procs = []
                for p in g.processes:
                    owner = self.owners.get(p.pid) or kernels.ProcessOwner(p.pid)
                    procs.append({"pid": p.pid, "name": p.name, "memory": p.used_memory,
                                  "kernel": owner.kernel.id if owner.kernel else None, "child": owner.child,
                                  "command": owner.command, "user": owner.user})
            gpus.append({"index": g.index, "name": g.name, "uuid": g.uuid, "memory_total": g.memory_total,
                         "memory_used": g.memory_used, "memory_free": g.memory_free, "utilization": g.utilization,
                         "simulated": g.simulated, "processes": procs})
        return {
            "time": self.time, "backend": inv.backend, "simulated": inv.simulated, "simulate": self.simulate,
            "message": inv.message, "gpus": gpus, "notes": list(self.notes),
            "kernels": {v.kernel.id: {
                "id": v.kernel.id, "name": v.kernel.name, "path": v.kernel.path, "pid": v.kernel.pid,
                "session_type": v.kernel.session_type, "execution_state": v.kernel.execution_state,
                "user": v.kernel.user, "this_server": v.this_server, "simulate": v.simulate,
                "visible": {"value": v.visible_devices, "order": v.device_order, "from": v.visible_from,
                            "devices": [{"cuda": n, "gpu": i} for n, i in v.devices]},
            } for v in self.kernels},
        }


def _environment(pid: int | None) -> tuple[dict[str, str], bool]:
    if pid is None:
        return {}, False
    try:
        return psutil.Process(pid).environ(), True
    except psutil.Error:
        return {}, False


def _view(kernel: kernels.Kernel, this_server: bool, state: KernelState | None, inv: Inventory) -> KernelView:
    if state is not None:
        value, order, source = state.visible_devices, state.device_order, "kernel"
    else:
        env, readable = _environment(kernel.pid)
        value, order = env.get(visibility.VISIBLE), env.get(visibility.ORDER)
        source = "environment" if readable else "unknown"
    if state is not None and state.simulate:  # the kernel's GPUs are its own simulated ones, whatever is shown
        inv = SimulatedGPUs(state.simulate).read()
    mapping = tuple((n, t.gpu.index) for n, t in enumerate(visibility.targets_for(value, inv))) \
        if source != "unknown" else ()
    return KernelView(kernel, this_server, value, order, source, mapping, state.simulate if state else None)


def occupancy(own: Iterable[kernels.Kernel] = (), *, simulate: str | None = None,
              others: kernels.ServerDirectory | None = None, states: Mapping[int, KernelState] | None = None,
              read=None) -> Occupancy:
    """Read the GPUs and name every process on them.

    `own`: the kernels of the server this runs in (with their pids); `others`: where to ask for kernels of this
    user's other servers; `states`: what kernels published (read from the runtime directory when None);
    `read`: the inventory reader for real GPUs (`nbgpu.devices.read`).
    """
    own = list(own)
    states = devices.published.read_all() if states is None else states
    spec = simulate
    inv = None
    if spec is None:
        inv = (read or devices.read)()
        if not len(inv):
            spec = pick_spec(states)  # no NVIDIA GPU, but kernels simulate some: show theirs
    if spec is not None:
        inv = simulated_inventory(spec, states)
    pids = {p.pid for g in inv for p in (g.processes or ())}
    own_ids = {k.id for k in own}
    known = list(own)
    if others is not None:
        wanted = kernels.kernel_ids_among(pids) - own_ids
        if wanted:
            known += [k for k in others.kernels(wanted) if k.id not in own_ids]
    owners = kernels.attribute(pids, known)
    by_kernel_id = {s.kernel_id: s for s in states.values() if s.kernel_id}
    holding = {o.kernel.id for o in owners.values() if o.kernel is not None}
    views = []
    for k in known:
        if k.id not in own_ids and k.id not in holding:
            continue  # another server's kernel that holds no GPU memory: not this panel's business
        state = (states.get(k.pid) if k.pid is not None else None) or by_kernel_id.get(k.id)
        views.append(_view(k, k.id in own_ids, state, inv))
    notes = [inv.message] if inv.message else []
    if others is not None:
        notes += [f"server {url}: {why}" for url, why in others.errors.items()]
    return Occupancy(time.time(), inv, owners, tuple(views), spec, tuple(notes))


__all__ = ["KernelView", "Occupancy", "occupancy"]
