import pytest
from conftest import shown_html
from fake_pynvml import (
    FakeGPU,
    GiB,
    NVMLError_GpuIsLost,
    NVMLError_LibraryNotFound,
    NVMLError_NoPermission,
    NVMLError_NotSupported,
    uuid,
)

import nbgpu
from nbgpu import devices
from nbgpu.devices import specs
from nbgpu.devices.simulated import CONTEXT_BYTES, SimulateSpecError, parse_simulate_spec
from nbgpu.errors import UsageError


def two_gpus():
    return [FakeGPU(uuid(0), compute=[(4242, 2 * GiB)], graphics=[(4242, 2 * GiB), (77, None)]),
            FakeGPU(uuid(1), name="NVIDIA H100 80GB HBM3", bus_id="00000000:0A:00.0", used=0, util=0, pstate=8,
                    persistence=0, cc=(9, 0), mem_clock_mhz=2619)]


def test_nvml_fields_translate(fake_nvml):
    fake_nvml(two_gpus(), names={4242: "/opt/conda/bin/python"})
    inv = devices.read()
    assert inv.backend == "nvml" and not inv.simulated
    assert inv.driver_version == "580.159.04" and inv.cuda_driver_version == "13.0"
    a, b = inv.gpus
    assert (a.index, a.uuid, a.name, a.pci_bus_id) == (0, uuid(0), "NVIDIA A100-SXM4-80GB", "00000000:07:00.0")
    assert (a.memory_total, a.memory_used, a.memory_free) == (80 * GiB, 3 * GiB, 77 * GiB)
    assert (a.utilization, a.temperature, a.power_draw, a.power_limit) == (12, 41, 95.0, 400.0)
    assert (a.pstate_label, a.persistence_mode, a.compute_capability_label, a.mig_mode) == ("P0", True, "8.0", False)
    # one process that is both compute and graphics is one row; a process whose memory NVML cannot give keeps n/a
    assert [(p.pid, p.name, p.kind, p.used_memory) for p in a.processes] == [
        (77, "proc77", "graphics", None), (4242, "python", "compute+graphics", 2 * GiB)]
    assert (b.pstate_label, b.persistence_mode, b.compute_capability, b.processes) == ("P8", False, (9, 0), ())
    assert b.memory_bandwidth == pytest.approx(2619e6 * 2 * 5120 / 8)  # H100: about 3.35 TB/s
    assert not a.errors and not b.errors


def test_lost_gpu_is_a_row_of_na_and_the_others_still_show(fake_nvml):
    gpus = two_gpus()
    fail = {(0, name): NVMLError_GpuIsLost for name in (
        "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetTemperature",
        "nvmlDeviceGetPowerUsage", "nvmlDeviceGetEnforcedPowerLimit", "nvmlDeviceGetPerformanceState",
        "nvmlDeviceGetPersistenceMode", "nvmlDeviceGetMigMode", "nvmlDeviceGetComputeRunningProcesses",
        "nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetUUID", "nvmlDeviceGetName",
        "nvmlDeviceGetPciInfo", "nvmlDeviceGetCudaComputeCapability")}
    fake_nvml(gpus, fail=fail)
    lost, ok = devices.read().gpus
    assert lost.memory_total is None and lost.utilization is None and lost.processes is None and lost.uuid is None
    assert "GPU is lost" in lost.errors["memory"]
    assert ok.uuid == uuid(1) and ok.memory_total == 80 * GiB
    table = nbgpu.gpus()
    text = repr(table)
    assert "n/a" in text.splitlines()[2] and uuid(1) in text
    assert "<table" in shown_html(table)


def test_handle_that_cannot_be_opened_keeps_its_row(fake_nvml):
    fake_nvml(two_gpus(), fail={(1, "nvmlDeviceGetHandleByIndex"): NVMLError_GpuIsLost})
    first, second = devices.read().gpus
    assert first.uuid == uuid(0)
    assert second.index == 1 and second.memory_total is None and "lost" in second.errors["gpu"]


def test_not_supported_power_and_no_permission_for_processes(fake_nvml):
    fake_nvml(two_gpus(), fail={(None, "nvmlDeviceGetPowerUsage"): NVMLError_NotSupported,
                                (None, "nvmlDeviceGetComputeRunningProcesses"): NVMLError_NoPermission,
                                (None, "nvmlDeviceGetGraphicsRunningProcesses"): NVMLError_NoPermission})
    a, _ = devices.read().gpus
    assert a.power_draw is None and a.power_limit == 400.0 and a.processes is None
    assert a.errors["power_draw"] == "Not Supported"
    assert "Insufficient Permissions" in a.errors["processes (compute)"]
    row = nbgpu.gpus().rows()[0]
    assert row[8] == "n/a" and row[-1] == "n/a" and row[5] == "3.0 GiB / 80 GiB"


def test_no_library_is_one_clear_line(fake_nvml):
    fake_nvml([], init_error=NVMLError_LibraryNotFound)
    inv = devices.read()
    assert inv.gpus == () and "no NVIDIA driver" in inv.message and "--simulate" in inv.message
    assert repr(nbgpu.gpus()) == inv.message
    with pytest.raises(UsageError, match="no NVIDIA driver"):
        nbgpu.use("0")


def test_no_pynvml_package(monkeypatch):
    import sys

    from nbgpu.devices.nvml import NVMLReader

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    inv = NVMLReader().read()
    assert inv.gpus == () and "nvidia-ml-py" in inv.message


def test_no_gpu(fake_nvml):
    fake_nvml([])
    assert "no NVIDIA GPU" in repr(nbgpu.gpus())


def test_a_static_field_that_failed_is_read_again_and_then_kept(fake_nvml):
    module = fake_nvml(two_gpus(), fail={(0, "nvmlDeviceGetUUID"): NVMLError_GpuIsLost})
    first = devices.read().gpus[0]
    assert first.uuid is None and "GPU is lost" in first.errors["uuid"]
    assert first.name == "NVIDIA A100-SXM4-80GB"  # the other static fields were read
    module.fail.clear()
    second = devices.read().gpus[0]
    assert second.uuid == uuid(0) and "uuid" not in second.errors
    asked = module.calls.count("nvmlDeviceGetUUID")
    assert devices.read().gpus[0].uuid == uuid(0)
    assert module.calls.count("nvmlDeviceGetUUID") == asked  # a clean reading is kept


def test_handles_are_cached_between_reads(fake_nvml):
    module = fake_nvml(two_gpus())
    devices.read()
    devices.read()
    assert module.calls.count("nvmlDeviceGetHandleByIndex") == 2  # once per GPU, not per read
    assert module.calls.count("nvmlDeviceGetUUID") == 2  # fields that cannot change are read once
    assert module.calls.count("nvmlDeviceGetMemoryInfo") == 4


@pytest.mark.parametrize("spec, expected", [
    ("4x24GiB", [24 * GiB] * 4),
    ("2xA100-80GB", [80 * GiB] * 2),
    ("H100", [80 * GiB]),
    ("8xT4", [16 * GiB] * 8),
    ("24GiB,80GiB", [24 * GiB, 80 * GiB]),
    ("2x a100, 1xL4", [80 * GiB, 80 * GiB, 24 * GiB]),
    ("4xL4:pcie", [24 * GiB] * 4),
    ("2xH100:nvlink, 2xH100:PCIe,24GiB:sys", [80 * GiB] * 4 + [24 * GiB]),
])
def test_simulate_spec_forms(spec, expected):
    assert [m for _, m, _ in parse_simulate_spec(spec)] == expected


@pytest.mark.parametrize("spec, message", [
    ("4xBanana", "Known names"), ("0x24GiB", "between 1 and 64"), ("24", "smaller than 1 GiB"), ("24GiB,", "empty"),
])
def test_simulate_spec_errors(spec, message):
    with pytest.raises(SimulateSpecError, match=message):
        parse_simulate_spec(spec)


def test_bad_simulate_spec_keeps_the_current_set():
    devices.simulate("2xH100")
    with pytest.raises(UsageError):
        devices.simulate("3xWhat")
    assert len(devices.read()) == 2


def test_simulated_gpus_are_labelled_and_follow_placed_memory():
    nbgpu.simulate("2xA100-80GB")
    sim = devices.simulated()
    sim.allocate(1, 10 * GiB)
    inv = devices.read()
    assert inv.simulated and all(g.simulated for g in inv)
    assert inv[0].memory_used == 0 and inv[0].processes == ()
    assert inv[1].memory_used > 10 * GiB and inv[1].processes[0].pid == __import__("os").getpid()
    assert inv[1].memory_bandwidth == specs.lookup("A100-80GB").bandwidth
    table = nbgpu.gpus()
    assert "SIMULATED" in repr(table) and "SIMULATED" in shown_html(table)
    sim.release()
    after = devices.read()[1]  # what was placed is freed; the CUDA context stays until the process ends
    assert after.memory_used == CONTEXT_BYTES and after.processes[0].used_memory == CONTEXT_BYTES
    assert devices.read()[0].memory_used == 0  # a GPU this process never used has no context
    nbgpu.simulate("off")
    assert devices.simulated() is None


def test_a_new_simulated_machine_starts_without_contexts():
    nbgpu.simulate("2xL4")
    devices.simulated().allocate(0, GiB)
    nbgpu.simulate("2xL4")
    assert [g.memory_used for g in devices.read()] == [0, 0]


# the datasheets' figures, written out here rather than read from the specs table
@pytest.mark.parametrize("spec, limit, bandwidth, bf16", [
    ("L4", 72, 300e9, 121e12), ("H100", 700, 3.35e12, 989e12), ("A100-80GB", 400, 2.039e12, 312e12),
    ("T4", 70, 320e9, None), ("L40S", 350, 864e9, 362e12),
])
def test_simulated_gpus_carry_their_models_figures(spec, limit, bandwidth, bf16):
    nbgpu.simulate(f"2x{spec}")
    sim = devices.simulated()
    idle = sim.spec(0).idle_power
    assert 0 < idle < limit / 4
    sim.set_utilization(1, 100)
    g0, g1 = devices.read()
    assert (g0.power_limit, g0.power_draw) == (limit, idle)
    assert g1.power_draw == limit  # full load reaches the limit and never goes past it
    assert g0.memory_bandwidth == pytest.approx(bandwidth)
    assert g0.bf16_flops == (None if bf16 is None else pytest.approx(bf16))
    sim.set_utilization(1, 50)
    assert devices.read()[1].power_draw == pytest.approx(idle + (limit - idle) / 2)
    sim.set_utilization(1, 150)  # a bad reading never draws more than the limit
    assert devices.read()[1].power_draw == limit


def test_l4_power_follows_utilisation_between_idle_and_72_watts():
    nbgpu.simulate(devices.DEFAULT_SPEC)
    sim = devices.simulated()
    assert devices.DEFAULT_SPEC == "4xL4" and len(sim) == 4
    for util, watts in ((0, 16), (25, 30), (100, 72)):  # 16 W idle + 56 W x share
        sim.set_utilization(2, util)
        assert devices.read()[2].power_draw == pytest.approx(watts)
    assert "16 / 72 W" in repr(nbgpu.gpus())


def test_a_gpu_given_only_by_size_has_no_model_figures_and_says_so():
    nbgpu.simulate("2x24GiB")
    devices.simulated().set_utilization(0, 100)
    g = devices.read()[0]
    assert (g.power_draw, g.power_limit, g.memory_bandwidth, g.bf16_flops, g.compute_capability) == (None,) * 5
    assert "no model figures" in g.errors["power_draw"] and "name a model" in g.errors["memory_bandwidth"]
    assert nbgpu.gpus().rows()[0][8] == "n/a"


def test_nvml_gpus_get_bf16_from_the_specs_table(fake_nvml):
    fake_nvml(two_gpus())
    a, b = devices.read().gpus
    assert a.bf16_flops == pytest.approx(312e12) and b.bf16_flops == pytest.approx(989e12)


def test_spec_table_matches_nvml_names():
    assert specs.match_name("NVIDIA H100 PCIe").key == "H100-PCIE"
    assert specs.match_name("NVIDIA A100-SXM4-80GB").key == "A100-80GB"
    assert specs.match_name("Some Other GPU") is None
