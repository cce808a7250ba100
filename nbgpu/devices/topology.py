"""The links between GPUs, as `nvidia-smi topo -m` shows them: plain dataclasses, None wherever NVML cannot say.

Per pair of GPUs: the path a PCIe transfer takes (PIX, PXB, PHB, NODE, SYS), the number of bonded NVLinks (shown as
NV# instead, as nvidia-smi does), whether peer-to-peer reads and writes work, and an estimated bandwidth and latency
from published figures (see link_figures.py) — estimates, not measurements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

from . import link_figures

# nvidia-smi's legend, in its order (worst first)
LEGEND = [
    ("X", "Self"),
    ("SYS", "Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)"),
    ("NODE", "Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node"),
    ("PHB", "Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)"),
    ("PXB", "Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)"),
    ("PIX", "Connection traversing at most a single PCIe bridge"),
    ("NV#", "Connection traversing a bonded set of # NVLinks"),
]
PCIE_PATHS = ("PIX", "PXB", "PHB", "NODE", "SYS")  # best first
# how good a link is for splitting work over the two GPUs: lower is better
RANK = {"NV": 0, "PIX": 1, "PXB": 2, "PHB": 3, "NODE": 4, "SYS": 5}
UNKNOWN_RANK = 6
KIND = {"NV": "NVLink", "PIX": "one PCIe switch", "PXB": "several PCIe switches", "PHB": "the CPU's PCIe host bridge",
        "NODE": "PCIe host bridges within one NUMA node", "SYS": "PCIe and the link between CPU sockets"}


@dataclass(frozen=True)
class GPUInterconnect:
    """What one GPU brings to its links."""

    index: int
    name: str | None
    pci_bus_id: str | None
    compute_capability: tuple[int, int] | None
    pcie_generation: int | None  # the highest this GPU and its slot can run
    pcie_width: int | None  # lanes
    nvlink_generation: int | None
    nvlinks: int | None  # active NVLinks (to GPUs or NVSwitches); None: not available
    cpu_affinity: str | None = None  # the CPUs nearest the GPU, as "0-55,112-167"
    numa_node: int | None = None
    errors: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def pcie_bandwidth(self) -> float | None:
        return link_figures.pcie_bandwidth(self.pcie_generation, self.pcie_width)


@dataclass(frozen=True)
class Link:
    """How two GPUs reach each other."""

    gpus: tuple[int, int]  # GPU indexes, smaller first
    path: str | None  # the PCIe path: PIX, PXB, PHB, NODE or SYS; None: not available
    nvlinks: int | None  # bonded NVLinks between them (0: none); None: not available
    nvlink_generation: int | None
    p2p_read: str | None  # "OK" or why not ("topology not supported", ...); None: not available
    p2p_write: str | None
    estimated_bandwidth: float | None  # bytes/s one way, from published figures
    estimated_latency: float | None  # seconds per hop of a small transfer, from NCCL's model
    errors: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def code(self) -> str | None:
        """'NV' or the PCIe path; None when neither is known."""
        return "NV" if self.nvlinks else self.path

    @property
    def label(self) -> str:
        """As nvidia-smi prints the cell: NV12, PIX, ..., or n/a."""
        return f"NV{self.nvlinks}" if self.nvlinks else (self.path or "n/a")

    @property
    def rank(self) -> int:
        return RANK.get(self.code, UNKNOWN_RANK)

    @property
    def kind(self) -> str:
        return KIND.get(self.code, "not available")

    @property
    def p2p(self) -> bool | None:
        """True when the GPUs can read and write each other's memory directly; None when NVML cannot say."""
        if self.p2p_read is None or self.p2p_write is None:
            return None
        return self.p2p_read == "OK" and self.p2p_write == "OK"

    def medium(self, ends: tuple[GPUInterconnect, GPUInterconnect] | None = None) -> str:
        """'NVLink 4 x18' or 'PCIe Gen4 x16' (the slower end's PCIe link)."""
        if self.nvlinks:
            gen = f" {self.nvlink_generation}" if self.nvlink_generation else ""
            return f"NVLink{gen} x{self.nvlinks}"
        if ends and all(e.pcie_generation for e in ends):
            slow = min(ends, key=lambda e: e.pcie_bandwidth or 0)
            return f"PCIe Gen{slow.pcie_generation} x{slow.pcie_width or '?'}"
        return "PCIe"


def estimate(path: str | None, nvlinks: int | None, nvlink_generation: int | None,
             a: GPUInterconnect, b: GPUInterconnect) -> tuple[float | None, float | None]:
    """(bandwidth, latency) of a link from published figures: NVLink by generation and count, else the slower
    end's PCIe link."""
    if nvlinks:
        cc = a.compute_capability or b.compute_capability
        return link_figures.nvlink_bandwidth(nvlinks, nvlink_generation, cc), link_figures.NVLINK_HOP_LATENCY
    if path is None:
        return None, None
    ends = [a.pcie_bandwidth, b.pcie_bandwidth]
    bandwidth = None if None in ends else min(ends)
    return bandwidth, link_figures.PCIE_HOP_LATENCY


def _gb(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"~{x / 1e9:.0f} GB/s" if x >= 10e9 else f"~{x / 1e9:.1f} GB/s"


def _us(x: float | None) -> str:
    return "n/a" if x is None else f"~{x * 1e6:.1f} us"


@dataclass(frozen=True)
class Topology:
    """Every GPU and every pair's link, from NVML or from the simulated machine."""

    gpus: tuple[GPUInterconnect, ...]
    links: tuple[Link, ...]  # one per pair, (smaller index, larger index)
    backend: str  # "nvml" or "simulated"
    message: str | None = None  # why there is nothing to show
    spec_text: str | None = None  # the simulate spec, for simulated GPUs

    @property
    def simulated(self) -> bool:
        return self.backend == "simulated"

    def link(self, a: int, b: int) -> Link | None:
        """The link between GPUs a and b (either order); None for a == b or an unknown index."""
        key = (min(a, b), max(a, b))
        return next((lk for lk in self.links if lk.gpus == key), None)

    def gpu(self, index: int) -> GPUInterconnect | None:
        return next((g for g in self.gpus if g.index == index), None)

    @property
    def available(self) -> bool:
        """True when at least one link is known (NVLink or PCIe path)."""
        return any(lk.code is not None for lk in self.links)

    def labels(self) -> list[list[str]]:
        """The matrix cells, GPU by GPU: 'X' on the diagonal, else NV# / PIX / ... / n/a."""
        out = []
        for a in self.gpus:
            out.append(["X" if a.index == b.index else self.link(a.index, b.index).label for b in self.gpus])
        return out

    def worst(self, indexes) -> Link | None:
        """The weakest link among the given GPUs (None for fewer than two)."""
        links = [self.link(a, b) for a, b in combinations(sorted(indexes), 2)]
        return max(links, key=lambda lk: lk.rank) if links else None

    def describe(self, indexes) -> str:
        """One line on the links among the given GPUs: 'every pair NV18 (NVLink)' or each pair and the weakest."""
        pairs = [self.link(a, b) for a, b in combinations(sorted(indexes), 2)]
        if not pairs:
            return "one GPU: no link between GPUs is used"
        if len({lk.label for lk in pairs}) == 1:
            lk = pairs[0]
            every = "every pair" if len(pairs) > 1 else f"GPU {lk.gpus[0]}-{lk.gpus[1]}"
            return f"{every} {lk.label} ({lk.kind})"
        worst = max(pairs, key=lambda lk: lk.rank)
        each = ", ".join(f"{lk.gpus[0]}-{lk.gpus[1]} {lk.label}" for lk in pairs)
        return f"GPU {each}; the weakest is {worst.label} ({worst.kind})"

    def title(self) -> str:
        if self.simulated:
            return f"SIMULATED GPUs ({self.spec_text or ''}) - topology of a simulated machine, not real hardware"
        return "GPU topology (NVML)"

    def rows(self) -> list[list[str]]:
        """The table as nvidia-smi prints it: a header, then per GPU its cells, CPU affinity and NUMA affinity."""
        head = ["", *(f"GPU{g.index}" for g in self.gpus), "CPU Affinity", "NUMA Affinity"]
        body = [[f"GPU{g.index}", *cells, g.cpu_affinity or "N/A", "N/A" if g.numa_node is None else str(g.numa_node)]
                for g, cells in zip(self.gpus, self.labels())]
        return [head, *body]

    def link_lines(self) -> list[str]:
        """Per pair: the medium and the estimates, and whether peer-to-peer works."""
        out = []
        for lk in self.links:
            a, b = self.gpu(lk.gpus[0]), self.gpu(lk.gpus[1])
            p2p = (f"P2P {lk.p2p_read or 'n/a'}" if lk.p2p_read == lk.p2p_write
                   else f"P2P read {lk.p2p_read or 'n/a'}, write {lk.p2p_write or 'n/a'}")
            out.append(f"GPU{lk.gpus[0]}-GPU{lk.gpus[1]}  {lk.label:<5} {lk.medium((a, b)):<14} "
                       f"{_gb(lk.estimated_bandwidth)} one way, {_us(lk.estimated_latency)} per hop; {p2p}")
        return out

    def error_lines(self) -> list[str]:
        out = [f"GPU {g.index} {name}: {why}" for g in self.gpus for name, why in g.errors.items()]
        out += [f"GPU {lk.gpus[0]}-{lk.gpus[1]} {name}: {why}" for lk in self.links for name, why in lk.errors.items()]
        return out

    def __repr__(self) -> str:
        if not self.gpus:
            return self.message or "no GPU found"
        rows = self.rows()
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [self.title()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines += ["", "Legend:", ""] + [f"  {code:<4} = {text}" for code, text in LEGEND]
        if self.links:
            lines += ["", "Links (estimates from published figures, not measured):"]
            lines += ["  " + line for line in self.link_lines()]
        errors = self.error_lines()
        if errors:
            lines += ["", "Not available:"] + ["  " + e for e in errors]
        return "\n".join(lines)
