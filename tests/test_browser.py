"""Every course notebook in a real browser: JupyterLab on localhost, headless Chromium (Debian's) with the network
blocked (every request to a host other than this machine is aborted, and none may be made), Run All Cells; then no
cell may show an error or anything on stderr, and every Plotly figure must have drawn: every Plotly output the kernel
sent renders as a plot (not as its text fallback), and every plot on the page has an SVG with one drawn trace per
visible trace.

The quick start is read closer (the oracle checks of its figures: one bar per GPU and segment, the KV cache's
2 GiB, the monitor's memory used). A full-page screenshot of each notebook goes to artifacts/<notebook>.png, and the
quick start's views to artifacts/ (and to docs/images/, the README's pictures, with NBGPU_DOCS_IMAGES=1).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import jupyter_servers
import pytest

from nbgpu import files

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIMULATE = "4xL4"  # the course's default machine (nbgpu.devices.DEFAULT_SPEC)
CHOSEN_GPUS = 2  # the quick start keeps the two least-loaded GPUs
ARTIFACTS = ROOT / "artifacts"
DOCS_IMAGES = ROOT / "docs" / "images"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
VIEWPORT = {"width": 1280, "height": 1000}
MAX_SHOT_HEIGHT = 16_000  # px: the full-page pictures' cap (the longest notebook is about 9,000 px)
PLOTLY = "application/vnd.plotly.v1+json"
STDERR = "application/vnd.jupyter.stderr"  # JupyterLab shows an error's traceback as stderr too
WIDGET = "application/vnd.jupyter.widget-view+json"
CURRENT = ".jp-NotebookPanel:not(.lm-mod-hidden)"
# an output Plotly's renderer drew (the output is the plot itself), and an output that shows a widget
PLOTLY_OUTPUT = f"{CURRENT} .jp-OutputArea-output.jp-RenderedPlotly"
WIDGET_OUTPUT = f"{CURRENT} .jp-OutputArea-output:has(> .jupyter-widgets)"

pytestmark = pytest.mark.browser

# JupyterLab settings for a quiet, fully rendered page: no news pop-up, every cell kept in the DOM
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """One JupyterLab for the module, serving a copy of notebooks/ on the course's simulated GPUs."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium; see .ci/setup)")
    import playwright.sync_api  # noqa: F401 - the test extra holds it: a missing package is an error, not a skip
    work = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    server = jupyter_servers.start_lab(work, LAB_SETTINGS, {"NBGPU_SIMULATE": SIMULATE})
    try:
        yield server
    finally:
        jupyter_servers.stop(server)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(server.log, ARTIFACTS / "jupyterlab.log")


@pytest.fixture(scope="module")
def chromium(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Offline:
    """A browser page that reaches only this machine: every other request is aborted and its URL kept."""

    def __init__(self, browser):
        self.blocked: list[str] = []
        # service workers blocked too: their requests would bypass the route
        self.context = browser.new_context(viewport=VIEWPORT, service_workers="block")
        self.context.route("**/*", self._only_local)
        self.page = self.context.new_page()

    def _only_local(self, route) -> None:
        if urlsplit(route.request.url).hostname in LOCAL_HOSTS:
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort("internetdisconnected")


@pytest.fixture
def offline(chromium):
    browser = Offline(chromium)
    try:
        yield browser
    finally:
        browser.context.close()


# what a plot on the page has drawn: its SVG, its visible traces, the traces drawn in the SVG and their marks
FIGURE_FACTS = """gd => ({
    title: gd.querySelector('.gtitle')?.textContent || '(no title)',
    cell: (gd.closest('.jp-CodeCell')?.querySelector('.cm-content')?.textContent || '').slice(0, 60),
    svg: gd.querySelectorAll('svg.main-svg').length,
    traces: (gd._fullData || []).filter(t => t.visible === true).length,
    drawn: gd.querySelectorAll('svg.main-svg g.trace').length,
    marks: gd.querySelectorAll('svg.main-svg g.trace .point, svg.main-svg g.trace path.js-line').length })"""
DREW = "f => f.svg > 0 && f.traces > 0 && f.drawn === f.traces && f.marks > 0"
# nbformat JSON of the notebook open at a path, as JupyterLab's model holds it; whether its kernel is ready
NOTEBOOK = """path => { for (const w of window.jupyterapp.shell.widgets('main'))
    if (w.context && w.context.path === path) return w.context.model.toJSON();
    return null; }"""
KERNEL_READY = """path => { for (const w of window.jupyterapp.shell.widgets('main')) {
    const kernel = w.context && w.context.path === path && w.sessionContext.session?.kernel;
    if (kernel) return kernel.connectionStatus === 'connected' && kernel.status === 'idle'; }
    return false; }"""


def _wait_for_kernel(page, path: str) -> None:
    """Until the notebook's kernel is connected and idle. JupyterLab may first ask which kernel to start: take the
    preselected one (the notebook's python3)."""
    page.wait_for_function(f"path => document.querySelector('.jp-Dialog') || ({KERNEL_READY})(path)", arg=path,
                           timeout=90_000, polling=200)
    dialog = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
    if dialog.count():
        dialog.first.click()
        page.wait_for_function(KERNEL_READY, arg=path, timeout=90_000, polling=200)


def _outputs(notebook: dict) -> list[dict]:
    return [o for c in notebook["cells"] if c["cell_type"] == "code" for o in c["outputs"]]


def _run_all(page, lab, path: str, timeout_s: float = 300) -> dict:
    """Open the notebook, Run All Cells, wait until every code cell has an execution count and its Plotly outputs and
    widgets have had their chance to draw; returns the notebook as JupyterLab's model holds it (what the kernel sent)
    as nbformat JSON."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    # a workspace of its own: JupyterLab would otherwise reopen the notebooks earlier tests had open (and their kernels)
    workspace = Path(path).stem
    page.goto(f"{lab.url}lab/workspaces/{workspace}/tree/{path}?token={lab.token}")
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started !== undefined", timeout=90_000)
    page.wait_for_selector(f"{CURRENT} .jp-Notebook .jp-CodeCell", timeout=90_000)
    _wait_for_kernel(page, path)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    # finished when every code cell has an execution count, or when a cell's error stopped Run All (the kernel skips
    # what was queued after it) and the kernel is idle
    page.wait_for_function(
        f"""path => {{ const cells = ({NOTEBOOK})(path).cells.filter(c => c.cell_type === 'code');
                      const failed = cells.some(c => c.outputs.some(o => o.output_type === 'error'));
                      return cells.every(c => c.execution_count !== null) || (failed && ({KERNEL_READY})(path)); }}""",
        arg=path, timeout=timeout_s * 1000, polling=1000)
    notebook = page.evaluate(NOTEBOOK, path)
    assert notebook is not None, f"JupyterLab has no notebook open at {path}"
    sent = _outputs(notebook)
    try:  # every Plotly output and widget is on the page and every plot has drawn its traces (a figure widget's
        # data comes after its view)
        page.wait_for_function(
            f"""([plots, widgets]) =>
                document.querySelectorAll('{PLOTLY_OUTPUT}').length === plots
                && document.querySelectorAll('{WIDGET_OUTPUT}').length === widgets
                && [...document.querySelectorAll('{CURRENT} .js-plotly-plot')].map({FIGURE_FACTS}).every({DREW})""",
            arg=[sum(PLOTLY in o.get("data", {}) for o in sent), sum(WIDGET in o.get("data", {}) for o in sent)],
            timeout=30_000, polling=250)
    except PlaywrightTimeout:
        pass  # the assertions say what did not draw
    return notebook


def _assert_no_error_or_stderr(page, notebook: dict) -> None:
    """No error and nothing on stderr: neither in what the kernel sent nor on the page."""
    sent = _outputs(notebook)
    errors = [f"{o['ename']}: {o['evalue']}" for o in sent if o["output_type"] == "error"]
    stderr = ["".join(o["text"]) for o in sent if o["output_type"] == "stream" and o["name"] == "stderr"]
    assert not errors, errors
    assert not stderr, "stderr output:\n" + "\n---\n".join(stderr)
    shown_stderr = page.locator(f"{CURRENT} .jp-OutputArea-output[data-mime-type='{STDERR}']")
    assert shown_stderr.count() == 0, "stderr output:\n" + "\n---\n".join(shown_stderr.all_inner_texts())
    broken = page.locator(f"{CURRENT} .jp-OutputArea-output",
                          has_text=re.compile("Error displaying widget|No renderer could be found|Javascript Error"))
    assert broken.count() == 0, broken.all_inner_texts()


def _assert_figures_drew(page, notebook: dict) -> None:
    """Each Plotly output the kernel sent is drawn by Plotly (not shown as its text fallback, which is what a missing
    plotly.js or renderer leaves), and every plot on the page, figure widgets included, has its SVG with one drawn
    trace per visible trace and at least one bar, point or line."""
    sent = [o for o in _outputs(notebook) if PLOTLY in o.get("data", {})]
    widgets = [o for o in _outputs(notebook) if WIDGET in o.get("data", {})]
    shown = page.locator(PLOTLY_OUTPUT)
    assert shown.count() == len(sent), f"{len(sent)} Plotly outputs sent, {shown.count()} drawn by Plotly"
    assert page.locator(f"{PLOTLY_OUTPUT}.js-plotly-plot").count() == len(sent)
    assert page.locator(WIDGET_OUTPUT).count() == len(widgets), f"{len(widgets)} widgets sent"
    facts = page.locator(f"{CURRENT} .js-plotly-plot").evaluate_all(
        f"gds => gds.map({FIGURE_FACTS}).map(f => ({{...f, drew: ({DREW})(f)}}))")
    undrawn = [f for f in facts if not f["drew"]]
    assert not undrawn, f"{len(undrawn)} of {len(facts)} plots did not draw: {undrawn}"


def _shut_down(lab, path: str) -> None:
    """End the notebook's kernel (one module, one server: kernels must not pile up on a small machine)."""
    _, sessions = lab.request("GET", "api/sessions")
    for session in sessions:
        if session["path"] == path:
            status, body = lab.request("DELETE", f"api/sessions/{session['id']}")
            assert status == 204, body
    _, kernels = lab.request("GET", "api/kernels")
    assert kernels == [], f"kernels left running after {path}: {kernels}"


def _full_page_shot(page, name: str) -> Path:
    """The whole notebook in one picture: the page made as tall as the notebook's scrolled content."""
    ARTIFACTS.mkdir(exist_ok=True)
    scroll, visible = page.evaluate(f"""() => {{ const s = document.querySelector('{CURRENT} .jp-WindowedPanel-outer');
                                                if (!s) return [0, 0];
                                                s.scrollTop = 0;
                                                return [s.scrollHeight, s.clientHeight]; }}""")
    height = min(VIEWPORT["height"] + max(0, scroll - visible), MAX_SHOT_HEIGHT)
    page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
    page.wait_for_timeout(500)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def _output_of(page, code_text):
    """The output area of the code cell whose source contains `code_text` (a string or a regex)."""
    cell = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea .cm-content", has_text=code_text)).first
    return cell.locator(".jp-OutputArea").first


def _figure(page, title: str):
    return page.locator(".js-plotly-plot").filter(has=page.locator(".gtitle", has_text=title)).first


def _shot(locator, name: str) -> Path:
    """A picture of one output; the page made taller first where the output is (else JupyterLab's menus and status
    bar would cover its ends)."""
    ARTIFACTS.mkdir(exist_ok=True)
    page, size = locator.page, locator.page.viewport_size
    height = locator.bounding_box()["height"]
    if height > size["height"] - 200:
        page.set_viewport_size({"width": size["width"], "height": int(height) + 400})
    locator.scroll_into_view_if_needed()
    path = ARTIFACTS / f"{name}.png"
    locator.screenshot(path=str(path))
    page.set_viewport_size(size)
    if os.environ.get("NBGPU_DOCS_IMAGES"):
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        files.write_bytes(DOCS_IMAGES / path.name, path.read_bytes())  # the README's picture replaced in one step
    return path


def _assert_quickstart_figures(page) -> None:
    """The quick start's figures read against what they must show; its views photographed for the README."""
    # the GPU table says the GPUs are simulated and highlights exactly the rows this kernel sees (a cuda:N)
    table = _output_of(page, re.compile(r"^\s*%gpus\s*$"))
    assert "SIMULATED" in table.inner_text()
    rows = table.locator("tbody tr").evaluate_all(
        "rows => rows.map(r => [r.cells[1].textContent.trim(), getComputedStyle(r).fontWeight])")
    assert len(rows) == 4 and any(alias != "-" for alias, _ in rows)
    assert all((alias != "-") == (weight == "600") for alias, weight in rows), rows

    # the plan's memory bars: one bar per chosen GPU for every memory segment
    bars = _figure(page, "Memory per GPU (simulated GPUs)")
    bars.wait_for(timeout=30_000)
    bar_traces = bars.evaluate("gd => gd.data.filter(t => t.type === 'bar').length")
    drawn = bars.locator(".bars .point path").count()
    assert bar_traces >= 5  # weights, KV cache, activations, context, others ... free, over budget
    assert drawn == CHOSEN_GPUS * bar_traces
    assert bars.locator(".xtick text").count() == CHOSEN_GPUS
    # the KV cache segment: Llama-3-8B's 32 layers x 8 KV heads x 128 dims x keys and values x 2 bytes,
    # for 4 x 4096 tokens, is 2 GiB in all, shared by the two GPUs
    kv = bars.evaluate("gd => Array.from(gd.data.find(t => t.name === 'KV cache').y)")
    assert len(kv) == CHOSEN_GPUS and all(v > 0 for v in kv) and sum(kv) == pytest.approx(2.0)

    placement = _figure(page, "Placement along the depth")
    assert placement.locator(".bars .point path").count() > 30  # every module of the 8B model's depth
    editor = _output_of(page, "plan = nbgpu.plan(llama3_8b")
    assert editor.locator(".widget-slider, .jupyter-widgets.widget-slider").count() >= CHOSEN_GPUS - 1

    monitor = _output_of(page, "monitor = nbgpu.monitor(")
    assert monitor.locator(".js-plotly-plot").count() >= 1
    assert "simulated" in monitor.inner_text().lower()
    # memory over time plots the memory used (the bars' this kernel + other), not the 24 GiB total
    plots = monitor.locator(".js-plotly-plot").evaluate_all(
        "gds => gds.map(gd => gd.data.map(t => [t.name, t.yaxis || 'y', Array.from(t.x || []),"
        " Array.from(t.y || [])]))")
    held = next(p for p in plots if [t[0] for t in p] == ["this kernel", "other processes + driver", "free"])
    used = [a + b for a, b in zip(held[0][2], held[1][2])]
    series = next(p for p in plots if p and p[0][0].startswith("GPU 0"))
    last = [t[3][-1] for t in series if t[1] == "y"]  # the first subplot: memory
    assert len(last) == len(used) == 4
    assert last == pytest.approx(used, abs=0.01) and all(v < 23 for v in last), (last, used)
    compare = _output_of(page, "nbgpu.compare(")
    assert compare.locator(".js-plotly-plot .bars .point path").count() >= 2
    assert page.locator(".js-plotly-plot svg.main-svg").count() >= 6

    _shot(table, "gpu_table")
    _shot(placement, "plan_placement")
    _shot(bars, "memory_bars")
    _shot(editor, "plan_editor")
    _shot(monitor, "monitor")
    _shot(_output_of(page, "split = nbgpu.bench("), "bench")
    _shot(compare, "compare")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_offline_in_jupyterlab_and_draws_its_figures(lab, offline, notebook):
    page, path = offline.page, f"notebooks/{notebook.name}"
    try:
        model = _run_all(page, lab, path)
        _assert_no_error_or_stderr(page, model)
        _assert_figures_drew(page, model)
        if notebook.stem == "00_quickstart":
            _assert_quickstart_figures(page)
        assert not offline.blocked, f"the page asked beyond this machine (blocked): {offline.blocked}"
    finally:
        try:
            _full_page_shot(page, notebook.stem)
        finally:
            _shut_down(lab, path)


# anywidget gives a widget's module 2 s to load and then drops the change messages sent to that widget; plotly's
# module is 5 MB, which a slow machine's browser may not load in time. This makes every such wait end at once.
MODULE_LOADS_LATE = "{ const timeout = AbortSignal.timeout.bind(AbortSignal); " \
                    "AbortSignal.timeout = ms => timeout(ms === 2000 ? 1 : ms); }"
LATE_NOTEBOOK = [
    "import nbgpu\nfrom nbgpu import course\n"
    "course.setup()  # simulated GPUs here\n"
    "plan = nbgpu.plan(dict(model_type='llama', hidden_size=512, intermediate_size=1024, num_hidden_layers=8,\n"
    "                       num_attention_heads=8, vocab_size=32000), gpus='2x24GiB', batch=1, seq_len=256)\n"
    "plan  # the editor: placement and bars as figure widgets",
    "monitor = nbgpu.monitor(interval=60)\nmonitor",
    "monitor.stop()",
]


def test_figure_widgets_draw_when_plotly_s_module_loads_late(lab, offline):
    """A figure widget's first drawing must not depend on a change message: on a slow machine anywidget drops those
    (what once left the plan editor's and the monitor's plots empty in CI)."""
    path = "late_module.ipynb"
    cells = [{"cell_type": "code", "source": code, "metadata": {}, "outputs": [], "execution_count": None}
             for code in LATE_NOTEBOOK]
    (lab.root / path).write_text(json.dumps({"cells": cells, "metadata": {"kernelspec": {
        "name": "python3", "display_name": "Python 3", "language": "python"}}, "nbformat": 4, "nbformat_minor": 5}))
    offline.context.add_init_script(MODULE_LOADS_LATE)
    page = offline.page
    try:
        model = _run_all(page, lab, path)
        _assert_no_error_or_stderr(page, model)
        _assert_figures_drew(page, model)
        assert page.locator(f"{CURRENT} .js-plotly-plot").count() >= 4  # the editor's two, the monitor's two
    finally:
        _shut_down(lab, path)
