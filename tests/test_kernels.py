"""Processes -> kernels without a server: which servers are asked (never another user's), command lines, the state
files kernels publish, and simulated GPUs shared by several kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from nbgpu import kernels
from nbgpu.devices import published
from nbgpu.devices.published import KernelState
from nbgpu.devices.simulated import CONTEXT_BYTES
from nbgpu.devices.simulated_shared import pick_spec, simulated_inventory
from nbgpu.units import GiB

NOBODY = 65534
KERNEL_ID = "0b9c5d8e-1f2a-4b3c-8d4e-5f6a7b8c9d0e"


class _Recorder(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.seen.append((self.path, self.headers.get("Authorization")))
        body = json.dumps(self.server.answers.get(self.path, [])).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def recorder():
    """A local HTTP server that records every request it gets (path, Authorization header)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    httpd.seen, httpd.status, httpd.answers = [], 200, {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _server_file(directory, name, url, pid, token="secret-token-123"):
    path = directory / f"jpserver-{name}.json"
    path.write_text(json.dumps({"url": url, "pid": pid, "token": token, "root_dir": "/", "sock": ""}))
    return path


def _foreign_process():
    """(pid, cleanup) of a running process that belongs to another user."""
    if os.geteuid() == 0:
        proc = subprocess.Popen(["sleep", "60"], user=NOBODY, group=NOBODY)
        return proc.pid, lambda: (proc.kill(), proc.wait())
    if psutil.Process(1).uids().real != os.getuid():
        return 1, lambda: None
    pytest.skip("no process of another user to point a server file at (not root, and pid 1 is this user's)")


def test_another_users_server_is_never_asked(tmp_path, recorder):
    url = f"http://127.0.0.1:{recorder.server_port}/"
    pid, cleanup = _foreign_process()
    try:
        _server_file(tmp_path, "1", url, pid)  # a server process of another user
        if os.geteuid() == 0:  # a runtime file of another user (only root can make one)
            chowned = _server_file(tmp_path, "2", url, os.getpid())
            os.chown(chowned, NOBODY, NOBODY)
        directory = kernels.ServerDirectory(tmp_path)
        assert directory.kernels(wanted={KERNEL_ID}) == []
        assert recorder.seen == []
        assert kernels.servers(tmp_path) == []
    finally:
        cleanup()
    # the control: this user's file naming this user's process is asked, with the token in the header only
    _server_file(tmp_path, "3", url, os.getpid())
    assert [s.url for s in kernels.servers(tmp_path)] == [url]
    assert kernels.ServerDirectory(tmp_path).kernels(wanted={KERNEL_ID}) == []
    assert sorted(p for p, _ in recorder.seen) == ["/api/kernels", "/api/sessions"]
    assert {auth for _, auth in recorder.seen} == {"token secret-token-123"}


def test_a_token_is_never_shown(tmp_path, recorder):
    recorder.status = 403
    url = f"http://127.0.0.1:{recorder.server_port}/"
    _server_file(tmp_path, "1", url, os.getpid())
    directory = kernels.ServerDirectory(tmp_path)
    assert directory.kernels(wanted={KERNEL_ID}) == []
    assert directory.errors == {url: "HTTP 403 Forbidden"}
    (server,) = kernels.servers(tmp_path)
    assert "secret-token" not in repr(server) and "secret-token" not in repr(directory.errors)


def test_a_failing_server_is_not_asked_on_every_call(tmp_path, recorder):
    recorder.status = 500
    _server_file(tmp_path, "1", f"http://127.0.0.1:{recorder.server_port}/", os.getpid())
    directory = kernels.ServerDirectory(tmp_path)
    for _ in range(5):
        directory.kernels(wanted={KERNEL_ID})
    assert len(recorder.seen) == 1  # the first request failed; the next ones wait RETRY_AFTER seconds


def test_a_process_that_is_no_kernel_keeps_its_command_line_with_secrets_masked():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--token=abc123", "x"])
    try:
        # the child has a command line of its own once it has exec'd python (a fork in between has the parent's)
        deadline = time.monotonic() + 30
        while "time.sleep(60)" not in " ".join(psutil.Process(proc.pid).cmdline()) and time.monotonic() < deadline:
            time.sleep(0.05)
        owner = kernels.owners([proc.pid])[proc.pid]
        assert owner.kernel is None and not owner.child
        assert "time.sleep(60)" in owner.command and "--token=***" in owner.command and "abc123" not in owner.command
        assert owner.label == owner.command and owner.user == psutil.Process().username()
    finally:
        proc.kill()
        proc.wait()
    gone = kernels.owners([proc.pid])[proc.pid]  # ended: nothing known but the pid
    assert (gone.kernel, gone.command) == (None, None)


def test_a_kernel_is_found_by_the_connection_file_on_its_command_line():
    kernel = kernels.Kernel(id=KERNEL_ID, name="python3", path="work/a.ipynb", server="http://x/")
    fake = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)",
                             "-f", f"/run/user/1/jupyter/kernel-{KERNEL_ID}.json"])
    try:
        child = _wait_for_child(fake.pid)
        owners = kernels.attribute([fake.pid, child, os.getpid()], [kernel])
        assert owners[fake.pid].kernel == kernel and not owners[fake.pid].child
        assert owners[fake.pid].label == "work/a.ipynb (python3)"
        assert owners[child].kernel == kernel and owners[child].kernel_pid == fake.pid
        assert owners[child].label == "child of work/a.ipynb (python3)"
        assert owners[os.getpid()].kernel is None
    finally:
        for p in psutil.Process(fake.pid).children(recursive=True):
            p.kill()
        fake.kill()
        fake.wait()


def _wait_for_child(pid: int) -> int:
    import time

    for _ in range(100):
        children = psutil.Process(pid).children()
        if children:
            return children[0].pid
        time.sleep(0.05)
    raise AssertionError("the child process did not start")


# --- what kernels publish -----------------------------------------------------------------------------

def _state(pid, **kw):
    return {"format": published.FORMAT, "pid": pid, "started": psutil.Process(pid).create_time(), **kw}


def test_published_state_is_read_back_for_live_processes_only(tmp_path):
    me = os.getpid()
    published.write(_state(me, kernel_id="k1", visible_devices="1", device_order="PCI_BUS_ID", simulate="4x24GiB",
                           allocated={"1": 3 * GiB}, utilization={"1": 40}), where=tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f"kernel-{dead.pid}.json").write_text(json.dumps({"format": published.FORMAT, "pid": dead.pid}))
    reused = subprocess.Popen(["sleep", "30"])  # a live pid whose file was written by an earlier process
    (tmp_path / f"kernel-{reused.pid}.json").write_text(
        json.dumps({"format": published.FORMAT, "pid": reused.pid, "started": 1.0}))
    try:
        states = published.read_all(tmp_path)
    finally:
        reused.kill()
        reused.wait()
    assert list(states) == [me]
    assert states[me] == KernelState(me, "k1", "1", "PCI_BUS_ID", "4x24GiB", {1: 3 * GiB}, {1: 40}, states[me].time)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"kernel-{me}.json"]  # the stale files are gone
    assert not list(tmp_path.glob(".kernel-*.tmp"))


def test_a_process_that_is_not_a_kernel_publishes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    import nbgpu

    nbgpu.simulate("2x24GiB")
    nbgpu.devices.simulated().allocate(0, GiB)
    assert not (tmp_path / "nbgpu").exists()


def test_kernels_that_simulate_the_same_gpus_share_them():
    states = {
        10: KernelState(10, "a", "0", "PCI_BUS_ID", "4x24GiB", {0: 2 * GiB, 1: GiB}, {0: 30}, time=1.0),
        11: KernelState(11, "b", "1", "PCI_BUS_ID", "4x24GiB", {1: 4 * GiB}, {1: 50}, time=2.0),
        12: KernelState(12, "c", None, None, "2xA100-80GB", {0: 9 * GiB}, time=3.0),
        13: KernelState(13, "d", None, None, None),
    }
    inv = simulated_inventory("4x24GiB", states)
    assert inv.simulated and len(inv) == 4
    g0, g1, g2, _ = inv
    assert [(p.pid, p.used_memory) for p in g0.processes] == [(10, 2 * GiB + CONTEXT_BYTES)]
    assert [(p.pid, p.used_memory) for p in g1.processes] == [(10, GiB + CONTEXT_BYTES), (11, 4 * GiB + CONTEXT_BYTES)]
    assert g1.memory_used == 5 * GiB + 2 * CONTEXT_BYTES and g1.memory_free == 24 * GiB - g1.memory_used
    assert (g0.utilization, g1.utilization, g2.memory_used, g2.processes) == (30, 50, 0, ())
    assert "12" in inv.message and "2xA100-80GB" in inv.message  # simulates other GPUs: named, not shown
    assert pick_spec(states) == "2xA100-80GB"  # the last kernel to publish


# --- what the server shows -------------------------------------------------------------------------------

def test_the_server_shows_real_gpus_and_a_simulating_kernels_own_choice(fake_nvml):
    import fake_pynvml

    from nbgpu.occupancy import occupancy

    kernel, stranger = (subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", tag])
                        for tag in ("kernel", "stranger"))
    try:
        fake_nvml([fake_pynvml.FakeGPU(uuid=fake_pynvml.uuid(0), compute=[(kernel.pid, GiB // 2)]),
                   fake_pynvml.FakeGPU(uuid=fake_pynvml.uuid(1), compute=[(stranger.pid, GiB)])])
        me = kernels.Kernel(id=KERNEL_ID, name="python3", path="a.ipynb", server="", pid=kernel.pid)
        states = {kernel.pid: KernelState(kernel.pid, KERNEL_ID, "3", "PCI_BUS_ID", "4x24GiB", {3: GiB})}
        found = occupancy([me], states=states).to_json()
    finally:
        for p in (kernel, stranger):
            p.kill()
            p.wait()
    assert (found["backend"], found["simulated"], len(found["gpus"])) == ("nvml", False, 2)
    assert [(p["pid"], p["kernel"], p["memory"]) for p in found["gpus"][0]["processes"]] == [
        (kernel.pid, KERNEL_ID, GiB // 2)]
    (proc,) = found["gpus"][1]["processes"]
    assert (proc["pid"], proc["kernel"], proc["memory"]) == (stranger.pid, None, GiB)
    assert proc["command"].endswith("time.sleep(60) stranger")
    view = found["kernels"][KERNEL_ID]
    # cuda:0 is GPU 3 of the kernel's own simulated 4x24GiB, which this machine does not have
    assert view["simulate"] == "4x24GiB" and view["visible"]["devices"] == [{"cuda": 0, "gpu": 3}]


def test_without_an_nvidia_gpu_the_server_shows_what_kernels_simulate(fake_nvml):
    from nbgpu.occupancy import occupancy

    fake_nvml([])
    me = kernels.Kernel(id=KERNEL_ID, name="python3", path="a.ipynb", server="", pid=os.getpid())
    states = {os.getpid(): KernelState(os.getpid(), KERNEL_ID, "1", "PCI_BUS_ID", "2x24GiB", {1: 2 * GiB})}
    found = occupancy([me], states=states).to_json()
    assert (found["simulated"], found["simulate"], len(found["gpus"])) == (True, "2x24GiB", 2)
    (proc,) = found["gpus"][1]["processes"]
    assert (proc["pid"], proc["kernel"], proc["memory"]) == (os.getpid(), KERNEL_ID, 2 * GiB + CONTEXT_BYTES)
    assert found["kernels"][KERNEL_ID]["visible"] == {"value": "1", "order": "PCI_BUS_ID", "from": "kernel",
                                                      "devices": [{"cuda": 0, "gpu": 1}]}


def test_gpus_and_the_monitor_name_the_notebook_of_a_kernels_process(tmp_path, recorder, fake_nvml, monkeypatch):
    import fake_pynvml

    from nbgpu import gpus, monitoring
    from nbgpu.views.monitor_view import _process_table

    recorder.answers = {
        "/api/sessions": [{"id": "s1", "path": "work/m.ipynb", "type": "notebook",
                           "kernel": {"id": KERNEL_ID, "name": "python3"}}],
        "/api/kernels": [{"id": KERNEL_ID, "name": "python3", "execution_state": "idle"}]}
    _server_file(tmp_path, "1", f"http://127.0.0.1:{recorder.server_port}/", os.getpid())
    monkeypatch.setattr(kernels, "_directory", kernels.ServerDirectory(tmp_path))
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "-f", f"/tmp/runtime/kernel-{KERNEL_ID}.json"])
    try:
        fake_nvml([fake_pynvml.FakeGPU(uuid=fake_pynvml.uuid(0), compute=[(fake.pid, 2 * GiB)])],
                  names={fake.pid: "python"})
        table = repr(gpus())
        sample = monitoring.Sampler().poll()
    finally:
        fake.kill()
        fake.wait()
    assert f"{fake.pid} work/m.ipynb (python3) compute 2048 MiB" in table
    assert sample.owners[fake.pid].kernel.path == "work/m.ipynb"
    lines = monitoring.sample_lines(sample)  # the process is this test's child, so "this kernel" too
    assert f"    pid {fake.pid} (this kernel) python [work/m.ipynb (python3)] 2048 MiB" in lines
    assert "work/m.ipynb (python3)" in _process_table(sample)
    assert sorted(p for p, _ in recorder.seen) == ["/api/kernels", "/api/sessions"]  # asked once, then cached


def test_import_nbgpu_imports_no_server_and_no_http_client():
    code = ("import sys, nbgpu; print(sorted({'jupyter_server', 'tornado', 'urllib.request', 'jupyter_core'} "
            "& set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
