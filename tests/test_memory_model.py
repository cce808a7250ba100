"""The memory model's pieces against what a tiny model really holds on the CPU (live storages followed one by one),
the balanced split on 2-8 simulated GPUs, tensor-parallel shares, and NVML's driver reserve kept apart."""

from __future__ import annotations

import pytest
import torch
import transformers
from live_bytes import LiveBytes

import nbgpu
from nbgpu.errors import UsageError
from nbgpu.running import placement
from nbgpu.units import GiB

TINY = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)


def tiny_llama(**over):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**TINY, **over})
    return cfg, transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def owned(model):
    return [*model.parameters(), *model.buffers()]


def test_kv_cache_after_the_prefill_and_at_the_end_is_what_the_plan_says():
    cfg, model = tiny_llama()
    batch, prompt, new = 3, 40, 9
    plan = nbgpu.plan(cfg, gpus="1x24GiB", batch=batch, prompt_len=prompt, new_tokens=new)
    cache = transformers.DynamicCache(config=cfg)
    ids = torch.randint(0, 1000, (batch, prompt))
    with torch.no_grad():
        model(ids, use_cache=True, **{placement.cache_argument(model): cache})
        held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
        assert held == sum(plan.estimates.kv_prompt.values())
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, return_dict_in_generate=True)
    final = placement.cache_of(out) if hasattr(out, "cache") else out.past_key_values
    # generate's cache holds every token but the last one it made (that one was never fed back)
    per_token = plan.devices[0].kv_cache // (batch * (prompt + new))
    assert sum(layer.keys.nbytes + layer.values.nbytes for layer in final.layers) == \
        per_token * batch * (prompt + new - 1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mlp_phase_holds_three_widths_gated_and_four_for_gpt2s_tanh_gelu(family):
    if family == "llama":
        cfg, model = tiny_llama()
        mlp, hidden = model.model.layers[0].mlp, 256
    else:
        cfg = transformers.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
        mlp, hidden = model.transformer.h[0].mlp, 128
    plan = nbgpu.plan(cfg, gpus="1x24GiB", batch=2, prompt_len=64, new_tokens=1)
    est = plan.estimates
    x = torch.randn(2, 64, hidden, dtype=torch.bfloat16)
    with torch.no_grad(), LiveBytes([*owned(model), x]) as live:
        mlp(x)
    widths = 3 if family == "llama" else 4  # gate, up, product; or fc, 0.5 x fc and two tanh-GELU temporaries
    assert est.mlp_widths == widths
    expected = est.tokens * widths * est.width * 2
    assert expected <= live.peak <= expected + est.tokens * hidden * 2  # + the output, allocated last


def test_a_decode_step_holds_a_second_copy_of_one_layers_keys_as_the_cache_grows():
    cfg, model = tiny_llama()
    plan = nbgpu.plan(cfg, gpus="1x24GiB", batch=2, prompt_len=300, new_tokens=1)
    name = placement.cache_argument(model)
    cache = transformers.DynamicCache(config=cfg)
    with torch.no_grad():
        model(torch.randint(0, 1000, (2, 300)), use_cache=True, **{name: cache})
        live = LiveBytes(owned(model), follow=[t for layer in cache.layers for t in (layer.keys, layer.values)])
        with live:
            model(torch.randint(0, 1000, (2, 1)), use_cache=True, **{name: cache})
    # the cache at 301 tokens, plus one layer's keys at 301 tokens while the 300-token ones were still held
    growth = max(plan.estimates.kv_total.values()) // 2
    assert live.peak >= sum(plan.estimates.kv_total.values()) + growth - 2 * 2 * 32 * 2 * 2  # less one token's K, V


def test_eager_attention_adds_the_score_matrices_sdpa_does_not():
    peaks = {}
    for impl in ("eager", "sdpa"):
        cfg, model = tiny_llama(attn_implementation=impl)
        ids = torch.randint(0, 1000, (2, 256))
        with torch.no_grad(), LiveBytes(owned(model)) as live:
            model(ids, use_cache=False, logits_to_keep=1)
        peaks[impl] = live.peak
    plan = nbgpu.plan(tiny_llama()[0], gpus="1x24GiB", batch=2, prompt_len=256, new_tokens=1,
                      attn_implementation="eager")
    scores = plan.estimates.score_bytes
    assert scores == 2 * 8 * 256 * 256 * (2 + 4 + 2) + 2 * 256 * 256 * 2
    extra = peaks["eager"] - peaks["sdpa"]
    assert 0.6 * scores <= extra <= 1.1 * scores  # bf16 scores + float32 softmax + its bf16 copy at the worst moment


# --- the split -----------------------------------------------------------------------------------------------

LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)
LLAMA_70B = dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, vocab_size=128256)
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, sliding_window=4096)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("config", [LLAMA_8B, MISTRAL_7B, LLAMA_70B], ids=["llama8b", "mistral7b", "llama70b"])
def test_balanced_uses_every_gpu_and_spreads_layers_within_what_embeddings_and_head_weigh(n, config):
    plan = nbgpu.plan(config, gpus=f"{n}x80GiB", batch=8, seq_len=4096)
    counts = plan.layer_counts()
    assert all(counts), counts
    layer = plan._meta.unit("model.layers.0").size
    ends = plan._meta.unit("model.embed_tokens").size + plan._meta.unit("lm_head").size
    assert max(counts) - min(counts) <= max(1, round(ends / layer)) + 1, counts


def test_another_process_lowers_a_gpus_share_but_does_not_empty_it():
    sim = nbgpu.devices.simulate("4x80GiB")
    sim.allocate(1, 40 * GiB)
    plan = nbgpu.plan(LLAMA_8B, batch=4, seq_len=4096)
    counts = plan.layer_counts()
    assert all(counts) and counts[1] < min(counts[0], counts[2], counts[3]), counts
    rooms = [d.room for d in plan.devices]
    shares = [d.process / r for d, r in zip(plan.devices, rooms)]
    assert max(shares) == pytest.approx(plan.balance_ratio, rel=1e-6)


def test_a_gpu_with_no_room_stays_empty_and_explain_says_why():
    sim = nbgpu.devices.simulate("2x24GiB")
    sim.allocate(0, 23 * GiB)
    plan = nbgpu.plan(LLAMA_8B, batch=1, seq_len=512)
    assert plan.layer_counts()[0] == 0 and plan.devices[0].room <= 0
    assert "stays empty: no room left on it" in plan.explain()


def test_boundaries_are_explained_with_their_target():
    plan = nbgpu.plan(LLAMA_8B, gpus="2x24GiB", batch=1, seq_len=2048)
    text = plan.explain()
    assert "Boundary cuda:0 -> cuda:1 after model.layers." in text and "target" in text
    assert "prefill activations and allocator overhead" in text


# --- the run ---------------------------------------------------------------------------------------------------

def test_prompt_and_new_tokens_set_the_prefill_and_the_cache_apart():
    long_prompt = nbgpu.plan(LLAMA_8B, gpus="1x80GiB", batch=4, prompt_len=8192, new_tokens=0)
    split_run = nbgpu.plan(LLAMA_8B, gpus="1x80GiB", batch=4, prompt_len=4096, new_tokens=4096)
    assert long_prompt.seq_len == split_run.seq_len == 8192
    assert long_prompt.devices[0].kv_cache == split_run.devices[0].kv_cache
    assert long_prompt.devices[0].activations > split_run.devices[0].activations  # twice the prefill tokens
    est = split_run.estimates
    # Llama 8B, bf16: 4 x 4096 prefill tokens x (layer input, residual, embeddings, normed, rotary 2 x 128 +
    # 3 x 14336) x 2 bytes, on top of the prompt's cache; the run's end holds the whole cache and one more keys copy
    per_token = 2 * 4096 + 256 + 4096 + 4096 + 3 * 14336
    prefill = sum(est.kv_prompt.values()) + 4 * 4096 * per_token * 2
    end = sum(est.kv_total.values()) + max(est.kv_total.values()) // 2
    logits = 4 * 128256 * (2 + 4 + 4)
    assert split_run.devices[0].activations == max(prefill, end) - sum(est.kv_total.values()) + logits


@pytest.mark.parametrize("args", [dict(seq_len=100, prompt_len=60, new_tokens=30), dict(prompt_len=0),
                                  dict(new_tokens=-1), dict(seq_len=10, prompt_len=20), dict(prefill_chunk=0),
                                  dict(attn_implementation="fast"), dict(cache="paged")])
def test_inconsistent_runs_are_refused(args):
    with pytest.raises(UsageError):
        nbgpu.plan(LLAMA_8B, gpus="1x80GiB", **args)


def test_run_forms():
    p = nbgpu.plan(LLAMA_8B, gpus="1x80GiB", seq_len=1000, new_tokens=200)
    assert (p.prompt_len, p.new_tokens, p.seq_len) == (800, 200, 1000)
    q = nbgpu.plan(LLAMA_8B, gpus="1x80GiB", prompt_len=300)
    assert (q.prompt_len, q.new_tokens) == (300, 0)
    chunked = nbgpu.plan(LLAMA_8B, gpus="1x80GiB", batch=2, prompt_len=4096, new_tokens=10, prefill_chunk=512)
    assert chunked.estimates.tokens == 2 * 512


# --- tensor parallel ---------------------------------------------------------------------------------------------

def test_tensor_parallel_shares_weights_as_transformers_tp_plan_does():
    plan = nbgpu.plan(LLAMA_8B, gpus="2x80GiB", batch=1, seq_len=1024, parallel="tensor")
    model = plan._meta.model
    whole = sum(p.numel() * 2 for n, p in model.named_parameters() if "norm" in n)
    whole += sum(b.numel() * b.element_size() for b in model.buffers())  # the rotary frequencies
    everything = sum(p.numel() * 2 for p in model.parameters()) + sum(b.numel() * b.element_size()
                                                                      for b in model.buffers())
    # every projection, the embeddings and the output are halved; norms and buffers stay whole on both GPUs
    assert [d.weights for d in plan.devices] == [(everything - whole) // 2 + whole] * 2
    kv_one_gpu = nbgpu.plan(LLAMA_8B, gpus="1x80GiB", batch=1, seq_len=1024).devices[0].kv_cache
    assert plan.devices[0].kv_cache == kv_one_gpu // 2
    assert plan.devices[0].communication > 0 and plan.tp == 2 and plan.layer_counts() == [32, 32]
    with pytest.raises(UsageError, match="tensor-parallel plan has no device_map"):
        _ = plan.device_map
    with pytest.raises(UsageError, match="tensor-parallel plan has no layers to move"):
        plan.move("model.layers.0", 1)


def test_tensor_parallel_replicates_kv_heads_when_there_are_fewer_than_gpus():
    few_kv = dict(LLAMA_8B, num_key_value_heads=2)
    plan = nbgpu.plan(few_kv, gpus="4x80GiB", batch=1, seq_len=1024, parallel="tensor")
    assert plan.heads.kv_replicas == 2 and plan.heads.kv_heads_per_gpu == 1
    whole = nbgpu.plan(few_kv, gpus="1x80GiB", batch=1, seq_len=1024).devices[0].kv_cache
    assert plan.devices[0].kv_cache == whole // 2  # one of the two KV heads on each GPU


def test_tensor_parallel_refusals_name_the_rule():
    with pytest.raises(UsageError, match="attention heads do not divide over 3 GPUs"):
        nbgpu.plan(LLAMA_8B, gpus="3x80GiB", parallel="tensor")
    with pytest.raises(UsageError, match="no tensor-parallel plan for GPT2LMHeadModel"):
        nbgpu.plan(dict(model_type="gpt2", n_layer=2, n_embd=128, n_head=4), gpus="2x80GiB", parallel="tensor")
    with pytest.raises(UsageError, match="takes no strategy and no offload"):
        nbgpu.plan(LLAMA_8B, gpus="2x80GiB", parallel="tensor", offload="cpu")


# --- NVML's reserve ---------------------------------------------------------------------------------------------

def test_the_drivers_reserve_is_not_another_process(fake_nvml):
    import fake_pynvml

    nv = fake_nvml([fake_pynvml.FakeGPU(uuid="GPU-00000000-0000-0000-0000-000000000000", total=80 * GiB, used=0)])
    nv.nvmlMemory_v2 = 0x02000028
    plain = nv.nvmlDeviceGetMemoryInfo

    def v2(handle, version=None):
        m = plain(handle)
        if version is None:
            return m
        reserved = 600 * 1024**2
        return type("M", (), dict(total=m.total, reserved=reserved, used=m.used + 2 * GiB, free=m.free))()

    nv.nvmlDeviceGetMemoryInfo = v2
    gpu = nbgpu.devices.read().gpus[0]
    assert gpu.memory_reserved == 600 * 1024**2 and gpu.memory_used == 2 * GiB + 600 * 1024**2
    plan = nbgpu.plan(LLAMA_8B, gpus=[gpu], batch=1, seq_len=512)
    d = plan.devices[0]
    assert d.others == 2 * GiB and d.driver_reserved == 600 * 1024**2
    assert d.room == 80 * GiB - GiB - 600 * 1024**2 - 2 * GiB
