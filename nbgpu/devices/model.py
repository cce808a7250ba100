"""What the inventory says about a GPU: plain dataclasses, None wherever a value is not available."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GPUProcess:
    pid: int
    name: str | None
    kind: str  # "compute" or "graphics" (both: "compute+graphics")
    used_memory: int | None  # bytes; NVML cannot always attribute memory (e.g. inside containers)


@dataclass(frozen=True)
class MIGDevice:
    uuid: str
    memory_total: int | None


@dataclass(frozen=True)
class GPU:
    index: int  # as nvidia-smi prints it (PCI bus order)
    uuid: str | None
    name: str | None
    pci_bus_id: str | None
    memory_total: int | None  # bytes
    memory_used: int | None  # as nvidia-smi counts it: processes and the driver's reserve
    memory_free: int | None
    utilization: int | None  # percent of time a kernel was running, last sample period
    temperature: int | None  # degrees C
    power_draw: float | None  # watts
    power_limit: float | None
    pstate: int | None  # 0 (max performance) .. 15
    persistence_mode: bool | None
    compute_capability: tuple[int, int] | None
    mig_mode: bool | None
    processes: tuple[GPUProcess, ...] | None = ()  # None: the process list is not available
    mig_devices: tuple[MIGDevice, ...] = ()
    memory_bandwidth: float | None = None  # bytes/s, peak, where known (NVML clocks or the specs table)
    bf16_flops: float | None = None  # FLOP/s, dense tensor-core peak, where the model is in the specs table
    memory_reserved: int | None = None  # part of memory_used the driver keeps for itself (NVML v2), not a process
    simulated: bool = False
    errors: dict[str, str] = field(default_factory=dict, compare=False)  # field -> why it is n/a

    @property
    def pstate_label(self) -> str:
        return "n/a" if self.pstate is None else f"P{self.pstate}"

    @property
    def compute_capability_label(self) -> str:
        return "n/a" if self.compute_capability is None else "%d.%d" % self.compute_capability


@dataclass(frozen=True)
class Inventory:
    """One reading of every GPU on the machine, with where it came from."""

    gpus: tuple[GPU, ...]
    backend: str  # "nvml" or "simulated"
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    message: str | None = None  # why there are no GPUs, when there are none

    @property
    def simulated(self) -> bool:
        return self.backend == "simulated"

    def __len__(self) -> int:
        return len(self.gpus)

    def __iter__(self):
        return iter(self.gpus)

    def __getitem__(self, index: int) -> GPU:
        return self.gpus[index]
