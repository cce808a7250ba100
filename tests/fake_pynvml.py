"""A stand-in for the `pynvml` module (nvidia-ml-py) with the same names, errors and return shapes,
so the NVML adapter's translation and failure handling can be tested without a GPU.

Each fake GPU is a dict of field values; `fail[(index, function_name)] = ErrorClass` makes that call raise.
Topology: each FakeGPU lists its NVLinks (what each one reaches), and `make(ancestors=..., p2p=...)` gives the PCIe
common ancestor and the peer-to-peer status per pair; without `ancestors` the topology calls answer Not Supported.
"""

from __future__ import annotations

import ctypes
import types
from dataclasses import dataclass, field

NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_MEM = 2
GiB = 1024**3
# the values of nvidia-ml-py 13.x (pynvml.py), including its NVML_P2P_CAPS_INDEX_READ = 0, (a tuple)
TOPOLOGY = dict(NVML_TOPOLOGY_INTERNAL=0, NVML_TOPOLOGY_SINGLE=10, NVML_TOPOLOGY_MULTIPLE=20,
                NVML_TOPOLOGY_HOSTBRIDGE=30, NVML_TOPOLOGY_NODE=40, NVML_TOPOLOGY_SYSTEM=50,
                NVML_P2P_CAPS_INDEX_READ=(0,), NVML_P2P_CAPS_INDEX_WRITE=1, NVML_P2P_STATUS_OK=0,
                NVML_P2P_STATUS_IOH_TOPOLOGY_NOT_SUPPORTED=3, NVML_P2P_STATUS_GPU_NOT_SUPPORTED=2,
                NVML_NVLINK_MAX_LINKS=36, NVML_FEATURE_ENABLED=1, NVML_FEATURE_DISABLED=0,
                NVML_NVLINK_DEVICE_TYPE_GPU=0, NVML_NVLINK_DEVICE_TYPE_SWITCH=2, NVML_NVLINK_VERSION_4_0=6)
GPU_LINK, SWITCH_LINK = 0, 2  # NVML_NVLINK_DEVICE_TYPE_*


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


class NVMLError_InvalidArgument(NVMLError):
    """Invalid Argument"""


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
    # per NVLink number: None (down) or (remote bus id, GPU_LINK or SWITCH_LINK); [] = no NVLink (Not Supported)
    nvlinks: list = field(default_factory=list)
    nvlink_version: int = 6  # NVML_NVLINK_VERSION_4_0
    pcie_gen: int = 4
    pcie_width: int = 16
    numa: int = 0
    cpus: tuple = tuple(range(16))


def make(gpus: list[FakeGPU], fail: dict | None = None, init_error: type | None = None,
         names: dict[int, str] | None = None, ancestors: dict | None = None,
         p2p: dict | None = None) -> types.ModuleType:
    """A module object that behaves like pynvml over the given fake GPUs.

    ancestors: {(i, j): NVML_TOPOLOGY_* level} per pair (either order); p2p: {(i, j): status} for both read and
    write, or {(i, j, "read"): status}; pairs not given are NVML_P2P_STATUS_OK."""
    fail = fail if fail is not None else {}
    names = names or {}
    p2p = p2p or {}
    mod = types.ModuleType("pynvml")
    mod.__dict__.update(
        NVML_TEMPERATURE_GPU=NVML_TEMPERATURE_GPU, NVML_CLOCK_MEM=NVML_CLOCK_MEM, NVMLError=NVMLError,
        NVMLError_LibraryNotFound=NVMLError_LibraryNotFound, NVMLError_NotSupported=NVMLError_NotSupported,
        NVMLError_NoPermission=NVMLError_NoPermission, NVMLError_GpuIsLost=NVMLError_GpuIsLost,
        NVMLError_InvalidArgument=NVMLError_InvalidArgument, gpus=gpus, fail=fail, calls=[], **TOPOLOGY,
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

    def link(h, n):
        links = gpus[h].nvlinks
        if not links:
            raise NVMLError_NotSupported()
        if n >= len(links):
            raise NVMLError_InvalidArgument()
        return links[n]

    def remote(h, n):
        bus = link(h, n)[0]
        if bus.startswith("0000:"):  # a 4-digit domain: only the legacy field is filled, as older drivers do
            return types.SimpleNamespace(busId=b"", busIdLegacy=bus.encode())
        return types.SimpleNamespace(busId=bus.encode(), busIdLegacy=b"")

    def ancestor(a, b):
        if ancestors is None:
            raise NVMLError_NotSupported()
        return ancestors[(a, b)] if (a, b) in ancestors else ancestors[(b, a)]

    def p2p_status(a, b, index):
        if not isinstance(index, int):  # what ctypes does with a tuple argument
            raise ctypes.ArgumentError("argument 3: TypeError: Don't know how to convert parameter 3")
        kind = {0: "read", 1: "write"}[index]
        for key in ((a, b, kind), (b, a, kind), (a, b), (b, a)):
            if key in p2p:
                return p2p[key]
        return 0

    def affinity(h, words):
        mask = [0] * words
        for cpu in gpus[h].cpus:
            mask[cpu // 64] |= 1 << (cpu % 64)
        return mask

    api("nvmlDeviceGetNvLinkState", lambda h, n: int(link(h, n) is not None))
    api("nvmlDeviceGetNvLinkRemotePciInfo", remote)
    api("nvmlDeviceGetNvLinkRemoteDeviceType", lambda h, n: link(h, n)[1])
    api("nvmlDeviceGetNvLinkVersion", lambda h, n: link(h, n) and gpus[h].nvlink_version)
    api("nvmlDeviceGetTopologyCommonAncestor", ancestor)
    api("nvmlDeviceGetP2PStatus", p2p_status)
    api("nvmlDeviceGetMaxPcieLinkGeneration", lambda h: gpus[h].pcie_gen)
    api("nvmlDeviceGetMaxPcieLinkWidth", lambda h: gpus[h].pcie_width)
    api("nvmlDeviceGetCpuAffinity", affinity)
    api("nvmlDeviceGetNumaNodeId", lambda h: gpus[h].numa)
    return mod


def bus(i: int) -> str:
    return f"00000000:{0x18 + i:02X}:00.0"


def uuid(i: int) -> str:
    return f"GPU-{i:08x}-1111-2222-3333-444455556666"
