"""Every figure of `nbgpu.bench` against a run whose times are known.

The bench protocol's clock is replaced by one that stands still except when the model works: a hook on the model
advances it by a fixed time for the prefill and for each decode step, different for every run. The time to first
token, the prefill and decode rates, the per-token latencies, their spread and percentiles then have values worked
out by hand below. The busy fractions of a decode step and the memory-bandwidth roofline are checked the same way:
a clock that moves only inside each decoder layer, and bytes and bandwidths written out from the model's shape and
the GPU's datasheet.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

import nbgpu
from nbgpu.running import BenchResult, protocol, roofline, timeline
from nbgpu.running.roofline import GPUBound, Roofline
from nbgpu.running.timeline import Interval, Timeline

HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 128, 4, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS


def tiny_config():
    return transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                                    max_position_embeddings=512, eos_token_id=2, bos_token_id=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(tiny_config()).eval()


class Clock:
    """perf_counter that only moves when told to. Times are powers of two, so every difference is exact."""

    def __init__(self):
        self.now = 1024.0

    def perf_counter(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


# per run: (prefill seconds, seconds per decode step); the first run is the discarded warm-up
WARMUP = (8.0, 4.0)
RUNS = [(0.125, 1 / 64), (0.25, 1 / 32), (0.5, 1 / 16)]
BATCH, PROMPT, NEW = 2, 10, 5


@pytest.fixture(scope="module")
def timed_run(model):
    """bench() on the tiny model with the clock above: returns (result, number of forward calls per run)."""
    clock = Clock()
    plan = iter([WARMUP, *RUNS])
    state = {"run": None, "forwards": []}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[1] == PROMPT:  # a prefill starts a new run
            state["run"] = next(plan)
            state["forwards"].append(0)
            clock.advance(state["run"][0])
        else:
            clock.advance(state["run"][1])
        state["forwards"][-1] += 1

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(protocol, "time", SimpleNamespace(perf_counter=clock.perf_counter))
            result = nbgpu.bench(model, batch=BATCH, prompt_len=PROMPT, new_tokens=NEW, repeats=len(RUNS), warmup=1,
                                 explain=False)
    finally:
        handle.remove()
    return result, state["forwards"]


def test_the_raw_times_are_the_runs_after_the_warm_up(timed_run):
    result, forwards = timed_run
    assert forwards == [NEW] * (1 + len(RUNS))  # one prefill and new_tokens - 1 decode steps per run
    # time to first token: from the start of generate to the first token, which the prefill makes
    assert result.ttft == [prefill for prefill, _ in RUNS]
    # decode time: from the first token to the last, new_tokens - 1 steps
    assert result.decode_seconds == [(NEW - 1) * step for _, step in RUNS]
    assert result.step_latencies == [step for _, step in RUNS for _ in range(NEW - 1)]
    assert result.generated_tokens == BATCH * NEW == 10


def test_the_derived_figures_by_hand(timed_run):
    result, _ = timed_run
    assert result.ttft_s == 0.25  # the median of 0.125, 0.25, 0.5 s
    assert result.prefill_tokens_per_s == pytest.approx(80.0)  # 2 sequences x 10 prompt tokens in 0.25 s
    # each run decodes 2 x 4 tokens (the first token came from the prefill) in 4 steps: 2 / step tokens/s
    assert result._decode_rates() == pytest.approx([128.0, 64.0, 32.0])
    assert result.decode_tokens_per_s == pytest.approx(64.0)
    assert result.decode_spread == pytest.approx((32.0, 128.0))
    # twelve latencies: four of 1/64, four of 1/32, four of 1/16 s
    assert result.latency_p50_s == pytest.approx(1 / 32)
    assert result.latency_p90_s == pytest.approx(1 / 16)


def test_the_summary_row_the_text_and_the_html_show_the_same_figures(timed_run):
    result, _ = timed_run
    row = result.summary()
    assert (row["ttft_ms"], row["prefill_tok_s"], row["decode_tok_s"]) == pytest.approx((250.0, 80.0, 64.0))
    assert (row["decode_tok_s_min"], row["decode_tok_s_max"]) == pytest.approx((32.0, 128.0))
    assert (row["latency_p50_ms"], row["latency_p90_ms"]) == pytest.approx((31.25, 62.5))
    assert (row["batch"], row["prompt_len"], row["new_tokens"], row["repeats"]) == (2, 10, 5, 3)
    text = repr(result)
    assert "time to first token 250.0 ms, prefill 80 tokens/s" in text
    assert "decode 64.0 tokens/s (runs 32.0 .. 128.0), per-token latency p50 31.25 ms, p90 62.50 ms" in text
    assert "3 runs after 1 warm-up" in text


def test_percentiles_interpolate_between_sorted_latencies():
    """Ten latencies 1..10 ms: the median is 5.5 ms; p90 lies a tenth of the way from the 9th to the 10th (9.1)."""
    result = BenchResult(label="r", batch=1, prompt_len=4, new_tokens=11, repeats=1, warmup=0, compiled=False,
                         simulated=False, devices=["cpu"], ttft=[0.01], decode_seconds=[0.055],
                         step_latencies=[k / 1000 for k in (7, 2, 9, 1, 5, 10, 3, 8, 4, 6)], generated_tokens=11)
    assert result.latency_p50_s == pytest.approx(5.5e-3)
    assert result.latency_p90_s == pytest.approx(9.1e-3)
    assert result.decode_tokens_per_s == pytest.approx(10 / 0.055)


# --- who was busy when -------------------------------------------------------------------------------------------

def test_busy_fractions_by_hand():
    # cuda:0 works 0-2 ms, cuda:1 works 2-8 ms, cuda:0 again 8-10 ms; the step is 12 ms
    steps = Timeline((Interval(0, 0.0, 2.0, "a"), Interval(1, 2.0, 8.0, "b"), Interval(0, 8.0, 10.0, "c")),
                     step_ms=12.0, simulated=False, note="")
    assert steps.busy() == pytest.approx({0: 4 / 12, 1: 6 / 12})
    assert "busy cuda:0 33%, cuda:1 50%" in repr(steps)
    assert Timeline((), 0.0, False, "").busy() == {}


def test_a_profiled_step_splits_into_blocks_and_categories():
    """Kernels (device, start us, end us, name) of one decode step between two marker kernels on each GPU."""
    from nbgpu.running import step_profile

    m = step_profile.MARKER
    kernels = [
        (0, 0, 1, m), (0, 10, 30, "ampere_bf16_gemm"), (0, 31, 40, "elementwise_add"), (0, 60, 70, "nccl_allreduce"),
        (0, 100, 101, m),
        (1, 5, 6, m), (1, 20, 50, "sm90_xmma_gemm"), (1, 90, 91, m),
    ]
    profile = step_profile.from_kernels(kernels, [0, 1])
    # the step on each GPU runs from the end of its first marker to the start of its last; one clock, origin 1 us
    assert profile.step_us == {0: 99, 1: 89}
    assert profile.busy_us(0) == 20 + 9 + 10 and profile.busy_us(1) == 30
    assert profile.by_category(0) == {"matrix": 20, "communication": 10, "other": 9}
    steps = timeline.from_profile(profile, "test", merge_gap_us=2.0)
    # the gemm and the add are 1 us apart: one block; the all-reduce 20 us later: another
    blocks = [(iv.cuda_index, iv.start_ms, iv.end_ms) for iv in steps.intervals]
    assert blocks == [(0, 0.009, 0.039), (0, 0.059, 0.069), (1, 0.019, 0.049)]
    assert steps.step_ms == pytest.approx(0.099)
    assert steps.busy() == pytest.approx({0: (0.030 + 0.010) / 0.099, 1: 0.030 / 0.099})
    assert steps.breakdown[0] == pytest.approx({"matrix": 0.020, "communication": 0.010, "other": 0.009,
                                                "idle": 0.099 - 0.039})
    assert steps.breakdown[1]["idle"] == pytest.approx(0.089 - 0.030)


def test_a_simulated_decode_step_is_timed_layer_by_layer(tmp_path, monkeypatch):
    """Two simulated GPUs with two layers each; each layer on cuda:0 takes 1 ms, on cuda:1 3 ms (a clock that moves
    only there): cuda:0 is busy a quarter of the step, cuda:1 three quarters."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_config()).save_pretrained(tmp_path)
    nbgpu.simulate("2xA100-80GB")
    plan = nbgpu.plan(str(tmp_path), batch=1, seq_len=64, dtype="float32", strategy=[2, 2])
    loaded = nbgpu.load(plan, show=False)
    clock = Clock()
    monkeypatch.setattr(timeline, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    for i, layer in enumerate(loaded.model.layers):
        cost = 2**-10 if i < 2 else 3 * 2**-10
        layer.register_forward_hook(lambda *_, cost=cost: clock.advance(cost))  # runs before the timeline's hook
    ids = torch.tensor([[5, 6, 7, 8]])
    steps = timeline.decode_step(loaded, ids, simulated=True)
    ms = 1000 * 2**-10
    assert steps.step_ms == pytest.approx(8 * ms)
    assert steps.busy() == pytest.approx({0: 0.25, 1: 0.75})
    layer_blocks = [(iv.cuda_index, iv.end_ms - iv.start_ms) for iv in steps.intervals if iv.end_ms > iv.start_ms]
    assert layer_blocks == [(0, pytest.approx(2 * ms)), (1, pytest.approx(6 * ms))]
    assert steps.simulated and "simulated" in repr(steps)


# --- the roofline ------------------------------------------------------------------------------------------------

def test_roofline_bound_and_fraction_by_hand():
    # cuda:0 reads 3 GB of weights and 1 GB of cache at 2 TB/s (2 ms), cuda:1 1 GB at 1 TB/s (1 ms), one after the
    # other: a step takes 3 ms, so 4 sequences make at most 4 / 3 ms = 1333 tokens/s; 1000 measured is 75% of that
    bound = Roofline((GPUBound(0, "a", 3e9, 1e9, 2e12), GPUBound(1, "b", 1e9, 0, 1e12)), batch=4, context=100,
                     measured_tokens_per_s=1000.0, simulated=False)
    assert bound.step_seconds == pytest.approx(3e-3)
    assert bound.tokens_per_s == pytest.approx(4 / 3e-3)
    assert bound.fraction == pytest.approx(0.75)
    assert "reached 75.0%" in repr(bound) and "1,333 tokens/s" in repr(bound)
    unknown = Roofline((GPUBound(0, "a", 3e9, 0, None),), 1, 10, 5.0, False)
    assert unknown.tokens_per_s is None and unknown.fraction is None and "bandwidth unknown" in repr(unknown)
    # tensor parallel: the GPUs read their shares at once, so the step is the slowest GPU's 2 ms: 2,000 tokens/s
    together = Roofline(bound.gpus, 4, 100, 1000.0, simulated=False, together=True)
    assert together.step_seconds == pytest.approx(2e-3) and together.fraction == pytest.approx(0.5)
    simulated = Roofline(bound.gpus, 4, 100, 1000.0, simulated=True)
    assert simulated.tokens_per_s == bound.tokens_per_s and simulated.fraction is None  # the run was on the CPU


def test_roofline_of_a_simulated_split_from_the_models_shape(tmp_path):
    """The bytes each GPU reads per decode step, written out from the Llama shape (float32), at the A100-80GB's
    datasheet bandwidth (2,039 GB/s)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config())
    model.save_pretrained(tmp_path)
    nbgpu.simulate("2xA100-80GB")
    plan = nbgpu.plan(str(tmp_path), batch=1, seq_len=64, dtype="float32", strategy=[2, 2])
    loaded = nbgpu.load(plan, show=False)
    prompt, new = 8, 4
    bound = roofline.estimate(loaded, batch=1, prompt_len=prompt, new_tokens=new, measured_tokens_per_s=None,
                              simulated=True)
    f32 = 4
    attention = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * HEAD_DIM  # q, o; k, v
    layer = (attention + 3 * HIDDEN * INTER + 2 * HIDDEN) * f32  # + gate, up, down and two norms
    embed = VOCAB * HIDDEN * f32
    rotary = sum(b.numel() * b.element_size() for b in model.buffers())  # inverse frequencies, no weights
    weights = {0: embed + 2 * layer, 1: 2 * layer + HIDDEN * f32 + rotary + embed}  # final norm, lm_head
    # decode steps 1..3 attend over the prompt and 1..3 new tokens: 10 tokens on average, keys and values of
    # 2 KV heads x 16 dims each, per layer
    context = sum(prompt + k for k in range(1, new)) / (new - 1)
    assert bound.context == context == 10
    kv = {g: 2 * (2 * KV_HEADS * HEAD_DIM * f32 * 10) for g in (0, 1)}
    assert [(g.cuda_index, g.weights, g.kv_cache) for g in bound.gpus] == [(0, weights[0], kv[0]),
                                                                          (1, weights[1], kv[1])]
    a100 = 2.039e12
    assert [g.bandwidth for g in bound.gpus] == [pytest.approx(a100)] * 2
    step = sum(weights[g] + kv[g] for g in (0, 1)) / a100
    assert bound.step_seconds == pytest.approx(step) and bound.tokens_per_s == pytest.approx(1 / step)
    assert bound.fraction is None  # the run is on the CPU


def test_a_kernel_that_ends_as_the_closing_marker_starts_is_inside_the_step():
    from nbgpu.running import step_profile

    m = step_profile.MARKER
    # the step runs from 1 us (end of the first marker) to 100 us (start of the last); the gemm fills 10-100 us
    kernels = [(0, 0, 1, m), (0, 10, 100, "ampere_bf16_gemm"), (0, 100, 101, m)]
    profile = step_profile.from_kernels(kernels, [0])
    assert profile.step_us == {0: 99} and profile.busy_us(0) == 90
    steps = timeline.from_profile(profile, "test", merge_gap_us=2.0)
    # 90 of 99 us busy is 91%: 0.09 ms of matrix work, none of any other kind, 0.009 ms idle
    assert repr(steps) == ("one decode step: 0.10 ms; busy cuda:0 91%; cuda:0 matrix 0.09 ms, communication 0.00 ms, "
                           "other 0.00 ms, idle 0.01 ms")


def real_run(label="m batch 2", batch=2):
    from nbgpu.units import GiB

    bound = Roofline((GPUBound(0, "NVIDIA L4", 3 * 10**9, 0, 3e11),), batch=batch, context=12,
                     measured_tokens_per_s=50.0, simulated=False)
    return BenchResult(label=label, batch=batch, prompt_len=10, new_tokens=5, repeats=2, warmup=1, compiled=False,
                       simulated=False, devices=[0], ttft=[0.125, 0.375], decode_seconds=[4 / 64, 8 / 64],
                       step_latencies=[1 / 64] * 4 + [1 / 32] * 4, generated_tokens=10,
                       peak_memory={0: GiB, 1: 512 * 1024**2}, roofline=bound)


def test_the_summary_row_carries_the_roofline_and_the_peak_memory_per_device():
    row = real_run().summary()
    # 2 sequences, 3 GB read at 300 GB/s a step: 10 ms, so at most 200 tokens/s; 50 measured is a quarter of it
    assert row["roofline_tok_s (estimate)"] == pytest.approx(200.0) and row["roofline_fraction"] == pytest.approx(0.25)
    assert row["peak_memory"] == {"cuda:0": 1024**3, "cuda:1": 512 * 1024**2}


def test_a_batch_sweep_reads_as_one_row_per_batch():
    from nbgpu.running.bench import Sweep

    sweep = Sweep([real_run("m batch 1", 1), real_run("m batch 8", 8)])
    # decode: runs of batch x 4 tokens in 1/16 s and 1/8 s -> batch x 64 and batch x 32, median batch x 48 tokens/s;
    # per-token p50 of 4 x 15.625 ms and 4 x 31.25 ms = 23.44 ms
    assert repr(sweep).splitlines() == ["m: batch sweep",
                                        "  batch    1: decode 48.0 tokens/s, per-token p50 23.44 ms",
                                        "  batch    8: decode 384.0 tokens/s, per-token p50 23.44 ms"]
    assert repr(Sweep([])) == "Sweep([])"
