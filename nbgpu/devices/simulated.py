"""Simulated GPUs: a first-class inventory backend for machines without NVIDIA GPUs.

Memory on a simulated GPU follows what nbgpu placed on it (`allocate`/`release`), so the planner,
loader, benchmark and monitor all behave as they would on real GPUs, and every display says "simulated".
A GPU named by model (L4, A100-80GB, ...) carries that model's published figures (specs.py): memory bandwidth, bf16
FLOP/s, power limit and idle power, PCIe and NVLink generation. A GPU given only by its size has none of them:
those fields are n/a, and its `errors` say why.

The spec (`%gpus --simulate SPEC`), groups separated by commas:

    group := [COUNT x] (MODEL | SIZE) [:LINK]        e.g. 4xL4   2xA100-80GB:nvlink   2x24GiB:pcie
    LINK  := nvlink | pcie | pix | pxb | phb | node | sys

LINK joins the GPUs within the group: `nvlink` through NVSwitch (every pair NV<links of the model>) on SXM models, or
through a bridge per pair of cards (GPU 0-1, 2-3, ...) on models that have NVLink bridges (A6000, RTX3090, H100-PCIE);
`pcie` is `phb` (through the CPU's PCIe host bridge); the others are nvidia-smi's PCIe paths. Without LINK a group
gets what its model usually has: `nvlink` for SXM models (H200, H100, A100, V100), `pcie` for cards and for GPUs
given by size. Different groups are joined by SYS (as if on another CPU socket): `2xH100:nvlink,2xH100:pcie`.
"""

from __future__ import annotations

import os
import re
import threading
import uuid as uuidlib
from dataclasses import dataclass

from ..errors import UsageError
from ..units import GiB, SizeError, format_size, parse_size
from . import published, specs
from .calibration import DEFAULT as CALIBRATION
from .model import GPU, GPUProcess, Inventory
from .simulated_topology import build, pci_bus_id

# A CUDA context and the kernels a first generate loads, per process and GPU (calibrated on real GPUs)
CONTEXT_BYTES = CALIBRATION.context

# The course's simulated machine: four NVIDIA L4 (24 GB, 300 GB/s, 121 TF bf16, a 72 W limit) on PCIe, a common
# cloud machine whose figures are all published.
DEFAULT_SPEC = "4xL4"

MAX_SIMULATED = 64  # GPUs in one simulated set
LINKS = ("nvlink", "pcie", "pix", "pxb", "phb", "node", "sys")
NO_MODEL = ("a GPU given only by its size has no model figures: name a model (e.g. 4xL4 or 2xA100-80GB) "
            "for bandwidth and power")


class SimulateSpecError(UsageError):
    pass


@dataclass(frozen=True)
class Group:
    """One comma-separated item of a simulate spec: COUNT GPUs of one kind, joined by `link`."""

    count: int
    name: str
    memory: int
    spec: specs.GPUSpec | None
    link: str  # one of LINKS, "pcie" already read as "phb"


def parse_groups(text: str) -> list[Group]:
    """'4xL4', '2xA100-80GB:nvlink', '2x24GiB:pcie,80GiB' -> the groups, links resolved to their defaults."""
    if not isinstance(text, str):
        raise SimulateSpecError(f"a simulate spec is a string such as '4xL4', not {type(text).__name__}")
    groups = []
    for item in [p.strip() for p in text.split(",")]:
        if not item:
            raise SimulateSpecError(f"empty item in {text!r}")
        match = re.fullmatch(r"(?:(\d{1,6})\s*[xX*]\s*)?([^:]+?)\s*(?::\s*(\w*))?", item, re.ASCII | re.DOTALL)
        if match is None:
            raise SimulateSpecError(f"cannot read {_short(item)!r}: write COUNTxNAME[:LINK], e.g. 4xL4 or "
                                    "2xA100-80GB:nvlink")
        count, what, link = int(match.group(1) or 1), match.group(2).strip(), match.group(3)
        if count < 1 or count > MAX_SIMULATED:
            raise SimulateSpecError(f"{count} GPUs in {_short(item)!r}: give between 1 and {MAX_SIMULATED}")
        spec = specs.lookup(what)
        if spec is not None:
            name, memory = spec.name, spec.memory
        else:
            try:
                memory = parse_size(what)
            except SizeError:
                raise SimulateSpecError(
                    f"cannot read {_short(item)!r}: write COUNTxSIZE (4x24GiB), COUNTxNAME (2xA100-80GB), a name "
                    f"(H100) or sizes separated by commas (24GiB,80GiB), each optionally followed by :LINK "
                    f"({', '.join(LINKS)}). Known names: {', '.join(specs.known_names())}"
                ) from None
            if memory < GiB:
                raise SimulateSpecError(f"{_short(item)!r} is smaller than 1 GiB: did you mean {_short(what)}GiB?")
            name = f"Simulated GPU {format_size(memory, digits=0)}"
        groups.append(Group(count, name, memory, spec, _link(item, link, spec)))
    if sum(g.count for g in groups) > MAX_SIMULATED:
        raise SimulateSpecError(f"{_short(text)!r} names {sum(g.count for g in groups)} GPUs: simulate at most "
                                f"{MAX_SIMULATED}")
    return groups


def _link(item: str, link: str | None, spec: specs.GPUSpec | None) -> str:
    if link is None:
        link = spec.default_link if spec else "pcie"
    link = link.lower()
    if link not in LINKS:
        raise SimulateSpecError(f"unknown link {_short(link)!r} in {_short(item)!r}: give one of {', '.join(LINKS)}")
    if link == "nvlink" and (spec is None or not spec.nvlink_generation):
        what = "a GPU given only by its size" if spec is None else f"the {spec.key}"
        raise SimulateSpecError(f"{item!r}: {what} has no NVLink. Use :pcie, or a model with NVLink "
                                f"({', '.join(s.key for s in specs.SPECS.values() if s.nvlink_generation)})")
    return "phb" if link == "pcie" else link


def parse_simulate_spec(text: str) -> list[tuple[str, int, specs.GPUSpec | None]]:
    """'4x24GiB', '2xA100-80GB', 'H100', '8xT4', '24GiB,80GiB' -> [(name, memory, spec or None), ...] per GPU."""
    return [(g.name, g.memory, g.spec) for g in parse_groups(text) for _ in range(g.count)]


def power_draw(spec: specs.GPUSpec | None, utilization: int) -> float | None:
    """Watts: from the model's idle power at 0% to its limit at 100%, linearly; None without a model."""
    if spec is None:
        return None
    share = min(max(utilization, 0), 100) / 100
    return spec.idle_power + (spec.power_limit - spec.idle_power) * share


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


class SimulatedGPUs:
    """A set of virtual GPUs whose memory and load follow what this process places on them."""

    def __init__(self, spec_text: str):
        self.spec_text = spec_text
        self.groups = parse_groups(spec_text)
        self._devices = [(g.name, g.memory, g.spec) for g in self.groups for _ in range(g.count)]
        # stable, well-formed UUIDs, so a simulated GPU can be chosen by UUID like a real one
        self._uuids = [f"GPU-{uuidlib.uuid5(uuidlib.NAMESPACE_OID, f'nbgpu-sim-{i}')}"
                       for i in range(len(self._devices))]
        self._lock = threading.Lock()
        self._allocated: dict[int, int] = {}  # index -> bytes this process placed there
        self._context: set[int] = set()  # GPUs this process has used: their CUDA context stays until it ends
        self._utilization: dict[int, int] = {}
        self._topology = None
        self.visible: str | None = None  # the simulated CUDA_VISIBLE_DEVICES; None: all

    # what the loader and benchmark call
    def allocate(self, index: int, nbytes: int) -> None:
        with self._lock:
            self._allocated[index] = self._allocated.get(index, 0) + int(nbytes)
            if nbytes > 0:
                self._context.add(index)
        published.changed()

    def release(self, index: int | None = None) -> None:
        """Free what was placed (on one GPU or all); the CUDA context stays, as on a real GPU."""
        with self._lock:
            if index is None:
                self._allocated.clear()
            else:
                self._allocated.pop(index, None)
        published.changed()

    def set_utilization(self, index: int, percent: int) -> None:
        with self._lock:
            self._utilization[index] = percent
        published.changed()

    def allocated(self, index: int) -> int:
        with self._lock:
            return self._allocated.get(index, 0)

    def spec(self, index: int) -> specs.GPUSpec | None:
        """The published figures of GPU `index`, or None for a GPU given only by its size."""
        return self._devices[index][2]

    def state(self) -> dict[str, dict[int, int]]:
        """What this process placed on each GPU and the utilisation it set (what a kernel publishes)."""
        with self._lock:
            return {"allocated": {i: b for i, b in self._allocated.items() if b},
                    "utilization": dict(self._utilization)}

    def __len__(self) -> int:
        return len(self._devices)

    def read(self) -> Inventory:
        with self._lock:
            gpus = tuple(self._gpu(i) for i in range(len(self._devices)))
        return Inventory(gpus=gpus, backend="simulated", driver_version="simulated", cuda_driver_version="simulated")

    def topology(self):
        """The links of the simulated machine, through the same interface as NVML's."""

        if self._topology is None:
            self._topology = build(self.groups, self.spec_text)
        return self._topology

    def _gpu(self, i: int) -> GPU:
        name, total, spec = self._devices[i]
        used = self._allocated.get(i, 0) + CONTEXT_BYTES if i in self._context else 0
        procs = (GPUProcess(os.getpid(), "python (this kernel)", "compute", used),) if used else ()
        util = self._utilization.get(i, 0)
        return GPU(
            index=i, uuid=self._uuids[i], name=name, pci_bus_id=pci_bus_id(i),
            memory_total=total, memory_used=used, memory_free=max(total - used, 0),
            utilization=util, temperature=35 + util // 2, power_draw=power_draw(spec, util),
            power_limit=spec.power_limit if spec else None, pstate=0 if util else 8, persistence_mode=True,
            compute_capability=spec.compute_capability if spec else None, mig_mode=False,
            processes=procs, memory_bandwidth=spec.bandwidth if spec else None,
            bf16_flops=spec.bf16_flops if spec else None, simulated=True,
            errors={} if spec else {f: NO_MODEL for f in ("power_draw", "power_limit", "memory_bandwidth")},
        )


