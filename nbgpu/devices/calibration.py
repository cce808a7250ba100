"""Figures of the memory model that only hardware can give, in one table, with what they were measured on.

Each figure was measured with `bench/plan_vs_measured.py` on the machine named in `MEASURED_ON` (random-weight Llama
shapes of 1B and 8B parameters, bf16, sdpa attention, batch x prompt up to 8 x 8192, one GPU, a layer split over two and
tensor parallelism over two). Other GPUs, drivers and torch versions differ somewhat; every figure taken from here is
labelled "calibrated" where it is shown. The simulated GPUs use the same context figure.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024**2


@dataclass(frozen=True)
class Calibration:
    measured_on: str
    # NVML's memory of this process less what torch's allocator reserved, after a first generate (CUDA context,
    # kernels of cuBLAS and attention loaded): 0.672-0.678 GiB in every run
    context: int
    # cuBLAS's workspace, taken through torch's allocator by the first matrix product on a device (34 MB seen)
    workspace: int
    # the allocator keeps more than it hands out: reserved - allocated at the peak, as a multiple of the largest
    # prefill block (batch x prompt x MLP width). 1.07-1.94 seen for a layer split or one GPU; 2.8 tensor-parallel
    slack_blocks: float
    slack_blocks_tensor: float
    # a tensor-parallel worker's NVML memory beyond torch's reserved pool and the context: NCCL's buffers and the
    # peers' mappings, per GPU, for 2 workers (3.78 GiB NVML - reserved seen, less the context)
    communication: int


MEASURED_ON = "2 x NVIDIA H200, driver 580.159.04, torch 2.11.0+cu130, CUDA 13.0, transformers 5.24.0 (2026-11-25)"

DEFAULT = Calibration(
    measured_on=MEASURED_ON,
    context=691 * MiB,
    workspace=32 * MiB,
    slack_blocks=1.5,
    slack_blocks_tensor=2.8,
    communication=3174 * MiB,
)
