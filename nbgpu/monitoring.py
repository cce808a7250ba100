"""`nbgpu.monitor()`: a live view of the GPUs from inside the kernel, like `watch -n 1 nvidia-smi`.

Three parts, kept apart: a `Sampler` turns one inventory reading into a `Sample` (memory split into this kernel's
processes, other processes and free); a `Monitor` polls it from one daemon thread into a bounded history; the view
(`nbgpu.views.monitor_view`, built only when displayed) draws samples and computes nothing.

A kernel runs at most one poller: starting a monitor stops the one running before it, and `monitor()` called again
with the same options returns the running one. The thread never prints: what goes wrong is kept in `Monitor.errors`.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import checks, devices, kernels, visibility
from .devices import GPU, GPUProcess, Inventory
from .errors import UsageError
from .units import GiB, format_size

METRICS = ("memory", "utilization", "temperature", "power")
COLUMNS = ["time", "gpu", "cuda", "memory_used", "memory_this_kernel", "memory_other", "memory_free", "memory_total",
           "utilization", "temperature", "power_draw", "simulated"]
MIN_INTERVAL = 0.01  # seconds; NVML itself refreshes utilisation only every 1/6 s to 1 s
MAX_HISTORY = 1_000_000  # samples kept
THREAD_NAME = "nbgpu-monitor"


@dataclass(frozen=True)
class GPUSample:
    """One GPU at one moment. None wherever the value was not available (a lost GPU, an unsupported field)."""

    gpu: int  # physical index, as nvidia-smi prints it
    cuda: str | None  # 'cuda:N' when this kernel sees the GPU
    name: str | None
    memory_total: int | None
    memory_used: int | None
    memory_free: int | None
    memory_this_kernel: int | None  # this process and its children
    memory_other: int | None  # everything else counted as used: other processes and the driver's reserve
    utilization: int | None
    temperature: int | None
    power_draw: float | None
    simulated: bool
    processes: tuple[GPUProcess, ...] | None
    own_pids: frozenset[int] = frozenset()
    errors: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        return f"GPU {self.gpu}" + (f" {self.cuda}" if self.cuda else "")


@dataclass(frozen=True)
class Sample:
    """Every monitored GPU at one moment."""

    time: float  # seconds since the epoch
    gpus: tuple[GPUSample, ...]
    backend: str  # "nvml" or "simulated"
    message: str | None = None
    owners: Mapping[int, kernels.ProcessOwner] = field(default_factory=dict, compare=False)  # notebook per pid

    @property
    def simulated(self) -> bool:
        return self.backend == "simulated"

    @property
    def datetime(self) -> datetime:
        return datetime.fromtimestamp(self.time)


@dataclass(frozen=True)
class MonitorError:
    """An exception caught in the poller (or while drawing), kept instead of printed."""

    time: float
    where: str  # "poll" or "view"
    message: str
    traceback: str

    def __repr__(self) -> str:
        return f"MonitorError({datetime.fromtimestamp(self.time):%H:%M:%S} in {self.where}: {self.message})"


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces or ')'
    except (OSError, IndexError, ValueError):
        return None


def _descends_from(pid: int, ancestor: int, depth: int = 16) -> bool:
    for _ in range(depth):
        pid = _parent_pid(pid)
        if pid is None or pid <= 1:
            return False
        if pid == ancestor:
            return True
    return False


class Sampler:
    """Turns one inventory reading into a Sample. `read` defaults to `nbgpu.devices.read` (NVML or simulated)."""

    def __init__(self, read: Callable[[], Inventory] | None = None, gpus: Iterable[int] | None = None):
        self.read = read or devices.read
        self.gpus = None if gpus is None else frozenset(gpus)
        self.pid = os.getpid()
        self._visibility_key: Any = None
        self._aliases: dict[int, str] = {}
        self._ours: dict[int, bool] = {}  # pid -> is this process or a child of it (asked of /proc once per pid)

    def poll(self) -> Sample:
        now = time.time()
        return self.sample(self.read(), now)

    def sample(self, inv: Inventory, now: float) -> Sample:
        aliases = self._aliases_for(inv)
        seen_pids: set[int] = set()
        rows = tuple(self._gpu_sample(g, aliases.get(g.index), seen_pids)
                     for g in inv if self.gpus is None or g.index in self.gpus)
        self._ours = {pid: ours for pid, ours in self._ours.items() if pid in seen_pids}  # forget exited processes
        return Sample(now, rows, inv.backend, inv.message, kernels.owners(seen_pids))

    def _aliases_for(self, inv: Inventory) -> dict[int, str]:
        # visibility.current() may ask /proc/self/maps whether CUDA started: only redo it when the setting changes
        sim = devices.simulated()
        key = (os.environ.get(visibility.VISIBLE), os.environ.get(visibility.ORDER), id(sim),
               sim.visible if sim is not None else None, tuple((g.index, g.uuid) for g in inv))
        if key != self._visibility_key:
            vis = visibility.current(inv)
            self._aliases = {g.index: a for g in inv if (a := vis.alias(g.index)) is not None}
            self._visibility_key = key
        return self._aliases

    def _is_ours(self, pid: int) -> bool:
        if pid == self.pid:
            return True
        if pid not in self._ours:
            self._ours[pid] = _descends_from(pid, self.pid)
        return self._ours[pid]

    def _gpu_sample(self, g: GPU, alias: str | None, seen_pids: set[int]) -> GPUSample:
        this = None
        own: frozenset[int] = frozenset()
        if g.processes is not None:
            seen_pids.update(p.pid for p in g.processes)
            mine = [p for p in g.processes if self._is_ours(p.pid)]
            own = frozenset(p.pid for p in mine)
            if all(p.used_memory is not None for p in mine):
                this = sum(p.used_memory for p in mine)
        other = None if this is None or g.memory_used is None else max(g.memory_used - this, 0)
        return GPUSample(
            gpu=g.index, cuda=alias, name=g.name, memory_total=g.memory_total, memory_used=g.memory_used,
            memory_free=g.memory_free, memory_this_kernel=this, memory_other=other, utilization=g.utilization,
            temperature=g.temperature, power_draw=g.power_draw, simulated=g.simulated, processes=g.processes,
            own_pids=own, errors=dict(g.errors),
        )


# --- the one poller of this kernel ---------------------------------------------------------------------

_registry_lock = threading.RLock()
_current: Monitor | None = None
_started: weakref.WeakSet = weakref.WeakSet()


def stop_all() -> None:
    """Stop every monitor this kernel started (`%gpu_monitor stop`; also run at exit)."""
    for m in list(_started):
        m.stop(timeout=1.0)


atexit.register(stop_all)


def _gpu_list(gpus: int | str | Iterable[int] | None) -> tuple[int, ...] | None:
    if gpus is None:
        return None
    how = "give physical GPU indexes as nvidia-smi prints them, e.g. gpus=[0, 1] or gpus='0,1'"
    if isinstance(gpus, str):
        items = [item.strip() for item in gpus.split(",")]
        if not all(item.isascii() and item.isdigit() for item in items):
            raise UsageError(f"cannot read gpus={checks.shown(gpus)}: {how}")
        items = [int(item) for item in items]
    elif isinstance(gpus, (list, tuple, set, frozenset, range)):
        items = list(gpus)
    else:
        items = [gpus]
    if len(items) > 1024:
        raise UsageError(f"gpus= names {len(items)} GPUs: {how}")
    out = tuple(checks.integer(i, "each of gpus= (a physical GPU index)", 0, 1023) for i in items)
    if not out:
        raise UsageError("gpus=[] names no GPU: leave gpus out to monitor every GPU")
    return tuple(sorted(set(out)))


def _metrics(show: str | Iterable[str], temperature: bool, power: bool) -> tuple[str, ...]:
    if isinstance(show, str):
        names = [show]
    elif isinstance(show, (list, tuple, set, frozenset)):
        names = list(show)
    else:
        raise UsageError(f"show must be a metric or a list of them ({', '.join(METRICS)}), not {checks.shown(show)}")
    if not all(isinstance(n, str) for n in names):
        raise UsageError(f"show takes names of metrics ({', '.join(METRICS)}), not {checks.shown(show)}")
    names = ["utilization" if n == "utilisation" else n for n in names]
    bad = [n for n in names if n not in METRICS]
    if bad:
        raise UsageError(f"cannot show {', '.join(map(checks.shown, bad))}: choose from {', '.join(METRICS)}")
    names += ["temperature"] * checks.boolean(temperature, "temperature") + ["power"] * checks.boolean(power, "power")
    return tuple(m for m in METRICS if m in names)


def _options(interval, history, gpus, show, temperature, power, read) -> tuple:
    """The monitor's arguments, checked: (interval, history, gpus, metrics, read)."""
    return (checks.interval(interval, "interval", MIN_INTERVAL, checks.MAX_INTERVAL),
            checks.integer(history, "history (samples kept)", 1, MAX_HISTORY),
            _gpu_list(gpus), _metrics(show, temperature, power), checks.callable_or_none(read, "read"))


class Monitor:
    """Polls the GPUs every `interval` seconds in a background thread and keeps the last `history` samples.

    Display it in a notebook for the live widget; `record()` (or `history`) gives the samples as a table;
    `stop()` ends the polling; `with nbgpu.monitor() as m:` records across a block.
    """

    def __init__(self, interval: float = 1.0, history: int = 300, gpus: int | str | Iterable[int] | None = None,
                 show: str | Iterable[str] = ("memory", "utilization"), temperature: bool = False,
                 power: bool = False, *, read: Callable[[], Inventory] | None = None, start: bool = True):
        interval, history, gpus, show, read = _options(interval, history, gpus, show, temperature, power, read)
        start = checks.boolean(start, "start")
        self.interval = interval
        self.history_length = history
        self.gpus = gpus
        self.show = show
        self._read = read
        self._sampler = Sampler(read, self.gpus)
        self._samples: deque[Sample] = deque(maxlen=history)
        self._lock = threading.Lock()
        self.errors: deque[MonitorError] = deque(maxlen=100)
        self._views: list[Any] = []
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self.stopped_because: str | None = "not started"
        now = time.time()
        first = self._sampler.read()
        self._check_gpus(first)
        self._samples.append(self._sampler.sample(first, now))
        if start:
            self.start()

    def _check_gpus(self, inv: Inventory) -> None:
        if not len(inv) and inv.message:
            raise UsageError(f"nothing to monitor: {inv.message}")
        if self.gpus is not None:
            missing = [i for i in self.gpus if i not in {g.index for g in inv}]
            if missing:
                have = ", ".join(str(g.index) for g in inv) or "none"
                raise UsageError(f"there is no GPU {', '.join(map(str, missing))} on this machine "
                                 f"(GPUs: {have}); give gpus= as nvidia-smi indexes")

    def options(self) -> tuple:
        return (self.interval, self.history_length, self.gpus, self.show, self._read)

    # --- polling --------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop_event.is_set()

    def start(self) -> Monitor:
        """Start polling (stopping any other monitor of this kernel first). Does nothing if already running."""
        global _current
        with _registry_lock:
            if self.running:
                return self
            if _current is not None and _current is not self:
                _current.stop(reason="replaced by a newer monitor")
            self._stop_event = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop_event,), name=THREAD_NAME,
                                            daemon=True)
            self.stopped_because = None
            self._thread.start()
            _current = self
            _started.add(self)
        return self

    def stop(self, timeout: float = 5.0, reason: str = "stopped") -> Monitor:
        """Stop polling; the history is kept. `start()` resumes."""
        global _current
        timeout = checks.number(timeout, "timeout (seconds)", 0, checks.MAX_INTERVAL)
        reason = checks.text(reason, "reason", max_length=500)
        with _registry_lock:
            if _current is self:
                _current = None
        was_running = self.running
        self._stop_event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if was_running:
            self.stopped_because = reason
            self._notify("stopped", reason)
        return self

    def close(self) -> None:
        """Stop polling and close every view drawing this monitor (its widget)."""
        self.stop()
        for view in self.subscribers:
            view.close()

    def _run(self, stop: threading.Event) -> None:
        """The poller. Nothing escapes it (Python's thread hook would print it into whichever cell runs next): a
        failed poll is kept in `errors` and polling goes on; a failure of the loop itself stops it, with the
        reason in `stopped_because` and on the widget's status line."""
        try:
            next_at = time.monotonic() + self.interval
            while not stop.wait(max(0.0, next_at - time.monotonic())):
                self._poll_once()
                next_at += self.interval
                if next_at < time.monotonic():  # fell behind (a slow poll, a suspended machine): skip, don't burst
                    next_at = time.monotonic() + self.interval
        except BaseException as err:  # noqa: BLE001 - never let the thread die silently
            error = self.record_error("poll", err)
            stop.set()
            self.stopped_because = f"stopped: the poller failed ({error.message})"
            self._notify("stopped", self.stopped_because)

    def _poll_once(self) -> None:
        try:
            sample = self._sampler.poll()
        except Exception as err:  # noqa: BLE001 - kept in errors, shown on the status line; polling goes on
            self._notify("failed", self.record_error("poll", err))
            return
        with self._lock:
            self._samples.append(sample)
        self._notify("draw", sample)

    def _notify(self, method: str, arg: Any) -> None:
        for view in list(self._views):
            call = getattr(view, method, None)
            if call is None:
                continue
            try:
                call(arg)
            except Exception as err:  # noqa: BLE001 - a broken view must not stop the poller
                self.record_error("view", err)

    def record_error(self, where: str, err: BaseException) -> MonitorError:
        try:
            message = f"{type(err).__name__}: {err}"
        except Exception:  # noqa: BLE001 - an exception whose str() fails still gets recorded
            message = type(err).__name__
        try:
            trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        except Exception:  # noqa: BLE001
            trace = message
        error = MonitorError(time.time(), where, message, trace)
        self.errors.append(error)
        return error

    def subscribe(self, view: Any) -> None:
        """Have `view.draw(sample)` called for each new sample and `view.stopped(reason)` when polling stops."""
        self._views.append(view)

    @property
    def subscribers(self) -> tuple:
        """The views drawing this monitor."""
        return tuple(self._views)

    def unsubscribe(self, view: Any) -> None:
        if view in self._views:
            self._views.remove(view)

    # --- the data -------------------------------------------------------------------------------------

    @property
    def samples(self) -> list[Sample]:
        with self._lock:
            return list(self._samples)

    @property
    def latest(self) -> Sample | None:
        with self._lock:
            return self._samples[-1] if self._samples else None

    def record(self):
        """The samples as a table, one row per GPU per sample: a pandas DataFrame if pandas is installed,
        else a list of dicts. Columns: time, gpu, cuda, memory_* (bytes), utilization (%), temperature (C),
        power_draw (W), simulated."""
        rows = [{"time": s.datetime, **{c: getattr(g, c) for c in COLUMNS[1:]}} for s in self.samples for g in s.gpus]
        try:
            import pandas
        except ImportError:
            return rows
        return pandas.DataFrame(rows, columns=COLUMNS)

    @property
    def history(self):
        """Same as `record()`."""
        return self.record()

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self._poll_once()  # the state at the end of the block

    # --- text (the widget and HTML are the views layer's: nbgpu.views.monitor_view) ---------------------------

    def status(self) -> str:
        state = "running" if self.running else self.stopped_because or "stopped"
        sim = " [SIMULATED GPUs]" if (s := self.latest) is not None and s.simulated else ""
        errors = f", {len(self.errors)} error(s) in .errors, last: {self.errors[-1].message}" if self.errors else ""
        return f"nbgpu monitor{sim}: {state}, every {self.interval:g} s, {len(self._samples)} of " \
               f"{self.history_length} samples{errors}"

    def __repr__(self) -> str:
        sample = self.latest
        lines = [self.status()]
        if sample is not None:
            lines += ["  " + line for line in sample_lines(sample, self.show)]
        return "\n".join(lines)


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.1f}"


def sample_lines(sample: Sample, show: Iterable[str] = METRICS) -> list[str]:
    """A sample as short text lines (also what the widget's terminal fallback shows)."""
    lines = [f"{sample.datetime:%H:%M:%S}" + (" (simulated GPUs, not real hardware)" if sample.simulated else "")]
    if not sample.gpus:
        lines.append(sample.message or "no GPU")
    for g in sample.gpus:
        parts = [f"memory {_gib(g.memory_used)} / {_gib(g.memory_total)} GiB (this kernel "
                 f"{_gib(g.memory_this_kernel)}, other {_gib(g.memory_other)}, free {_gib(g.memory_free)})"]
        parts.append("util n/a" if g.utilization is None else f"util {g.utilization}%")
        if "temperature" in show:
            parts.append("temp n/a" if g.temperature is None else f"temp {g.temperature}C")
        if "power" in show:
            parts.append("power n/a" if g.power_draw is None else f"power {g.power_draw:.0f} W")
        sim = " (simulated)" if g.simulated else ""
        lines.append(f"{g.label} {g.name or 'n/a'}{sim}: " + ", ".join(parts))
        for p in g.processes or ():
            own = " (this kernel)" if p.pid in g.own_pids else ""
            owner = sample.owners.get(p.pid)
            notebook = f" [{owner.label}]" if owner is not None and owner.kernel is not None else ""
            lines.append(f"    pid {p.pid}{own} {p.name or 'n/a'}{notebook} {format_size(p.used_memory, 'MiB', 0)}")
    return lines


def monitor(interval: float = 1.0, history: int = 300, gpus: int | str | Iterable[int] | None = None,
            show: str | Iterable[str] = ("memory", "utilization"), temperature: bool = False, power: bool = False,
            *, read: Callable[[], Inventory] | None = None) -> Monitor:
    """Start (or return) this kernel's GPU monitor: memory bars, utilisation and memory over time, processes.

    Called again with the same options while running, it returns the running monitor; with other options it
    replaces it. Either way one poller runs, never two. `gpus`: physical indexes to watch (default all).
    """
    options = _options(interval, history, gpus, show, temperature, power, read)
    with _registry_lock:
        old = _current
        if old is not None and old.running and old.options() == options:
            return old
        return Monitor(interval, history, gpus, show, temperature, power, read=read)  # starting it stops `old`


__all__ = ["COLUMNS", "GPUSample", "Monitor", "MonitorError", "Sample", "Sampler", "monitor", "sample_lines"]
