import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# One thread per process for the tiny models: the suite runs kernels, workers and a browser beside itself on two
# cores, where torch's spinning OpenMP threads make a 0.5 s benchmark take 5 s. (Kernels and workers inherit it.)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import fake_pynvml  # noqa: E402

from nbgpu import devices  # noqa: E402
from nbgpu.devices.nvml import NVMLReader  # noqa: E402


@pytest.fixture(autouse=True)
def clean_gpu_state():
    """Each test starts with no simulated GPUs; the CUDA variables are restored after it."""
    names = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")
    saved = {name: os.environ.get(name) for name in names}
    devices.simulate(None)
    yield
    devices.simulate(None)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def fake_nvml(monkeypatch):
    """Install a stub pynvml over the given fake GPUs as the inventory backend; returns the stub module."""

    def install(gpus, **kwargs):
        module = fake_pynvml.make(gpus, **kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", module)
        monkeypatch.setattr(devices, "_nvml", NVMLReader())
        return module

    return install


try:  # property-based tests (tests/test_properties*.py); profiles: NBGPU_HYPOTHESIS=ci (default) or thorough
    from hypothesis import HealthCheck, settings
except ImportError:
    pass
else:
    # ci: the same examples on every run (derandomize), no example database written into the checkout, no
    # deadline (a plan takes tens of milliseconds on a busy CI core). The example counts are set per test and
    # multiplied by NBGPU_HYPOTHESIS_SCALE; thorough draws fresh examples each run, ten times as many.
    settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                                     HealthCheck.filter_too_much, HealthCheck.data_too_large])
    settings.register_profile("thorough", parent=settings.get_profile("ci"), derandomize=False)
    settings.load_profile(os.environ.get("NBGPU_HYPOTHESIS", "ci"))
    if os.environ.get("NBGPU_HYPOTHESIS") == "thorough":
        os.environ.setdefault("NBGPU_HYPOTHESIS_SCALE", "10")


@pytest.fixture
def opened_state(monkeypatch):
    """The state each widget's comm opened with, by model id: what a front end that creates its view before any later
    change message is applied starts from."""
    from ipywidgets.widgets import widget

    opened = {}
    create_comm = widget.comm.create_comm

    def recording(**kwargs):
        comm = create_comm(**kwargs)
        opened[comm.comm_id] = kwargs["data"]["state"]
        return comm

    monkeypatch.setattr(widget.comm, "create_comm", recording)
    return opened


def shown_formats(obj) -> dict:
    """Every format IPython's formatter gives `obj` once the extension is loaded (outside a kernel: the text/html
    the views layer registers, and the repr)."""
    from IPython.core.interactiveshell import InteractiveShell

    import nbgpu

    shell = InteractiveShell.instance()
    nbgpu.load_ipython_extension(shell)
    data, _ = shell.display_formatter.format(obj)
    return data


def shown_html(obj) -> str:
    """What a notebook's static renderer shows for `obj`: the text/html IPython's formatter gives it once the
    extension is loaded (the views layer registers every nbgpu type)."""
    from IPython.core.interactiveshell import InteractiveShell

    import nbgpu

    shell = InteractiveShell.instance()
    nbgpu.load_ipython_extension(shell)
    data, _ = shell.display_formatter.format(obj)
    return data.get("text/html", "")


# In CI these tests must run: a skip there (no chromium, no kernel) fails the run instead of passing quietly.
REQUIRED_IN_CI = ("tests/test_browser.py", "tests/test_panel_browser.py", "tests/test_notebooks.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CI") == "true" and item.nodeid.startswith(REQUIRED_IN_CI):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where it must run: {reason}"
