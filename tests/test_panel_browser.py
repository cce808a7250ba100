"""The JupyterLab GPU panel in a real browser (Debian's chromium, headless): two notebooks hold memory on simulated
GPUs; the panel lists each against its GPU, the status bar names the current notebook's GPUs, and shutting a kernel
down from the panel frees its memory and the panel shows it.

Screenshots go to artifacts/ (and to docs/images/ with NBGPU_DOCS_IMAGES=1).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import jupyter_servers
import pytest

from nbgpu.devices.simulated import CONTEXT_BYTES
from nbgpu.units import GiB

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = ROOT / "artifacts"
DOCS_IMAGES = ROOT / "docs" / "images"
SIMULATE = "4xA100-80GB"
TOTAL = 80 * GiB  # each simulated A100-80GB
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}
NOTEBOOKS = {  # name -> (GPUs it chooses, GPU it fills, GiB it places there)
    "train.ipynb": ("1", 1, 52),
    "evaluate.ipynb": ("2,3", 2, 17),
}

pytestmark = pytest.mark.browser


def _notebook(visible: str, gpu: int, gib: int) -> dict:
    source = (f"import nbgpu\nnbgpu.simulate({SIMULATE!r})\nnbgpu.use({visible!r})\n"
              f"# what nbgpu.load records for a model of {gib} GiB on simulated GPU {gpu}\n"
              f"nbgpu.devices.simulated().allocate({gpu}, {gib} * 2**30)")
    return {"cells": [{"cell_type": "code", "execution_count": None, "id": "setup", "metadata": {}, "outputs": [],
                       "source": source}],
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
            "nbformat": 4, "nbformat_minor": 5}


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's chromium is not installed at {CHROMIUM} (apt-get install -y chromium; see .ci/setup)")
    import playwright.sync_api  # noqa: F401 - the test extra holds it: a missing package is an error, not a skip
    work = tmp_path_factory.mktemp("panel")
    for name, spec in NOTEBOOKS.items():
        (work / name).write_text(json.dumps(_notebook(*spec)))
    server = jupyter_servers.start_lab(work, LAB_SETTINGS, {"NBGPU_SIMULATE": SIMULATE})
    try:
        yield server
    finally:
        jupyter_servers.stop(server)
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(server.log, ARTIFACTS / "jupyterlab_panel.log")


def _shot(target, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    target.screenshot(path=str(path))
    if os.environ.get("NBGPU_DOCS_IMAGES"):
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMAGES / path.name)


def _run_notebook(page, name: str) -> None:
    page.evaluate("path => window.jupyterapp.commands.execute('docmanager:open', {path})", name)
    tab = page.locator(f".lm-DockPanel-tabBar .lm-TabBar-tab[data-type='document-title']:has-text('{name}')")
    tab.wait_for(timeout=60_000)
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator"
                           "[data-status='idle']", timeout=90_000)
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    page.wait_for_function(
        """() => { const p = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-InputPrompt')];
                   return p.length > 0 && p.every(e => /\\[\\d+\\]/.test(e.textContent)); }""",
        timeout=120_000, polling=500)
    errors = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) "
                          ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert errors.count() == 0, errors.first.inner_text()


def _card(page, gpu: int):
    return page.locator(f"#nbgpu-panel .jp-nbgpu-gpu[data-gpu='{gpu}']")


def _bytes(card, part: str) -> int:
    return int(card.locator(f".jp-nbgpu-segment-{part}").get_attribute("data-bytes"))


def test_the_panel_names_each_notebook_on_its_gpu_and_shuts_one_down(lab):
    from playwright.sync_api import expect, sync_playwright

    (train, (_, train_gpu, train_gib)), (evaluate, (_, eval_gpu, eval_gib)) = NOTEBOOKS.items()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        try:
            page.goto(f"{lab.url}lab?token={lab.token}")
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.started !== undefined",
                                   timeout=90_000)
            page.locator(".jp-SideBar .lm-TabBar-tab[data-id='nbgpu-panel']").wait_for(timeout=90_000)
            _run_notebook(page, evaluate)
            _run_notebook(page, train)  # the current notebook is train.ipynb

            page.locator(".jp-SideBar .lm-TabBar-tab[data-id='nbgpu-panel']").click()
            panel = page.locator("#nbgpu-panel")
            expect(panel.locator(".jp-nbgpu-simulated")).to_have_text("SIMULATED")
            train_row = _card(page, train_gpu).locator(".jp-nbgpu-notebook", has_text=train)
            eval_row = _card(page, eval_gpu).locator(".jp-nbgpu-notebook", has_text=evaluate)
            expect(train_row).to_be_visible(timeout=30_000)
            expect(eval_row).to_be_visible(timeout=30_000)
            assert "jp-mod-current" in train_row.get_attribute("class")  # "this notebook"
            assert _bytes(_card(page, train_gpu), "this") == train_gib * GiB + CONTEXT_BYTES
            assert _bytes(_card(page, eval_gpu), "notebooks") == eval_gib * GiB + CONTEXT_BYTES
            assert _bytes(_card(page, eval_gpu), "free") == TOTAL - eval_gib * GiB - CONTEXT_BYTES
            assert _card(page, 0).locator(".jp-nbgpu-notebook").count() == 0
            assert "(simulated)" in _card(page, train_gpu).locator(".jp-nbgpu-gpu-name").inner_text()
            expect(_card(page, train_gpu).locator(".jp-nbgpu-alias")).to_have_text("cuda:0")
            status = page.locator(".jp-nbgpu-status")
            expect(status).to_have_text(f"cuda:0 → GPU {train_gpu} (simulated)")
            _shot(panel, "gpu_panel")
            _shot(page, "gpu_panel_lab")

            eval_row.locator(".jp-nbgpu-shutdown").click()
            dialog = page.locator(".jp-Dialog")
            expect(dialog).to_contain_text(evaluate)
            dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
            expect(_card(page, eval_gpu).locator(".jp-nbgpu-notebook")).to_have_count(0, timeout=30_000)
            assert _bytes(_card(page, eval_gpu), "free") == TOTAL
            assert _bytes(_card(page, eval_gpu), "notebooks") == 0
            expect(train_row).to_be_visible()  # the other notebook keeps its memory
            # the kernel's process ends (and the panel shows it) a moment before the server forgets its session
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                sessions = [s["path"] for s in lab.request("GET", "api/sessions")[1]]
                kernels = [k["id"] for k in lab.request("GET", "api/kernels")[1]]
                if sessions == [train] and len(kernels) == 1:
                    break
                time.sleep(0.5)
            assert sessions == [train] and len(kernels) == 1, (sessions, kernels)
        finally:
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "gpu_panel_last.png"))
            browser.close()
