"""The links between GPUs: NVML's answers (a stubbed pynvml) read as `nvidia-smi topo -m` shows them, the simulated
machine's links, the text and HTML matrix, and --auto choosing connected GPUs."""

import pytest
from conftest import shown_html
from fake_pynvml import (
    GPU_LINK,
    SWITCH_LINK,
    FakeGPU,
    GiB,
    NVMLError_GpuIsLost,
    NVMLError_LibraryNotFound,
    NVMLError_NoPermission,
    NVMLError_NotSupported,
    bus,
    uuid,
)

import nbgpu
from nbgpu import devices, visibility
from nbgpu.errors import UsageError
from nbgpu.magics import gpus_magic

NODE, SINGLE, MULTIPLE, HOSTBRIDGE, INTERNAL, SYSTEM = 40, 10, 20, 30, 0, 50
TOPOLOGY_CALLS = ("nvmlDeviceGetTopologyCommonAncestor", "nvmlDeviceGetP2PStatus", "nvmlDeviceGetNvLinkState",
                  "nvmlDeviceGetNvLinkRemotePciInfo", "nvmlDeviceGetCpuAffinity", "nvmlDeviceGetNumaNodeId")


def gpu(i, name="NVIDIA H100 80GB HBM3", cc=(9, 0), **kw):
    return FakeGPU(uuid(i), name=name, bus_id=bus(i), cc=cc, **kw)


def hgx_h100(fake_nvml, **kw):
    """8 x H100 SXM on an NVSwitch board: every GPU has 18 NVLinks into the switches; two CPU sockets."""
    switches = [f"00000000:{0xC0 + s:02X}:00.0" for s in range(4)]
    gpus = [gpu(i, nvlinks=[(switches[n % 4], SWITCH_LINK) for n in range(18)], numa=i // 4,
                cpus=tuple(range(0, 56)) + tuple(range(112, 168)) if i < 4 else tuple(range(56, 112)) +
                tuple(range(168, 224))) for i in range(8)]
    ancestors = {(a, b): NODE if a // 4 == b // 4 else SYSTEM for a in range(8) for b in range(a + 1, 8)}
    return fake_nvml(gpus, ancestors=ancestors, **kw)


def pcie_l4(fake_nvml, **kw):
    """5 x L4: 0 and 1 under one switch, 2 under a second switch of the same tree, 3 on the host bridge (a Gen3 x8
    slot), 4 on the other CPU socket."""
    gpus = [gpu(i, name="NVIDIA L4", cc=(8, 9)) for i in range(5)]
    gpus[3].pcie_gen, gpus[3].pcie_width = 3, 8
    ancestors = {(0, 1): SINGLE, (0, 2): MULTIPLE, (1, 2): MULTIPLE, (0, 3): HOSTBRIDGE, (1, 3): HOSTBRIDGE,
                 (2, 3): HOSTBRIDGE, (0, 4): SYSTEM, (1, 4): SYSTEM, (2, 4): SYSTEM, (3, 4): SYSTEM}
    p2p = {(a, 4): 3 for a in range(4)}  # NVML_P2P_STATUS_IOH_TOPOLOGY_NOT_SUPPORTED
    return fake_nvml(gpus, ancestors=ancestors, p2p=p2p, **kw)


def bridged_h100_pcie(fake_nvml, **kw):
    """4 x H100 PCIe: NVLink bridges join 0-1 and 2-3 (12 links each); the rest is PCIe. GPU 3 reports its links'
    peer with a 4-digit PCI domain (older drivers' legacy field)."""
    gpus = [gpu(i, name="NVIDIA H100 PCIe") for i in range(4)]
    peer = {0: 1, 1: 0, 2: 3, 3: 2}
    for i, g in enumerate(gpus):
        target = bus(peer[i]) if i != 3 else "0000:" + bus(peer[i]).split(":", 1)[1]
        g.nvlinks = [(target, GPU_LINK)] * 12 + [None] * 6  # 6 more links that are down
    ancestors = {(0, 1): SINGLE, (0, 2): NODE, (0, 3): SYSTEM, (1, 2): SYSTEM, (1, 3): SYSTEM, (2, 3): INTERNAL}
    return fake_nvml(gpus, ancestors=ancestors, **kw)


def cells(topo):
    return topo.labels()


# --- NVML ------------------------------------------------------------------------------------------------

def test_nvswitch_machine_is_nv18_between_every_pair(fake_nvml):
    hgx_h100(fake_nvml)
    topo = nbgpu.topology()
    assert topo.backend == "nvml" and not topo.simulated
    expected = [["X" if a == b else "NV18" for b in range(8)] for a in range(8)]
    assert cells(topo) == expected
    assert [g.cpu_affinity for g in topo.gpus] == ["0-55,112-167"] * 4 + ["56-111,168-223"] * 4
    assert [g.numa_node for g in topo.gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    link = topo.link(6, 1)
    assert link.gpus == (1, 6) and link.path == "SYS" and link.nvlinks == 18 and link.nvlink_generation == 4
    assert link.estimated_bandwidth == pytest.approx(450e9)  # 900 GB/s both ways (H100 datasheet) / 2
    assert link.estimated_latency == pytest.approx(0.6e-6)
    assert (link.p2p_read, link.p2p_write, link.p2p) == ("OK", "OK", True)
    assert all(not g.errors for g in topo.gpus) and all(not lk.errors for lk in topo.links)


def test_links_whose_far_end_nvml_cannot_name_are_told_apart_by_bus_id(fake_nvml):
    hgx_h100(fake_nvml, fail={(None, "nvmlDeviceGetNvLinkRemoteDeviceType"): NVMLError_NotSupported})
    assert {c for row in cells(nbgpu.topology()) for c in row} == {"X", "NV18"}  # switch buses are no GPU's
    bridged_h100_pcie(fake_nvml, fail={(None, "nvmlDeviceGetNvLinkRemoteDeviceType"): NVMLError_NotSupported})
    assert cells(nbgpu.topology())[0] == ["X", "NV12", "NODE", "SYS"]  # a GPU's bus: a direct link


def test_pcie_machine_shows_each_path(fake_nvml):
    pcie_l4(fake_nvml)
    topo = nbgpu.topology()
    assert cells(topo) == [
        ["X", "PIX", "PXB", "PHB", "SYS"],
        ["PIX", "X", "PXB", "PHB", "SYS"],
        ["PXB", "PXB", "X", "PHB", "SYS"],
        ["PHB", "PHB", "PHB", "X", "SYS"],
        ["SYS", "SYS", "SYS", "SYS", "X"],
    ]
    assert all(g.nvlinks == 0 for g in topo.gpus)  # NVLink Not Supported: no NVLink, not an error
    gen4_x16 = 16 * 16e9 / 8 * 128 / 130  # 31.5 GB/s
    gen3_x8 = 8 * 8e9 / 8 * 128 / 130  # 7.9 GB/s: the slower end decides
    assert topo.link(0, 1).estimated_bandwidth == pytest.approx(gen4_x16)
    assert topo.link(1, 3).estimated_bandwidth == pytest.approx(gen3_x8)
    assert topo.link(0, 1).estimated_latency == pytest.approx(1.0e-6)
    assert topo.link(2, 4).p2p_read == "topology not supported" and topo.link(2, 4).p2p is False
    assert topo.link(0, 2).p2p is True
    assert not any(g.errors for g in topo.gpus)


def test_mixed_machine_counts_bridged_nvlinks_and_pcie_paths(fake_nvml):
    bridged_h100_pcie(fake_nvml)
    topo = nbgpu.topology()
    assert cells(topo) == [
        ["X", "NV12", "NODE", "SYS"],
        ["NV12", "X", "SYS", "SYS"],
        ["NODE", "SYS", "X", "NV12"],
        ["SYS", "SYS", "NV12", "X"],
    ]
    assert [g.nvlinks for g in topo.gpus] == [12] * 4  # the 6 links that are down do not count
    assert topo.link(2, 3).path == "PIX"  # NVML_TOPOLOGY_INTERNAL (one board) is PIX, as nvidia-smi prints it
    assert topo.link(0, 1).estimated_bandwidth == pytest.approx(300e9)  # 600 GB/s both ways (datasheet) / 2


def test_text_matrix_reads_like_nvidia_smi(fake_nvml):
    bridged_h100_pcie(fake_nvml)
    text = repr(nbgpu.topology())
    expected = """\
GPU topology (NVML)
      GPU0  GPU1  GPU2  GPU3  CPU Affinity  NUMA Affinity
GPU0  X     NV12  NODE  SYS   0-15          0
GPU1  NV12  X     SYS   SYS   0-15          0
GPU2  NODE  SYS   X     NV12  0-15          0
GPU3  SYS   SYS   NV12  X     0-15          0

Legend:

  X    = Self
  SYS  = Connection traversing PCIe as well as the SMP interconnect between NUMA nodes (e.g., QPI/UPI)
  NODE = Connection traversing PCIe as well as the interconnect between PCIe Host Bridges within a NUMA node
  PHB  = Connection traversing PCIe as well as a PCIe Host Bridge (typically the CPU)
  PXB  = Connection traversing multiple PCIe bridges (without traversing the PCIe Host Bridge)
  PIX  = Connection traversing at most a single PCIe bridge
  NV#  = Connection traversing a bonded set of # NVLinks

Links (estimates from published figures, not measured):
  GPU0-GPU1  NV12  NVLink 4 x12   ~300 GB/s one way, ~0.6 us per hop; P2P OK
  GPU0-GPU2  NODE  PCIe Gen4 x16  ~32 GB/s one way, ~1.0 us per hop; P2P OK"""
    assert text.startswith(expected)


def test_each_nvml_error_is_one_field_not_available(fake_nvml):
    module = bridged_h100_pcie(fake_nvml, fail={
        (1, "nvmlDeviceGetNvLinkState"): NVMLError_NoPermission,
        (0, "nvmlDeviceGetTopologyCommonAncestor"): NVMLError_NoPermission,
        (None, "nvmlDeviceGetP2PStatus"): NVMLError_NotSupported,
        (None, "nvmlDeviceGetNumaNodeId"): NVMLError_NotSupported,
        (2, "nvmlDeviceGetMaxPcieLinkGeneration"): NVMLError_GpuIsLost,
    })
    del module.nvmlDeviceGetCpuAffinity  # an older nvidia-ml-py
    topo = nbgpu.topology()
    g0, g1, g2, _ = topo.gpus
    assert g1.nvlinks is None and "Insufficient Permissions" in g1.errors["nvlink"]
    assert topo.link(0, 1).nvlinks == 12  # GPU 0's end still shows the bridge
    assert topo.link(0, 1).path is None and "Insufficient Permissions" in topo.link(0, 1).errors["path"]
    assert topo.link(0, 2).label == "n/a" and topo.link(0, 2).rank == 6
    assert topo.link(1, 2).label == "SYS" and topo.link(1, 2).nvlinks == 0  # GPU 2's links say: no bridge to 1
    assert topo.link(2, 3).p2p_read is None and topo.link(2, 3).p2p is None
    assert g0.numa_node is None and g0.errors["numa_node"] == "Not Supported"
    assert g0.cpu_affinity is None and "nvidia-ml-py" in g0.errors["cpu_affinity"]
    assert g2.pcie_generation is None and topo.link(1, 2).estimated_bandwidth is None
    assert cells(topo) == [["X", "NV12", "n/a", "n/a"], ["NV12", "X", "SYS", "SYS"],
                           ["n/a", "SYS", "X", "NV12"], ["n/a", "SYS", "NV12", "X"]]
    text = repr(topo)
    assert "Not available:" in text and "GPU 1 nvlink: link 0: Insufficient Permissions" in text
    assert "P2P n/a" in text


def test_a_gpu_that_cannot_be_opened_keeps_its_row(fake_nvml):
    pcie_l4(fake_nvml, fail={(2, "nvmlDeviceGetHandleByIndex"): NVMLError_GpuIsLost})
    topo = nbgpu.topology()
    assert topo.gpus[2].name is None and "could not be opened" in topo.gpus[2].errors["gpu"]
    assert cells(topo)[2] == ["n/a", "n/a", "X", "n/a", "n/a"] and cells(topo)[0][1] == "PIX"


def test_topology_is_read_on_demand_once_and_never_by_a_poll(fake_nvml):
    module = pcie_l4(fake_nvml)
    devices.read()
    devices.read()
    assert not any(name in module.calls for name in TOPOLOGY_CALLS)  # the monitor's poll costs what it did
    first = nbgpu.topology()
    assert module.calls.count("nvmlDeviceGetTopologyCommonAncestor") == 10  # once per pair of 5 GPUs
    assert nbgpu.topology() is first and module.calls.count("nvmlDeviceGetTopologyCommonAncestor") == 10


def test_without_nvml_the_topology_says_why(fake_nvml):
    fake_nvml([], init_error=NVMLError_LibraryNotFound)
    topo = nbgpu.topology()
    assert topo.gpus == () and "no NVIDIA driver" in repr(topo) and not topo.available


# --- simulated GPUs --------------------------------------------------------------------------------------

def test_simulated_nvlink_group():
    nbgpu.simulate("4xA100-80GB:nvlink")
    topo = nbgpu.topology()
    assert topo.simulated and "SIMULATED" in repr(topo)
    assert cells(topo) == [["X" if a == b else "NV12" for b in range(4)] for a in range(4)]
    assert topo.link(0, 3).estimated_bandwidth == pytest.approx(300e9)  # 600 GB/s both ways / 2
    assert topo.link(0, 3).nvlink_generation == 3 and topo.link(0, 3).p2p


def test_simulated_pcie_group():
    nbgpu.simulate("2xL4:pcie")
    link = nbgpu.topology().link(0, 1)
    assert (link.label, link.p2p_read) == ("PHB", "OK")
    assert link.estimated_bandwidth == pytest.approx(16 * 16e9 / 8 * 128 / 130)  # PCIe Gen4 x16


def test_simulated_groups_are_joined_by_sys():
    nbgpu.simulate("2xH100:nvlink,2xH100:pcie,L4:pix")
    assert cells(nbgpu.topology()) == [
        ["X", "NV18", "SYS", "SYS", "SYS"],
        ["NV18", "X", "SYS", "SYS", "SYS"],
        ["SYS", "SYS", "X", "PHB", "SYS"],
        ["SYS", "SYS", "PHB", "X", "SYS"],
        ["SYS", "SYS", "SYS", "SYS", "X"],
    ]
    assert nbgpu.topology().link(0, 2).p2p_read == "topology not supported"


@pytest.mark.parametrize("spec, cell", [("4xH100", "NV18"), ("4xV100", "NV6"), ("4xL4", "PHB"), ("4xT4", "PHB"),
                                        ("4x24GiB", "PHB"), ("4xL40S:pxb", "PXB"), ("4xL4:sys", "SYS")])
def test_simulated_default_and_named_links(spec, cell):
    nbgpu.simulate(spec)
    assert {c for row in cells(nbgpu.topology()) for c in row} == {"X", cell}


def test_bridged_cards_pair_up_and_geforce_refuses_p2p_over_pcie():
    nbgpu.simulate("3xRTX3090:nvlink")
    topo = nbgpu.topology()
    assert cells(topo) == [["X", "NV4", "PHB"], ["NV4", "X", "PHB"], ["PHB", "PHB", "X"]]
    assert topo.link(0, 1).estimated_bandwidth == pytest.approx(56.25e9)  # 112.5 GB/s both ways (bridge) / 2
    assert topo.link(0, 2).p2p_read == "GPU not supported"
    assert [g.nvlinks for g in topo.gpus] == [4, 4, 0]


def test_a_gpu_given_by_size_has_no_link_figures():
    nbgpu.simulate("2x24GiB")
    link = nbgpu.topology().link(0, 1)
    assert link.label == "PHB" and link.estimated_bandwidth is None


@pytest.mark.parametrize("spec, message", [("2xL4:nvlink", "L4 has no NVLink"),
                                           ("2x24GiB:nvlink", "given only by its size has no NVLink"),
                                           ("2xL4:fast", "unknown link 'fast'"), ("40xL4,40xL4", "at most 64")])
def test_bad_link_specs_are_refused_and_keep_the_current_set(spec, message):
    nbgpu.simulate("2xH100")
    with pytest.raises(UsageError, match=message):
        nbgpu.simulate(spec)
    assert devices.simulated().spec_text == "2xH100"


# --- display ---------------------------------------------------------------------------------------------

def test_html_view_is_registered_for_the_topology():
    from IPython.core.formatters import DisplayFormatter

    from nbgpu.views import registry

    shell = type("Shell", (), {"display_formatter": DisplayFormatter()})()
    registry.register(shell)
    nbgpu.simulate("2xH100:nvlink,L4")
    topo = nbgpu.topology()
    assert not hasattr(topo, "_repr_html_")  # the data object knows nothing of its display
    data, _ = shell.display_formatter.format(topo)
    html = data["text/html"]
    assert "SIMULATED" in html and ">NV18</td>" in html and ">SYS</td>" in html and "<table" in html
    assert "#86efac" in html  # NVLink cells are green
    assert data["text/plain"].startswith("SIMULATED GPUs (2xH100:nvlink,L4)")


def test_gpus_magic_topo_flag():
    topo = gpus_magic("--simulate 2xA100-80GB --topo")
    assert topo.simulated and cells(topo) == [["X", "NV12"], ["NV12", "X"]]
    assert gpus_magic("--topo") is topo
    for line in ("--topo 0", "--topo --auto 2"):
        with pytest.raises(UsageError, match="--topo shows the links"):
            gpus_magic(line)


# --- choosing connected GPUs -----------------------------------------------------------------------------

def test_auto_prefers_the_nvlink_pair_over_more_free_memory():
    nbgpu.simulate("2xH100:pcie,2xH100:nvlink")
    devices.simulated().allocate(3, 30 * GiB)  # the NVLink pair is also the fuller one
    vis = nbgpu.use(auto=2)
    assert [t.gpu.index for t in vis.targets] == [2, 3]
    assert vis.links == "GPU 2-3 NV18 (NVLink)" and "links: GPU 2-3 NV18 (NVLink)" in repr(vis)
    assert "NV18" in shown_html(vis)


def test_auto_prefers_one_pcie_switch_then_the_next_best(fake_nvml):
    module = pcie_l4(fake_nvml)
    module.gpus[3].used = 0  # GPUs 3 and 4 have the most free memory but the weakest links
    module.gpus[4].used = 0
    inv = devices.read()
    topo = nbgpu.topology()
    assert [t.gpu.index for t in visibility.auto_select(inv, 2, topology=topo)] == [0, 1]
    assert [t.gpu.index for t in visibility.auto_select(inv, 2)] == [3, 4]  # without links: the least loaded
    module.gpus[1].util = 90
    inv = devices.read()
    assert [t.gpu.index for t in visibility.auto_select(inv, 2, max_util=50, topology=topo)] == [0, 2]  # PXB
    # all but the GPU across the socket, in the least-loaded order (GPU 1 is busy)
    assert [t.gpu.index for t in visibility.auto_select(inv, 4, topology=topo)] == [3, 0, 2, 1]
    vis = nbgpu.use(auto=3, max_util=50)
    assert sorted(t.gpu.index for t in vis.targets) == [0, 2, 3]
    assert "the weakest is PHB" in vis.links


def test_greedy_choice_on_large_machines_finds_the_same_set(fake_nvml, monkeypatch):
    hgx_h100(fake_nvml)
    inv, topo = devices.read(), nbgpu.topology()
    exhaustive = [t.gpu.index for t in visibility.auto_select(inv, 4, topology=topo)]
    monkeypatch.setattr(visibility, "_EXHAUSTIVE", 0)
    assert [t.gpu.index for t in visibility.auto_select(inv, 4, topology=topo)] == exhaustive == [0, 1, 2, 3]


def test_auto_without_topology_keeps_the_old_choice(fake_nvml):
    fake_nvml([FakeGPU(uuid(0), used=70 * GiB), FakeGPU(uuid(1), used=GiB, bus_id=bus(1)),
               FakeGPU(uuid(2), used=2 * GiB, bus_id=bus(2))])  # no ancestors: NVML answers Not Supported
    assert not nbgpu.topology().available
    vis = nbgpu.use(auto=2)
    assert [t.gpu.index for t in vis.targets] == [1, 2] and vis.links is None


def test_bridges_pair_up_within_their_group_wherever_it_starts():
    nbgpu.simulate("L4,3xRTX3090:nvlink")  # the bridged cards are GPUs 1, 2 and 3: 1-2 share a bridge, 3 has none
    topo = nbgpu.topology()
    assert cells(topo) == [["X", "SYS", "SYS", "SYS"], ["SYS", "X", "NV4", "PHB"], ["SYS", "NV4", "X", "PHB"],
                           ["SYS", "PHB", "PHB", "X"]]
    assert [g.nvlinks for g in topo.gpus] == [0, 4, 4, 0]


def test_a_pcie_link_is_as_fast_as_its_slower_end_and_the_worst_link_of_a_set_is_found(fake_nvml):
    pcie_l4(fake_nvml)
    topo = nbgpu.topology()
    # GPU 1 sits in a Gen4 x16 slot, GPU 3 in a Gen3 x8 one: the link between them is the Gen3 x8 end's
    line = next(x for x in topo.link_lines() if x.startswith("GPU1-GPU3"))
    assert line.split()[:4] == ["GPU1-GPU3", "PHB", "PCIe", "Gen3"] and " x8 " in line
    assert [g.name for g in topo.gpus] == ["NVIDIA L4"] * 5
    assert [g.compute_capability for g in topo.gpus] == [(8, 9)] * 5
    # among GPUs 0, 1 and 3 the links are PIX (0-1) and PHB (0-3, 1-3): the worst is the first PHB one
    worst = topo.worst([3, 1, 0])
    assert worst.gpus == (0, 3) and worst.label == "PHB"
    assert topo.worst([2]) is None


def test_each_failed_nvml_field_is_named_with_its_gpus(fake_nvml):
    bridged_h100_pcie(fake_nvml, fail={(1, "nvmlDeviceGetName"): NVMLError_NotSupported,
                                       (2, "nvmlDeviceGetPciInfo"): NVMLError_NoPermission,
                                       (0, "nvmlDeviceGetTopologyCommonAncestor"): NVMLError_NoPermission},
                      p2p={(0, 1): 9})  # a P2P status this version of nbgpu does not know
    topo = nbgpu.topology()
    errors = topo.error_lines()
    assert "GPU 1 name: Not Supported" in errors and "GPU 2 pci_bus_id: Insufficient Permissions" in errors
    assert "GPU 0-3 path: Insufficient Permissions" in errors and "GPU 0-2 path: Insufficient Permissions" in errors
    assert topo.link(0, 1).p2p_read == "status 9" and "P2P status 9" in repr(topo)
    inventory = devices.read()
    assert "pci_bus_id" in inventory[2].errors and inventory[2].pci_bus_id is None
    assert inventory[1].pci_bus_id == bus(1)


def test_nvlink_generation_comes_from_the_link_version_or_else_the_compute_capability(fake_nvml):
    bridged_h100_pcie(fake_nvml, fail={(None, "nvmlDeviceGetCudaComputeCapability"): NVMLError_NotSupported})
    topo = nbgpu.topology()  # NVML_NVLINK_VERSION_4_0 on every link
    assert topo.gpus[0].compute_capability is None and topo.link(0, 1).nvlink_generation == 4
    bridged_h100_pcie(fake_nvml, fail={(None, "nvmlDeviceGetNvLinkVersion"): NVMLError_NotSupported})
    topo = nbgpu.topology()  # compute capability 9.0: Hopper, NVLink 4
    assert topo.gpus[0].compute_capability == (9, 0) and topo.link(0, 1).nvlink_generation == 4


def test_a_gpu_whose_nvlinks_nvml_cannot_read_leaves_its_switched_links_unknown(fake_nvml):
    hgx_h100(fake_nvml, fail={(5, "nvmlDeviceGetNvLinkState"): NVMLError_NoPermission})
    topo = nbgpu.topology()
    assert topo.link(0, 5).nvlinks is None and topo.link(0, 1).nvlinks == 18
