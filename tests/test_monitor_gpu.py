"""The monitor on a real GPU: during a matrix-multiply loop on cuda:0 its utilisation and memory rise and agree
with nvidia-smi's readings taken at the same moments."""

from __future__ import annotations

import os
import statistics
import subprocess
import time

import pytest

from nbgpu import devices, visibility
from nbgpu.monitoring import Monitor

pytestmark = pytest.mark.gpu

GiB = 1024**3
# NVML averages utilisation over a sample period of 1/6 s to 1 s (by product), and nvidia-smi and the monitor
# each read it at their own moment: compare an nvidia-smi reading with the monitor's samples within one such
# period (1 s) either side, and allow 10 points for the rounding of two averages over shifted windows.
WINDOW_S = 1.0
UTIL_POINTS = 10
# Memory does not change during the loop (everything is allocated before it), so the two must agree closely:
# nvidia-smi prints MiB, and it may leave the driver's reserved memory out of "used" where NVML's v1 call counts it.
MEMORY_SLACK = 64 * 1024**2


def smi_fields(index: int) -> str:
    """memory.reserved where this driver's nvidia-smi knows it (it is what "used" may leave out)."""
    cmd = ["nvidia-smi", f"--id={index}", "--query-gpu=memory.reserved", "--format=csv,noheader,nounits"]
    known = subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    return "utilization.gpu,memory.used" + (",memory.reserved" if known else "")


def smi(index: int, fields: str) -> tuple[subprocess.Popen, float]:
    cmd = ["nvidia-smi", f"--id={index}", f"--query-gpu={fields}", "--format=csv,noheader,nounits"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), time.time()


def test_monitor_follows_a_matmul_loop_and_agrees_with_nvidia_smi():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    devices.simulate(None)
    physical = visibility.current().targets[0].gpu.index  # cuda:0 as nvidia-smi numbers it

    fields = smi_fields(physical)
    m = Monitor(interval=0.2, history=1000, gpus=[physical])
    time.sleep(1.5)
    idle = m.samples

    dev = torch.device("cuda:0")
    ballast = torch.empty(4 * GiB, dtype=torch.uint8, device=dev)
    a = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.float16)
    torch.cuda.synchronize()
    loop_start = time.time()
    readings = []  # (time, utilisation, memory used, reserved) from nvidia-smi
    pending = None
    while time.time() - loop_start < 8:
        for _ in range(20):
            c = a @ b
        torch.cuda.synchronize()
        now = time.time()
        if pending is None and now - loop_start > 2:
            pending = smi(physical, fields)
        elif pending is not None and pending[0].poll() is not None:
            proc, started = pending
            out, err = proc.communicate()
            assert proc.returncode == 0, err
            util, used, reserved = ([float(x) for x in out.strip().split(",")] + [None])[:3]
            readings.append(((started + now) / 2, util, used * 1024**2, reserved))
            pending = None
    loop_end = time.time()
    del c, ballast, a, b
    m.stop()
    assert not m.errors, list(m.errors)

    busy = [s.gpus[0] for s in m.samples if loop_start + 1 < s.time < loop_end]
    base = [s.gpus[0] for s in idle]
    print(f"\nidle: util {[g.utilization for g in base]}, used {[g.memory_used // 2**20 for g in base]} MiB, "
          f"this kernel {[g.memory_this_kernel for g in base]}")
    print(f"busy: util {[g.utilization for g in busy]}, used {[g.memory_used // 2**20 for g in busy]} MiB, "
          f"this kernel {[None if g.memory_this_kernel is None else g.memory_this_kernel // 2**20 for g in busy]}"
          f" MiB, processes {busy[-1].processes}, own pid {os.getpid()}")
    print(f"nvidia-smi: {readings}")

    assert len(busy) >= 10
    assert max(g.utilization for g in busy) >= 90
    assert statistics.median([g.utilization for g in busy]) >= statistics.median([g.utilization for g in base]) + 50
    assert min(g.memory_used for g in busy) >= max(g.memory_used for g in base) + 4 * GiB
    if any(os.getpid() == p.pid for p in busy[-1].processes or ()):  # NVML sees this process (no PID namespace)
        assert min(g.memory_this_kernel for g in busy) >= 4 * GiB
        assert busy[-1].own_pids == {os.getpid()}

    assert len(readings) >= 3
    for t, util, used, reserved in readings:
        near = [s.gpus[0] for s in m.samples if abs(s.time - t) <= WINDOW_S]
        assert near, t
        lo, hi = min(g.utilization for g in near), max(g.utilization for g in near)
        assert lo - UTIL_POINTS <= util <= hi + UTIL_POINTS, (util, lo, hi)
        slack = MEMORY_SLACK + (reserved or 0) * 1024**2
        assert all(abs(g.memory_used - used) <= slack for g in near), ([g.memory_used for g in near], used, reserved)


