import os
import subprocess
import sys

import pytest
from fake_pynvml import FakeGPU, uuid
from IPython.core.error import UsageError as IPythonUsageError

from nbgpu import GPUTable, Visibility, devices
from nbgpu.errors import UsageError
from nbgpu.magics import gpus_magic, register


def test_no_argument_shows_the_table():
    devices.simulate("2xH100")
    table = gpus_magic("")
    assert isinstance(table, GPUTable) and len(table.gpus) == 2


def test_simulate_and_off():
    table = gpus_magic("--simulate 4x24GiB")
    assert table.inventory.simulated and len(table.gpus) == 4
    gpus_magic("--simulate off")
    assert devices.simulated() is None


def test_selection_and_auto_flags(fake_nvml):
    fake_nvml([FakeGPU(uuid(0), used=50 * 1024**3), FakeGPU(uuid(1))])
    vis = gpus_magic("--auto 1 --min-free 20GiB --max-util 50")
    assert isinstance(vis, Visibility) and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    gpus_magic("0")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.parametrize("line, message", [
    ("--auto two", "invalid int value"),
    ("--min-free 20GiB", "go with --auto"),
    ("0 --simulate 2x24GiB", "second `%gpus` call"),
    ("--simulate 2xNope", "Known names"),
    ("--frobnicate", "unrecognized arguments"),
    ("--help", r"%gpus \[--auto N\]"),
])
def test_parse_errors_are_usage_errors_and_change_nothing(line, message):
    devices.simulate("2x24GiB")
    with pytest.raises(UsageError, match=message):
        gpus_magic(line)
    assert len(devices.read()) == 2 and "CUDA_VISIBLE_DEVICES" not in os.environ


class FakeShell:
    def __init__(self):
        self.magics = {}

    def register_magic_function(self, fn, kind, name):
        self.magics[name] = fn


def test_registered_magic_shows_a_one_line_usage_error():
    shell = FakeShell()
    register(shell)
    assert set(shell.magics) == {"gpus", "gpu_monitor"}
    devices.simulate("2x24GiB")
    with pytest.raises(IPythonUsageError, match="nbgpu: there is no GPU 5"):
        shell.magics["gpus"]("5")


def test_load_ext_does_not_import_heavy_libraries():
    code = (
        "import sys\n"
        "from IPython.testing.globalipapp import start_ipython\n"
        "ip = start_ipython()\n"
        "ip.run_line_magic('load_ext', 'nbgpu')\n"
        "ip.run_line_magic('gpus', '--simulate 2x24GiB')\n"
        "ip.run_line_magic('gpus', '1')\n"
        "heavy = [m for m in ('torch', 'transformers', 'accelerate', 'plotly') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY=\n" in out.stdout


def test_gpu_monitor_magic_starts_and_stops():
    import nbgpu
    from nbgpu.magics import gpu_monitor_magic

    devices.simulate("2x24GiB")
    nbgpu.monitor(interval=0.05).stop()  # the function, while nbgpu.monitoring is the module
    mon = gpu_monitor_magic("--interval 0.05 --history 10")
    assert mon.running
    gpu_monitor_magic("stop")
    assert not mon.running


def test_gpu_monitor_magic_passes_its_options_to_the_monitor():
    from nbgpu.magics import gpu_monitor_magic

    devices.simulate("2x24GiB")
    mon = gpu_monitor_magic("--interval 0.25 --history 7 --temperature --power")
    try:
        assert (mon.interval, mon.history_length) == (0.25, 7)
        assert mon.show == ("memory", "utilization", "temperature", "power")
    finally:
        mon.stop()
    plain = gpu_monitor_magic("")
    try:
        assert (plain.interval, plain.history_length, plain.show) == (1.0, 300, ("memory", "utilization"))
    finally:
        plain.stop()


def test_a_gpu_named_twice_in_the_magic_is_refused_not_merged():
    devices.simulate("2x24GiB")
    with pytest.raises(UsageError, match="GPU 1 is named twice in '1,1'"):
        gpus_magic("1,1")
    assert devices.simulated().visible is None  # nothing chosen
    vis = gpus_magic("1,0")
    assert [t.gpu.index for t in vis.targets] == [1, 0]  # the order given is the cuda order


def test_auto_limits_given_to_the_magic_reach_the_choice(fake_nvml):
    # GPU 0: 70 GiB free but busy; GPU 1: 40 GiB free and idle; GPU 2: 10 GiB free and idle
    fake_nvml([FakeGPU(uuid(0), used=10 * 1024**3, util=90), FakeGPU(uuid(1), used=40 * 1024**3, util=0),
               FakeGPU(uuid(2), used=70 * 1024**3, util=0)])
    assert [t.gpu.index for t in gpus_magic("--auto 1").targets] == [0]  # the most free memory
    assert [t.gpu.index for t in gpus_magic("--auto 1 --max-util 10").targets] == [1]
    with pytest.raises(UsageError, match="only 1 qualify"):
        gpus_magic("--auto 2 --min-free 30GiB --max-util 10")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # the refused call changed nothing


@pytest.mark.parametrize("line, message", [("go", "invalid choice: 'go'"),
                                           ("--help", r"%gpu_monitor \[--interval INTERVAL\] \[--history HISTORY\]")])
def test_gpu_monitor_magic_refuses_what_it_cannot_read(line, message):
    from nbgpu.magics import gpu_monitor_magic

    devices.simulate("2x24GiB")
    with pytest.raises(UsageError, match=message):
        gpu_monitor_magic(line)


def test_question_mark_shows_each_magics_usage():
    from IPython.core.interactiveshell import InteractiveShell

    import nbgpu

    shell = InteractiveShell.instance()
    nbgpu.load_ipython_extension(shell)
    gpus_help = shell.find_line_magic("gpus").__doc__  # what `%gpus?` prints
    monitor_help = shell.find_line_magic("gpu_monitor").__doc__
    assert "%gpus [--auto N] [--min-free SIZE]" in gpus_help and "--topo" in gpus_help and "--simulate" in gpus_help
    assert "%gpu_monitor [--interval INTERVAL]" in monitor_help and "--history" in monitor_help


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_each_help_flag_shows_the_whole_help_not_an_error(flag):
    from nbgpu.magics import gpu_monitor_magic

    devices.simulate("2x24GiB")
    for magic, described in ((gpus_magic, "Show the GPUs, or choose which ones"),
                             (gpu_monitor_magic, "--interval")):
        with pytest.raises(UsageError) as err:
            magic(f"{flag}")
        assert described in str(err.value) and "unrecognized" not in str(err.value)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
