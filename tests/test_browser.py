"""The quick start in a real browser: JupyterLab on localhost, headless Chromium (Debian's), Run All Cells, then the
Plotly widgets must have drawn (with one bar per GPU and segment) and no cell may show an error.

Screenshots of each view go to artifacts/ (and to docs/images/ with NBGPU_DOCS_IMAGES=1).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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

pytestmark = pytest.mark.browser

# JupyterLab settings for a quiet, fully rendered page: no news pop-up, every cell kept in the DOM
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer at {url} within {timeout} s")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium; see .ci/setup)")
    import playwright.sync_api  # noqa: F401 - the test extra holds it: a missing package is an error, not a skip
    work = tmp_path_factory.mktemp("lab")
    shutil.copytree(ROOT / "notebooks", work / "notebooks")
    settings = work / "settings"
    for name, value in LAB_SETTINGS.items():
        path = settings / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "NBGPU_SIMULATE": SIMULATE, "JUPYTERLAB_SETTINGS_DIR": str(settings),
           "JUPYTERLAB_WORKSPACES_DIR": str(work / "workspaces")}
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False", f"--ServerApp.root_dir={work}",
         "--ServerApp.port_retries=0", *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", proc)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(work / "lab.log", ARTIFACTS / "jupyterlab.log")


def _accept_kernel_dialog(page) -> None:
    """JupyterLab may ask which kernel to start: take the preselected one (the notebook's python3)."""
    button = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
    try:
        button.wait_for(state="visible", timeout=5_000)
    except Exception:
        return
    button.click()
    page.wait_for_selector(".jp-Dialog", state="detached", timeout=10_000)


def _output_of(page, code_text):
    """The output area of the code cell whose source contains `code_text` (a string or a regex)."""
    cell = page.locator(".jp-CodeCell").filter(has=page.locator(".jp-InputArea .cm-content", has_text=code_text)).first
    return cell.locator(".jp-OutputArea").first


def _figure(page, title: str):
    return page.locator(".js-plotly-plot").filter(has=page.locator(".gtitle", has_text=title)).first


def _shot(locator, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    locator.scroll_into_view_if_needed()
    path = ARTIFACTS / f"{name}.png"
    locator.screenshot(path=str(path))
    if os.environ.get("NBGPU_DOCS_IMAGES"):
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        files.write_bytes(DOCS_IMAGES / path.name, path.read_bytes())  # the README's picture replaced in one step
    return path


def test_quickstart_runs_in_jupyterlab_and_draws_its_figures(lab):
    from playwright.sync_api import sync_playwright

    base, token = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        try:
            page.goto(f"{base}/lab/tree/notebooks/00_quickstart.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)

            _accept_kernel_dialog(page)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            _accept_kernel_dialog(page)

            prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
            n_code = prompts.count()
            assert n_code > 10
            # finished when every code cell shows an execution count (not "[ ]" or "[*]")
            page.wait_for_function(
                """() => { const p = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')];
                           return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.textContent)); }""",
                timeout=240_000, polling=1000)
            page.wait_for_timeout(2000)  # the last widgets draw
            page.screenshot(path=str(ARTIFACTS / "quickstart_top.png"))

            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error'], "
                                  ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
            tracebacks = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                      has_text="Traceback")
            assert errors.count() == 0, errors.first.inner_text()
            assert tracebacks.count() == 0, tracebacks.first.inner_text()

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
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "quickstart_last.png"))
            browser.close()
