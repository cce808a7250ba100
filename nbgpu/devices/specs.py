"""Published figures for common data-centre and workstation GPUs.

Used to build simulated GPUs by name and to estimate the memory-bandwidth roofline when NVML cannot say.
Bandwidth is the vendor's peak (bytes/s); real kernels reach 80-90% of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import GiB


@dataclass(frozen=True)
class GPUSpec:
    key: str  # the short name a user types: "A100-80GB"
    name: str  # as NVML reports it
    memory: int  # bytes
    bandwidth: float  # bytes/s
    bf16_tflops: float | None
    compute_capability: tuple[int, int]


_TB = 1e12
SPECS: dict[str, GPUSpec] = {
    s.key.lower(): s
    for s in [
        GPUSpec("H200", "NVIDIA H200", 141 * 10**9, 4.8 * _TB, 989, (9, 0)),
        GPUSpec("H100", "NVIDIA H100 80GB HBM3", 80 * GiB, 3.35 * _TB, 989, (9, 0)),
        GPUSpec("H100-PCIE", "NVIDIA H100 PCIe", 80 * GiB, 2.0 * _TB, 756, (9, 0)),
        GPUSpec("A100-80GB", "NVIDIA A100-SXM4-80GB", 80 * GiB, 2.039 * _TB, 312, (8, 0)),
        GPUSpec("A100-40GB", "NVIDIA A100-SXM4-40GB", 40 * GiB, 1.555 * _TB, 312, (8, 0)),
        GPUSpec("L40S", "NVIDIA L40S", 48 * GiB, 0.864 * _TB, 362, (8, 9)),
        GPUSpec("L4", "NVIDIA L4", 24 * GiB, 0.3 * _TB, 121, (8, 9)),
        GPUSpec("A10G", "NVIDIA A10G", 24 * GiB, 0.6 * _TB, 70, (8, 6)),
        GPUSpec("A6000", "NVIDIA RTX A6000", 48 * GiB, 0.768 * _TB, 155, (8, 6)),
        GPUSpec("RTX4090", "NVIDIA GeForce RTX 4090", 24 * GiB, 1.008 * _TB, 165, (8, 9)),
        GPUSpec("RTX3090", "NVIDIA GeForce RTX 3090", 24 * GiB, 0.936 * _TB, 71, (8, 6)),
        GPUSpec("V100", "Tesla V100-SXM2-32GB", 32 * GiB, 0.9 * _TB, None, (7, 0)),
        GPUSpec("T4", "Tesla T4", 16 * GiB, 0.32 * _TB, 65, (7, 5)),
    ]
}
ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "4090": "rtx4090", "3090": "rtx3090", "v100-32gb": "v100"}


def lookup(key: str) -> GPUSpec | None:
    """A spec by the short name a user types (case-insensitive), or None."""
    key = key.strip().lower().replace(" ", "")
    return SPECS.get(ALIASES.get(key, key))


def match_name(nvml_name: str | None) -> GPUSpec | None:
    """The spec whose NVML name best matches a real GPU's name, for bandwidth when NVML lacks it."""
    if not nvml_name:
        return None
    name = nvml_name.lower()
    exact = [s for s in SPECS.values() if s.name.lower() == name]
    if exact:
        return exact[0]
    # longest key contained in the name wins: "H100 PCIe" before "H100"
    hits = [s for s in SPECS.values() if s.key.lower().replace("-", " ") in name.replace("-", " ")]
    return max(hits, key=lambda s: len(s.key)) if hits else None


def known_names() -> list[str]:
    return [s.key for s in SPECS.values()]
