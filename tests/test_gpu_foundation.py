"""On a machine with a real NVIDIA GPU: run with `pytest -m gpu`."""

import csv
import io
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu


def run_fresh(code: str) -> str:
    """Run code in a fresh interpreter with an IPython shell `ip` that has nbgpu loaded; return its stdout."""
    prelude = ("from IPython.testing.globalipapp import start_ipython\n"
               "ip = start_ipython()\nip.run_line_magic('load_ext', 'nbgpu')\n")
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_inventory_matches_nvidia_smi():
    import nbgpu

    fields = "index,uuid,name,pci.bus_id,memory.total,pstate,persistence_mode,compute_cap"
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, check=True).stdout
    rows = [[c.strip() for c in row] for row in csv.reader(io.StringIO(smi)) if row]
    inv = nbgpu.gpus().inventory
    assert len(inv) == len(rows) > 0
    for gpu, (index, uuid, name, bus, total_mib, pstate, persistence, cc) in zip(inv, rows):
        assert gpu.index == int(index)
        assert gpu.uuid == uuid
        assert gpu.name == name
        assert gpu.pci_bus_id.lower().endswith(bus.lower()[-12:])  # nvidia-smi prints 8-digit domains too
        assert gpu.memory_total // 2**20 == int(total_mib)
        assert gpu.pstate_label == pstate
        assert ("Enabled" if gpu.persistence_mode else "Disabled") == persistence
        assert gpu.compute_capability_label == cc


def test_choice_then_torch_sees_exactly_that_gpu():
    out = run_fresh("""
        import nbgpu, torch
        ip.run_line_magic('gpus', '0')
        want = nbgpu.gpus().inventory[0].uuid
        got = 'GPU-' + str(torch.cuda.get_device_properties(0).uuid)
        print('COUNT', torch.cuda.device_count(), 'SAME', want == got)
    """)
    assert "COUNT 1 SAME True" in out


def test_late_choice_is_refused_after_is_available():
    out = run_fresh("""
        import os, torch, nbgpu
        ip.run_line_magic('gpus', '0')
        assert torch.cuda.is_available()
        print('TORCH_FLAG', torch.cuda.is_initialized())   # torch's own flag misses this
        print('DRIVER', nbgpu.cuda_driver_initialized())
        try:
            nbgpu.use('none')
        except nbgpu.UsageError as err:
            print('REFUSED', 'already running' in str(err), os.environ['CUDA_VISIBLE_DEVICES'])
        nbgpu.use('0')
        print('SAME SET OK')
    """)
    assert "TORCH_FLAG False" in out and "DRIVER True" in out
    assert "REFUSED True 0" in out and "SAME SET OK" in out


def test_none_leaves_torch_without_a_device():
    out = run_fresh("""
        import torch
        ip.run_line_magic('gpus', 'none')
        print('COUNT', torch.cuda.device_count(), torch.cuda.is_available())
    """)
    assert "COUNT 0 False" in out
