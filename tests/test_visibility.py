import ctypes
import os

import fake_pynvml
import pytest
from conftest import shown_html
from fake_pynvml import FakeGPU, GiB, uuid

import nbgpu
from nbgpu import visibility
from nbgpu.errors import UsageError


@pytest.fixture
def four_gpus(fake_nvml):
    """Four real-looking GPUs: 0 and 2 busy, 1 nearly idle, 3 idle but hot."""
    return fake_nvml([
        FakeGPU(uuid(0), used=70 * GiB, util=90),
        FakeGPU(uuid(1), used=1 * GiB, util=5, bus_id="00000000:08:00.0"),
        FakeGPU(uuid(2), used=40 * GiB, util=0, bus_id="00000000:09:00.0"),
        FakeGPU(uuid(3), used=2 * GiB, util=50, bus_id="00000000:0A:00.0"),
    ])


class FakeLibcuda:
    """libcuda as seen through RTLD_NOLOAD: cuDeviceGetCount answers 3 (NOT_INITIALIZED) until cuInit ran."""

    def __init__(self, initialised):
        self.initialised = initialised

    def cuDeviceGetCount(self, count_ref):
        ctypes.cast(count_ref, ctypes.POINTER(ctypes.c_int)).contents.value = 4 if self.initialised else 0
        return 0 if self.initialised else 3


def env():
    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.environ.get("CUDA_DEVICE_ORDER")


def test_use_sets_both_variables_and_shows_the_mapping(four_gpus):
    vis = nbgpu.use("2,3")
    assert env() == ("2,3", "PCI_BUS_ID")
    assert vis.lines() == ["cuda:0 -> GPU 2 NVIDIA A100-SXM4-80GB (40.0 / 80 GiB used)",
                           "cuda:1 -> GPU 3 NVIDIA A100-SXM4-80GB (2.0 / 80 GiB used)"]
    assert vis.alias(3) == "cuda:1" and vis.alias(0) is None
    table = nbgpu.gpus()
    assert [r[1] for r in table.rows()] == ["-", "-", "cuda:0", "cuda:1"]


def test_use_accepts_uuids_lists_and_none(four_gpus):
    nbgpu.use(f"{uuid(3)},{uuid(1)}")
    assert env()[0] == f"{uuid(3)},{uuid(1)}"
    assert [t.gpu.index for t in visibility.current().targets] == [3, 1]
    nbgpu.use([1, 0])
    assert env()[0] == "1,0"
    vis = nbgpu.use("none")
    assert env()[0] == "" and vis.targets == () and "no GPU is visible" in repr(vis)


@pytest.mark.parametrize("selection, message, lists_choices", [
    ("7", "there is no GPU 7: this machine has 4", True),
    ("1,1", "named twice", False),
    ("GPU-1234", "is not a GPU UUID", True),
    ("GPU-00000000-0000-0000-0000-000000000000", "no GPU has the UUID", True),
    ("MIG-zz", "is not a MIG device UUID", True),
    ("fast", "cannot read 'fast'", True),
    ("1,,2", "empty GPU entry", False),
])
def test_bad_selection_is_refused_and_environment_untouched(four_gpus, selection, message, lists_choices):
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    os.environ.pop("CUDA_DEVICE_ORDER", None)
    with pytest.raises(UsageError, match=message) as err:
        nbgpu.use(selection)
    choices = f"Valid choices: 0 (NVIDIA A100-SXM4-80GB, {uuid(0)}), 1 (NVIDIA A100-SXM4-80GB, {uuid(1)})"
    assert (choices in str(err.value)) == lists_choices
    assert env() == ("0", None)


def test_auto_picks_most_free_memory_then_least_utilised(four_gpus):
    assert [t.gpu.index for t in visibility.auto_select(visibility.devices.read(), 2)] == [1, 3]
    nbgpu.use(auto=1, max_util=20)
    assert env()[0] == "1"
    nbgpu.use(auto=2, min_free="30GiB", max_util=10)
    assert env()[0] == "1,2"


@pytest.mark.parametrize("kwargs, message", [
    (dict(auto=5), "asked for 5 GPU"),
    (dict(auto=1, min_free="79.5GiB"), "only 0 qualify"),
    (dict(auto=3, max_util=10), "GPU 0: utilisation 90%"),
    (dict(auto=1, min_free="lots"), "cannot read the size 'lots'"),
    (dict(auto=0), "auto .* must be a whole number from 1 to"),
])
def test_auto_refusals(four_gpus, kwargs, message):
    with pytest.raises(UsageError, match=message):
        nbgpu.use(**kwargs)
    assert env() == (None, None)


def test_only_one_mig_device(fake_nvml):
    from nbgpu.devices import MIGDevice
    from nbgpu.devices import nvml as nvml_module

    mig = [f"MIG-{i:08x}-aaaa-bbbb-cccc-ddddeeeeffff" for i in range(2)]
    fake_nvml([FakeGPU(uuid(0), mig=1), FakeGPU(uuid(1))])
    original = nvml_module.NVMLReader._mig_devices
    nvml_module.NVMLReader._mig_devices = lambda self, h: tuple(MIGDevice(u, 10 * GiB) for u in mig) if h == 0 else ()
    try:
        with pytest.raises(UsageError, match="only one MIG device"):
            nbgpu.use(",".join(mig))
        with pytest.raises(UsageError, match="only one MIG device"):
            nbgpu.use(f"{mig[0]},1")
        vis = nbgpu.use(mig[1])
        assert env()[0] == mig[1] and vis.lines()[0].startswith(f"cuda:0 -> MIG {mig[1]} on GPU 0")
        assert 0 not in [t.gpu.index for t in visibility.auto_select(visibility.devices.read(), 1)]
    finally:
        nvml_module.NVMLReader._mig_devices = original


def test_too_late_is_refused_unless_the_same_set(four_gpus, monkeypatch):
    os.environ["CUDA_VISIBLE_DEVICES"] = "1,2"
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    monkeypatch.setattr(visibility, "_loaded_libcuda", lambda: FakeLibcuda(initialised=True))
    assert visibility.cuda_driver_initialized()
    with pytest.raises(UsageError) as err:
        nbgpu.use("3")
    text = str(err.value)
    assert "CUDA is already running in this kernel" in text and "cuda:0 -> GPU 1" in text
    assert "Restart the kernel" in text and "%gpus 3" in text
    assert env() == ("1,2", "PCI_BUS_ID")
    assert nbgpu.use("1,2").lines()[0].startswith("cuda:0 -> GPU 1")  # the set in force: fine
    with pytest.raises(UsageError, match="already running"):
        nbgpu.use("2,1")  # same GPUs, other order: a change


def test_driver_loaded_but_not_started_is_free(four_gpus, monkeypatch):
    monkeypatch.setattr(visibility, "_loaded_libcuda", lambda: FakeLibcuda(initialised=False))
    assert not visibility.cuda_driver_initialized()
    nbgpu.use("3")
    assert env()[0] == "3"


def test_asking_whether_cuda_started_never_loads_libcuda(monkeypatch):
    opened = []
    cdll = ctypes.CDLL

    def spy(name, mode=ctypes.DEFAULT_MODE, *args, **kwargs):
        opened.append(mode)
        return cdll(name, mode, *args, **kwargs)

    monkeypatch.setattr(visibility.ctypes, "CDLL", spy)
    visibility.cuda_driver_initialized()
    assert opened and all(mode & os.RTLD_NOLOAD for mode in opened)  # only asks for a libcuda already loaded


@pytest.mark.parametrize("answer, started", [(3, False), (0, True), (100, True)])
def test_only_not_initialised_means_cuda_has_not_started(monkeypatch, answer, started):
    """cuDeviceGetCount: 3 CUDA_ERROR_NOT_INITIALIZED, 0 success, 100 CUDA_ERROR_NO_DEVICE (cuInit ran and failed)."""
    lib = type("Lib", (), {"cuDeviceGetCount": staticmethod(lambda count: answer)})()
    monkeypatch.setattr(visibility, "_loaded_libcuda", lambda: lib)
    assert visibility.cuda_driver_initialized() is started


def test_current_reads_cuda_rules(four_gpus):
    os.environ["CUDA_VISIBLE_DEVICES"] = f"2,{uuid(0)},9,1"  # CUDA stops at the first entry it cannot use
    vis = visibility.current()
    assert [t.gpu.index for t in vis.targets] == [2, 0]
    assert "fastest first" in vis.note  # CUDA_DEVICE_ORDER unset
    os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    assert visibility.current().targets == ()


def test_simulated_choice_does_not_touch_the_real_environment():
    nbgpu.simulate("4x24GiB")
    vis = nbgpu.use("2,3")
    assert env() == (None, None)
    assert vis.simulated and "[simulated]" in repr(vis) and "SIMULATED" in shown_html(vis)
    assert [t.gpu.index for t in visibility.current().targets] == [2, 3]
    with pytest.raises(UsageError):
        nbgpu.use("4")
    assert [t.gpu.index for t in visibility.current().targets] == [2, 3]


def test_all_shows_every_gpu_and_an_explicit_choice_reads_no_topology(four_gpus):
    vis = nbgpu.use("all")
    assert env() == ("0,1,2,3", "PCI_BUS_ID")
    assert [line.split(" (")[0] for line in vis.lines()] == [f"cuda:{i} -> GPU {i} NVIDIA A100-SXM4-80GB"
                                                            for i in range(4)]
    nbgpu.use("1,2")
    nbgpu.use(auto=1)
    assert not [c for c in four_gpus.calls if "Topology" in c or "NvLink" in c or "P2P" in c]


def test_auto_refusals_say_why_each_gpu_was_left_out_and_which_limits_applied(fake_nvml):
    fake_nvml([FakeGPU(uuid(0), mig=1), FakeGPU(uuid(1), util=50, bus_id="00000000:08:00.0"),
               FakeGPU(uuid(2), bus_id="00000000:09:00.0")],
              fail={(2, "nvmlDeviceGetMemoryInfo"): fake_pynvml.NVMLError_NotSupported})
    with pytest.raises(UsageError) as refused:
        nbgpu.use(auto=1, max_util=20)
    message = str(refused.value)
    assert message.startswith("asked for 1 GPU(s) with at most 20.0% utilisation, but only 0 qualify (GPU 0: MIG "
                              "mode on (choose a MIG device by UUID); GPU 1: utilisation 50%; GPU 2: free memory n/a)")
    assert "free (" not in message.split("qualify")[0]  # no memory limit was given
    with pytest.raises(UsageError, match=r"with no limits, but only 1 qualify"):
        nbgpu.use(auto=3)
    with pytest.raises(UsageError, match=r"give either GPUs to use \(e.g. '2,3', 'none'\) or auto=N"):
        nbgpu.use("1", auto=1)
    assert env() == (None, None)
