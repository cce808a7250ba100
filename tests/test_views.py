"""Each display checked by what it shows: the Plotly figures' traces and values, the HTML's rows, cells and labels.

Displays are reached the way a notebook reaches them, through IPython's display formatter with the extension
loaded, or through the view functions of nbgpu.views; the oracles are the data objects' own fields and values
worked out by hand (KV bytes from the model's shape, fixed samples, fixed benchmark times).
"""

from __future__ import annotations

import dataclasses
import os
import re
from html import unescape
from html.parser import HTMLParser

import pytest
from fake_pynvml import FakeGPU, uuid

import nbgpu
from nbgpu.devices import GPU, GPUProcess, Inventory
from nbgpu.devices.calibration import DEFAULT as CALIBRATION
from nbgpu.running.bench import BenchResult
from nbgpu.running.compare import compare
from nbgpu.running.load import GPUMemory, LoadReport
from nbgpu.running.roofline import GPUBound, Roofline
from nbgpu.running.timeline import Interval, Timeline
from nbgpu.units import GiB, MiB
from nbgpu.views import bench_view, load_view, memory_bars, plan_view


@pytest.fixture(scope="module")
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    nbgpu.load_ipython_extension(ip)
    return ip


def shown(shell, obj) -> dict:
    data, _ = shell.display_formatter.format(obj)
    return data


class Table(HTMLParser):
    """Every <tr> of an HTML page: (its style attribute, the text of each cell)."""

    def __init__(self, html: str):
        super().__init__()
        self.rows: list[tuple[str, list[str]]] = []
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append((dict(attrs).get("style") or "", []))
        elif tag in ("td", "th") and self.rows:
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("; ")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, f"{name!r} in {[t.name for t in fig.data]}"
    return found[0]


# --- the GPU table ---------------------------------------------------------------------------------------------

def gpu_rows(html: str) -> dict[str, tuple[bool, list[str]]]:
    """GPU index -> (highlighted, cells), for the body rows of the GPU table."""
    rows = [(style, cells) for style, cells in Table(html).rows if cells and cells[0].isdigit()]
    return {cells[0]: ("background" in style or "font-weight" in style, cells) for style, cells in rows}


def test_gpu_table_highlights_exactly_the_gpus_this_kernel_sees(shell):
    nbgpu.simulate("4x24GiB")
    nbgpu.devices.simulated().allocate(3, 2 * GiB)
    nbgpu.use("3,1")
    data = shown(shell, nbgpu.gpus())
    rows = gpu_rows(data["text/html"])
    assert {i for i, (lit, _) in rows.items() if lit} == {"1", "3"}
    assert {i: cells[1] for i, (_, cells) in rows.items()} == {"0": "-", "1": "cuda:1", "2": "-", "3": "cuda:0"}
    used = (2 * GiB + CALIBRATION.context) / GiB
    assert rows["3"][1][5] == f"{used:.1f} GiB / 24 GiB" and rows["0"][1][5] == "0.0 GiB / 24 GiB"
    assert f"{os.getpid()} (this kernel)" in rows["3"][1][-1] and rows["0"][1][-1] == "none"
    page = unescape(data["text/html"])
    assert "SIMULATED" in page and "Highlighted: GPUs this kernel sees" in page
    assert "[simulated] CUDA_VISIBLE_DEVICES='3,1'" in page
    text = data["text/plain"]
    assert text.startswith("SIMULATED GPUs (4x24GiB) - not real hardware")
    assert "[simulated] CUDA_VISIBLE_DEVICES='3,1', CUDA_DEVICE_ORDER=PCI_BUS_ID" in text


def test_gpu_table_of_real_gpus_follows_cuda_visible_devices(shell, fake_nvml, monkeypatch):
    fake_nvml([FakeGPU(uuid(i), bus_id=f"00000000:{7 + i:02X}:00.0") for i in range(3)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    data = shown(shell, nbgpu.gpus())
    rows = gpu_rows(data["text/html"])
    assert {i for i, (lit, _) in rows.items() if lit} == {"2"}
    assert rows["2"][1][1] == "cuda:0" and rows["2"][1][3] == uuid(2)
    assert "SIMULATED" not in data["text/html"] and "NVIDIA driver 580.159.04, CUDA 13.0" in data["text/html"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert not any(lit for lit, _ in gpu_rows(shown(shell, nbgpu.gpus())["text/html"]).values())


def test_a_visibility_change_shows_the_new_mapping(shell):
    nbgpu.simulate("4x24GiB")
    data = shown(shell, nbgpu.use("2,0"))
    html, text = data["text/html"], data["text/plain"]
    assert "SIMULATED" in html
    assert "cuda:0 -&gt; GPU 2 Simulated GPU 24 GiB (0.0 / 24 GiB used)" in html
    assert "cuda:1 -&gt; GPU 0 Simulated GPU 24 GiB (0.0 / 24 GiB used)" in html
    assert text.splitlines()[0] == "[simulated] CUDA_VISIBLE_DEVICES='2,0', CUDA_DEVICE_ORDER=PCI_BUS_ID"


# --- the plan: memory bars and placement --------------------------------------------------------------------------

def small_llama():
    import transformers

    return transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=2)


# keys and values of 2 KV heads x 32 dims, 100 tokens of 3 sequences, float16: per layer
KV_PER_LAYER = 2 * 2 * 32 * 100 * 3 * 2


def test_memory_bars_stack_every_segment_of_each_gpu():
    plan = nbgpu.plan(small_llama(), gpus="2x24GiB", batch=3, seq_len=100, dtype="float16", strategy=[1, 3])
    fig = plan_view.bars_figure(plan)
    names = [t.name for t in fig.data]
    assert names == ["weights", "KV cache", "activations", "allocator", "context", "others", "reserve", "free",
                     "over budget", "budget"]
    assert list(trace(fig, "KV cache").y) == pytest.approx([KV_PER_LAYER / GiB, 3 * KV_PER_LAYER / GiB])
    for name, field in (("weights", "weights"), ("activations", "activations"), ("allocator", "allocator"),
                        ("context", "context"), ("others", "others"), ("reserve", "reserve")):
        assert list(trace(fig, name).y) == pytest.approx([getattr(d, field) / GiB for d in plan.devices]), name
    assert list(trace(fig, "context").y) == pytest.approx([CALIBRATION.context / GiB] * 2)
    assert list(trace(fig, "reserve").y) == [1.0, 1.0]
    stacked = [sum(t.y[i] for t in fig.data if t.type == "bar") for i in range(2)]
    assert stacked == pytest.approx([24.0, 24.0])  # the segments and free fill each card exactly
    assert list(trace(fig, "over budget").y) == [0, 0] and list(trace(fig, "budget").y) == [24.0, 24.0]
    assert list(trace(fig, "weights").x) == ["cuda:0 = GPU 0 Simulated GPU 24 GiB (simulated)",
                                             "cuda:1 = GPU 1 Simulated GPU 24 GiB (simulated)"]
    assert "simulated" in fig.layout.title.text


def test_memory_bars_of_a_plan_that_does_not_fit_show_what_is_over():
    llama_8b = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
    plan = nbgpu.plan(llama_8b, gpus="2x8GiB", batch=1, seq_len=1024)
    fig = plan_view.bars_figure(plan)
    assert list(trace(fig, "over budget").y) == pytest.approx([d.over / GiB for d in plan.devices])
    assert all(d.over > 0 for d in plan.devices) and list(trace(fig, "free").y) == [0, 0]
    assert all("OVER" in label for label in trace(fig, "weights").x)


def test_memory_bars_draw_the_segments_they_are_given():
    fig = memory_bars.memory_bars(["a", "b"], {"weights": [4 * GiB, 6 * GiB], "KV cache": [GiB, 3 * GiB]},
                                  [8 * GiB, 8 * GiB])
    assert [(t.name, list(t.y)) for t in fig.data] == [("weights", [4, 6]), ("KV cache", [1, 3]), ("free", [3, 0]),
                                                       ("over budget", [0, 1]), ("budget", [8, 8])]
    assert list(fig.data[0].x) == ["a", f"<span style='color:{memory_bars.OVER}'>b OVER</span>"]
    assert [t.marker.color for t in fig.data[:4]] == [memory_bars.COLORS["weights"], memory_bars.COLORS["KV cache"],
                                                     memory_bars.COLORS["free"], memory_bars.OVER]
    same = memory_bars.memory_bars(["a", "b"], {"weights": [GiB, GiB], "KV cache": [0, 0]}, [8 * GiB, 8 * GiB],
                                   fig=fig)
    assert same is fig and [list(t.y) for t in fig.data] == [[1, 1], [0, 0], [7, 7], [0, 0], [8, 8]]


def test_placement_draws_each_unit_where_the_plan_puts_it():
    plan = nbgpu.plan(small_llama(), gpus="2x24GiB", dtype="float16", strategy=[1, 3])
    plan.move("model.layers.3", "cpu")
    fig = plan_view.placement_figure(plan)
    assert [t.name for t in fig.data] == ["cuda:0", "cuda:1", "cpu"] and {t.orientation for t in fig.data} == {"h"}
    units = plan.units
    largest = max(u.size for u in units)
    widths = [max(u.size, largest * 0.02) / GiB for u in units]
    for t in fig.data:
        device = {"cuda:0": 0, "cuda:1": 1, "cpu": "cpu"}[t.name]
        names = plan.layers_on(device)
        assert [h.split(" (")[0] for h in t.hovertext] == names
        index = [i for i, u in enumerate(units) if u.name in names]
        assert list(t.x) == pytest.approx([widths[i] for i in index])
        assert list(t.base) == pytest.approx([sum(widths[:i]) for i in index])  # along the depth, in order
    assert "simulated" in fig.layout.title.text


LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def test_the_plan_displays_its_status_memory_and_explanation(shell):
    plan = nbgpu.plan(LLAMA_8B, gpus="2x24GiB", batch=4, seq_len=4096, strategy=[16, 16])
    html = shown(shell, plan)["text/html"]
    assert "SIMULATED" in html and "layers per GPU: cuda:0: 16, cuda:1: 16" in html and ">fits<" in html
    rows = {cells[0]: cells for _, cells in Table(html).rows if cells and cells[0].startswith("cuda:")}
    head = next(cells for _, cells in Table(html).rows if cells and cells[0] == "GPU")
    # 16 layers x 8 KV heads x 128 dims x keys and values x 2 bytes x 4 x 4096 tokens = 1 GiB on each GPU
    kv = head.index("KV cache")
    assert [cells[kv] for cells in rows.values()] == ["1.0 GiB", "1.0 GiB"]
    assert [cells[head.index("weights")] for cells in rows.values()] == [nbgpu.format_size(d.weights)
                                                                          for d in plan.devices]
    assert "Where the figures come from" in html and "Boundary cuda:0 -&gt; cuda:1" in html
    over = nbgpu.plan(small_llama(), gpus="2x24GiB", batch=3, seq_len=100, reserve="23.99GiB")
    assert f"does not fit: {nbgpu.format_size(over.missing())} missing" in shown(shell, over)["text/html"]


# --- load -------------------------------------------------------------------------------------------------------

def load_report(simulated: bool) -> LoadReport:
    real = not simulated
    rows = [GPUMemory(0, 2, "NVIDIA L4", planned_weights=10 * GiB, planned_total=14 * GiB, weights=10 * GiB,
                      allocated=11 * GiB if real else None, reserved=12 * GiB if real else None,
                      peak_reserved=12 * GiB if real else None, nvml_process=13 * GiB if real else None,
                      nvml_used=13 * GiB),
            GPUMemory(1, 3, "NVIDIA L4", planned_weights=5 * GiB, planned_total=8 * GiB, weights=5 * GiB,
                      allocated=int(4.9 * GiB) if real else None, reserved=6 * GiB if real else None,
                      peak_reserved=6 * GiB if real else None, nvml_process=7 * GiB if real else None,
                      nvml_used=7 * GiB)]
    return LoadReport(source="/models/llama", plan=None, simulated=simulated, placement={}, gpus=rows, seconds=2.5,
                      dtype="bfloat16")


def test_load_figure_sets_the_plan_beside_each_measurement():
    fig = load_view.load_figure(load_report(simulated=False))
    expected = {"planned weights": [10, 5], "loaded tensors": [10, 5], "allocated (torch)": [11, 4.9],
                "reserved (torch)": [12, 6], "NVML: this process": [13, 7], "planned total (the plan's run)": [14, 8]}
    assert {t.name: list(t.y) for t in fig.data} == {k: pytest.approx(v) for k, v in expected.items()}
    assert list(fig.data[0].x) == ["cuda:0", "cuda:1"] and "SIMULATED" not in fig.layout.title.text
    sim = load_view.load_figure(load_report(simulated=True))
    assert [t.name for t in sim.data] == ["planned weights", "loaded tensors", "planned total (the plan's run)"]
    assert list(sim.data[0].x) == ["cuda:0 (simulated)", "cuda:1 (simulated)"]
    assert "SIMULATED" in sim.layout.title.text


def test_load_html_flags_a_gpu_that_differs_from_the_plan(shell):
    html = shown(shell, load_report(simulated=False))["text/html"]
    rows = [cells for _, cells in Table(html).rows]
    assert rows[0][:5] == ["GPU", "planned weights", "loaded tensors", "allocated (torch)", "vs plan"]
    assert rows[1][:5] == ["cuda:0 = GPU 2 NVIDIA L4", "10.0 GiB", "10.0 GiB", "11.0 GiB", "+10.0%"]
    assert rows[2][:5] == ["cuda:1 = GPU 3 NVIDIA L4", "5.0 GiB", "5.0 GiB", "4.9 GiB", "-2.0%"]
    assert html.count("color:#b91c1c;font-weight:bold'>+10.0%") == 1 and "font-weight:bold'>-2.0%" not in html
    assert "SIMULATED" not in html
    sim = shown(shell, load_report(simulated=True))["text/html"]
    assert "SIMULATED" in sim and "ran on the CPU" in sim and "n/a (CPU)" in sim


# --- bench and compare ------------------------------------------------------------------------------------------

def bench_result(label="run A", simulated=True, step=1 / 64) -> BenchResult:
    steps = Timeline((Interval(0, 0.0, 2.0, "model.layers.0 .. model.layers.1"),
                      Interval(1, 2.0, 8.0, "model.layers.2 .. lm_head")), step_ms=8.0, simulated=simulated, note="")
    bound = Roofline((GPUBound(0, "NVIDIA L4", 3 * 10**9, 0, 3e11),), batch=2, context=12,
                     measured_tokens_per_s=None if simulated else 50.0, simulated=simulated)
    return BenchResult(label=label, batch=2, prompt_len=10, new_tokens=5, repeats=2, warmup=1, compiled=False,
                       simulated=simulated, devices=[0, 1], ttft=[0.125, 0.375], decode_seconds=[4 * step, 8 * step],
                       step_latencies=[step] * 4 + [2 * step] * 4, generated_tokens=10,
                       peak_memory={0: GiB, 1: 512 * MiB}, roofline=bound, timeline=steps)


def test_bench_figure_draws_the_latencies_and_the_decode_rate_against_its_bound():
    result = bench_result()
    fig = bench_view.bench_figure(result)
    latency, rates = fig.data
    assert latency.type == "histogram" and list(latency.x) == pytest.approx([1000 / 64] * 4 + [1000 / 32] * 4)
    assert list(rates.x) == ["measured", "bandwidth bound (estimate)"]
    # decode: 2 x 4 tokens in 4/64 s and 8/64 s -> 128 and 64 tokens/s, median 96; bound: 2 / (3 GB / 300 GB/s)
    assert list(rates.y) == pytest.approx([96.0, 200.0])
    assert fig.layout.title.text == "run A — SIMULATED (ran on the CPU)"


def test_bench_html_shows_the_figures_by_hand(shell):
    html = shown(shell, bench_result())["text/html"]
    cells = dict(row[1][:2] for row in Table(html).rows if len(row[1]) == 2)
    assert cells["time to first token"] == "250.0 ms"  # median of 125 and 375 ms
    assert cells["prefill"] == "80 tokens/s"  # 2 x 10 tokens in 0.25 s
    assert cells["decode"] == "96.0 tokens/s (runs 64.0 .. 128.0)"
    assert cells["per-token latency"] == "p50 23.44 ms, p90 31.25 ms"
    assert cells["peak memory (torch)"] == "cuda:0 1.0 GiB, cuda:1 512.0 MiB"
    assert cells["busy in one decode step"] == "cuda:0 25%, cuda:1 75%"
    assert cells["runs"] == "2 measured after 1 warm-up (discarded)"
    # 3 GB read at 300 GB/s: 10 ms a step for 2 sequences
    assert cells["roofline (estimate)"].startswith("200 tokens/s — cuda:0 2.8 GiB at 0.30 TB/s (estimate")
    assert "SIMULATED" in html and "ran on the CPU" in html
    real = shown(shell, bench_result(simulated=False))["text/html"]
    assert "SIMULATED" not in real and "reached 25.0%" in real  # 50 of 200 tokens/s


def test_timeline_figure_draws_each_busy_block_where_it_ran():
    result = bench_result()
    fig = bench_view.timeline_figure(result.timeline)
    assert [(list(t.y), list(t.base), list(t.x)) for t in fig.data] == [(["cuda:0"], [0.0], [2.0]),
                                                                        (["cuda:1"], [2.0], [6.0])]
    assert fig.layout.title.text == ("One decode step (8.00 ms): busy cuda:0 25%, cuda:1 75% — SIMULATED "
                                     "(ran on the CPU)")


def test_compare_draws_one_bar_per_run_and_figure(shell):
    fast, slow = bench_result("fast", step=1 / 64), bench_result("slow", step=1 / 16)
    table = compare([fast, slow])
    fig = bench_view.compare_figure(table)
    drawn = {(t.name, t.x[0]): t.y[0] for t in fig.data}
    expected = {("fast", "decode"): 96.0, ("slow", "decode"): 24.0, ("fast", "prefill"): 80.0,
                ("slow", "prefill"): 80.0, ("fast", "ttft"): 250.0, ("slow", "ttft"): 250.0,
                ("fast", "latency"): 1000 * 1.5 / 64, ("slow", "latency"): 1000 * 1.5 / 16}
    assert drawn == pytest.approx(expected)
    assert fig.layout.title.text == "nbgpu.compare — SIMULATED (includes runs on the CPU)"
    modelled = compare([dataclasses.replace(fast, modelled="the cost model")])  # simulated GPUs: modelled timings
    assert "timings modelled for the simulated GPUs" in bench_view.compare_figure(modelled).layout.title.text
    assert "timings modelled for the simulated GPUs" in shown(shell, modelled)["text/html"]
    html = shown(shell, table)["text/html"]
    header, *body = [cells for _, cells in Table(html).rows]
    rows = {cells[0]: dict(zip(header, cells)) for cells in body if cells and cells[0] in ("fast", "slow")}
    assert rows["fast"]["decode_tok_s"] == "96.00" and rows["slow"]["decode_tok_s"] == "24.00"
    # simulated; no roofline fraction on the CPU
    assert rows["fast"]["simulated"] == "True" and rows["fast"]["roofline_fraction"] == "n/a"
    assert rows["fast"]["timing"] == "measured"
    real = compare([bench_result("gpu", simulated=False)])
    assert [cells[-2] for _, cells in Table(shown(shell, real)["text/html"]).rows][1] == "25.0%"


# --- the monitor --------------------------------------------------------------------------------------------------

STRANGER = 1  # init: never this kernel's


def reading(used: list[int], util: list[int]) -> Inventory:
    gpus = tuple(GPU(index=i, uuid=None, name="Test GPU", pci_bus_id=None, memory_total=24 * GiB,
                     memory_used=u, memory_free=24 * GiB - u, utilization=p, temperature=40 + p // 10,
                     power_draw=None, power_limit=None, pstate=0, persistence_mode=True, compute_capability=None,
                     mig_mode=False, simulated=True,
                     processes=(GPUProcess(os.getpid(), "python", "compute", u - GiB),
                                GPUProcess(STRANGER, "other", "compute", GiB)))
                 for i, (u, p) in enumerate(zip(used, util)))
    return Inventory(gpus=gpus, backend="simulated")


def test_the_monitor_plots_used_memory_and_utilisation_over_time(monkeypatch):
    from nbgpu.monitoring import Monitor
    from nbgpu.views.monitor_view import MonitorView

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    readings = iter([reading([2 * GiB, 3 * GiB], [10, 0]), reading([5 * GiB, 3 * GiB], [50, 20]),
                     reading([9 * GiB, 6 * GiB], [90, 40])])
    m = Monitor(interval=600, read=lambda: next(readings), start=False, temperature=True)
    for _ in range(2):
        with m:  # leaving the block takes one more sample
            pass
    view = MonitorView(m)
    assert [t.name for t in view.series.data] == ["GPU 0 cuda:0 (simulated)", "GPU 1 cuda:1 (simulated)"] * 3
    memory = [list(t.y) for t in view.series.data[:2]]
    assert memory == [[2, 5, 9], [3, 3, 6]]  # GiB used, never the 24 GiB total
    assert [list(t.y) for t in view.series.data[2:4]] == [[10, 50, 90], [0, 20, 40]]
    assert [list(t.y) for t in view.series.data[4:]] == [[41, 45, 49], [40, 42, 44]]
    titles = [a.text for a in view.series.layout.annotations]
    assert titles == ["memory used (GiB)", "utilisation (%)", "temperature (°C)"]
    this_kernel, other, free = view.bars.data
    assert list(this_kernel.y) == ["GPU 0 cuda:0 (simulated)", "GPU 1 cuda:1 (simulated)"]
    # the last reading: 9 and 6 GiB used, 1 GiB of it by another process
    assert (list(this_kernel.x), list(other.x), list(free.x)) == ([8, 5], [1, 1], [15, 18])
    assert list(free.text) == ["9.0 / 24 GiB", "6.0 / 24 GiB"]
    assert "SIMULATED" in view.header.value and "SIMULATED" in view.bars.layout.title.text
    processes = Table(view.processes.value).rows
    own = [(style, cells) for style, cells in processes if cells and cells[1].endswith("(this kernel)")]
    assert [cells[0] for _, cells in own] == ["GPU 0 cuda:0", "GPU 1 cuda:1"] and all(s for s, _ in own)
    assert [cells[-1] for _, cells in own] == ["8,192 MiB", "5,120 MiB"]
    strangers = [(style, cells) for style, cells in processes if cells and cells[1] == str(STRANGER)]
    assert len(strangers) == 2 and not any(style for style, _ in strangers)
    view.close()


def test_every_cell_of_a_real_gpus_row(shell, fake_nvml):
    fake_nvml([FakeGPU(uuid(0), compute=[(os.getpid(), 2 * GiB)])])
    rows = gpu_rows(shown(shell, nbgpu.gpus())["text/html"])
    # FakeGPU's NVML readings: 3 of 80 GiB used, 12% busy, 41 C, 95 of 400 W, P0, persistence on, sm 8.0, no MIG
    assert rows["0"][1][:13] == ["0", "cuda:0", "NVIDIA A100-SXM4-80GB", uuid(0), "00000000:07:00.0",
                                 "3.0 GiB / 80 GiB", "12%", "41C", "95 / 400 W", "P0", "on", "8.0", "off"]
    assert rows["0"][1][13].startswith(f"{os.getpid()} (this kernel)") and rows["0"][1][13].endswith("2048 MiB")


def test_the_monitors_text_says_what_each_gpu_reads(monkeypatch):
    from nbgpu.monitoring import Monitor, sample_lines

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    inv = reading([9 * GiB, 6 * GiB], [90, 40])
    lost = GPU(index=2, uuid=None, name=None, pci_bus_id=None, memory_total=None, memory_used=None, memory_free=None,
               utilization=None, temperature=None, power_draw=None, power_limit=None, pstate=None,
               persistence_mode=None, compute_capability=None, mig_mode=None, processes=None, simulated=True)
    m = Monitor(interval=600, read=lambda: Inventory(gpus=(*inv.gpus, lost), backend="simulated"), start=False,
                temperature=True)
    lines = sample_lines(m.latest, m.show)
    assert lines[0].endswith(" (simulated GPUs, not real hardware)")
    assert lines[1] == ("GPU 0 cuda:0 Test GPU (simulated): memory 9.0 / 24.0 GiB (this kernel 8.0, other 1.0, "
                        "free 15.0), util 90%, temp 49C")
    assert lines[-1] == ("GPU 2 cuda:2 n/a (simulated): memory n/a / n/a GiB (this kernel n/a, other n/a, free n/a), "
                         "util n/a, temp n/a")


def test_the_topology_of_real_gpus_has_no_simulated_badge(shell, fake_nvml):
    fake_nvml([FakeGPU(uuid(i), bus_id=f"00000000:{7 + i:02X}:00.0") for i in range(2)], ancestors={(0, 1): 30})
    html = shown(shell, nbgpu.topology())["text/html"]
    assert "SIMULATED" not in html and ">PHB</td>" in html


def html_text(html: str) -> str:
    """The text a reader sees: the HTML without its tags."""
    return re.sub(r"<[^>]+>", "", html)


def test_load_html_shows_every_column_by_hand_and_the_offload_and_warnings(shell):
    html = shown(shell, load_report(simulated=False))["text/html"]
    rows = [cells for _, cells in Table(html).rows]
    assert rows[0] == ["GPU", "planned weights", "loaded tensors", "allocated (torch)", "vs plan", "reserved (torch)",
                       "peak reserved", "NVML this process", "NVML GPU used", "planned total"]
    # cuda:0: 11 GiB allocated for 10 GiB planned is +10.0%; NVML saw 13 GiB for this process
    assert rows[1] == ["cuda:0 = GPU 2 NVIDIA L4", "10.0 GiB", "10.0 GiB", "11.0 GiB", "+10.0%", "12.0 GiB",
                       "12.0 GiB", "13.0 GiB", "13.0 GiB", "14.0 GiB"]
    assert rows[2] == ["cuda:1 = GPU 3 NVIDIA L4", "5.0 GiB", "5.0 GiB", "4.9 GiB", "-2.0%", "6.0 GiB",
                       "6.0 GiB", "7.0 GiB", "7.0 GiB", "8.0 GiB"]
    assert "offloaded" not in html and "warning" not in html and "None" not in html
    report = dataclasses.replace(load_report(simulated=False), cpu_weights=3 * GiB, disk_weights=GiB,
                                 warnings=["w<1>", "second"])
    text = unescape(html_text(shown(shell, report)["text/html"]))
    assert "offloaded to: 3.0 GiB CPU, 1.0 GiB disk" in text
    assert text.endswith("offloaded to: 3.0 GiB CPU, 1.0 GiB disk" "warning: w<1>" "warning: second")
    cpu_only = dataclasses.replace(report, gpus=[], warnings=[])
    text = unescape(html_text(shown(shell, cpu_only)["text/html"]))
    assert text.endswith("on the CPU (no GPU): 3.0 GiB CPU, 1.0 GiB disk") and "None" not in text


def test_load_report_text_names_each_gpu_and_where_the_rest_went():
    report = dataclasses.replace(load_report(simulated=False), cpu_weights=3 * GiB, disk_weights=GiB,
                                 warnings=["check the plan"])
    report.gpus[1] = dataclasses.replace(report.gpus[1], gpu_name=None)
    assert repr(report).splitlines() == [
        "nbgpu.load('/models/llama') in 2.5 s, bfloat16",
        "  cuda:0 NVIDIA L4: planned weights 10.0 GiB, tensors 10.0 GiB, allocated 11.0 GiB (+10.0% vs plan), "
        "NVML this process 13.0 GiB",
        "  cuda:1 n/a: planned weights 5.0 GiB, tensors 5.0 GiB, allocated 4.9 GiB (-2.0% vs plan), "
        "NVML this process 7.0 GiB",
        "  offloaded: 3.0 GiB on CPU, 1.0 GiB on disk",
        "  warning: check the plan"]


def test_bench_and_compare_figures_name_their_plots_and_each_run_once_in_the_legend(shell):
    fig = bench_view.bench_figure(bench_result())
    assert [a.text for a in fig.layout.annotations] == ["per-token latency (ms)", "decode tokens/s"]
    table = compare([bench_result("fast", step=1 / 64), bench_result("slow", step=1 / 16)])
    legend = [t.name for t in bench_view.compare_figure(table).data if t.showlegend is not False]
    assert legend == ["fast", "slow"]  # four plots, one legend entry per run
    assert "SIMULATED" in html_text(shown(shell, table)["text/html"])
    real = compare([bench_result("gpu", simulated=False)])
    assert "SIMULATED" not in html_text(shown(shell, real)["text/html"])


def test_widgets_are_used_in_a_kernel_and_html_in_a_terminal(monkeypatch):
    from types import SimpleNamespace

    from IPython.core.formatters import DisplayFormatter
    from IPython.core.interactiveshell import InteractiveShell

    from nbgpu.views import registry

    terminal = InteractiveShell.instance()
    monkeypatch.delattr(terminal, "kernel", raising=False)
    assert not plan_view.widgets_available()
    monkeypatch.setattr(terminal, "kernel", object(), raising=False)  # what ipykernel's shell carries
    assert plan_view.widgets_available()
    nbgpu.simulate("1x24GiB")
    m = nbgpu.monitor(interval=0.05)
    m.stop()
    for kernel, widget in ((None, False), (object(), True)):
        ipython = SimpleNamespace(kernel=kernel, display_formatter=DisplayFormatter())
        registry.register(ipython)
        html = ipython.display_formatter.formatters["text/html"]
        assert "SIMULATED" in html(m)
        try:
            ipython.display_formatter.ipython_display_formatter.lookup(m)
            found = True
        except KeyError:
            found = False
        assert found == widget


def test_show_load_displays_the_reports_table_and_its_figure(monkeypatch):
    import IPython.display

    shown_now = []
    monkeypatch.setattr(IPython.display, "display", lambda obj, raw=False: shown_now.append(obj))
    load_view.show_load(load_report(simulated=False))
    html, figure = shown_now
    assert "cuda:0 = GPU 2 NVIDIA L4" in html.data
    assert [t["name"] for t in figure["application/vnd.plotly.v1+json"]["data"]][0] == "planned weights"


def test_a_tensor_parallel_placement_draws_each_gpus_slice_of_every_unit():
    plan = nbgpu.plan(small_llama(), gpus="2x24GiB", parallel="tensor")
    fig = plan_view.placement_figure(plan)
    assert [t.name for t in fig.data] == ["cuda:0", "cuda:1"] and {t.orientation for t in fig.data} == {"h"}
    for i, t in enumerate(fig.data):
        assert len(t.hovertext) == len(plan.units)
        assert all(h.endswith(f"a 1/2 slice on cuda:{i}") for h in t.hovertext)


def test_importing_nbgpu_in_a_running_ipython_registers_the_views(shell):
    from nbgpu.views import registry

    plan = nbgpu.plan(small_llama(), gpus="2x24GiB")
    html = shell.display_formatter.formatters["text/html"]
    html.deferred_printers.pop(("nbgpu.planning.plan", "Plan"), None)
    html.type_printers.pop(type(plan), None)
    assert "text/html" not in shown(shell, plan)
    registry.register_if_running()
    assert shown(shell, plan)["text/html"] == plan_view.plan_html(plan)
