"""The cost model behind modelled timings on simulated GPUs, against figures computed here by hand from the GPUs'
datasheet numbers (NVIDIA L4: 300 GB/s, 121 TFLOP/s bf16, PCIe Gen4 x16; NVIDIA H100 SXM: 3.35 TB/s, NVLink 4 with 18
links) and the calibration table; and bench on simulated GPUs: modelled, labelled, the same on every run."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import nbgpu  # noqa: E402
from nbgpu.devices.speed_calibration import DEFAULT as CAL  # noqa: E402
from nbgpu.errors import UsageError  # noqa: E402
from nbgpu.running.prediction import predict  # noqa: E402

# an 8B-like Llama cut to 4 layers: every figure below is worked out from these numbers
H, MLP, L, HEADS, KV, HD, V = 4096, 14336, 4, 32, 8, 128, 32000
SHAPE = dict(model_type="llama", hidden_size=H, intermediate_size=MLP, num_hidden_layers=L, num_attention_heads=HEADS,
             num_key_value_heads=KV, vocab_size=V, max_position_embeddings=4096)
LAYER_PARAMS = 2 * H * H + 2 * H * KV * HD + 3 * H * MLP + 2 * H  # q, o; k, v; gate, up, down; two norms
LAYER_BYTES = 2 * LAYER_PARAMS  # bf16
HEAD_BYTES = 2 * V * H
NORM_BYTES = 2 * H
ROTARY_BYTES = 2 * (HD // 2) * 4  # inv_freq and original_inv_freq, float32 buffers of the rotary embedding
KV_BYTES_PER_TOKEN = 2 * KV * HD * 2  # keys and values, bf16, one layer, one sequence

L4_BW = 300e9 * CAL.bandwidth_fraction
L4_FLOPS = 121e12 * CAL.compute_fraction
H100_BW = 3.35e12 * CAL.bandwidth_fraction
PCIE4_X16 = 16 * 16e9 / 8 * 128 / 130  # bytes/s one way
NVLINK4_X18 = 18 * 25e9
PER_TOKEN = CAL.path("eager").per_step  # generate's own work after each token, the same on every path


def step_ms(result) -> float:
    assert len(set(result.step_latencies)) >= 1
    return result.step_latencies[-1] * 1e3


def test_one_l4_decode_is_the_memory_time_of_every_layer_and_the_head():
    plan = nbgpu.plan(SHAPE, gpus="1xL4", batch=1, prompt_len=100, new_tokens=3)
    r = predict(plan, batch=1, prompt_len=100, new_tokens=3)
    # the last decode step reads each layer's weights and its cache of 102 tokens; the GPU (2.5 ms a layer) is slower
    # than the host (0.7 ms), so the layers follow each other on the GPU; then generate's own work for the token
    context = 102
    expected = (L * (LAYER_BYTES + KV_BYTES_PER_TOKEN * context) + NORM_BYTES + ROTARY_BYTES + HEAD_BYTES) / L4_BW \
        + PER_TOKEN
    assert step_ms(r) == pytest.approx(expected * 1e3, rel=1e-9)
    assert r.latency_p50_s * 1e3 == pytest.approx(step_ms(r), rel=1e-3)
    assert "(modelled)" in r.label and "modelled" in r.modelled and "NVIDIA L4" in r.modelled


def test_one_l4_prefill_is_compute_bound():
    batch, prompt = 8, 512
    plan = nbgpu.plan(SHAPE, gpus="1xL4", batch=batch, prompt_len=prompt, new_tokens=2)
    r = predict(plan, batch=batch, prompt_len=prompt, new_tokens=2)
    tokens = batch * prompt
    attention = 4 * tokens * (prompt / 2) * HEADS * HD  # QK^T and AV over half the prompt on average
    layer = (2 * LAYER_PARAMS * tokens + attention) / L4_FLOPS
    # logits of the last position only: reading the head's matrix sets its time
    head = (HEAD_BYTES + NORM_BYTES + ROTARY_BYTES) / L4_BW
    assert r.ttft_s == pytest.approx(L * layer + head + PER_TOKEN, rel=1e-9)


def test_a_layer_split_over_two_l4_adds_one_hand_off_over_pcie():
    nbgpu.simulate("2xL4:pcie")
    plan = nbgpu.plan(SHAPE, batch=1, prompt_len=100, new_tokens=3, strategy=[2, 2])
    r = predict(plan, batch=1, prompt_len=100, new_tokens=3)
    one = (L * (LAYER_BYTES + KV_BYTES_PER_TOKEN * 102) + NORM_BYTES + ROTARY_BYTES + HEAD_BYTES) / L4_BW
    hand_off = 1.0e-6 + H * 2 / PCIE4_X16  # NCCL's PCIe hop latency + the hidden state of one token
    assert step_ms(r) == pytest.approx((one + hand_off + PER_TOKEN) * 1e3, rel=1e-9)
    tl = r.timeline
    assert set(tl.busy()) == {0, 1} and tl.simulated and "modelled" in tl.note
    # the GPUs work one after another: cuda:0's blocks all end before cuda:1's first layer starts
    last0 = max(iv.end_ms for iv in tl.intervals if iv.cuda_index == 0)
    first1 = min(iv.start_ms for iv in tl.intervals if iv.cuda_index == 1 and "layers" in iv.modules)
    assert last0 <= first1
    assert tl.breakdown[1]["communication"] == pytest.approx(hand_off * 1e3, rel=1e-9)


def test_tensor_parallel_on_two_h100_is_host_bound_with_two_all_reduces_per_layer():
    nbgpu.simulate("2xH100:nvlink")
    plan = nbgpu.plan(SHAPE, batch=1, prompt_len=100, new_tokens=3, parallel="tensor")
    r = predict(plan, batch=1, prompt_len=100, new_tokens=3)
    # each GPU reads half a layer (0.11 ms) while the host needs 1.3 ms per layer (DTensor): the host sets the pace.
    # The MLP's all-reduce of the last layer follows the host's last issue; then the head's half is read.
    all_reduce = 6.6e-6 + 2 * 0.6e-6 + (H * 2) / NVLINK4_X18  # ring of 2: fixed cost, 2 hops, all the bytes once
    head = (HEAD_BYTES + NORM_BYTES + ROTARY_BYTES) / 2 / H100_BW
    expected = L * CAL.path("dtensor").per_layer + all_reduce + head + PER_TOKEN
    assert step_ms(r) == pytest.approx(expected * 1e3, rel=1e-9)
    assert r.timeline.breakdown[0]["communication"] == pytest.approx(2 * L * all_reduce * 1e3, rel=1e-9)
    assert set(r.timeline.busy()) == {0, 1}


def test_compiled_one_h100_is_the_gpu_time_plus_generates_own_work_per_token():
    plan = nbgpu.plan(SHAPE, gpus="1xH100", batch=1, prompt_len=100, new_tokens=3)
    r = predict(plan, batch=1, prompt_len=100, new_tokens=3, compile=True)
    gpu = (L * (LAYER_BYTES + KV_BYTES_PER_TOKEN * 102) + NORM_BYTES + ROTARY_BYTES + HEAD_BYTES) / H100_BW
    assert step_ms(r) == pytest.approx((gpu + PER_TOKEN) * 1e3, rel=1e-9)
    eager = predict(plan, batch=1, prompt_len=100, new_tokens=3)
    # eager is host-bound here: the layers' launches (0.7 ms each, the GPU needs 0.22), then the head's read
    launches = L * CAL.path("eager").per_layer
    assert step_ms(eager) == pytest.approx((launches + (NORM_BYTES + ROTARY_BYTES + HEAD_BYTES) / H100_BW
                                            + PER_TOKEN) * 1e3, rel=1e-9)


def test_pcie_without_peer_to_peer_halves_the_link():
    nbgpu.simulate("2xRTX4090")  # GeForce: the driver refuses peer-to-peer over PCIe
    plan = nbgpu.plan(SHAPE, batch=1, prompt_len=100, new_tokens=3, parallel="tensor")
    r = predict(plan, batch=1, prompt_len=100, new_tokens=3)
    assert "no peer-to-peer" in r.modelled


def test_a_gpu_given_only_by_its_size_cannot_be_modelled():
    plan = nbgpu.plan(SHAPE, gpus="2x24GiB", batch=1, prompt_len=100, new_tokens=3)
    with pytest.raises(UsageError, match="bandwidth"):
        predict(plan)


# --- bench on simulated GPUs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small-llama")
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    return str(path)


def test_bench_on_simulated_gpus_reports_the_modelled_figures_every_time(small_llama):
    nbgpu.simulate("2xL4")
    plan = nbgpu.plan(small_llama, batch=1, seq_len=64, strategy=[2, 2])
    model = nbgpu.load(plan, show=False)
    runs = [nbgpu.bench(model, prompt_len=8, new_tokens=4, repeats=2) for _ in range(2)]
    a, b = runs
    assert a.step_latencies == b.step_latencies and a.ttft == b.ttft  # a model has no noise
    expected = predict(plan, batch=1, prompt_len=8, new_tokens=4)
    assert a.step_latencies == expected.step_latencies * 2 and a.ttft == expected.ttft * 2
    assert a.modelled and "(modelled)" in a.label and "modelled" in repr(a)
    assert any("CPU ran generate 1 time and made exactly 4 tokens" in n for n in a.notes)
    assert len(a.cpu_times["ttft"]) == 1 and len(a.ttft) == 2  # one CPU run; every repeat modelled alike
    assert set(a.timeline.busy()) == {0, 1} and "modelled" in a.timeline.note
    # tiny layers: eager decoding is host-bound, and a split pays accelerate's hooks on every layer
    one = nbgpu.bench(nbgpu.load(nbgpu.plan(small_llama, gpus=1, batch=1, seq_len=64), show=False), prompt_len=8,
                      new_tokens=4, repeats=1)
    assert one.decode_tokens_per_s > a.decode_tokens_per_s
    assert "modelled" in repr(nbgpu.compare([one, a]))


def test_compiled_bench_on_simulated_gpus_is_modelled_and_said_so(small_llama):
    nbgpu.simulate("1xL4")
    model = nbgpu.load(nbgpu.plan(small_llama, batch=1, seq_len=64), show=False)
    eager = nbgpu.bench(model, prompt_len=8, new_tokens=4, repeats=1)
    compiled = nbgpu.bench(model, prompt_len=8, new_tokens=4, repeats=1, compile=True)
    assert compiled.compiled and "compiled" in compiled.modelled
    assert compiled.latency_p50_s < eager.latency_p50_s


def test_bench_on_gpus_given_only_by_size_keeps_the_cpu_clock_and_says_why(small_llama):
    nbgpu.simulate("2x24GiB")
    model = nbgpu.load(nbgpu.plan(small_llama, batch=1, seq_len=64), show=False)
    r = nbgpu.bench(model, prompt_len=8, new_tokens=3, repeats=1)
    assert r.modelled is None and any("given only by its size" in n for n in r.notes)
    with pytest.raises(UsageError, match="named model"):
        nbgpu.bench(model, prompt_len=8, new_tokens=3, repeats=1, compile=True)
