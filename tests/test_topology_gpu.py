"""On a machine with real NVIDIA GPUs (`pytest -m gpu`): nbgpu.topology() against `nvidia-smi topo -m`, cell by cell.

Run with -s to see both matrices and nbgpu's estimates side by side.
"""

import re
import shutil
import subprocess

import pytest

import nbgpu

pytestmark = pytest.mark.gpu
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # nvidia-smi underlines the header, even into a pipe


def nvidia_smi_topo() -> dict:
    """`nvidia-smi topo -m` read into {'gpus': ['GPU0', ...], 'cells': [[...]], 'cpu': [...], 'numa': [...]}."""
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not installed")
    text = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, check=True).stdout
    print("\nnvidia-smi topo -m:\n" + _ANSI.sub("", text))
    lines = [_ANSI.sub("", line) for line in text.splitlines()]
    header = next(line.split() for line in lines if re.search(r"\bGPU0\b", line))
    gpus = [t for t in header if re.fullmatch(r"GPU\d+", t)]
    nics = [t for t in header if re.fullmatch(r"NIC\d+", t)]
    rows = [line.split() for line in lines if re.match(r"GPU\d+\s", line)]
    n = len(gpus)
    return {"gpus": gpus, "cells": [r[1:1 + n] for r in rows],
            "cpu": [r[1 + n + len(nics)] if len(r) > 1 + n + len(nics) else None for r in rows],
            "numa": [r[2 + n + len(nics)] if len(r) > 2 + n + len(nics) else None for r in rows]}


def test_link_matrix_matches_nvidia_smi_cell_by_cell():
    smi = nvidia_smi_topo()
    topo = nbgpu.topology()
    print(repr(topo))
    assert [f"GPU{g.index}" for g in topo.gpus] == smi["gpus"]
    mine = topo.labels()
    differ = [(smi["gpus"][a], smi["gpus"][b], smi["cells"][a][b], mine[a][b])
              for a in range(len(mine)) for b in range(len(mine)) if smi["cells"][a][b] != mine[a][b]]
    assert not differ, f"(row, column, nvidia-smi, nbgpu): {differ}"


def test_cpu_and_numa_affinity_match_nvidia_smi():
    smi = nvidia_smi_topo()
    topo = nbgpu.topology()
    assert [g.cpu_affinity or "N/A" for g in topo.gpus] == smi["cpu"]
    assert ["N/A" if g.numa_node is None else str(g.numa_node) for g in topo.gpus] == smi["numa"]


def test_gpus_topo_magic_shows_the_same_matrix():
    from nbgpu.magics import gpus_magic

    smi = nvidia_smi_topo()
    text = repr(gpus_magic("--topo"))
    for name, cells in zip(smi["gpus"], smi["cells"]):
        assert re.search(r"^" + r"\s+".join([name, *map(re.escape, cells)]) + r"\b", text, re.M), (name, cells)
