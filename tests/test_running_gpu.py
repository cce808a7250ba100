"""nbgpu.load / bench on real GPUs: random-weight Llama-shaped 1B and 8B models loaded through a plan."""

import gc

import pytest
import torch
from gpu_models import saved_llama  # tests/ is on the path (conftest)

import nbgpu
from nbgpu.running import NotEnoughMemory

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    return saved_llama("1B", tmp_path_factory)


@pytest.fixture(scope="module")
def llama_8b(tmp_path_factory):
    return saved_llama("8B", tmp_path_factory)


def _check_memory(model, plan):
    report = model.nbgpu_load
    assert not report.simulated
    assert [g.cuda_index for g in report.gpus] == [d.cuda_index for d in plan.devices if d.weights]
    for g in report.gpus:
        assert g.allocated is not None and g.planned_weights
        assert abs(g.difference) <= 0.05, repr(report)
    assert report.warnings == []
    print(repr(report))


def test_1b_through_a_plan_measured_within_5_percent_and_bench_eager_and_compiled(llama_1b):
    plan = nbgpu.plan(llama_1b, batch=1, seq_len=512)
    model = nbgpu.load(plan, show=False)
    _check_memory(model, plan)
    eager = nbgpu.bench(model, batch=1, prompt_len=128, new_tokens=64, repeats=3)
    compiled = nbgpu.bench(model, batch=1, prompt_len=128, new_tokens=64, repeats=3, compile=True)
    for r in (eager, compiled):
        print(r)
        assert r.generated_tokens == 64 and len(r.step_latencies) == 3 * 63
        assert r.latency_p50_s <= r.latency_p90_s
        assert set(r.peak_memory) == set(r.devices)
        # measured / bound, and never above the bound: a run faster than the bandwidth allows means a wrong bound
        assert r.roofline.fraction == pytest.approx(r.decode_tokens_per_s / r.roofline.tokens_per_s)
        assert 0 < r.roofline.fraction <= 1
        assert set(r.timeline.busy()) == set(r.devices)
    assert compiled.compiled and not eager.compiled
    print(nbgpu.compare([eager, compiled]))


def test_8b_through_a_plan_measured_within_5_percent(llama_8b):
    plan = nbgpu.plan(llama_8b, batch=1, seq_len=1024)
    model = nbgpu.load(plan, show=False)
    _check_memory(model, plan)
    result = nbgpu.bench(model, batch=1, prompt_len=128, new_tokens=32, repeats=2)
    print(result)
    assert result.generated_tokens == 32


def test_device_map_auto_path_is_measured_too(llama_1b):
    model = nbgpu.load(llama_1b, show=False, dtype=torch.bfloat16)
    report = model.nbgpu_load
    assert report.gpus and all(g.allocated and abs(g.allocated - g.weights) / g.weights <= 0.05 for g in report.gpus)


def test_a_real_out_of_memory_while_generating_leaves_the_kernel_usable(llama_1b):
    plan = nbgpu.plan(llama_1b, batch=1, seq_len=512)
    model = nbgpu.load(plan, show=False)
    device = model.nbgpu_load.gpus[0].cuda_index
    gc.collect()
    torch.cuda.empty_cache()  # earlier tests' freed blocks would otherwise count as room inside the limit
    total = torch.cuda.get_device_properties(device).total_memory
    used = torch.cuda.memory_reserved(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, (used + 256 * 1024**2) / total), device)
    try:
        with pytest.raises(NotEnoughMemory) as err:
            nbgpu.bench(model, batch=64, prompt_len=2048, new_tokens=4, repeats=1, explain=False)
        assert "more was needed" in str(err.value) and "released" in str(err.value)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    r = nbgpu.bench(model, batch=1, prompt_len=32, new_tokens=4, repeats=1)
    assert r.generated_tokens == 4


@pytest.fixture(scope="module")
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")


def test_compiled_split_is_no_slower_than_eager_and_its_timeline_shows_both_gpus(llama_1b, two_gpus):
    plan = nbgpu.plan(llama_1b, gpus=2, batch=1, prompt_len=128, new_tokens=64)
    model = nbgpu.load(plan, show=False)
    assert placement_gpus(model) == [0, 1]
    eager = nbgpu.bench(model, batch=1, prompt_len=128, new_tokens=64, repeats=3)
    compiled = nbgpu.bench(model, batch=1, prompt_len=128, new_tokens=64, repeats=3, compile=True)
    print(eager, compiled, sep="\n")
    assert compiled.latency_p50_s <= eager.latency_p50_s
    for r in (eager, compiled):
        assert set(r.timeline.busy()) == {0, 1} and all(v > 0 for v in r.timeline.busy().values())
        assert set(r.timeline.breakdown) == {0, 1}
    assert hasattr(model, "_hf_hook") or any(hasattr(m, "_hf_hook") for m in model.modules())  # hooks restored


def placement_gpus(model):
    from nbgpu.running import placement

    return placement.cuda_devices(model)
