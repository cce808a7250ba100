"""Processes -> notebooks with a real `jupyter server` on localhost and two real kernels on simulated GPUs, and the
server extension's endpoints (authentication, shutting down only this server's kernels).

Kernel A (a.ipynb) sees simulated GPU 1 and places 3 GiB there, and runs a child process; kernel B
(work/b.ipynb) sees GPUs 2 and 3 and places 5 GiB on GPU 2. Each kernel reports its own pid: that is the oracle.
"""

from __future__ import annotations

import subprocess
import sys
import time

import jupyter_servers
import psutil
import pytest

from nbgpu import kernels
from nbgpu.devices.simulated import CONTEXT_BYTES
from nbgpu.units import GiB

SIMULATE = "4x24GiB"
SETUP = """
import os, subprocess, sys
import nbgpu
nbgpu.simulate({spec!r})
nbgpu.use({visible!r})
nbgpu.devices.simulated().allocate({gpu}, {nbytes})
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]) if {child} else None
print(os.getpid(), child.pid if child else 0)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    (root / "work").mkdir()
    srv = jupyter_servers.start(root, {"NBGPU_SIMULATE": SIMULATE})
    yield srv
    jupyter_servers.stop(srv)


@pytest.fixture(scope="module")
def notebooks(server):
    out = {}
    for key, path, visible, gpu, nbytes, child in (("a", "a.ipynb", "1", 1, 3 * GiB, True),
                                                   ("b", "work/b.ipynb", "2,3", 2, 5 * GiB, False)):
        session = server.open_notebook(path)
        client = server.client(session["kernel"]["id"])
        printed = jupyter_servers.run(client, SETUP.format(spec=SIMULATE, visible=visible, gpu=gpu, nbytes=nbytes,
                                                           child=child))
        pid, child_pid = map(int, printed.split())
        out[key] = dict(session=session, kernel=session["kernel"]["id"], path=path, pid=pid, child=child_pid,
                        client=client, gpu=gpu, nbytes=nbytes)
    yield out
    for nb in out.values():
        nb["client"].stop_channels()


def test_each_kernel_is_named_by_its_notebook(server, notebooks):
    a, b = notebooks["a"], notebooks["b"]
    directory = kernels.ServerDirectory(server.runtime_dir)
    owners = kernels.owners([a["pid"], b["pid"]], servers_of=directory)
    assert (owners[a["pid"]].kernel.id, owners[a["pid"]].kernel.path) == (a["kernel"], "a.ipynb")
    assert (owners[b["pid"]].kernel.id, owners[b["pid"]].kernel.path) == (b["kernel"], "work/b.ipynb")
    assert owners[a["pid"]].label == "a.ipynb (python3)" and owners[a["pid"]].kernel.server == server.url
    assert owners[a["pid"]].kernel.user == psutil.Process().username()
    asked = directory.requests
    kernels.owners([a["pid"], b["pid"]], servers_of=directory)
    assert directory.requests == asked  # answered from the cache: %gpus and the monitor stay fast


def test_a_kernels_child_process_is_attributed_to_it(server, notebooks):
    a = notebooks["a"]
    owner = kernels.owners([a["child"]], servers_of=kernels.ServerDirectory(server.runtime_dir))[a["child"]]
    assert owner.kernel.id == a["kernel"] and owner.child and owner.kernel_pid == a["pid"]
    assert owner.label == "child of a.ipynb (python3)"


def test_an_unknown_pid_keeps_its_command_line(server, notebooks):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 10  # until the child has exec'd (its command line is empty before that)
        while "time.sleep(60)" not in " ".join(psutil.Process(other.pid).cmdline()) and time.monotonic() < deadline:
            time.sleep(0.02)
        owner = kernels.owners([other.pid], servers_of=kernels.ServerDirectory(server.runtime_dir))[other.pid]
        assert owner.kernel is None and "time.sleep(60)" in owner.label
    finally:
        other.kill()
        other.wait()


def test_gpus_in_a_kernel_names_its_own_notebook(notebooks):
    text = jupyter_servers.run(notebooks["a"]["client"], "print(repr(nbgpu.gpus()))")
    row = next(line for line in text.splitlines() if line.startswith("1 "))
    assert f"{notebooks['a']['pid']} (this kernel) a.ipynb (python3) compute" in row


def test_the_inventory_endpoint_maps_simulated_memory_to_notebooks(server, notebooks):
    status, body = server.request("GET", "nbgpu/api/gpus")
    assert status == 200 and body["simulated"] and body["simulate"] == SIMULATE
    gpus = {g["index"]: g for g in body["gpus"]}
    for nb in notebooks.values():
        g = gpus[nb["gpu"]]
        assert [(p["pid"], p["kernel"], p["memory"]) for p in g["processes"]] == [
            (nb["pid"], nb["kernel"], nb["nbytes"] + CONTEXT_BYTES)]
        assert g["memory_used"] == nb["nbytes"] + CONTEXT_BYTES
        assert g["memory_free"] == 24 * GiB - g["memory_used"] and g["simulated"]
        k = body["kernels"][nb["kernel"]]
        assert (k["path"], k["pid"], k["this_server"], k["simulate"]) == (nb["path"], nb["pid"], True, SIMULATE)
    assert gpus[0]["processes"] == [] and gpus[3]["processes"] == []
    assert body["kernels"][notebooks["a"]["kernel"]]["visible"]["devices"] == [{"cuda": 0, "gpu": 1}]
    assert body["kernels"][notebooks["b"]["kernel"]]["visible"]["devices"] == [{"cuda": 0, "gpu": 2},
                                                                                {"cuda": 1, "gpu": 3}]


def test_every_endpoint_needs_the_servers_authentication(server, notebooks):
    b = notebooks["b"]
    assert server.request("GET", "nbgpu/api/gpus", token=None)[0] == 403
    assert server.request("GET", "nbgpu/api/gpus", token="wrong")[0] == 403
    assert server.request("DELETE", f"nbgpu/api/kernels/{b['kernel']}", token=None)[0] == 403
    assert server.request("DELETE", f"nbgpu/api/kernels/{b['kernel']}", token="wrong")[0] == 403
    assert psutil.pid_exists(b["pid"]) and server.request("GET", f"api/kernels/{b['kernel']}")[0] == 200


def test_every_handler_is_decorated_as_jupyter_server_requires(tmp_path):
    # jupyter_server warns about each extension endpoint without an authentication decorator; make that an error
    # (the JupyterLab extension template's check_auth.py)
    code = """
import warnings
from jupyter_server.serverapp import ServerApp
from jupyter_server.utils import JupyterServerAuthWarning
app = ServerApp(allow_unauthenticated_access=False, jpserver_extensions={"nbgpu": True},
                reraise_server_extension_failures=True)
with warnings.catch_warnings(record=True) as records:
    warnings.simplefilter("always")
    app.initialize(argv=[], find_extensions=False, new_httpserver=False)
bad = [str(r.message) for r in records if issubclass(r.category, JupyterServerAuthWarning)]
assert not bad, bad
patterns = [getattr(r.matcher, "regex", None) for rule in app.web_app.default_router.rules
            for r in getattr(rule.target, "rules", [])]
assert any(p is not None and "nbgpu/api/gpus" in p.pattern for p in patterns)  # the extension's handlers are there
print("ok")
"""
    env = {"JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, **env})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_a_kernel_that_is_not_this_servers_is_refused(server, notebooks, tmp_path):
    import uuid

    from jupyter_client import KernelManager

    kernel_id = str(uuid.uuid4())  # a kernel this server did not start, named as servers name theirs
    outside = KernelManager(kernel_name="python3", connection_file=str(tmp_path / f"kernel-{kernel_id}.json"))
    outside.start_kernel()
    try:
        status, body = server.request("DELETE", f"nbgpu/api/kernels/{kernel_id}")
        assert status == 404 and "not a kernel of this server" in body["message"]
        assert outside.is_alive()
        assert server.request("DELETE", "nbgpu/api/kernels/00000000-0000-4000-8000-000000000000")[0] == 404
    finally:
        outside.shutdown_kernel(now=True)


def test_shutting_down_a_kernel_frees_its_simulated_memory(server, notebooks):
    b = notebooks["b"]
    status, _ = server.request("DELETE", f"nbgpu/api/kernels/{b['kernel']}")
    assert status == 204
    psutil.Process(b["pid"]).wait(timeout=30) if psutil.pid_exists(b["pid"]) else None
    assert all(s["kernel"]["id"] != b["kernel"] for s in server.request("GET", "api/sessions")[1])
    deadline = time.monotonic() + 10
    while True:
        body = server.request("GET", "nbgpu/api/gpus")[1]
        gpu2 = next(g for g in body["gpus"] if g["index"] == 2)
        if not gpu2["processes"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert gpu2["processes"] == [] and gpu2["memory_used"] == 0 and gpu2["memory_free"] == 24 * GiB
    assert b["kernel"] not in body["kernels"] and notebooks["a"]["kernel"] in body["kernels"]
    assert not (server.runtime_dir / "nbgpu" / f"kernel-{b['pid']}.json").exists()


def test_an_unreadable_simulate_spec_is_reported_not_fatal(monkeypatch):
    import logging

    from nbgpu.server.handlers import _simulate_spec

    monkeypatch.setenv("NBGPU_SIMULATE", "4xbogus")
    spec, notes = _simulate_spec(logging.getLogger("nbgpu-test"))
    assert spec is None and notes[0].startswith("NBGPU_SIMULATE='4xbogus' is ignored: cannot read '4xbogus'")
    monkeypatch.setenv("NBGPU_SIMULATE", "2xA100-80GB")
    assert _simulate_spec(logging.getLogger("nbgpu-test")) == ("2xA100-80GB", [])
