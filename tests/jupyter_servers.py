"""A real Jupyter server (or JupyterLab) on localhost for tests: a known token, a free port, its own runtime directory,
and helpers to open notebook sessions and run code in their kernels."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    url: str
    token: str = field(repr=False)
    root: Path
    runtime_dir: Path
    process: subprocess.Popen
    log: Path

    def request(self, method: str, path: str, body=None, token: str | None = "default", timeout: float = 30):
        """(status, parsed JSON or None); token=None sends no credentials."""
        token = self.token if token == "default" else token
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"token {token}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                text = r.read().decode()
                return r.status, (json.loads(text) if text else None)
        except urllib.error.HTTPError as err:
            text = err.read().decode()
            try:
                return err.code, json.loads(text)
            except ValueError:
                return err.code, text

    def open_notebook(self, path: str) -> dict:
        """Create the notebook file and a session for it (the server starts its kernel); returns the session."""
        (self.root / path).write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
        status, session = self.request("POST", "api/sessions", {"path": path, "type": "notebook", "name": path,
                                                               "kernel": {"name": "python3"}})
        assert status == 201, session
        return session

    def client(self, kernel_id: str):
        """A jupyter_client client on one of this server's kernels, through its connection file."""
        from jupyter_client import BlockingKernelClient

        client = BlockingKernelClient()
        client.load_connection_file(str(self.runtime_dir / f"kernel-{kernel_id}.json"))
        # no heartbeat: without a kernel manager, jupyter_client takes a kernel that has not yet answered its first
        # ping within 1 s for dead (a kernel still starting on a busy machine); ready means a kernel_info reply
        client.start_channels(hb=False)
        client.wait_for_ready(timeout=60)
        return client


def run(client, code: str, timeout: float = 60) -> str:
    """Run code in a kernel; returns its stdout. An error in the kernel fails the test with its traceback."""
    out, errors = [], []

    def hook(msg):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream" and content["name"] == "stdout":
            out.append(content["text"])
        elif kind == "error":
            errors.append("\n".join(content["traceback"]))

    reply = client.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok" and not errors, "\n".join(errors)
    return "".join(out)


def start(root: Path, env: dict[str, str] | None = None, app: str = "jupyter_server",
          extra: tuple[str, ...] = (), python: str = sys.executable, inherit_env: bool = True) -> RunningServer:
    """Start `python -m jupyter_server` (or jupyterlab) in `root` with its own runtime directory; wait until it
    answers and has written its runtime file."""
    port, token = free_port(), secrets.token_hex(16)
    runtime = root / ".runtime"
    runtime.mkdir(parents=True, exist_ok=True)
    log = root / f"{app}.log"
    env = {**(os.environ if inherit_env else {}), **(env or {}), "JUPYTER_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen(
        [python, "-m", app, "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", "--ServerApp.open_browser=False", f"--ServerApp.root_dir={root}",
         "--ServerApp.port_retries=0", *(["--allow-root"] if os.geteuid() == 0 else []), *extra],
        cwd=root, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}/", token, root, runtime, proc, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{app} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            status, _ = server.request("GET", "api/status", timeout=2)
            if status == 200 and list(runtime.glob(f"jpserver-{proc.pid}.json")):
                return server
        except OSError:
            pass
        time.sleep(0.3)
    stop(server)
    raise RuntimeError(f"{app} did not answer within 120 s:\n{log.read_text()[-3000:]}")


def start_lab(root: Path, settings: dict[str, dict], env: dict[str, str]) -> RunningServer:
    """JupyterLab in `root` with these user settings (file name under the settings folder -> its JSON), its own
    workspaces, and the app exposed to the page (window.jupyterapp) for the browser tests."""
    folder = root / ".settings"
    for name, value in settings.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    env = {**env, "JUPYTERLAB_SETTINGS_DIR": str(folder), "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces")}
    return start(root, env, app="jupyterlab", extra=("--LabApp.expose_app_in_browser=True",))


def stop(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()
