"""The GPU panel's endpoint on a real GPU (run with -m gpu): a kernel and its child process hold CUDA memory on GPU 0;
NVML's processes are named by the notebook; shutting the kernel down from the endpoint frees the memory."""

from __future__ import annotations

import time

import jupyter_servers
import psutil
import pytest

from nbgpu import devices
from nbgpu.units import GiB

pytestmark = pytest.mark.gpu

SETUP = """
import os, subprocess, sys
import nbgpu
nbgpu.use("0")
import torch
x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
child = subprocess.Popen([sys.executable, "-c", "import time, torch; y = torch.empty(2**30, dtype=torch.uint8, "
                          "device='cuda:0'); torch.cuda.synchronize(); print('ready', flush=True); time.sleep(600)"],
                         stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(os.getpid(), child.pid)
"""


@pytest.fixture
def server(tmp_path):
    inv = devices.read()
    if not len(inv) or inv.simulated:
        pytest.fail(f"no NVIDIA GPU: {inv.message}")
    srv = jupyter_servers.start(tmp_path)
    yield srv
    jupyter_servers.stop(srv)


def _gpu0(server) -> dict:
    status, body = server.request("GET", "nbgpu/api/gpus")
    assert status == 200 and body["backend"] == "nvml" and not body["simulated"]
    return next(g for g in body["gpus"] if g["index"] == 0), body


def test_the_panel_names_a_kernel_and_its_child_on_a_real_gpu(server):
    session = server.open_notebook("gpu.ipynb")
    kernel_id = session["kernel"]["id"]
    client = server.client(kernel_id)
    pid, child = map(int, jupyter_servers.run(client, SETUP, timeout=180).split())
    gpu0, body = _gpu0(server)
    procs = {p["pid"]: p for p in gpu0["processes"]}
    print(f"GPU 0 processes: {[(p['pid'], p['kernel'], p['child'], p['memory']) for p in procs.values()]}; "
          f"kernel pid {pid}, child pid {child}")
    if pid not in procs:
        pytest.skip(f"NVML lists other pids than this PID namespace's ({sorted(procs)}; kernel {pid}): "
                    "processes cannot be named here")
    assert procs[pid]["kernel"] == kernel_id and not procs[pid]["child"] and procs[pid]["memory"] >= 2 * GiB
    assert procs[child]["kernel"] == kernel_id and procs[child]["child"] and procs[child]["memory"] >= GiB
    k = body["kernels"][kernel_id]
    assert k["path"] == "gpu.ipynb" and k["visible"]["devices"] == [{"cuda": 0, "gpu": 0}]
    assert k["visible"]["from"] == "kernel"
    table = jupyter_servers.run(client, "print(repr(nbgpu.gpus()))")
    assert f"{pid} (this kernel) gpu.ipynb (python3)" in table and "child of gpu.ipynb (python3)" in table
    client.stop_channels()

    used = gpu0["memory_used"]
    try:
        assert server.request("DELETE", f"nbgpu/api/kernels/{kernel_id}")[0] == 204
        _freed(server, pid, used)
    finally:
        if psutil.pid_exists(child):  # the kernel's process group usually takes it along
            psutil.Process(child).kill()


def _freed(server, pid: int, used: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gpu0, _ = _gpu0(server)
        if pid not in {p["pid"] for p in gpu0["processes"]}:
            break
        time.sleep(0.5)
    print(f"GPU 0 used before shutdown {used / GiB:.2f} GiB, after {gpu0['memory_used'] / GiB:.2f} GiB")
    assert pid not in {p["pid"] for p in gpu0["processes"]}
    assert gpu0["memory_used"] <= used - 2 * GiB
