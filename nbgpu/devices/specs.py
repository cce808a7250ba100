"""Published figures for common data-centre and workstation GPUs.

Used to build simulated GPUs by name (memory, bandwidth, compute, power, links) and to estimate the
memory-bandwidth roofline when NVML cannot say. Bandwidth is the vendor's peak (bytes/s); real kernels reach
80-90% of it. bf16 is dense tensor-core throughput (the datasheets' headline figures with sparsity are twice
that); None where the GPU has no bf16 tensor cores.

Idle power is not in any datasheet: it is a typical nvidia-smi reading of the idle GPU (no process, 0%
utilisation; P0 for data-centre GPUs in persistence mode, else P8) in public nvidia-smi outputs, rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..units import GiB


@dataclass(frozen=True)
class GPUSpec:
    key: str  # the short name a user types: "A100-80GB"
    name: str  # as NVML reports it
    memory: int  # bytes
    bandwidth: float  # bytes/s, memory
    bf16_tflops: float | None  # dense; None: no bf16 tensor cores
    compute_capability: tuple[int, int]
    power_limit: float  # W, the board's default limit (TDP)
    idle_power: float  # W, typical idle reading (see above)
    pcie_generation: int  # x16 for every GPU here
    nvlink_generation: int | None = None  # None: no NVLink
    nvlinks: int | None = None  # NVLinks per GPU
    nvlink_bridge: bool = False  # True: a bridge joins two cards; False: every GPU reaches every other (NVSwitch)
    pcie_p2p: bool = True  # False: the driver refuses peer-to-peer over PCIe (GeForce cards)

    @property
    def bf16_flops(self) -> float | None:
        return None if self.bf16_tflops is None else self.bf16_tflops * 1e12

    @property
    def default_link(self) -> str:
        """How several of these are usually joined: SXM boards by NVLink (NVSwitch), cards by PCIe."""
        return "nvlink" if self.nvlink_generation and not self.nvlink_bridge else "pcie"


_TB = 1e12
# Sources, per row: the vendor's datasheet (power limit, bandwidth, bf16, PCIe and NVLink), and the idle reading.
SPECS: dict[str, GPUSpec] = {
    s.key.lower(): s
    for s in [
        # H200 SXM datasheet (nvidia.com/en-us/data-center/h200): 4.8 TB/s, 989 TF bf16, up to 700 W, NVLink 900 GB/s
        # (NVLink 4, 18 links), PCIe Gen5; idle 73-76 W
        GPUSpec("H200", "NVIDIA H200", 141 * 10**9, 4.8 * _TB, 989, (9, 0), 700, 75, 5, 4, 18),
        # H100 SXM5 datasheet: 3.35 TB/s, 989 TF, up to 700 W, NVLink 900 GB/s (18 links), PCIe Gen5; idle 68-73 W
        GPUSpec("H100", "NVIDIA H100 80GB HBM3", 80 * GiB, 3.35 * _TB, 989, (9, 0), 700, 70, 5, 4, 18),
        # H100 PCIe datasheet: 2.0 TB/s, 756 TF, 350 W, NVLink bridge 600 GB/s (12 links), PCIe Gen5; idle 46-49 W
        GPUSpec("H100-PCIE", "NVIDIA H100 PCIe", 80 * GiB, 2.0 * _TB, 756, (9, 0), 350, 48, 5, 4, 12,
                nvlink_bridge=True),
        # A100 datasheet (SXM4 80GB): 2,039 GB/s, 312 TF, 400 W, NVLink 600 GB/s (NVLink 3, 12 links), PCIe Gen4;
        # idle 46-51 W
        GPUSpec("A100-80GB", "NVIDIA A100-SXM4-80GB", 80 * GiB, 2.039 * _TB, 312, (8, 0), 400, 50, 4, 3, 12),
        # A100 datasheet (SXM4 40GB): 1,555 GB/s, 312 TF, 400 W, NVLink 600 GB/s, PCIe Gen4; idle 46-51 W
        GPUSpec("A100-40GB", "NVIDIA A100-SXM4-40GB", 40 * GiB, 1.555 * _TB, 312, (8, 0), 400, 50, 4, 3, 12),
        # L40S datasheet: 864 GB/s, 362 TF, 350 W, no NVLink, PCIe Gen4; idle (P8) 22-34 W
        GPUSpec("L40S", "NVIDIA L40S", 48 * GiB, 0.864 * _TB, 362, (8, 9), 350, 30, 4),
        # L4 datasheet: 300 GB/s, 121 TF, 72 W, no NVLink, PCIe Gen4 x16; idle (P8) 12-19 W
        GPUSpec("L4", "NVIDIA L4", 24 * GiB, 0.3 * _TB, 121, (8, 9), 72, 16, 4),
        # A10G: an AWS variant of the A10 without a public NVIDIA datasheet: 600 GB/s as the A10 datasheet (same
        # GDDR6); 70 TF bf16 unconfirmed (the A10 datasheet gives 125 TF); the 300 W limit as nvidia-smi reports on
        # AWS G5; PCIe Gen4; idle (P8) 9-11 W
        GPUSpec("A10G", "NVIDIA A10G", 24 * GiB, 0.6 * _TB, 70, (8, 6), 300, 10, 4),
        # RTX A6000 datasheet: 768 GB/s, 310 TF tensor with sparsity, 300 W, NVLink bridge 112.5 GB/s (4 links),
        # PCIe Gen4; idle (P8) 17-27 W
        GPUSpec("A6000", "NVIDIA RTX A6000", 48 * GiB, 0.768 * _TB, 155, (8, 6), 300, 25, 4, 3, 4, nvlink_bridge=True),
        # Ada whitepaper (RTX 4090): 1,008 GB/s, 165 TF bf16 with FP32 accumulate, 450 W, no NVLink, PCIe Gen4,
        # no peer-to-peer; idle (P8) 13-24 W
        GPUSpec("RTX4090", "NVIDIA GeForce RTX 4090", 24 * GiB, 1.008 * _TB, 165, (8, 9), 450, 20, 4,
                pcie_p2p=False),
        # Ampere GA102 whitepaper (RTX 3090): 936 GB/s, 71 TF bf16 with FP32 accumulate, 350 W, NVLink bridge
        # 112.5 GB/s (4 links), PCIe Gen4, no peer-to-peer over PCIe; idle (P8) 20-38 W
        GPUSpec("RTX3090", "NVIDIA GeForce RTX 3090", 24 * GiB, 0.936 * _TB, 71, (8, 6), 350, 25, 4, 3, 4,
                nvlink_bridge=True, pcie_p2p=False),
        # V100 datasheet (SXM2 32GB): 900 GB/s, no bf16, 300 W, NVLink 300 GB/s (NVLink 2, 6 links), PCIe Gen3;
        # idle 39-44 W
        GPUSpec("V100", "Tesla V100-SXM2-32GB", 32 * GiB, 0.9 * _TB, None, (7, 0), 300, 40, 3, 2, 6),
        # T4 datasheet: 320 GB/s, no bf16 (65 TF is fp16), 70 W, no NVLink, PCIe Gen3 x16; idle (P8) 8-9 W
        GPUSpec("T4", "Tesla T4", 16 * GiB, 0.32 * _TB, None, (7, 5), 70, 9, 3),
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
