"""What `nbgpu.load` measured: per GPU the plan's figures beside the memory the load took (the layer split's
in-process load and the tensor-parallel workers report alike)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..units import format_size

SIMULATED_NOTE = "simulated — ran on CPU"
TOLERANCE = 0.05  # measured vs planned: a larger difference is worth a warning


@dataclass(frozen=True)
class GPUMemory:
    """One GPU after a load: the plan's figures beside what was measured (bytes; None where not available)."""

    cuda_index: int
    gpu_index: int | None  # physical (nvidia-smi) index
    gpu_name: str | None
    planned_weights: int | None
    planned_total: int | None  # weights + KV cache + activations + context + others, at the plan's batch/seq_len
    weights: int  # bytes of the loaded tensors placed on this GPU
    allocated: int | None  # torch allocator: what this load added
    reserved: int | None  # torch allocator: reserved now
    peak_reserved: int | None
    nvml_process: int | None  # NVML: this process's memory on the GPU
    nvml_used: int | None  # NVML: the whole GPU

    @property
    def measured(self) -> int:
        """The figure compared with the planned weights: the allocator's on a GPU, the tensors' bytes when simulated."""
        return self.allocated if self.allocated is not None else self.weights

    @property
    def difference(self) -> float | None:
        if not self.planned_weights:
            return None
        return (self.measured - self.planned_weights) / self.planned_weights

    @property
    def off_plan(self) -> bool:
        """The measured weights differ from the plan's by more than TOLERANCE (worth a warning)."""
        return self.difference is not None and abs(self.difference) > TOLERANCE


@dataclass
class LoadReport:
    """What `nbgpu.load` did: where the model went and the memory it took, measured, beside the plan."""

    source: str
    plan: object | None
    simulated: bool
    placement: dict  # module -> device on the (simulated) GPUs
    gpus: list[GPUMemory]
    seconds: float
    dtype: str
    cpu_weights: int = 0
    disk_weights: int = 0
    warnings: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        head = f"nbgpu.load({self.source!r}) in {self.seconds:.1f} s, {self.dtype}"
        if self.simulated:
            head += f" [{SIMULATED_NOTE}; memory shown on the simulated GPUs]"
        lines = [head]
        for g in self.gpus:
            diff = "" if g.difference is None else f" ({g.difference:+.1%} vs plan)"
            alloc = "n/a (" + SIMULATED_NOTE + ")" if g.allocated is None else format_size(g.allocated, "auto")
            lines.append(f"  cuda:{g.cuda_index} {g.gpu_name or 'n/a'}: planned weights "
                         f"{format_size(g.planned_weights, 'auto')}, tensors {format_size(g.weights, 'auto')}, "
                         f"allocated {alloc}{diff}, NVML this process {format_size(g.nvml_process, 'auto')}")
        if not self.gpus:
            lines.append(f"  on the CPU (no GPU): {format_size(self.cpu_weights, 'auto')}")
        elif self.cpu_weights or self.disk_weights:
            lines.append(f"  offloaded: {format_size(self.cpu_weights, 'auto')} on CPU, "
                         f"{format_size(self.disk_weights, 'auto')} on disk")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def differences(report: LoadReport) -> list[str]:
    out = []
    what = "tensors' bytes" if report.simulated else "allocated memory"
    for g in report.gpus:
        if g.off_plan:
            out.append(f"cuda:{g.cuda_index}: {what} {format_size(g.measured, 'auto')} differs from the planned "
                       f"weights {format_size(g.planned_weights, 'auto')} by {g.difference:+.1%}")
    return out


def show(report: LoadReport) -> None:
    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython
    from IPython.display import display

    if get_ipython() is not None:
        display(report)
