"""The GPU monitor on CPU: simulated GPUs and a stubbed pynvml (no timing assertions, only generous counts)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time

import fake_pynvml
import numpy as np
import pytest
from conftest import shown_formats

import nbgpu
from nbgpu import devices
from nbgpu.devices.simulated import CONTEXT_BYTES
from nbgpu.errors import UsageError
from nbgpu.monitoring import COLUMNS, THREAD_NAME, Monitor, monitor
from nbgpu.units import GiB
from nbgpu.views.monitor_view import monitor_html, view_of, widget_of


def pollers() -> int:
    return sum(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())


def wait_for(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture(autouse=True)
def no_monitor_left(monkeypatch):
    """conftest restores the GPU state; this also stops every monitor a test started."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield
    import nbgpu.monitoring as mod

    mod.stop_all()


@pytest.fixture
def sim():
    return devices.simulate("2x24GiB")


# --- a stubbed NVML (tests/fake_pynvml.py, installed by conftest's fake_nvml fixture) -------------------

NVML_CALLS = [name for name in dir(fake_pynvml.make([])) if name.startswith("nvmlDevice")]


def lose(module, index):
    """Every NVML query about GPU `index` now fails as a GPU that fell off the bus does."""
    for name in NVML_CALLS:
        module.fail[(index, name)] = fake_pynvml.NVMLError_GpuIsLost


@pytest.fixture
def two_nvml_gpus(fake_nvml):
    return fake_nvml([fake_pynvml.FakeGPU(uuid=fake_pynvml.uuid(i), bus_id=f"00000000:{7 + i:02X}:00.0",
                                          util=40 + i, temperature=50 + i, used=2 * GiB) for i in range(2)])


# --- polling --------------------------------------------------------------------------------------------

def test_samples_arrive_at_the_interval(sim):
    m = monitor(interval=0.05)
    time.sleep(0.5)
    m.stop()
    samples = m.samples
    assert 3 <= len(samples) <= 15
    times = [s.time for s in samples]
    assert times == sorted(times)
    assert all(len(s.gpus) == 2 and s.simulated for s in samples)
    assert not m.errors


def test_stop_ends_the_thread_and_the_sampling(sim):
    m = monitor(interval=0.05)
    assert m.running and pollers() == 1
    m.stop()
    assert not m.running and pollers() == 0
    count = len(m.samples)
    time.sleep(0.2)
    assert len(m.samples) == count
    m.start()  # resumes, keeping the history
    assert wait_for(lambda: len(m.samples) > count) and pollers() == 1


def test_closing_the_widget_stops_the_thread(sim):
    m = monitor(interval=0.05)
    widget = widget_of(m)
    assert m.running
    widget.close()
    assert not m.running and pollers() == 0
    assert m.stopped_because == "widget closed"


def test_close_stops_the_thread_and_closes_the_widget(sim):
    m = monitor(interval=0.05)
    widget = widget_of(m)
    m.close()
    assert not m.running and pollers() == 0
    assert widget.comm is None


def test_running_the_cell_again_never_leaves_a_second_poller(sim):
    first = monitor(interval=0.05)
    again = monitor(interval=0.05)
    assert again is first and pollers() == 1  # same options: the running monitor is reused
    other = monitor(interval=0.1, temperature=True)
    assert other is not first and pollers() == 1
    assert not first.running and first.stopped_because == "replaced by a newer monitor"
    direct = Monitor(interval=0.05)
    assert pollers() == 1 and direct.running and not other.running


def test_bad_options_are_refused_and_the_running_monitor_goes_on(sim):
    m = monitor(interval=0.05)
    for kwargs in (dict(gpus=[7]), dict(interval=0), dict(history=0), dict(show=("memory", "fan")),
                   dict(gpus="a,b"), dict(interval="fast")):
        with pytest.raises(UsageError):
            monitor(**kwargs)
    assert m.running and pollers() == 1


def test_no_gpu_at_all_is_a_clear_error(fake_nvml):
    fake_nvml([], init_error=fake_pynvml.NVMLError_LibraryNotFound)
    with pytest.raises(UsageError, match="nothing to monitor: NVML is not available"):
        monitor()
    assert pollers() == 0


# --- NVML failures --------------------------------------------------------------------------------------

def test_a_gpu_lost_mid_run_is_survived(two_nvml_gpus):
    m = monitor(interval=0.05, temperature=True, power=True)
    assert wait_for(lambda: len(m.samples) >= 3)
    first = m.latest.gpus[1]
    assert first.memory_used == 2 * GiB and first.utilization == 41 and first.temperature == 51
    lose(two_nvml_gpus, 1)
    lost_at = time.time()
    assert wait_for(lambda: sum(s.time > lost_at for s in m.samples) >= 3)
    assert m.running and pollers() == 1
    after = [s for s in m.samples if s.time > lost_at]
    for s in after:
        gone, fine = s.gpus[1], s.gpus[0]
        assert gone.memory_used is None and gone.utilization is None and gone.temperature is None
        assert gone.power_draw is None and gone.memory_this_kernel is None and gone.processes is None
        assert "GPU is lost" in gone.errors["memory"]
        assert fine.memory_used == 2 * GiB and fine.utilization == 40 and not fine.errors
    assert not m.errors  # per-field NVML errors are n/a values, not failures
    text = repr(m)
    assert "GPU 1 cuda:1" in text and "memory n/a / n/a GiB" in text and "util n/a" in text
    view = view_of(m)  # the widget draws the lost GPU as n/a
    view.draw(m.latest, force=True)
    assert view.bars.data[0].y[1] == "GPU 1 cuda:1 · memory n/a" and view.bars.data[-1].text[1] == "n/a"
    assert math.isnan(view.series.data[1].y[-1]) and "GPU is lost" in view.header.value
    assert m.running and not m.errors


def test_an_exception_in_the_poll_is_kept_and_the_thread_goes_on(sim):
    calls = {"n": 0}

    def flaky_read():
        calls["n"] += 1
        if calls["n"] in (3, 4):
            raise RuntimeError("driver hiccup")
        return devices.read()

    m = monitor(interval=0.05, read=flaky_read)
    assert wait_for(lambda: calls["n"] >= 7)
    assert m.running
    m.stop()
    assert len(m.samples) == calls["n"] - 2
    assert len(m.errors) == 2 and all("driver hiccup" in e.message and e.where == "poll" for e in m.errors)
    assert "RuntimeError" in m.errors[0].traceback


def test_a_failing_view_is_kept_in_errors(sim, capsys):
    class Broken:
        def draw(self, sample):
            raise ValueError("cannot draw")

        def stopped(self, reason):
            pass

    m = monitor(interval=0.05)
    m.subscribe(Broken())
    assert wait_for(lambda: len(m.errors) >= 2)
    assert m.running and m.errors[0].where == "view"
    m.stop()
    assert capsys.readouterr() == ("", "")  # nothing printed


# --- what is recorded -----------------------------------------------------------------------------------

def test_history_is_one_row_per_gpu_per_sample(sim):
    sim.allocate(0, 3 * GiB)
    m = monitor(interval=0.05, history=5)
    assert wait_for(lambda: len(m.samples) == 5)
    time.sleep(0.15)
    m.stop()
    assert len(m.samples) == 5  # bounded
    table = m.record()
    assert list(table.columns) == COLUMNS and len(table) == 10
    assert list(table["gpu"]) == [0, 1] * 5 and list(table["cuda"]) == ["cuda:0", "cuda:1"] * 5
    assert table["simulated"].all()
    assert (table["memory_this_kernel"] + table["memory_other"] == table["memory_used"]).all()
    assert (table["memory_used"] + table["memory_free"] == table["memory_total"]).all()
    assert table["time"].is_monotonic_increasing
    assert m.history.equals(table)


def test_history_without_pandas_is_a_list_of_dicts(sim, monkeypatch):
    m = monitor(interval=0.05)
    m.stop()
    monkeypatch.setitem(sys.modules, "pandas", None)
    rows = m.record()
    assert isinstance(rows, list) and len(rows) == 2 * len(m.samples)
    assert list(rows[0]) == COLUMNS and rows[1]["gpu"] == 1


def test_context_manager_records_the_block_and_follows_simulated_allocations(sim):
    with monitor(interval=0.05) as m:
        assert m.running
        time.sleep(0.15)
        sim.allocate(1, 5 * GiB)
        time.sleep(0.15)
    assert not m.running and pollers() == 0
    table = m.record()
    gpu1 = table[table["gpu"] == 1]
    assert gpu1["memory_this_kernel"].iloc[0] == 0
    assert gpu1["memory_this_kernel"].iloc[-1] == 5 * GiB + CONTEXT_BYTES  # the sample taken at the end of the block
    assert gpu1["memory_other"].iloc[-1] == 0
    assert (table[table["gpu"] == 0]["memory_this_kernel"] == 0).all()


def test_only_the_chosen_gpus_and_their_cuda_alias(sim):
    nbgpu.use("1")  # simulated: physical GPU 1 becomes cuda:0
    m = monitor(interval=0.05, gpus=[0, 1])
    m.stop()
    g0, g1 = m.latest.gpus
    assert (g0.gpu, g0.cuda, g1.gpu, g1.cuda) == (0, None, 1, "cuda:0")
    only = monitor(interval=0.05, gpus="1")
    only.stop()
    assert [g.gpu for g in only.latest.gpus] == [1]


def test_memory_of_this_process_and_its_children_is_told_from_others(two_nvml_gpus):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        stranger = 1  # init: never this kernel's child
        two_nvml_gpus.gpus[0].compute[:] = [(os.getpid(), GiB), (child.pid, 512 * 1024**2), (stranger, 256 * 1024**2)]
        m = monitor(interval=0.05)
        m.stop()
        g0 = m.latest.gpus[0]
        assert g0.own_pids == {os.getpid(), child.pid}
        assert g0.memory_this_kernel == GiB + 512 * 1024**2
        assert g0.memory_other == 2 * GiB - g0.memory_this_kernel
        assert f"pid {child.pid} (this kernel)" in repr(m) and "pid 1 proc1" in repr(m)
    finally:
        child.kill()
        child.wait()


# --- display --------------------------------------------------------------------------------------------

def test_text_display_labels_simulated_gpus_and_this_kernel(sim):
    sim.allocate(0, GiB)
    m = monitor(interval=0.05)
    m.stop()
    text = repr(m)
    assert "SIMULATED" in text and "(simulated)" in text and "(this kernel)" in text
    used = (GiB + CONTEXT_BYTES) / GiB  # what was placed plus the simulated CUDA context
    assert f"memory {used:.1f} / 24.0 GiB (this kernel {used:.1f}, other 0.0, free {24 - used:.1f})" in text
    assert "simulated" in monitor_html(m).lower()


def test_widget_draws_the_samples(sim):
    sim.allocate(0, 2 * GiB)
    m = monitor(interval=0.05, temperature=True)
    view = view_of(m)
    m.stop()
    view.draw(m.latest, force=True)
    this_kernel, other, free = view.bars.data
    assert this_kernel.y == ("GPU 0 cuda:0 (simulated)", "GPU 1 cuda:1 (simulated)")
    assert this_kernel.x[0] == pytest.approx((2 * GiB + CONTEXT_BYTES) / GiB) and this_kernel.x[1] == 0
    assert free.x[1] == pytest.approx(24)
    samples = m.samples
    assert len(view.series.data) == 3 * 2  # memory, utilisation, temperature for two GPUs
    for k in range(2):  # the memory used (not the total), the utilisation and the temperature of every sample
        assert list(view.series.data[k].y) == pytest.approx([s.gpus[k].memory_used / GiB for s in samples])
        assert list(view.series.data[2 + k].y) == [s.gpus[k].utilization for s in samples]
        assert list(view.series.data[4 + k].y) == [s.gpus[k].temperature for s in samples]
    assert view.series.data[0].y[-1] == pytest.approx((2 * GiB + CONTEXT_BYTES) / GiB)
    assert "SIMULATED" in view.header.value and "SIMULATED" in view.bars.layout.title.text
    assert "(this kernel)" in view.processes.value
    assert not m.errors


def test_a_front_end_that_renders_the_widget_late_still_gets_the_first_sample(sim, opened_state):
    """A view created before a later change message is applied draws the state the comm opened with: the first
    sample must be in it, not only in the messages that followed."""
    sim.allocate(0, 2 * GiB)
    m = monitor(interval=60)  # one sample, taken as it starts
    view = view_of(m)
    m.stop()
    bars = opened_state[view.bars.model_id]["_widget_data"]
    assert [t["name"] for t in bars] == [t.name for t in view.bars.data] and len(bars) == 3
    assert bars[0]["x"][0] == pytest.approx((2 * GiB + CONTEXT_BYTES) / GiB)  # this kernel's memory on GPU 0
    series = opened_state[view.series.model_id]["_widget_data"]
    # memory and utilisation of the two GPUs, from the first sample on
    assert len(series) == len(view.series.data) == 4 and all(len(t["y"]) >= 1 for t in series)
    assert "Memory per GPU" in opened_state[view.bars.model_id]["_widget_layout"]["title"]["text"]


def test_the_stop_button_and_a_front_end_closing_the_widget_stop_the_thread(sim):
    m = monitor(interval=0.05)
    view = view_of(m)
    view.stop_button.click()
    assert not m.running and pollers() == 0 and view.stop_button.disabled
    m.start()
    assert m.running
    widget_of(m).comm.handle_close({})  # what the kernel does when the front end closes the widget's comm
    assert not m.running and m.stopped_because == "widget closed"


def test_outside_a_kernel_display_falls_back_to_text(sim):
    from IPython.core.interactiveshell import InteractiveShell
    InteractiveShell.instance()  # an IPython shell with no kernel, as in a terminal
    m = monitor(interval=0.05)
    data = shown_formats(m)
    assert data["text/plain"].startswith("nbgpu monitor [SIMULATED GPUs]: running")
    assert "SIMULATED" in data["text/html"] and m.subscribers == ()  # no widget was built
    assert m.running


def test_importing_the_monitor_does_not_import_plotly_or_widgets():
    code = ("import nbgpu, nbgpu.monitoring, sys; nbgpu.Monitor; "
            "print(sorted({'plotly', 'ipywidgets', 'torch'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_in_a_kernel_the_widget_shows_and_other_cells_get_no_output_from_the_poller():
    import nbclient
    import nbformat

    cells = [
        "import threading, time, nbgpu\nnbgpu.simulate('2x24GiB')\n"
        "m = nbgpu.monitor(interval=0.1, temperature=True)\nm",
        "time.sleep(1.0)\nprint('only this')",
        "again = nbgpu.monitor(interval=0.1, temperature=True)\n"
        "print(again is m, sum(t.name == 'nbgpu-monitor' for t in threading.enumerate()))",
        "m.stop()\nprint(len(m.samples) >= 5, list(m.errors), m.running)",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    shown, quiet, rerun, stopped = (c.outputs for c in nb.cells)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in shown)
    assert [(o.output_type, o.get("text")) for o in quiet] == [("stream", "only this\n")]
    assert rerun[0].text == "True 1\n"
    assert stopped[0].text == "True [] False\n"


# --- intervals and a poller that fails ------------------------------------------------------------------

@pytest.mark.parametrize("interval", [float("inf"), 1e10, float("nan"), -1, 3601, "1", True])
def test_an_interval_that_is_not_a_finite_number_of_seconds_up_to_an_hour_is_refused(sim, interval):
    with pytest.raises(UsageError, match="interval"):
        monitor(interval=interval)
    assert pollers() == 0


def test_the_magic_refuses_an_infinite_interval(sim):
    from nbgpu.magics import gpu_monitor_magic

    with pytest.raises(UsageError, match="interval"):
        gpu_monitor_magic("--interval inf")
    assert pollers() == 0


def test_a_poller_that_fails_stops_with_a_visible_reason_and_prints_nothing(sim, monkeypatch, capsys):
    """The finding: interval=inf killed the thread with OverflowError, printed by Python's thread hook into the next
    cell, with monitor.errors empty. The interval is now refused up front, so the failure is forced here."""
    hooked = []
    monkeypatch.setattr(threading, "excepthook", lambda args: hooked.append(args))
    m = Monitor(interval=0.05, start=False)
    view = view_of(m)  # the status line to watch
    m.interval = 1e10  # past the check: what an infinite interval did to the poller
    m.start()
    assert wait_for(lambda: not m.running)
    assert pollers() == 0 and hooked == []
    assert len(m.errors) == 1 and m.errors[0].message.startswith("OverflowError")
    assert m.stopped_because.startswith("stopped: the poller failed (OverflowError")
    assert "the poller failed" in view.header.value and "OverflowError" in view.header.value
    assert "the poller failed (OverflowError" in repr(m)
    assert capsys.readouterr() == ("", "")


def test_a_failed_poll_shows_on_the_status_line_and_polling_goes_on(sim):
    calls = {"n": 0}

    def read_once_broken():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("NVML hiccup")
        return devices.read()

    m = monitor(interval=0.05, read=read_once_broken)
    view = view_of(m)
    assert wait_for(lambda: calls["n"] >= 5)
    assert m.running and len(m.errors) == 1
    assert "NVML hiccup" in view.header.value and "1 error(s)" in view.header.value
    assert "last: RuntimeError: NVML hiccup" in repr(m)


@pytest.mark.parametrize("kwargs", [dict(history=np.int64(5)), dict(gpus=np.int64(1)), dict(gpus=(0, np.int32(1)))])
def test_numpy_integers_are_taken(sim, kwargs):
    m = monitor(interval=0.05, **kwargs)
    m.stop()
    assert isinstance(m.history_length, int) and all(type(g) is int for g in (m.gpus or ()))


@pytest.mark.parametrize("kwargs", [dict(gpus=1.5), dict(gpus=True), dict(show=5), dict(temperature="yes"),
                                    dict(history=True), dict(history=10**9), dict(read="nvml"), dict(gpus=[-1])])
def test_arguments_of_the_wrong_kind_are_usage_errors(sim, kwargs):
    with pytest.raises(UsageError):
        monitor(**kwargs)
    assert pollers() == 0


def test_the_text_lines_of_a_sample_show_every_reading_and_n_a_where_nvml_could_not_say(fake_nvml):
    from nbgpu.monitoring import Sampler, sample_lines

    gpus = [fake_pynvml.FakeGPU(uuid=fake_pynvml.uuid(i), bus_id=f"00000000:{7 + i:02X}:00.0", util=40 + i,
                                temperature=50 + i, used=2 * GiB, power_mw=95_400 + i * 1000) for i in range(2)]
    gpus[0].compute[:] = [(os.getpid(), GiB), (1, 256 * 1024**2)]
    fake_nvml(gpus, fail={(1, "nvmlDeviceGetUtilizationRates"): fake_pynvml.NVMLError_NotSupported,
                          (1, "nvmlDeviceGetName"): fake_pynvml.NVMLError_NotSupported})
    sample = Sampler().poll()
    clock = time.strftime("%H:%M:%S", time.localtime(sample.time))
    # GPU 0: 2 GiB used of 80, 1 GiB of it this kernel's (pid os.getpid()), 256 MiB pid 1's; 95.4 W shows as 95 W
    gpu0 = ("GPU 0 cuda:0 NVIDIA A100-SXM4-80GB: memory 2.0 / 80.0 GiB (this kernel 1.0, other 1.0, free 78.0), "
            "util 40%")
    gpu1 = "GPU 1 cuda:1 n/a: memory 2.0 / 80.0 GiB (this kernel 0.0, other 2.0, free 78.0), util n/a"
    procs = ["    pid 1 proc1 256 MiB", f"    pid {os.getpid()} (this kernel) proc{os.getpid()} 1024 MiB"]
    assert sample_lines(sample, ("memory", "utilization")) == [clock, gpu0, *procs, gpu1]
    assert sample_lines(sample, ("memory", "utilization", "power", "temperature")) == [
        clock, gpu0 + ", temp 50C, power 95 W", *procs, gpu1 + ", temp 51C, power 96 W"]


def test_the_text_lines_of_simulated_gpus_say_so_on_every_line(sim):
    from nbgpu.monitoring import Sampler, sample_lines

    sample = Sampler().poll()
    clock = time.strftime("%H:%M:%S", time.localtime(sample.time))
    empty = "memory 0.0 / 24.0 GiB (this kernel 0.0, other 0.0, free 24.0), util 0%"
    assert sample_lines(sample, ()) == [f"{clock} (simulated GPUs, not real hardware)",
                                        f"GPU 0 cuda:0 Simulated GPU 24 GiB (simulated): {empty}",
                                        f"GPU 1 cuda:1 Simulated GPU 24 GiB (simulated): {empty}"]


def test_the_parent_of_a_process_whose_name_holds_a_parenthesis_is_read(tmp_path):
    from nbgpu.monitoring import _descends_from, _parent_pid

    odd = tmp_path / "a) b"  # /proc/<pid>/stat shows the name in parentheses: "123 (a) b) S <ppid> ..."
    odd.symlink_to("/bin/sleep")
    child = subprocess.Popen([str(odd), "30"])
    try:
        assert wait_for(lambda: open(f"/proc/{child.pid}/stat").read().split(" (", 1)[1].startswith("a) b)"))
        assert _parent_pid(child.pid) == os.getpid()
        assert _descends_from(child.pid, os.getpid())
    finally:
        child.kill()
        child.wait()


def test_the_widget_puts_utilisation_on_a_percent_axis_and_its_legends_under_the_plots(sim):
    m = monitor(interval=0.05, temperature=True)
    view = view_of(m)
    m.stop()
    view.draw(m.latest, force=True)
    layout = view.series.layout
    # rows: memory (GiB, free scale), utilisation (0-100 %, a fixed scale with headroom), temperature (free scale)
    assert [a.text for a in layout.annotations] == ["memory used (GiB)", "utilisation (%)", "temperature (°C)"]
    assert layout.yaxis.range is None and tuple(layout.yaxis2.range) == (0, 105) and layout.yaxis3.range is None
    assert layout.title.text == "Over time · SIMULATED GPUs (not real hardware)"
    # horizontal legends below the plots, where they cover no subplot title
    assert (layout.legend.orientation, layout.legend.yanchor) == ("h", "top") and layout.legend.y < 0
    assert view.bars.layout.legend.orientation == "h" and view.bars.layout.legend.y < 0
    header = unescape_tags(view.header.value)
    assert header.startswith("SIMULATED") and f"nbgpu monitor · stopped · every 0.05 s · {len(m.samples)} samples" \
        in header and "None" not in header and "error" not in header


def test_the_widget_redraws_at_most_every_min_redraw_seconds_unless_forced(sim, monkeypatch):
    from nbgpu.monitoring import Sampler
    from nbgpu.views import monitor_view

    monkeypatch.setattr(monitor_view, "MIN_REDRAW", 3600.0)  # no unforced redraw within this test
    m = monitor(interval=0.05)
    view = view_of(m)
    m.stop()
    view.draw(m.latest, force=True)
    sim.allocate(1, 4 * GiB)
    later = Sampler().poll()
    view.draw(later)  # what the poller does: too soon after the last drawing, skipped
    assert view.bars.data[0].x[1] == 0
    view.draw(later, force=True)
    assert view.bars.data[0].x[1] == pytest.approx((4 * GiB + CONTEXT_BYTES) / GiB)


def unescape_tags(html: str) -> str:
    import re
    from html import unescape

    return unescape(re.sub(r"<[^>]+>", "", html))


def test_the_poller_is_a_daemon_thread_and_a_monitor_has_one_view(sim):
    """A non-daemon poller would keep the kernel's process alive after it is asked to exit; a second view would
    be a second subscriber redrawn on every sample."""
    m = monitor(interval=60)
    try:
        assert m._thread.daemon
        assert view_of(m) is view_of(m)
        assert sum(1 for s in m.subscribers if type(s).__name__ == "MonitorView") == 1
    finally:
        m.stop()
