"""nbgpu.load / bench / compare on the CPU with tiny random-weight models saved to a temp dir."""

import gc
import statistics
import sys
import time
import weakref

import pytest
import torch
import transformers
from conftest import shown_html

import nbgpu
from nbgpu import devices
from nbgpu.errors import UsageError
from nbgpu.running import BenchResult, NotEnoughMemory, oom
from nbgpu.units import GiB
from nbgpu.views.bench_view import compare_figure
from nbgpu.views.load_view import load_figure


def _save(config, path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=512,
                                   eos_token_id=2, bos_token_id=1)
    return str(path), _save(cfg, path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=300, n_positions=256)
    return str(path), _save(cfg, path)


# --- load -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_load_a_path_with_device_map_auto_loads_the_saved_weights(which, request):
    path, nbytes = request.getfixturevalue(which)
    model = nbgpu.load(path, show=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits)
    report = model.nbgpu_load
    assert report.gpus == [] and not report.simulated
    assert report.cpu_weights == sum(t.numel() * t.element_size() for t in {
        id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    assert "no GPU" in repr(report)
    assert "<table>" in shown_html(report)


def test_load_refuses_what_is_not_a_plan_or_path():
    with pytest.raises(UsageError, match="plan"):
        nbgpu.load(42, show=False)


# --- bench ------------------------------------------------------------------------------------------------

def test_bench_fields_are_consistent_and_warmup_is_discarded(llama):
    model = nbgpu.load(llama[0], show=False)
    calls = []
    generate = model.generate

    def counting_generate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)  # only the warm-up run is slow: none of the figures may contain it
        return generate(*args, **kwargs)

    model.generate = counting_generate
    result = nbgpu.bench(model, batch=2, prompt_len=12, new_tokens=5, repeats=3, warmup=1)
    assert isinstance(result, BenchResult)
    assert len(calls) == 4
    assert result.repeats == 3 and len(result.ttft) == 3 and len(result.decode_seconds) == 3
    assert max(result.ttft) < 1.0
    assert result.generated_tokens == 2 * 5
    assert len(result.step_latencies) == 3 * (5 - 1)
    # the figures come from the measured runs (their values by hand: test_bench_figures.py)
    assert result.prefill_tokens_per_s == pytest.approx(2 * 12 / statistics.median(result.ttft))
    rates = [2 * (5 - 1) / s for s in result.decode_seconds]
    assert result.decode_tokens_per_s == pytest.approx(statistics.median(rates))
    assert result.decode_spread == pytest.approx((min(rates), max(rates)))
    assert sum(result.step_latencies) == pytest.approx(sum(result.decode_seconds))  # steps tile the decode time
    assert result.devices == ["cpu"] and not result.simulated
    assert "decode" in repr(result) and "<table>" in shown_html(result)


def test_bench_makes_the_fixed_number_of_tokens_even_when_eos_comes_first(llama):
    model = nbgpu.load(llama[0], show=False)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first  # greedy decoding would stop after one token
    plain = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert plain.shape[1] - 8 < 6
    result = nbgpu.bench(model, batch=1, prompt_len=8, new_tokens=6, repeats=1, warmup=0, seed=0)
    assert result.generated_tokens == 6 and len(result.step_latencies) == 5


def test_bench_uses_a_tokenizers_text_when_given(llama):
    model = nbgpu.load(llama[0], show=False)

    class Tokenizer:
        def __call__(self, text, return_tensors=None):
            return type("Enc", (), {"input_ids": torch.tensor([[ord(c) % 256 for c in text]])})()

    result = nbgpu.bench(model, tokenizer=Tokenizer(), prompt="hello there", batch=2, new_tokens=3, repeats=1)
    assert result.prompt_len == len("hello there") and result.generated_tokens == 6
    with pytest.raises(UsageError, match="tokenizer"):
        nbgpu.bench(model, prompt="hello", new_tokens=3, repeats=1)


@pytest.mark.parametrize("kwargs", [dict(new_tokens=1), dict(repeats=0), dict(batch=0), dict(warmup=-1)])
def test_bench_refuses_bad_arguments(llama, kwargs):
    model = nbgpu.load(llama[0], show=False)
    with pytest.raises(UsageError):
        nbgpu.bench(model, **kwargs)


def test_compile_on_cpu_says_it_is_not_supported(gpt2):
    model = nbgpu.load(gpt2[0], show=False)
    with pytest.raises(UsageError, match="CUDA"):
        nbgpu.bench(model, new_tokens=3, repeats=1, compile=True)


def test_compare_tables_several_runs(gpt2, llama):
    a = nbgpu.bench(nbgpu.load(gpt2[0], show=False), prompt_len=8, new_tokens=3, repeats=2)
    b = nbgpu.bench(nbgpu.load(llama[0], show=False), prompt_len=8, new_tokens=3, repeats=2)
    table = nbgpu.compare({"gpt2": a, "llama": b})
    assert [r["run"] for r in table.rows()] == ["gpt2", "llama"]
    assert table.rows()[1]["decode_tok_s"] == b.decode_tokens_per_s
    assert list(table.to_pandas()["run"]) == ["gpt2", "llama"]
    assert "gpt2" in repr(table) and "llama" in shown_html(table)
    fig = compare_figure(table)
    assert {t.name for t in fig.data} == {"gpt2", "llama"}
    with pytest.raises(UsageError):
        nbgpu.compare([])
    with pytest.raises(UsageError):
        nbgpu.compare([a, "not a result"])


# --- simulated GPUs ---------------------------------------------------------------------------------------

def test_simulated_load_through_a_plan_runs_on_cpu_and_shows_the_memory_on_the_gpus(llama):
    nbgpu.simulate("2xA100-80GB")
    plan = nbgpu.plan(llama[0], batch=1, seq_len=64, dtype="float32")
    model = nbgpu.load(plan, show=False)
    report = model.nbgpu_load
    assert report.simulated and next(model.parameters()).device.type == "cpu"
    assert [g.cuda_index for g in report.gpus] == [0, 1]
    sim = devices.simulated()
    for d, g in zip(plan.devices, report.gpus):
        assert sim.allocated(d.gpu.index) == d.weights > 0
        assert g.weights == d.weights  # the planner's sizes match the loaded tensors
    assert report.warnings == []
    assert "simulated" in repr(report) and "SIMULATED" in shown_html(report)
    assert "SIMULATED" in load_figure(report).layout.title.text
    used = {g.index: g.memory_used for g in nbgpu.gpus().gpus}
    assert all(used[d.gpu.index] >= d.weights for d in plan.devices)

    result = nbgpu.bench(model, prompt_len=8, new_tokens=4, repeats=2)
    assert result.simulated and "simulated" in result.label
    assert "simulated — ran on CPU" in repr(result) and "SIMULATED" in shown_html(result)
    busy = result.timeline.busy()
    # a layer split on one CPU: the two simulated GPUs take turns, so their busy fractions add up to at most 1
    assert set(busy) == {0, 1} and all(0 < v <= 1 for v in busy.values()) and sum(busy.values()) <= 1 + 1e-9
    assert result.timeline.simulated and "simulated" in repr(result.timeline)
    bound = result.roofline
    # a bound for the simulated GPUs (its value by hand: test_bench_figures.py), no fraction for a run on the CPU
    assert bound.fraction is None and [g.cuda_index for g in bound.gpus] == [0, 1]
    assert [g.weights for g in bound.gpus] == [d.weights for d in plan.devices]
    assert "simulated" in repr(nbgpu.compare([result]))
    assert all(g.utilization == 0 for g in nbgpu.gpus().gpus)  # back to idle after the run

    del model, report
    gc.collect()
    assert all(sim.allocated(d.gpu.index) == 0 for d in plan.devices)


def test_simulated_load_of_a_path_places_it_as_accelerate_would(gpt2):
    nbgpu.simulate("2x24GiB")
    model = nbgpu.load(gpt2[0], device_map="balanced", show=False)
    report = model.nbgpu_load
    assert report.simulated and len(report.gpus) == 2
    assert sum(g.weights for g in report.gpus) == gpt2[1]
    assert all(devices.simulated().allocated(i) == g.weights for i, g in enumerate(report.gpus))
    assert all(g.planned_weights is None for g in report.gpus)


def test_a_plan_for_real_gpus_is_refused_while_simulating(llama):
    nbgpu.simulate("2x24GiB")
    plan = nbgpu.plan(llama[0], batch=1, seq_len=64)
    plan_real = type("RealPlan", (), {k: getattr(plan, k) for k in
                                      ("source", "device_map", "max_memory", "dtype", "devices", "fits")})()
    plan_real.simulated = False
    with pytest.raises(UsageError, match="simulate"):
        nbgpu.load(plan_real, show=False)


# --- out of memory ----------------------------------------------------------------------------------------

CUDA_OOM = ("CUDA out of memory. Tried to allocate {tried}. GPU 0 has a total capacity of 79.15 GiB of which "
            "{free} is free. Including non-PyTorch memory, this process has 78.90 GiB memory in use. Of the allocated "
            "memory 77.50 GiB is allocated by PyTorch, and 1.02 GiB is reserved by PyTorch but unallocated.")


def test_out_of_memory_messages_are_read():
    s = oom.parse(CUDA_OOM.format(tried="2.00 GiB", free="512.00 MiB"))
    assert (s.tried, s.free, s.device, s.missing) == (2 * GiB, 512 * 1024**2, 0, int(1.5 * GiB))
    cpu = oom.parse("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                    "you tried to allocate 4096 bytes.")
    assert cpu.device == "cpu" and cpu.tried == 4096
    assert oom.is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 10 bytes"))
    assert not oom.is_oom(RuntimeError("shape mismatch"))


def test_out_of_memory_in_generate_is_released_and_explained(llama):
    nbgpu.simulate("2xA100-80GB")
    plan = nbgpu.plan(llama[0], batch=4, seq_len=32, dtype="float32")
    model = nbgpu.load(plan, show=False)
    held = []
    limit = 2 * 24  # tokens per forward this test allows: a memory limit on activations

    def memory_limit(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden.shape[0] * hidden.shape[1] > limit:
            held.append(weakref.ref(hidden))
            raise torch.OutOfMemoryError(CUDA_OOM.format(tried="120.00 KiB", free="20.00 KiB"))

    model.model.layers[0].register_forward_pre_hook(memory_limit, with_kwargs=True)
    with pytest.raises(NotEnoughMemory) as err:
        nbgpu.bench(model, batch=4, prompt_len=16, new_tokens=4, repeats=1)
    message = str(err.value)
    assert "100.0 KiB more was needed" in message and "cuda:0" in message and "released" in message
    assert err.value.missing == 100 * 1024
    # the suggestion is the largest smaller batch whose plan needs 100 KiB less on cuda:0
    fit = err.value.plan
    assert fit is not None and fit.fits and fit.batch == 2 and "batch=2" in message
    before, after = plan.with_batch(batch=4, seq_len=20).devices[0].total, fit.devices[0].total
    assert before - after >= 100 * 1024
    assert err.value.__context__ is None and err.value.__cause__ is None
    gc.collect()
    assert held and held[0]() is None  # the activations the failed call held are gone
    result = nbgpu.bench(model, batch=2, prompt_len=16, new_tokens=4, repeats=1)  # the kernel goes on
    assert result.generated_tokens == 8


def test_out_of_memory_while_loading_releases_the_half_built_model(llama, monkeypatch):
    nbgpu.simulate("2xA100-80GB")
    plan = nbgpu.plan(llama[0], batch=1, seq_len=64, dtype="float32")
    built = []
    init = transformers.LlamaForCausalLM.__init__

    def init_then_run_out(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(weakref.ref(self))
        raise torch.OutOfMemoryError(CUDA_OOM.format(tried="100.00 GiB", free="60.00 GiB"))

    monkeypatch.setattr(transformers.LlamaForCausalLM, "__init__", init_then_run_out)
    with pytest.raises(NotEnoughMemory) as err:
        nbgpu.load(plan, show=False)
    assert "40.0 GiB more was needed" in str(err.value)
    assert err.value.plan is None and "offload" in str(err.value)  # 40 GiB more than any smaller plan frees
    gc.collect()
    assert built and built[0]() is None
    assert devices.simulated().allocated(0) == 0  # nothing recorded for a model that never loaded
    monkeypatch.undo()
    assert nbgpu.load(plan, show=False).nbgpu_load.simulated


def test_an_earlier_out_of_memory_error_kept_for_debugging_is_dropped():
    def fail():
        big = torch.zeros(1000)  # noqa: F841 - held by the frame
        held.append(weakref.ref(big))
        raise torch.OutOfMemoryError(CUDA_OOM.format(tried="1.00 GiB", free="0 bytes"))

    held = []
    try:
        fail()
    except torch.OutOfMemoryError as exc:
        sys.last_value, sys.last_traceback = exc, exc.__traceback__
    oom.release_memory()
    assert sys.last_value is None and sys.last_traceback is None
    assert held[0]() is None
