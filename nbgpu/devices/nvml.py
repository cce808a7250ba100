"""The NVML backend (nvidia-ml-py, imported as `pynvml`).

Every field is read on its own: an NVML error for one field (NotSupported, NoPermission, GPU lost, ...)
makes that field None and is noted in `GPU.errors`; the rest of the reading goes on.
Handles are looked up once and cached, so a poll costs only the field queries. The links between GPUs
(`topology()`) are read only when asked for, and once: they do not change while the process runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from . import nvml_topology, specs
from .model import GPU, GPUProcess, Inventory, MIGDevice
from .nvml_topology import _text
from .simulated import DEFAULT_SPEC

_MW = 1000.0


class NVMLReader:
    """Reads the machine's GPUs through NVML, keeping the library initialised and the handles cached."""

    def __init__(self):
        self._lock = threading.Lock()
        self._nvml = None
        self._handles: list[Any] = []
        self._static: dict[int, dict[str, Any]] = {}  # fields that do not change while the process runs
        self._topology = None
        self.message: str | None = None

    def _start(self) -> bool:
        if self._nvml is not None:
            return True
        try:
            import pynvml
        except ImportError:
            self.message = ("NVML is not available: the nvidia-ml-py package is not installed "
                            "(pip install nvidia-ml-py).")
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as err:
            self.message = f"NVML is not available ({_text(err)}): no NVIDIA driver on this machine. " \
                           f"Use `%gpus --simulate {DEFAULT_SPEC}` for simulated GPUs."
            return False
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as err:
            self.message = f"NVML could not count the GPUs ({_text(err)})."
            return False
        self._nvml = pynvml
        self._handles = []
        for i in range(count):
            try:
                self._handles.append(pynvml.nvmlDeviceGetHandleByIndex(i))
            except pynvml.NVMLError:
                self._handles.append(None)  # a GPU that is lost or inaccessible still keeps its row
        self.message = None if count else "NVML found no NVIDIA GPU on this machine."
        return True

    def read(self) -> Inventory:
        with self._lock:
            if not self._start():
                return Inventory(gpus=(), backend="nvml", message=self.message)
            nv = self._nvml
            driver = self._get({}, "driver_version", lambda: _text(nv.nvmlSystemGetDriverVersion()))
            cuda = self._get({}, "cuda", lambda: "%d.%d" % divmod(nv.nvmlSystemGetCudaDriverVersion() // 10, 100))
            gpus = tuple(self._gpu(i, h) for i, h in enumerate(self._handles))
            return Inventory(gpus=gpus, backend="nvml", driver_version=driver, cuda_driver_version=cuda,
                             message=self.message)

    def topology(self):
        """The links between the GPUs (nvidia-smi topo -m), read on first use and kept."""
        from .topology import Topology

        with self._lock:
            if self._topology is None:
                if not self._start():
                    return Topology(gpus=(), links=(), backend="nvml", message=self.message)
                self._topology = nvml_topology.read(self._nvml, self._handles)
            return self._topology

    def _get(self, errors: dict[str, str], name: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except self._nvml.NVMLError as err:
            errors[name] = _text(err) or type(err).__name__
            return None

    def _static_fields(self, i: int, h: Any, errors: dict[str, str]) -> dict[str, Any]:
        if i in self._static:
            return self._static[i]
        nv, get = self._nvml, self._get
        local: dict[str, str] = {}
        cc = get(local, "compute_capability", lambda: tuple(nv.nvmlDeviceGetCudaComputeCapability(h)))
        name = get(local, "name", lambda: _text(nv.nvmlDeviceGetName(h)))
        known = specs.match_name(name)
        fields = dict(
            uuid=get(local, "uuid", lambda: _text(nv.nvmlDeviceGetUUID(h))),
            name=name,
            pci_bus_id=get(local, "pci_bus_id", lambda: _text(nv.nvmlDeviceGetPciInfo(h).busId)),
            compute_capability=cc,
            memory_bandwidth=self._bandwidth(h, name),
            bf16_flops=known.bf16_flops if known else None,
        )
        errors.update(local)
        if not local:  # cache only a clean reading: a field that failed may answer next time
            self._static[i] = fields
        return fields

    def _bandwidth(self, h: Any, name: str | None) -> float | None:
        nv = self._nvml
        try:  # peak = max memory clock (MHz) x 2 (double data rate) x bus width (bits) / 8
            clock = nv.nvmlDeviceGetMaxClockInfo(h, nv.NVML_CLOCK_MEM)
            width = nv.nvmlDeviceGetMemoryBusWidth(h)
            return clock * 1e6 * 2 * width / 8
        except (nv.NVMLError, AttributeError):
            spec = specs.match_name(name)
            return spec.bandwidth if spec else None

    def _memory(self, h: Any) -> SimpleNamespace:
        """Memory as nvidia-smi counts it (used includes the driver's reserve), with the reserve apart where the
        driver gives it (NVML's v2 reading; older drivers only have v1)."""
        nv = self._nvml
        version = getattr(nv, "nvmlMemory_v2", None)
        if version is not None:
            try:
                m = nv.nvmlDeviceGetMemoryInfo(h, version=version)
                return SimpleNamespace(total=m.total, used=m.used + m.reserved, free=m.free, reserved=m.reserved)
            except (nv.NVMLError, TypeError):
                pass
        m = nv.nvmlDeviceGetMemoryInfo(h)
        return SimpleNamespace(total=m.total, used=m.used, free=m.free, reserved=None)

    def _gpu(self, i: int, h: Any) -> GPU:
        nv, get = self._nvml, self._get
        errors: dict[str, str] = {}
        if h is None:
            return _unavailable(i, "the GPU could not be opened (lost or no permission)")
        static = self._static_fields(i, h, errors)
        mem = get(errors, "memory", lambda: self._memory(h))
        util = get(errors, "utilization", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu)
        power = get(errors, "power_draw", lambda: nv.nvmlDeviceGetPowerUsage(h) / _MW)
        limit = get(errors, "power_limit", lambda: nv.nvmlDeviceGetEnforcedPowerLimit(h) / _MW)
        mig = get(errors, "mig_mode", lambda: bool(nv.nvmlDeviceGetMigMode(h)[0]))
        return GPU(
            index=i,
            memory_total=None if mem is None else int(mem.total),
            memory_used=None if mem is None else int(mem.used),
            memory_free=None if mem is None else int(mem.free),
            memory_reserved=None if mem is None or mem.reserved is None else int(mem.reserved),
            utilization=util,
            temperature=get(errors, "temperature", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            power_draw=power,
            power_limit=limit,
            pstate=get(errors, "pstate", lambda: int(nv.nvmlDeviceGetPerformanceState(h))),
            persistence_mode=get(errors, "persistence_mode", lambda: bool(nv.nvmlDeviceGetPersistenceMode(h))),
            mig_mode=mig,
            processes=self._processes(h, errors),
            mig_devices=self._mig_devices(h) if mig else (),
            errors=errors,
            **static,
        )

    def _processes(self, h: Any, errors: dict[str, str]) -> tuple[GPUProcess, ...] | None:
        nv = self._nvml
        found: dict[int, tuple[set[str], int | None]] = {}
        ok = False
        for kind, call in (("compute", "nvmlDeviceGetComputeRunningProcesses"),
                           ("graphics", "nvmlDeviceGetGraphicsRunningProcesses")):
            procs = self._get(errors, f"processes ({kind})", lambda call=call: getattr(nv, call)(h))
            if procs is None:
                continue
            ok = True
            for p in procs:
                kinds, mem = found.setdefault(p.pid, (set(), None))
                used = getattr(p, "usedGpuMemory", None)
                used = None if used is None or used >= 2**63 else int(used)  # NVML_VALUE_NOT_AVAILABLE
                kinds.add(kind)
                found[p.pid] = (kinds, mem if used is None else used)
        if not ok:
            return None
        return tuple(GPUProcess(pid, self._process_name(pid), "+".join(sorted(kinds)), mem)
                     for pid, (kinds, mem) in sorted(found.items()))

    def _process_name(self, pid: int) -> str | None:
        try:
            return _text(self._nvml.nvmlSystemGetProcessName(pid)).rsplit("/", 1)[-1] or None
        except self._nvml.NVMLError:
            try:  # another PID namespace (containers): ask /proc
                with open(f"/proc/{pid}/comm") as f:
                    return f.read().strip() or None
            except OSError:
                return None

    def _mig_devices(self, h: Any) -> tuple[MIGDevice, ...]:
        nv = self._nvml
        out = []
        try:
            count = nv.nvmlDeviceGetMaxMigDeviceCount(h)
        except nv.NVMLError:
            return ()
        for j in range(count):
            try:
                m = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, j)
            except nv.NVMLError:
                continue  # slot not populated
            uuid = self._get({}, "uuid", lambda m=m: _text(nv.nvmlDeviceGetUUID(m)))
            mem = self._get({}, "memory", lambda m=m: nv.nvmlDeviceGetMemoryInfo(m).total)
            if uuid:
                out.append(MIGDevice(uuid, None if mem is None else int(mem)))
        return tuple(out)


def _unavailable(i: int, why: str) -> GPU:
    return GPU(index=i, uuid=None, name=None, pci_bus_id=None, memory_total=None, memory_used=None,
               memory_free=None, utilization=None, temperature=None, power_draw=None, power_limit=None,
               pstate=None, persistence_mode=None, compute_capability=None, mig_mode=None, processes=None,
               errors={"gpu": why})
