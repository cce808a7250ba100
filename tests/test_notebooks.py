"""Every course notebook runs top to bottom, headless, on simulated GPUs, without an error in any output."""

from __future__ import annotations

import pytest

from nbgpu.tour import NOTEBOOKS, error_outputs, execute

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
SIMULATE = "4x24GiB"


def test_the_course_is_all_there():
    names = [p.stem for p in NOTEBOOK_PATHS]
    assert names == ["00_quickstart", "01_see_the_gpus", "02_choose_gpus", "03_device_map_auto",
                     "04_device_map_by_hand", "05_watch_memory", "06_why_a_split_is_not_faster",
                     "07_tensor_parallel_sizing"]


def test_outputs_are_not_committed():
    import nbformat

    for path in NOTEBOOK_PATHS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs: strip them"


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_notebook_runs_on_simulated_gpus(path):
    nb = execute(path, simulate=SIMULATE, timeout=300)
    assert error_outputs(nb) == []
    first = "".join(o.get("text", "") for o in nb.cells[2].outputs if o.get("output_type") == "stream")
    assert "SIMULATED GPUs" in first  # the setup cell says that the GPUs are simulated
    shown = "".join(str(o.get("data", {}).get("text/html", "")) + str(o.get("data", {}).get("text/plain", ""))
                    + o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "simulated" in shown.lower().replace(first.lower(), "")  # later outputs are labelled too


def test_executing_a_notebook_leaves_no_kernel_running(tmp_path):
    import nbformat
    import psutil

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import os\nprint(os.getpid())")])
    path = tmp_path / "pid.ipynb"
    nbformat.write(nb, path)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    ran = execute(path, timeout=120)
    kernel_pid = int(ran.cells[0].outputs[0]["text"])
    assert kernel_pid not in before
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert kernel_pid not in left and not psutil.pid_exists(kernel_pid)
