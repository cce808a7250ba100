"""What each kernel tells the GPU panel: which GPUs it sees, and what it placed on simulated GPUs.

Simulated GPUs live inside the kernel process that made them, and a choice made with `%gpus 2,3` is in the
kernel's `os.environ` but not in /proc/<pid>/environ; the Jupyter server sees neither. So a Jupyter kernel that uses
nbgpu writes both, whole (a temporary file renamed), to `<jupyter runtime dir>/nbgpu/kernel-<pid>.json` whenever
one of them changes, and removes the file at exit. Readers take only files of processes that still run (same pid,
same start time): a dead kernel's simulated memory is freed with it.

Only a Jupyter kernel writes (not a script or a test process). What the state holds is built by a provider that
a layer above registers (`set_provider`), so this module imports nothing of nbgpu.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import files

FORMAT = 1
_FILE = re.compile(r"^kernel-(\d+)\.json$")
_provider: Callable[[], dict[str, Any]] | None = None
_lock = threading.Lock()
_written: Path | None = None
_closed = False
_swept = False


@dataclass(frozen=True)
class KernelState:
    """One kernel's published state."""

    pid: int
    kernel_id: str | None  # from the kernel's connection file
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES in force in the kernel (simulated: the simulated setting)
    device_order: str | None
    simulate: str | None  # the simulate spec ('4x24GiB') when the kernel uses simulated GPUs
    allocated: dict[int, int] = field(default_factory=dict)  # simulated GPU index -> bytes the kernel placed there
    utilization: dict[int, int] = field(default_factory=dict)  # simulated GPU index -> percent
    time: float = 0.0


def directory() -> Path | None:
    """<jupyter runtime dir>/nbgpu, or None where Jupyter is not installed."""
    try:
        from jupyter_core.paths import jupyter_runtime_dir
    except ImportError:
        return None
    return Path(jupyter_runtime_dir()) / "nbgpu"


def set_provider(provider: Callable[[], dict[str, Any]]) -> None:
    """Register what `changed()` publishes: a dict with visible_devices, device_order, simulate, allocated,
    utilization (called on every change, so it must be cheap)."""
    global _provider
    _provider = provider


def _kernel_id() -> str | None:
    """The kernel id when this process is a running Jupyter kernel, else None (nothing is published then)."""
    module = sys.modules.get("ipykernel.kernelapp")
    if module is None or not module.IPKernelApp.initialized():
        return None
    connection_file = os.path.basename(module.IPKernelApp.instance().connection_file or "")
    match = re.fullmatch(r"kernel-(.+)\.json", connection_file)
    return match.group(1) if match else ""


def changed() -> None:
    """Publish this kernel's state again (called after every change of GPUs, visibility or simulated memory)."""
    if _provider is None or _closed:
        return
    try:
        kernel_id = _kernel_id()
        if kernel_id is None:
            return
        state = dict(_provider())
        import psutil

        me = psutil.Process()
        state.update(format=FORMAT, pid=me.pid, started=me.create_time(), kernel_id=kernel_id or None,
                     time=time.time())
        if write(state) is not None and not _swept:
            _sweep()
    except Exception:  # the panel's view of a kernel is never worth breaking the kernel's own work
        return


def write(state: dict[str, Any], where: Path | None = None) -> Path | None:
    """Write one state file whole: to a temporary file in the same folder, then renamed over the old one."""
    global _written
    where = where or directory()
    if where is None:
        return None
    with _lock:
        if _closed:
            return None
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = where / f"kernel-{state['pid']}.json"
        files.write_json(target, state)  # whole, then renamed: a reader never sees half a file
        if state["pid"] == os.getpid():
            _written = target
        return target


def _sweep() -> None:
    """Once per kernel: delete the files of kernels that were killed (a killed process leaves its file behind)."""
    global _swept
    _swept = True
    read_all()


def _remove_own() -> None:
    global _closed
    with _lock:
        _closed = True  # finalizers that run after this (a model freed at exit) must not write it again
        if _written is not None:
            try:
                _written.unlink()
            except OSError:
                pass


atexit.register(_remove_own)


def _alive(pid: int, started: float | None) -> bool:
    import psutil  # here, not at import: `import nbgpu` stays cheap

    try:
        proc = psutil.Process(pid)
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE and (
            started is None or abs(proc.create_time() - started) < 1.0)
    except psutil.Error:
        return False


def _state(data: dict[str, Any]) -> KernelState:
    return KernelState(
        pid=int(data["pid"]), kernel_id=data.get("kernel_id"), visible_devices=data.get("visible_devices"),
        device_order=data.get("device_order"), simulate=data.get("simulate"),
        allocated={int(k): int(v) for k, v in (data.get("allocated") or {}).items()},
        utilization={int(k): int(v) for k, v in (data.get("utilization") or {}).items()},
        time=float(data.get("time") or 0.0),
    )


def read_all(where: Path | None = None) -> dict[int, KernelState]:
    """Every live kernel's published state, by pid. Files of processes that ended are deleted (they are this
    user's own files, in this user's runtime directory)."""
    where = where or directory()
    if where is None or not where.is_dir():
        return {}
    uid = os.getuid()
    out = {}
    for path in where.iterdir():
        match = _FILE.match(path.name)
        if not match:
            continue
        try:
            if path.is_symlink() or path.stat().st_uid != uid:
                continue
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT or int(data["pid"]) != int(match.group(1)):
                continue
            if not _alive(int(data["pid"]), data.get("started")):
                path.unlink(missing_ok=True)
                continue
            out[int(data["pid"])] = _state(data)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


__all__ = ["KernelState", "changed", "directory", "read_all", "set_provider", "write"]
