"""Every course notebook runs top to bottom, headless, on the course's simulated GPUs: no error and no library warning
in any output, simulated GPUs said so and every speed modelled; every exercise's check fails on a wrong answer and
passes on the right one (both run in the executed notebook's kernel); notebook 06, run three times, comes to the same
conclusion with the same modelled figures."""

from __future__ import annotations

import ast
import functools
import json
import re

import nbformat
import pytest

from nbgpu.devices import DEFAULT_SPEC
from nbgpu.tour import NOTEBOOKS, error_outputs, execute

NOTEBOOK_PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
SIMULATE = DEFAULT_SPEC
SPLIT = "06_why_a_split_is_not_faster"
FIGURES = ("import json\nprint('FIGURES', json.dumps({r.label: [r.ttft_s, r.latency_p50_s, r.decode_tokens_per_s] "
           "for r in results}, sort_keys=True))")


def _exercises(nb) -> list[tuple[str, str, str]]:
    """(right, wrong, check source) for each exercise cell and the check cell after it."""
    out = []
    for i, cell in enumerate(nb.cells):
        if "exercise" in cell.metadata.get("tags", []):
            check = next(c for c in nb.cells[i + 1:] if "check" in c.metadata.get("tags", []))
            answers = cell.metadata["nbgpu"]
            out.append((answers["right"], answers["wrong"], check.source))
    return out


def _code_cells(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


@functools.cache
def _run(name: str):
    """The notebook executed once, followed in the same kernel by each exercise's check with a wrong and a right
    answer (and, for notebook 06, two more runs of all its cells, each followed by its modelled figures)."""
    path = NOTEBOOKS / f"{name}.ipynb"
    source = nbformat.read(path, as_version=4)
    then = []
    for right, wrong, check in _exercises(source):
        then += [f"{wrong}\n{check}", f"{right}\n{check}"]
    if name == SPLIT:
        then.append(FIGURES)
        for _ in range(2):
            then += [*_code_cells(source), FIGURES]
    nb = execute(path, simulate=SIMULATE, timeout=600, then=then)
    return source, nb


def _outputs_text(cells) -> str:
    return "".join(str(o.get("data", {}).get("text/html", "")) + str(o.get("data", {}).get("text/plain", ""))
                   + o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)


def test_the_course_is_all_there():
    names = [p.stem for p in NOTEBOOK_PATHS]
    assert names == ["00_quickstart", "01_see_the_gpus", "02_choose_gpus", "03_device_map_auto",
                     "04_device_map_by_hand", "05_watch_memory", SPLIT, "07_tensor_parallel_sizing",
                     "08_memory_and_out_of_memory"]


def test_outputs_are_not_committed():
    for path in NOTEBOOK_PATHS:
        nb = nbformat.read(path, as_version=4)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code"), f"{path.name} has outputs: strip them"


def test_every_notebook_teaches_with_practice_and_a_summary():
    for path in NOTEBOOK_PATHS:
        nb = nbformat.read(path, as_version=4)
        text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert "Predict, then run" in text, f"{path.name}: no 'predict, then run' step"
        assert _exercises(nb), f"{path.name}: no exercise with a check cell"
        last = nb.cells[-1]
        summary = last.source.split("## Summary", 1)
        assert last.cell_type == "markdown" and len(summary) == 2, f"{path.name} does not end with a summary"
        assert len([line for line in summary[1].splitlines() if line.startswith("* ")]) == 3, path.name


def test_the_code_without_nbgpu_is_valid_python():
    """Every python block of a 'the same without nbgpu' cell parses (shell blocks are for the shell)."""
    for path in NOTEBOOK_PATHS:
        nb = nbformat.read(path, as_version=4)
        blocks = [b for c in nb.cells if c.cell_type == "markdown" and "without nbgpu" in c.source
                  for b in re.findall(r"```python\n(.*?)```", c.source, re.S)]
        assert blocks or "```bash" in "".join(c.source for c in nb.cells), f"{path.name}: nothing without nbgpu"
        for block in blocks:
            ast.parse(block)


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_notebook_runs_on_simulated_gpus(path):
    source, nb = _run(path.stem)
    cells = nb.cells[:len(source.cells)]  # the notebook itself, without the checks run after it
    assert error_outputs(nbformat.v4.new_notebook(cells=cells)) == []
    first = next(c for c in cells if c.cell_type == "code")
    said = "".join(o.get("text", "") for o in first.outputs if o.get("output_type") == "stream")
    assert f"{SIMULATE} SIMULATED GPUs" in said  # the setup cell says that the GPUs are simulated
    shown = _outputs_text(cells)
    assert "simulated" in shown.lower().replace(said.lower(), "")  # later outputs are labelled too
    warnings = [o["text"] for c in cells if c.cell_type == "code" for o in c.outputs
                if o.get("name") == "stderr" and re.search(r"warn|deprecat", o.get("text", ""), re.I)]
    assert warnings == []
    if re.search(r"nbgpu\.(bench|predict)\(", "".join(_code_cells(source))):
        assert "modelled" in shown  # every speed shown is modelled


@pytest.mark.parametrize("path", NOTEBOOK_PATHS, ids=lambda p: p.stem)
def test_every_exercise_check_fails_on_a_wrong_answer_and_passes_on_the_right_one(path):
    source, nb = _run(path.stem)
    probes = nb.cells[len(source.cells):]
    for k, (right, wrong, _) in enumerate(_exercises(source)):
        wrong_run, right_run = probes[2 * k], probes[2 * k + 1]
        failed = [o for o in wrong_run.outputs if o.get("output_type") == "error"]
        assert [o["ename"] for o in failed] == ["WrongAnswer"], (path.stem, wrong, wrong_run.outputs)
        assert not [o for o in right_run.outputs if o.get("output_type") == "error"], (path.stem, right_run.outputs)
        assert "Right:" in _outputs_text([right_run]), (path.stem, right)


def test_notebook_06_comes_to_the_same_conclusion_on_every_run():
    source, nb = _run(SPLIT)
    extra = nb.cells[len(source.cells) + 2 * len(_exercises(source)):]
    figures = [json.loads(line.split("FIGURES ", 1)[1]) for c in extra for o in c.outputs
               if o.get("text", "").startswith("FIGURES ") for line in o["text"].splitlines()]
    assert len(figures) == 3 and figures[0] == figures[1] == figures[2]  # modelled: identical on every run
    assert len(figures[0]) >= 7  # 1 GPU, layer split, tensor parallel at two batch sizes, and compiled
    conclusion_cell = next(i for i, s in enumerate(_code_cells(source)) if "conclusion = {" in s)
    codes = [c for c in nb.cells if c.cell_type == "code"]
    runs = [codes[conclusion_cell], *(c for c in extra if c.source == _code_cells(source)[conclusion_cell])]
    said = ["".join(o.get("text", "") for o in c.outputs) for c in runs]
    assert len(said) == 3 and said[0] == said[1] == said[2] and "batch 1 eager: fastest is 1 GPU" in said[0]
    assert all(not [o for o in c.outputs if o.get("output_type") == "error"] for c in extra)


def test_executing_a_notebook_leaves_no_kernel_running(tmp_path):
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


def test_cells_run_after_a_notebook_record_their_errors(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    path = tmp_path / "then.ipynb"
    nbformat.write(nb, path)
    ran = execute(path, timeout=120, then=["raise ValueError(x)", "print(x + 1)"])
    assert [o["ename"] for o in ran.cells[1].outputs if o["output_type"] == "error"] == ["ValueError"]
    assert ran.cells[2].outputs[0]["text"] == "2\n"
