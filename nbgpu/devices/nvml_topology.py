"""The links between GPUs, read from NVML (nvidia-ml-py) the way `nvidia-smi topo -m` shows them.

Per GPU: its active NVLinks and what each one reaches (NVML's remote PCI bus id and device type), its PCIe link and
CPU/NUMA affinity. Per pair: the PCIe common ancestor and the peer-to-peer status. A pair's NV# counts the NVLinks
from one GPU straight to the other, plus, when both reach NVSwitches, the links each has into the switch fabric
(the smaller of the two): an HGX H100 shows NV18 between every pair, as nvidia-smi does.

Every NVML error makes that one field None and is noted in `errors`; a GPU whose NVLinks NVML does not support
(NotSupported, or InvalidArgument for link numbers it lacks) simply has none.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable
from itertools import combinations
from typing import Any

from . import link_figures
from .topology import GPUInterconnect, Link, Topology, estimate


def _text(value) -> str:
    """NVML answers bytes in older bindings, str in newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)

# NVML_TOPOLOGY_* -> nvidia-smi's name; INTERNAL (two GPUs on one board, joined by the board's own switch) is PIX
_PATHS = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
_P2P = {0: "OK", 1: "chipset not supported", 2: "GPU not supported", 3: "topology not supported",
        4: "disabled by registry key", 5: "not supported", 6: "unknown"}
_GPU, _SWITCH = 0, 2  # NVML_NVLINK_DEVICE_TYPE_GPU, _SWITCH
_BUS = re.compile(r"([0-9a-fA-F]+):([0-9a-fA-F]+):([0-9a-fA-F]+)\.([0-7])")


def _bus_key(bus_id: Any) -> tuple[int, ...] | None:
    """'00000000:07:00.0' and '0000:07:00.0' -> (0, 7, 0, 0): NVML writes the domain with 8 or 4 digits."""
    match = _BUS.search(_text(bus_id or ""))
    return tuple(int(g, 16) for g in match.groups()) if match else None


def _index(value: Any) -> int:
    # nvidia-ml-py 13.x defines NVML_P2P_CAPS_INDEX_READ as the tuple (0,) (a stray comma), which ctypes refuses
    return int(value[0]) if isinstance(value, tuple) else int(value)


def _cpu_ranges(mask_words) -> str | None:
    """NVML's CPU affinity bitmask (64-bit words) -> '0-55,112-167'."""
    cpus = [w * 64 + b for w, word in enumerate(mask_words) for b in range(64) if int(word) >> b & 1]
    if not cpus:
        return None
    runs, start = [], cpus[0]
    for prev, cpu in zip(cpus, cpus[1:] + [None]):
        if cpu != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cpu
    return ",".join(runs)


class _Reader:
    def __init__(self, nv):
        self.nv = nv
        self.absent = tuple(c for c in (getattr(nv, "NVMLError_NotSupported", None),
                                        getattr(nv, "NVMLError_InvalidArgument", None)) if c)

    def get(self, errors: dict[str, str], name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except (self.nv.NVMLError, ctypes.ArgumentError) as err:  # ArgumentError: a binding that ctypes refuses
            errors[name] = _text(err) or type(err).__name__
        except AttributeError:  # an older nvidia-ml-py without this function
            errors[name] = "not in this nvidia-ml-py version"
        return None

    def nvlinks(self, h: Any, errors: dict[str, str]) -> list[tuple] | None:
        """(remote bus key, remote device type or None, NVML version or None) per active NVLink; None: n/a."""
        nv, out = self.nv, []
        for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if nv.nvmlDeviceGetNvLinkState(h, link) != getattr(nv, "NVML_FEATURE_ENABLED", 1):
                    continue
                remote = nv.nvmlDeviceGetNvLinkRemotePciInfo(h, link)
            except self.absent:
                continue  # no such link on this GPU
            except (nv.NVMLError, ctypes.ArgumentError, AttributeError) as err:
                errors["nvlink"] = f"link {link}: {_text(err) or type(err).__name__}"
                return None
            bus = _bus_key(getattr(remote, "busId", None)) or _bus_key(getattr(remote, "busIdLegacy", None))
            kind = self.get({}, "type", lambda link=link: nv.nvmlDeviceGetNvLinkRemoteDeviceType(h, link))
            version = self.get({}, "version", lambda link=link: nv.nvmlDeviceGetNvLinkVersion(h, link))
            out.append((bus, kind, version))
        return out

    def gpu(self, i: int, h: Any) -> tuple[GPUInterconnect, list[tuple] | None]:
        nv, get = self.nv, self.get
        if h is None:
            return GPUInterconnect(i, None, None, None, None, None, None, None,
                                   errors={"gpu": "the GPU could not be opened (lost or no permission)"}), None
        errors: dict[str, str] = {}
        cc = get(errors, "compute_capability", lambda: tuple(nv.nvmlDeviceGetCudaComputeCapability(h)))
        links = self.nvlinks(h, errors)
        versions = [v for _, _, v in links or () if v]
        words = max(16, -(-(os.cpu_count() or 1) // 64))  # 64 CPUs a word; NVML truncates to what fits
        numa = get(errors, "numa_node", lambda: nv.nvmlDeviceGetNumaNodeId(h))
        end = GPUInterconnect(
            index=i,
            name=get(errors, "name", lambda: _text(nv.nvmlDeviceGetName(h))),
            pci_bus_id=get(errors, "pci_bus_id", lambda: _text(nv.nvmlDeviceGetPciInfo(h).busId)),
            compute_capability=cc,
            pcie_generation=get(errors, "pcie_generation", lambda: nv.nvmlDeviceGetMaxPcieLinkGeneration(h)),
            pcie_width=get(errors, "pcie_width", lambda: nv.nvmlDeviceGetMaxPcieLinkWidth(h)),
            nvlink_generation=link_figures.nvlink_generation(versions[0] if versions else None, cc) if links else None,
            nvlinks=None if links is None else len(links),
            cpu_affinity=get(errors, "cpu_affinity", lambda: _cpu_ranges(nv.nvmlDeviceGetCpuAffinity(h, words))),
            numa_node=None if numa is None or numa < 0 else int(numa),
            errors=errors,
        )
        return end, links

    def pair(self, a: GPUInterconnect, b: GPUInterconnect, ha: Any, hb: Any, links_a, links_b) -> Link:
        nv, get = self.nv, self.get
        errors: dict[str, str] = {}
        if ha is None or hb is None:
            return Link((a.index, b.index), None, None, None, None, None, None, None,
                        errors={"link": "a GPU could not be opened"})
        level = get(errors, "path", lambda: nv.nvmlDeviceGetTopologyCommonAncestor(ha, hb))
        path = _PATHS.get(level) if level is not None else None
        p2p = {}
        for name in ("read", "write"):
            const = getattr(nv, f"NVML_P2P_CAPS_INDEX_{name.upper()}", None)
            status = get(errors, f"p2p_{name}", lambda const=const: nv.nvmlDeviceGetP2PStatus(ha, hb, _index(const)))
            p2p[name] = None if status is None else _P2P.get(status, f"status {status}")
        versions, nvlinks = _nvlinks_between(a, b, links_a, links_b)
        versions = [v for v in versions if v]
        generation = None
        if nvlinks:
            generation = link_figures.nvlink_generation(versions[0] if versions else None,
                                                        a.compute_capability or b.compute_capability)
        bandwidth, latency = estimate(path, nvlinks, generation, a, b)
        return Link((a.index, b.index), path, nvlinks, generation, p2p["read"], p2p["write"], bandwidth, latency,
                    errors=errors)


def _nvlinks_between(a: GPUInterconnect, b: GPUInterconnect, links_a, links_b) -> tuple[list, int | None]:
    """(NVML versions of the links, count) between a and b. A direct link shows at both ends, so one end's list
    is enough for those; links into NVSwitches count only when both ends' lists are known."""
    if links_a is None and links_b is None:
        return [], None
    mine, peer = (links_a, b) if links_a is not None else (links_b, a)
    key = _bus_key(peer.pci_bus_id)
    direct = [v for bus, kind, v in mine if kind != _SWITCH and key is not None and bus == key]
    switched = [[v for _, kind, v in links if kind == _SWITCH] if links is not None else None
                for links in (links_a, links_b)]
    if None in switched:
        known = next(s for s in switched if s is not None)
        return direct, None if known else len(direct)  # one end reaches switches, the other cannot say
    count = min(len(switched[0]), len(switched[1]))
    return direct + switched[0], len(direct) + count


def read(nv, handles: list[Any]) -> Topology:
    """The topology of the GPUs behind `handles` (index order); `nv` is the initialised pynvml module."""
    reader = _Reader(nv)
    ends, links = zip(*(reader.gpu(i, h) for i, h in enumerate(handles))) if handles else ((), ())
    # where NVML cannot say what a link reaches (older drivers), a bus that is no GPU's is an NVSwitch
    gpu_buses = {_bus_key(e.pci_bus_id) for e in ends} - {None}
    links = [None if ls is None else [(bus, kind if kind is not None else (_GPU if bus in gpu_buses else _SWITCH), v)
                                      for bus, kind, v in ls] for ls in links]
    pairs = tuple(reader.pair(ends[i], ends[j], handles[i], handles[j], links[i], links[j])
                  for i, j in combinations(range(len(handles)), 2))
    return Topology(gpus=tuple(ends), links=pairs, backend="nvml")
