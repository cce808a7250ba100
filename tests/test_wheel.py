"""The built wheel carries the prebuilt JupyterLab extension and enables the server extension: installed into a fresh
environment with a plain `pip install`, JupyterLab lists both as enabled and serves the panel, with no build step.

The fresh environment borrows this one's libraries (JupyterLab, torch, ...) through a .pth file so that nothing is
downloaded; nbgpu itself, its labextension and its server config come only from the wheel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import jupyter_servers
import pytest

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    import hatch_jupyter_builder  # noqa: F401 - both in the test extra: missing is an error, not a skip
    import hatchling  # noqa: F401
    out = tmp_path_factory.mktemp("dist")
    # the labextension built by `pip install -e` (or `jlpm build:prod`) is packaged as it is (skip-if-exists)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (found,) = out.glob("nbgpu-*.whl")
    return found


def test_the_wheel_holds_the_built_labextension_and_the_server_config(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    data = next(n.split("/data/")[0] for n in names if "/data/share/" in n) + "/data/"
    lab = data + "share/jupyter/labextensions/nbgpu/"
    assert lab + "package.json" in names and lab + "install.json" in names
    assert any(re.fullmatch(re.escape(lab) + r"static/remoteEntry\.[0-9a-f]+\.js", n) for n in names)
    config = json.loads(zipfile.ZipFile(wheel).read(data + "etc/jupyter/jupyter_server_config.d/nbgpu.json"))
    assert config == {"ServerApp": {"jpserver_extensions": {"nbgpu": True}}}
    assert "nbgpu/server/handlers.py" in names and "nbgpu/kernels.py" in names
    assert not [n for n in names if "node_modules" in n or n.endswith(".ts") or n.startswith(("tests/", "src/"))]


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    home = tmp_path_factory.mktemp("fresh")
    venv = home / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this env's libraries, not its nbgpu
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "PYTHON"))}
    env.update(HOME=str(home), JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"), PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    where = subprocess.check_output([python, "-c", "import nbgpu; print(nbgpu.__file__)"], env=env, cwd=home,
                                    text=True).strip()
    assert where.startswith(str(venv)), where  # nbgpu from the wheel, not from the working tree
    return python, env


def _listing(python, env, module, cwd) -> str:
    done = subprocess.run([python, "-m", module, "list"], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)
    return ANSI.sub("", done.stdout + done.stderr)


def test_jupyter_lists_both_extensions_as_enabled(fresh):
    python, env = fresh
    venv = python.parent.parent
    labs = _listing(python, env, "jupyterlab.labextensions", env["HOME"])
    section = labs.split(str(venv / "share" / "jupyter" / "labextensions"), 1)[1]
    assert re.search(r"^\s+nbgpu v0\.1\.0 enabled OK \(python, nbgpu\)", section, re.M), labs
    servers = _listing(python, env, "jupyter_server.extension.serverextension", env["HOME"])
    section = servers.split(str(venv / "etc" / "jupyter"), 1)[1]
    assert re.search(r"^\s+nbgpu enabled", section, re.M) and re.search(r"nbgpu 0\.1\.0 OK", section), servers


def test_jupyterlab_serves_the_panel_with_no_build_step(fresh, tmp_path):
    python, env = fresh
    server = jupyter_servers.start(tmp_path, env, app="jupyterlab", python=str(python), inherit_env=False)
    try:
        with urllib.request.urlopen(f"{server.url}lab?token={server.token}", timeout=30) as r:
            page = r.read().decode()
        config = json.loads(re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>',
                                      page, re.S).group(1))
        (ext,) = [e for e in config["federated_extensions"] if e["name"] == "nbgpu"]
        with urllib.request.urlopen(f"{server.url}lab/extensions/nbgpu/{ext['load']}", timeout=30) as r:
            assert r.status == 200 and b"nbgpu" in r.read()
        status, body = server.request("GET", "nbgpu/api/gpus")
        assert status == 200 and "gpus" in body
    finally:
        jupyter_servers.stop(server)
