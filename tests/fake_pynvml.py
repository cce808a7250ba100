"""A stand-in for the `pynvml` module (nvidia-ml-py) with the same names, errors and return shapes,
so the NVML adapter's translation and failure handling can be tested without a GPU.

Each fake GPU is a dict of field values; `fail[(index, function_name)] = ErrorClass` makes that call raise.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_MEM = 2
GiB = 1024**3


class NVMLError(Exception):
    def __str__(self):
        return type(self).__doc__ or type(self).__name__


class NVMLError_LibraryNotFound(NVMLError):
    """NVML Shared Library Not Found"""


class NVMLError_NotSupported(NVMLError):
    """Not Supported"""


class NVMLError_NoPermission(NVMLError):
    """Insufficient Permissions"""


class NVMLError_GpuIsLost(NVMLError):
    """GPU is lost"""


@dataclass
class FakeGPU:
    uuid: str
    name: str = "NVIDIA A100-SXM4-80GB"
    bus_id: str = "00000000:07:00.0"
    total: int = 80 * GiB
    used: int = 3 * GiB
    util: int = 12
    temperature: int = 41
    power_mw: int = 95_000
    limit_mw: int = 400_000
    pstate: int = 0
    persistence: int = 1
    cc: tuple = (8, 0)
    mig: int = 0
    mem_clock_mhz: int = 1593
    bus_width: int = 5120
    compute: list = field(default_factory=list)  # [(pid, bytes)]
    graphics: list = field(default_factory=list)


def make(gpus: list[FakeGPU], fail: dict | None = None, init_error: type | None = None,
         names: dict[int, str] | None = None) -> types.ModuleType:
    """A module object that behaves like pynvml over the given fake GPUs."""
    fail = fail if fail is not None else {}
    names = names or {}
    mod = types.ModuleType("pynvml")
    mod.__dict__.update(
        NVML_TEMPERATURE_GPU=NVML_TEMPERATURE_GPU, NVML_CLOCK_MEM=NVML_CLOCK_MEM, NVMLError=NVMLError,
        NVMLError_LibraryNotFound=NVMLError_LibraryNotFound, NVMLError_NotSupported=NVMLError_NotSupported,
        NVMLError_NoPermission=NVMLError_NoPermission, NVMLError_GpuIsLost=NVMLError_GpuIsLost,
        gpus=gpus, fail=fail, calls=[],
    )

    def api(name, fn):
        def call(*args):
            mod.calls.append(name)
            index = args[0] if args and isinstance(args[0], int) else None
            err = fail.get((index, name)) or fail.get((None, name))
            if err:
                raise err()
            return fn(*args)

        setattr(mod, name, call)

    def proc(pid, used):
        return types.SimpleNamespace(pid=pid, usedGpuMemory=used)

    def init():
        if init_error:
            raise init_error()

    api("nvmlInit", init)
    api("nvmlShutdown", lambda: None)
    api("nvmlSystemGetDriverVersion", lambda: "580.159.04")
    api("nvmlSystemGetCudaDriverVersion", lambda: 13000)
    api("nvmlDeviceGetCount", lambda: len(gpus))
    api("nvmlDeviceGetHandleByIndex", lambda i: i)  # a handle is the index
    api("nvmlDeviceGetUUID", lambda h: gpus[h].uuid)
    api("nvmlDeviceGetName", lambda h: gpus[h].name)
    api("nvmlDeviceGetPciInfo", lambda h: types.SimpleNamespace(busId=gpus[h].bus_id))
    api("nvmlDeviceGetMemoryInfo", lambda h: types.SimpleNamespace(
        total=gpus[h].total, used=gpus[h].used, free=gpus[h].total - gpus[h].used))
    api("nvmlDeviceGetUtilizationRates", lambda h: types.SimpleNamespace(gpu=gpus[h].util, memory=0))
    api("nvmlDeviceGetTemperature", lambda h, sensor: gpus[h].temperature)
    api("nvmlDeviceGetPowerUsage", lambda h: gpus[h].power_mw)
    api("nvmlDeviceGetEnforcedPowerLimit", lambda h: gpus[h].limit_mw)
    api("nvmlDeviceGetPerformanceState", lambda h: gpus[h].pstate)
    api("nvmlDeviceGetPersistenceMode", lambda h: gpus[h].persistence)
    api("nvmlDeviceGetCudaComputeCapability", lambda h: gpus[h].cc)
    api("nvmlDeviceGetMigMode", lambda h: (gpus[h].mig, gpus[h].mig))
    api("nvmlDeviceGetMaxClockInfo", lambda h, clock: gpus[h].mem_clock_mhz)
    api("nvmlDeviceGetMemoryBusWidth", lambda h: gpus[h].bus_width)
    api("nvmlDeviceGetComputeRunningProcesses", lambda h: [proc(p, m) for p, m in gpus[h].compute])
    api("nvmlDeviceGetGraphicsRunningProcesses", lambda h: [proc(p, m) for p, m in gpus[h].graphics])
    api("nvmlSystemGetProcessName", lambda pid: names.get(pid, f"/usr/bin/proc{pid}").encode())
    api("nvmlDeviceGetMaxMigDeviceCount", lambda h: 0)
    return mod


def uuid(i: int) -> str:
    return f"GPU-{i:08x}-1111-2222-3333-444455556666"
