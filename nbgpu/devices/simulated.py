"""Simulated GPUs: a first-class inventory backend for machines without NVIDIA GPUs.

Memory on a simulated GPU follows what nbgpu placed on it (`allocate`/`release`), so the planner,
loader, benchmark and monitor all behave as they would on real GPUs, and every display says "simulated".
"""

from __future__ import annotations

import os
import re
import threading
import uuid as uuidlib

from ..errors import UsageError
from ..units import GiB, SizeError, format_size, parse_size
from . import specs
from .model import GPU, GPUProcess, Inventory

# What a CUDA context and framework workspace (cuBLAS, allocator slack) cost a process on a real GPU: 0.68 GiB
# measured on an H100 with torch 2.11 / CUDA 13 (bench/plan_vs_measured.py); older GPUs and CUDA versions take
# less, so this errs on the safe side. Shown on a simulated GPU once this process "uses" it; the planner's default.
CONTEXT_BYTES = 700 * 1024**2


class SimulateSpecError(UsageError):
    pass


MAX_SIMULATED = 64  # GPUs in one simulated set


def parse_simulate_spec(text: str) -> list[tuple[str, int, specs.GPUSpec | None]]:
    """'4x24GiB', '2xA100-80GB', 'H100', '8xT4', '24GiB,80GiB' -> [(name, memory, spec or None), ...]."""
    if not isinstance(text, str):
        raise SimulateSpecError(f"a simulate spec is a string such as '4x24GiB', not {type(text).__name__}")
    out = []
    for item in [p.strip() for p in text.split(",")]:
        if not item:
            raise SimulateSpecError(f"empty item in {_short(text)!r}: write e.g. 4x24GiB or 24GiB,80GiB")
        match = re.fullmatch(r"(?:(\d{1,6})\s*[xX*]\s*)?(.+)", item, re.ASCII | re.DOTALL)
        count, what = int(match.group(1) or 1), match.group(2).strip()
        if count < 1 or count > MAX_SIMULATED:
            raise SimulateSpecError(f"{count} GPUs in {_short(item)!r}: give between 1 and {MAX_SIMULATED}")
        spec = specs.lookup(what)
        if spec is not None:
            out += [(spec.name, spec.memory, spec)] * count
        else:
            try:
                memory = parse_size(what)
            except SizeError:
                raise SimulateSpecError(
                    f"cannot read {_short(item)!r}: write COUNTxSIZE (4x24GiB), COUNTxNAME (2xA100-80GB), a name "
                    f"(H100) or sizes separated by commas (24GiB,80GiB). Known names: {', '.join(specs.known_names())}"
                ) from None
            if memory < GiB:
                raise SimulateSpecError(f"{_short(item)!r} is smaller than 1 GiB: did you mean {_short(what)}GiB?")
            out += [(f"Simulated GPU {format_size(memory, digits=0)}", memory, None)] * count
        if len(out) > MAX_SIMULATED:
            raise SimulateSpecError(f"{_short(text)!r} names {len(out)} GPUs or more: simulate at most {MAX_SIMULATED}")
    return out


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class SimulatedGPUs:
    """A set of virtual GPUs whose memory and load follow what this process places on them."""

    def __init__(self, spec_text: str):
        self.spec_text = spec_text
        self._devices = parse_simulate_spec(spec_text)
        # stable, well-formed UUIDs, so a simulated GPU can be chosen by UUID like a real one
        self._uuids = [f"GPU-{uuidlib.uuid5(uuidlib.NAMESPACE_OID, f'nbgpu-sim-{i}')}"
                       for i in range(len(self._devices))]
        self._lock = threading.Lock()
        self._allocated: dict[int, int] = {}  # index -> bytes this process placed there
        self._utilization: dict[int, int] = {}
        self.visible: str | None = None  # the simulated CUDA_VISIBLE_DEVICES; None: all

    # what the loader and benchmark call
    def allocate(self, index: int, nbytes: int) -> None:
        with self._lock:
            self._allocated[index] = self._allocated.get(index, 0) + int(nbytes)

    def release(self, index: int | None = None) -> None:
        with self._lock:
            if index is None:
                self._allocated.clear()
            else:
                self._allocated.pop(index, None)

    def set_utilization(self, index: int, percent: int) -> None:
        with self._lock:
            self._utilization[index] = percent

    def allocated(self, index: int) -> int:
        with self._lock:
            return self._allocated.get(index, 0)

    def __len__(self) -> int:
        return len(self._devices)

    def read(self) -> Inventory:
        with self._lock:
            gpus = tuple(self._gpu(i) for i in range(len(self._devices)))
        return Inventory(gpus=gpus, backend="simulated", driver_version="simulated", cuda_driver_version="simulated")

    def _gpu(self, i: int) -> GPU:
        name, total, spec = self._devices[i]
        placed = self._allocated.get(i, 0)
        used = placed + CONTEXT_BYTES if placed else 0
        procs = (GPUProcess(os.getpid(), "python (this kernel)", "compute", used),) if used else ()
        util = self._utilization.get(i, 0)
        return GPU(
            index=i, uuid=self._uuids[i], name=name, pci_bus_id=f"00000000:{0x10 + i:02X}:00.0",
            memory_total=total, memory_used=used, memory_free=max(total - used, 0),
            utilization=util, temperature=35 + util // 2, power_draw=60.0 + 3 * util,
            power_limit=None if spec is None else 300.0, pstate=0 if util else 8, persistence_mode=True,
            compute_capability=spec.compute_capability if spec else (9, 0), mig_mode=False,
            processes=procs, memory_bandwidth=spec.bandwidth if spec else None, simulated=True,
        )
