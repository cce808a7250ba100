"""Published figures for links between GPUs, to estimate what a link can carry. Estimates, never measurements.

Bandwidth is one direction of the link (the datasheets' "bidirectional" totals are twice that):
- NVLink per link: NVLink 1 (P100) 20 GB/s; NVLink 2 (V100, 6 links = 300 GB/s total) 25 GB/s; NVLink 3 (A100,
  12 links = 600 GB/s) 25 GB/s, but 14.0625 GB/s on GA102 cards (RTX A6000 / RTX 3090 bridge, 4 links = 112.5
  GB/s); NVLink 4 (H100/H200, 18 links = 900 GB/s) 25 GB/s; NVLink 5 (B200, 18 links = 1.8 TB/s) 50 GB/s.
  Sources: NVIDIA's datasheets for those GPUs and the NVLink page (nvidia.com/en-us/data-center/nvlink).
- PCIe per lane after line coding (PCI-SIG): Gen3 8 GT/s x 128/130, Gen4 16 GT/s, Gen5 32 GT/s, Gen6 64 GT/s
  x 242/256 (FLIT); a Gen4 x16 link is 31.5 GB/s, Gen5 x16 63 GB/s. Real copies reach about 80-90% of it.

Latency is NCCL's own model of one hop of a small transfer (ring, LL protocol: NVLink 0.6 us, PCIe 1.0 us) and its
fixed cost per collective (6.6 us), from NCCL's src/graph/tuning.cc (NVIDIA/nccl, 5067397c, 2026-06).
"""

from __future__ import annotations

_GB = 1e9
NVLINK_PER_LINK = {1: 20 * _GB, 2: 25 * _GB, 3: 25 * _GB, 4: 25 * _GB, 5: 50 * _GB}  # bytes/s one way
GA102_NVLINK_PER_LINK = 14.0625 * _GB  # compute capability 8.6 cards with an NVLink bridge
PCIE_PER_LANE = {1: 0.25 * _GB, 2: 0.5 * _GB, 3: 8 / 8 * 128 / 130 * _GB, 4: 16 / 8 * 128 / 130 * _GB,
                 5: 32 / 8 * 128 / 130 * _GB, 6: 64 / 8 * 242 / 256 * _GB}
NVLINK_HOP_LATENCY = 0.6e-6  # s
PCIE_HOP_LATENCY = 1.0e-6  # s
COLLECTIVE_BASE_LATENCY = 6.6e-6  # s, once per all-reduce (NCCL ring, LL protocol)

# NVML's nvmlNvlinkVersion_t -> NVLink generation: 1.0, 2.0, 2.2, 3.0, 3.1, 4.0, 5.0, 6.0
_NVML_VERSION = {1: 1, 2: 2, 3: 2, 4: 3, 5: 3, 6: 4, 7: 5, 8: 6}
_BY_COMPUTE_CAPABILITY = {(6, 0): 1, (7, 0): 2, (8, 0): 3, (8, 6): 3, (9, 0): 4, (10, 0): 5}


def nvlink_generation(nvml_version: int | None = None, compute_capability: tuple[int, int] | None = None) -> int | None:
    """The NVLink generation from NVML's version value, else from the GPU's compute capability; None if unknown."""
    if nvml_version in _NVML_VERSION:
        return _NVML_VERSION[nvml_version]
    return _BY_COMPUTE_CAPABILITY.get(tuple(compute_capability)) if compute_capability else None


def nvlink_bandwidth(links: int | None, generation: int | None,
                     compute_capability: tuple[int, int] | None = None) -> float | None:
    """Bytes/s one way over `links` bonded NVLinks of that generation; None if the figures are not known."""
    if not links or generation is None:
        return None
    if generation == 3 and compute_capability is not None and tuple(compute_capability) == (8, 6):
        return links * GA102_NVLINK_PER_LINK
    per_link = NVLINK_PER_LINK.get(generation)
    return None if per_link is None else links * per_link


def pcie_bandwidth(generation: int | None, width: int | None) -> float | None:
    """Bytes/s one way over a PCIe link of that generation and lane count; None if either is not known."""
    if generation not in PCIE_PER_LANE or not width:
        return None
    return PCIE_PER_LANE[generation] * width
