"""Which Jupyter kernel, and which notebook, a GPU process belongs to.

NVML and nvidia-smi name a process by pid and binary (`python`). This module names the notebook behind a pid when
the pid is a kernel of a running Jupyter server of this user, or a child of one (a DataLoader worker, a
tensor-parallel worker): it walks up the process's parents until one is a kernel. A kernel is recognised by its pid
where the server knows it (inside the server: its own kernel manager), else by the connection file on its command
line, `kernel-<kernel id>.json`, which is how jupyter_client starts every local kernel. The kernel id gives the
notebook through the server's sessions.

Anywhere else than inside the server (a kernel running `%gpus`, a script), the servers are found the way
`jupyter server list` finds them, from the `jpserver-<pid>.json` files in the Jupyter runtime directory, and asked
over their REST API (/api/sessions, /api/kernels) with a short timeout; answers are kept a few seconds, and a server
is asked only when a process on a GPU runs under a kernel it does not know yet. A server is asked only when both its
file and its process belong to this user. The server's token goes into the Authorization header of these requests
and nowhere else: never into a URL, an object, a message or a log.

No jupyter_server import (2-3 s; its `list_running_servers` also deletes files): the runtime directory is read
here. urllib is imported only when a server is asked.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

TIMEOUT = 0.3  # seconds per REST request: a server that does not answer in time is skipped, never waited for
MAX_AGE = 5.0  # seconds a server's kernel list is reused (notebooks are opened and renamed rarely)
RETRY_AFTER = 15.0  # seconds before a server that failed is asked again
_CONNECTION_FILE = re.compile(r"kernel-([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"
                              r"\.json$")
_SECRET = re.compile(r"(?i)((?:token|password|passwd|secret|api[_-]?key)[=:\s]+)\S+")
_MAX_DEPTH = 32  # parents walked from a process towards its kernel


@dataclass(frozen=True)
class Kernel:
    """A kernel of a Jupyter server, with the notebook (or console) it runs for, when it has one."""

    id: str
    name: str | None  # the kernel spec: python3, ...
    path: str | None  # the notebook's path under the server's root; None for a kernel without a session
    server: str  # the server's URL (no token)
    pid: int | None = None  # known inside the server; elsewhere kernels are recognised by their connection file
    session_type: str | None = None  # "notebook", "console", ...
    execution_state: str | None = None
    user: str | None = None  # who runs the server

    @property
    def label(self) -> str:
        where = self.path or f"kernel {self.id[:8]}"
        return f"{where} ({self.name})" if self.name else where


@dataclass(frozen=True)
class ProcessOwner:
    """What a GPU process is: a kernel (or a child of one), or a command line."""

    pid: int
    kernel: Kernel | None = None
    kernel_pid: int | None = None  # the kernel's own process, when `pid` is one of its children
    command: str | None = None  # the command line (secrets masked), for a process that is no kernel's
    user: str | None = None

    @property
    def child(self) -> bool:
        return self.kernel is not None and self.kernel_pid is not None and self.kernel_pid != self.pid

    @property
    def label(self) -> str | None:
        """'notebooks/a.ipynb (python3)', 'child of notebooks/a.ipynb (python3)', or the command line."""
        if self.kernel is not None:
            return ("child of " if self.child else "") + self.kernel.label
        return self.command


@dataclass(frozen=True)
class Server:
    """A running Jupyter server of this user, as its runtime file describes it."""

    url: str
    pid: int
    root_dir: str | None
    user: str | None
    token: str = field(default="", repr=False)


# --- servers of this user ------------------------------------------------------------------------------

def runtime_dir() -> Path | None:
    try:
        from jupyter_core.paths import jupyter_runtime_dir
    except ImportError:  # no Jupyter installed: no server to ask
        return None
    return Path(jupyter_runtime_dir())


def _ours(path: Path, pid: int) -> bool:
    """The runtime file and the server process both belong to this user (a shared runtime dir is possible)."""
    import psutil  # here, not at import: `import nbgpu` stays cheap

    uid = os.getuid()
    try:
        st = path.lstat()
        if path.is_symlink() or st.st_uid != uid:
            return False
        return psutil.Process(pid).uids().real == uid
    except (OSError, psutil.Error):
        return False


def servers(directory: Path | str | None = None) -> list[Server]:
    """The running Jupyter servers of this user listed in the runtime directory (`jupyter server list`)."""
    import psutil  # here, not at import: `import nbgpu` stays cheap

    directory = Path(directory) if directory is not None else runtime_dir()
    if directory is None or not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob("jpserver-*.json")):
        try:
            info = json.loads(path.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being written, or not a server file
        if info.get("sock") or not info.get("url") or not _ours(path, pid):
            continue  # a unix socket (urllib cannot reach it), or another user's server
        try:
            user = psutil.Process(pid).username()
        except (psutil.Error, KeyError):
            user = None
        base = info["url"].rstrip("/") + "/"
        found.append(Server(base, pid, info.get("root_dir"), user, str(info.get("token") or "")))
    return found


def _get(server: Server, endpoint: str, timeout: float):
    import ssl
    import urllib.request  # here, not at import: `import nbgpu` stays cheap

    request = urllib.request.Request(server.url + endpoint, headers={"Accept": "application/json"})
    if server.token:
        request.add_unredirected_header("Authorization", f"token {server.token}")
    context = None
    if server.url.startswith("https://"):
        context = ssl.create_default_context()
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.load(response)


def fetch_kernels(server: Server, timeout: float = TIMEOUT) -> list[Kernel]:
    """Every kernel of one server, with its notebook where a session holds it (two REST requests)."""
    sessions = _get(server, "api/sessions", timeout)
    models = _get(server, "api/kernels", timeout)
    by_kernel = {s["kernel"]["id"]: s for s in sessions if isinstance(s, dict) and s.get("kernel")}
    out = []
    for k in models:
        s = by_kernel.get(k.get("id"), {})
        out.append(Kernel(id=k["id"], name=k.get("name"), path=s.get("path"), server=server.url,
                          session_type=s.get("type"), execution_state=k.get("execution_state"), user=server.user))
    return out


class ServerDirectory:
    """The kernels of this user's running servers, asked over REST and kept for `max_age` seconds."""

    def __init__(self, directory: Path | str | None = None, timeout: float = TIMEOUT, max_age: float = MAX_AGE,
                 exclude_pid: int | None = None):
        self.directory = directory
        self.timeout = timeout
        self.max_age = max_age
        self.exclude_pid = exclude_pid  # the server this runs inside (it knows its own kernels first hand)
        self._lock = threading.Lock()
        self._kernels: dict[str, tuple[float, list[Kernel]]] = {}  # server url -> (when asked, its kernels)
        self._failed: dict[str, float] = {}  # server url -> when it last failed
        self._unknown: dict[str, float] = {}  # kernel id no server knew -> when that was found
        self.errors: dict[str, str] = {}  # server url -> why it could not be asked (never holds a token)
        self.requests = 0  # REST requests made, for tests and benchmarks

    def kernels(self, wanted: Iterable[str] = (), refresh: bool = False) -> list[Kernel]:
        """Every kernel of every server; a server is asked again when its answer is older than `max_age`, or
        when a `wanted` kernel id is in no answer (each unknown id triggers that once per `max_age`)."""
        now = time.monotonic()
        with self._lock:
            known = {k.id for _, ks in self._kernels.values() for k in ks}
            missing = {k for k in wanted if k not in known and now - self._unknown.get(k, -self.max_age)
                       >= self.max_age}
            fresh = [ks for t, ks in self._kernels.values() if now - t < self.max_age]
            if not refresh and not missing and fresh and len(fresh) == len(self._kernels):
                return [k for ks in fresh for k in ks]  # every answer is recent: no need to list the servers
            out: list[Kernel] = []
            listed = [s for s in servers(self.directory) if s.pid != self.exclude_pid]
            for url in (set(self._kernels) | set(self.errors)) - {s.url for s in listed}:
                self._kernels.pop(url, None)  # a server that stopped
                self.errors.pop(url, None)
            for server in listed:
                cached = self._kernels.get(server.url)
                if cached is not None and not refresh and not missing and now - cached[0] < self.max_age:
                    out += cached[1]
                    continue
                if not refresh and now - self._failed.get(server.url, -RETRY_AFTER) < RETRY_AFTER:
                    continue
                try:
                    self.requests += 2
                    found = fetch_kernels(server, self.timeout)
                except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                    self._failed[server.url] = now
                    self._kernels.pop(server.url, None)
                    self.errors[server.url] = _reason(err)
                    continue
                self._kernels[server.url] = (now, found)
                self._failed.pop(server.url, None)
                self.errors.pop(server.url, None)
                out += found
            for kernel_id in missing - {k.id for k in out}:
                self._unknown[kernel_id] = now
            return out


def _reason(err: Exception) -> str:
    import urllib.error

    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"  # never the URL's query or the headers
    if isinstance(err, urllib.error.URLError):
        return f"not reachable ({err.reason})"
    return type(err).__name__


# --- processes -> kernels ------------------------------------------------------------------------------

def _masked(cmdline: list[str]) -> str | None:
    text = " ".join(cmdline).strip()
    return _SECRET.sub(r"\1***", text) or None


def _connection_kernel_id(cmdline: list[str]) -> str | None:
    for arg in cmdline:
        match = _CONNECTION_FILE.search(arg)
        if match:
            return match.group(1).lower()
    return None


@dataclass(frozen=True)
class _Lineage:
    """A process and its parents, each with the kernel id of its connection file (when it has one)."""

    chain: tuple[tuple[int, str | None], ...]  # (pid, kernel id from the command line) from the process upwards
    command: str | None
    user: str | None


def _start_time(pid: int) -> float | None:
    """When the process started (a cheap identity for the cache): /proc's clock ticks on Linux, else psutil's."""
    import psutil  # here, not at import: `import nbgpu` stays cheap

    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return float(f.read().rsplit(b")", 1)[1].split()[19])  # field 22; the name may hold spaces or ')'
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return None  # Linux, and the process is gone
    except (OSError, IndexError, ValueError):
        pass
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class ProcessIndex:
    """Reads a process's parents and command line once per process (a pid's parents never change)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._cache: dict[tuple[int, float], _Lineage] = {}

    def lineage(self, pid: int) -> _Lineage:
        import psutil  # here, not at import: `import nbgpu` stays cheap

        key = (pid, _start_time(pid))  # a pid reused by a new process is another key
        if key[1] is None:
            return _Lineage(((pid, None),), None, None)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return _Lineage(((pid, None),), None, None)
        chain = []
        command = user = None
        current: psutil.Process | None = proc
        for depth in range(_MAX_DEPTH):
            if current is None or current.pid <= 1:
                break
            try:
                cmdline = current.cmdline()
            except psutil.Error:
                cmdline = []
            if depth == 0:
                command = _masked(cmdline)
                try:
                    user = current.username()
                except (psutil.Error, KeyError):
                    user = None
            chain.append((current.pid, _connection_kernel_id(cmdline)))
            try:
                current = current.parent()
            except psutil.Error:
                break
        found = _Lineage(tuple(chain) or ((pid, None),), command, user)
        with self._lock:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[key] = found
        return found


_index = ProcessIndex()
_directory: ServerDirectory | None = None


def attribute(pids: Iterable[int], kernels: Iterable[Kernel], index: ProcessIndex | None = None
              ) -> dict[int, ProcessOwner]:
    """Each pid's owner among `kernels`: the nearest kernel up its parents, else its command line."""
    index = index or _index
    return _attribute({pid: index.lineage(pid) for pid in pids}, kernels)


def _attribute(lines: dict[int, _Lineage], kernels: Iterable[Kernel]) -> dict[int, ProcessOwner]:
    kernels = list(kernels)
    by_pid = {k.pid: k for k in kernels if k.pid is not None}
    by_id = {k.id: k for k in kernels}
    out = {}
    for pid, line in lines.items():
        owner = ProcessOwner(pid, command=line.command, user=line.user)
        for ancestor, kernel_id in line.chain:
            kernel = by_pid.get(ancestor) or (by_id.get(kernel_id) if kernel_id else None)
            if kernel is not None:
                owner = ProcessOwner(pid, kernel, ancestor, line.command, line.user)
                break
        out[pid] = owner
    return out


def kernel_ids_among(pids: Iterable[int], index: ProcessIndex | None = None) -> set[str]:
    """The kernel ids on the command lines of these processes and their parents."""
    index = index or _index
    return _kernel_ids([index.lineage(pid) for pid in pids])


def _kernel_ids(lines: Iterable[_Lineage]) -> set[str]:
    return {kid for line in lines for _, kid in line.chain if kid}


def directory() -> ServerDirectory:
    """The one ServerDirectory of this process (its answers are shared by %gpus and the monitor)."""
    global _directory
    if _directory is None:
        _directory = ServerDirectory()
    return _directory


def owners(pids: Iterable[int], servers_of: ServerDirectory | None = None) -> dict[int, ProcessOwner]:
    """Who each GPU process is, asking this user's Jupyter servers only when a process runs under a kernel.

    Never raises for a process that vanished or a server that does not answer: what is not known stays unnamed.
    """
    lines = {pid: _index.lineage(pid) for pid in sorted(set(pids))}
    wanted = _kernel_ids(lines.values())
    kernels = (servers_of or directory()).kernels(wanted) if wanted else []
    return _attribute(lines, kernels)


__all__ = ["Kernel", "ProcessIndex", "ProcessOwner", "Server", "ServerDirectory", "attribute", "directory",
           "fetch_kernels", "owners", "servers"]
