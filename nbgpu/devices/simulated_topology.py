"""The links of a simulated machine, from its spec's groups (see simulated.py for the grammar).

Within a group, the group's link (GPUs joined by NVLink sit on one PCIe host bridge underneath, PHB); between
groups, SYS. Peer-to-peer works over NVLink and over PCIe paths that stay
on one CPU socket, except on models whose driver refuses it (GeForce cards); across sockets (SYS) it does not, as
NVML usually reports on such machines.
"""

from __future__ import annotations

from itertools import combinations

from .topology import GPUInterconnect, Link, Topology, estimate


def pci_bus_id(i: int) -> str:
    """A simulated GPU's PCI bus id, one bus per GPU."""
    return f"00000000:{0x10 + i:02X}:00.0"


def _ends(groups: list) -> list[tuple[int, GPUInterconnect]]:
    """(group number, the GPU's end of its links) per GPU, in index order."""
    out = []
    for number, g in enumerate(groups):
        s = g.spec
        for k in range(g.count):
            i = len(out)
            unpaired = s is not None and s.nvlink_bridge and k == g.count - 1 and g.count % 2  # no card to bridge to
            nvlinks = s.nvlinks if g.link == "nvlink" and not unpaired else 0
            out.append((number, GPUInterconnect(
                index=i, name=g.name, pci_bus_id=pci_bus_id(i),
                compute_capability=s.compute_capability if s else None,
                pcie_generation=s.pcie_generation if s else None, pcie_width=16 if s else None,
                nvlink_generation=s.nvlink_generation if nvlinks else None, nvlinks=nvlinks,
            )))
    return out


def _link(groups: list, first: dict[int, int], ga: int, a: GPUInterconnect, gb: int,
          b: GPUInterconnect) -> Link:
    group = groups[ga]
    nvlinks = 0
    if ga != gb:
        path = "SYS"
    elif group.link == "nvlink":
        path = "PHB"
        bridged = (a.index - first[ga]) // 2 == (b.index - first[ga]) // 2  # cards 0-1, 2-3, ... share a bridge
        nvlinks = group.spec.nvlinks if not group.spec.nvlink_bridge or bridged else 0
    else:
        path = group.link.upper()
    generation = group.spec.nvlink_generation if nvlinks else None
    if nvlinks:
        p2p = "OK"
    elif path == "SYS":
        p2p = "topology not supported"
    else:
        p2p = "OK" if all(groups[g].spec is None or groups[g].spec.pcie_p2p for g in (ga, gb)) else "GPU not supported"
    bandwidth, latency = estimate(path, nvlinks, generation, a, b)
    return Link((a.index, b.index), path, nvlinks, generation, p2p, p2p, bandwidth, latency)


def build(groups: list, spec_text: str) -> Topology:
    ends = _ends(groups)
    first: dict[int, int] = {}
    for number, end in ends:
        first.setdefault(number, end.index)
    links = tuple(_link(groups, first, ga, a, gb, b) for (ga, a), (gb, b) in combinations(ends, 2))
    return Topology(gpus=tuple(e for _, e in ends), links=links, backend="simulated", spec_text=spec_text)

