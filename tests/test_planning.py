"""The layout planner on real architectures built on the meta device, with simulated GPUs."""

from __future__ import annotations

import pytest
import transformers

import nbgpu
from nbgpu.errors import UsageError
from nbgpu.units import GiB


def llama(layers=8, hidden=512, heads=8, kv_heads=2, vocab=32000, inter=1408):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                    num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads)


LLAMA_8B = dict(layers=32, hidden=4096, heads=32, kv_heads=8, vocab=128256, inter=14336)


def test_gqa_kv_cache_and_exact_weights():
    cfg = llama(layers=4, hidden=256, heads=8, kv_heads=2, vocab=1000, inter=512)
    p = nbgpu.plan(cfg, gpus="1x24GiB", batch=3, seq_len=100, dtype="float16")
    head_dim = 256 // 8
    per_layer = 2 * 2 * head_dim * 100 * 3 * 2  # K and V, 2 kv heads, 100 tokens, batch 3, fp16
    assert p.devices[0].kv_cache == 4 * per_layer
    from accelerate.utils import compute_module_sizes

    assert p.devices[0].weights == compute_module_sizes(p._meta.model)[""]
    assert p.fits and p.dtype == "float16" and p.batch == 3 and p.seq_len == 100
    d = p.devices[0]
    assert d.total == d.weights + d.kv_cache + d.activations + d.allocator + d.context + d.others
    assert d.budget == 24 * GiB - GiB and d.free == d.budget - d.total


def test_balanced_equal_gpus_splits_llama_8b_shape_evenly():
    p = nbgpu.plan(llama(**LLAMA_8B), gpus="2x24GiB", batch=4, seq_len=4096)
    assert p.layer_counts() == [16, 16]
    totals = [d.total for d in p.devices]
    assert max(totals) / (sum(totals) / 2) < 1.05
    assert p.layers_on(0)[0] == "model.embed_tokens" and p.layers_on(1)[-1] == "lm_head"
    assert set(p.device_map.values()) == {0, 1}


def test_unequal_gpus_get_layers_in_proportion():
    p = nbgpu.plan(llama(**LLAMA_8B), gpus="24GiB,80GiB", batch=1, seq_len=2048)
    small, big = p.devices
    assert p.fits
    assert big.weights > 2 * small.weights
    assert abs(small.total / small.budget - big.total / big.budget) < 0.05


def test_sequential_fills_first_gpu_first():
    p = nbgpu.plan(llama(**LLAMA_8B), gpus="2x24GiB", strategy="sequential")
    assert p.layer_counts()[0] > p.layer_counts()[1]
    assert p.devices[0].free < p.devices[1].free


def test_gpt2_and_gemma_tied_embeddings_stay_together():
    gpt2 = transformers.GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=5000)
    p = nbgpu.plan(gpt2, gpus="2x24GiB", strategy=[3, 3])
    assert p.tied_groups == [["lm_head.weight", "transformer.wte.weight"]]
    assert p.device_map["lm_head"] == p.device_map["transformer.wte"] == 0
    gemma = transformers.GemmaConfig(vocab_size=8000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=64)
    g = nbgpu.plan(gemma, gpus="2x24GiB", strategy=[2, 2])
    assert g.device_map["lm_head"] == g.device_map["model.embed_tokens"] == 0
    # the tied tensor is counted once
    assert g._meta.unit("lm_head").size == 0
    with pytest.raises(UsageError, match="tied weights must stay on one device.*lm_head"):
        g.move("lm_head", 1)
    assert g.device_map["lm_head"] == 0  # refused: unchanged
    g.move(["lm_head", "model.embed_tokens"], 1)
    assert g.device_map["lm_head"] == g.device_map["model.embed_tokens"] == 1


def test_mistral_sliding_window_caps_the_cache():
    cfg = transformers.MistralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, sliding_window=128)
    p = nbgpu.plan(cfg, gpus="1x24GiB", seq_len=4096, batch=1)
    per_token = 2 * 2 * 64 * 2
    assert p.estimates.kv_total == {0: 128 * per_token, 1: 128 * per_token}
    short = p.with_batch(seq_len=64)
    assert short.estimates.kv_total[0] == 64 * per_token and short.seq_len == 64


def test_qwen2_and_mixtral_moe():
    qwen = transformers.Qwen2Config(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                    num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)
    q = nbgpu.plan(qwen, gpus="2x24GiB")
    assert q.layer_counts() == [2, 2] and q.fits
    mix = transformers.MixtralConfig(vocab_size=2000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                                     num_experts_per_tok=2)
    m = nbgpu.plan(mix, gpus="2x24GiB")
    assert "MixtralDecoderLayer" in m.no_split_modules
    # eight experts make a layer far heavier than a dense one of the same width
    assert m._meta.unit("model.layers.0").size > 4 * q._meta.unit("model.layers.0").size
    assert m.layer_counts() == [2, 2]


def test_gappy_physical_ids_map_to_cuda_indexes():
    nbgpu.simulate("4x24GiB")
    nbgpu.use("1,3")
    p = nbgpu.plan(llama(), batch=2)
    assert [d.cuda_index for d in p.devices] == [0, 1]
    assert [d.gpu.index for d in p.devices] == [1, 3]
    assert set(p.device_map.values()) <= {0, 1}
    assert "GPU 3" in repr(p) and "simulated" in repr(p)
    assert p.simulated
    two = nbgpu.plan(llama(), gpus=1)
    assert [d.gpu.index for d in two.devices] == [1]


def test_others_memory_reduces_room():
    sim = nbgpu.devices.simulate("2x24GiB")
    sim.allocate(0, 10 * GiB)
    p = nbgpu.plan(llama(**LLAMA_8B), batch=4, seq_len=4096)
    assert p.devices[0].others >= 10 * GiB
    assert p.layer_counts()[0] < p.layer_counts()[1]


def test_model_that_does_not_fit_says_how_much_is_missing():
    p = nbgpu.plan(llama(**LLAMA_8B), gpus="2x8GiB")
    assert not p.fits
    assert p.missing() == sum(d.over for d in p.devices) > 0
    text = p.explain()
    assert "DOES NOT FIT" in text and "over its budget" in text
    assert "Fewest empty 8 GiB GPUs that hold this run with its layers split across them: 3" in text
    # the smallest size the heads allow (1, 2, 4, 8 for 32 heads / 8 KV heads) whose share fits a 7 GiB room
    from nbgpu.planning.explain import tensor_parallel, tensor_parallel_need

    room = 7 * GiB
    tp = tensor_parallel(p)
    assert tensor_parallel_need(p, tp) <= room and all(tensor_parallel_need(p, k) > room for k in (1, 2, 4) if k < tp)
    assert f"Tensor parallel: {tp} GPUs" in text


def test_offload_to_cpu_then_disk_states_the_slowdown():
    p = nbgpu.plan(llama(**LLAMA_8B), gpus="2x8GiB", offload="cpu", cpu_memory="64GiB")
    assert p.fits and p.cpu_weights > 0 and p.disk_weights == 0
    assert all(d.over == 0 for d in p.devices)
    assert "cpu" in p.device_map.values() and p.device_map["lm_head"] == "cpu"
    assert "cross PCIe" in p.explain()
    d = nbgpu.plan(llama(**LLAMA_8B), gpus="2x8GiB", offload="disk", cpu_memory="2GiB")
    assert d.disk_weights > 0 and "disk" in d.device_map.values() and "read from disk" in d.explain()


def test_manual_ranges_and_moves():
    p = nbgpu.plan(llama(layers=8), gpus="2x24GiB", strategy={"model.layers.0-5": 0, "model.layers.6-7": 1})
    assert p.layer_counts() == [6, 2]
    assert p.device_map["model.embed_tokens"] == 0 and p.device_map["lm_head"] == 1
    p.move("model.layers.4-5", 1)
    assert p.layer_counts() == [4, 4]
    with pytest.raises(UsageError, match="model.layers.3.*LlamaDecoderLayer.*no-split"):
        p.move("model.layers.3.mlp", 1)
    with pytest.raises(UsageError, match="no module 'model.layers.8'"):
        p.move("model.layers.6-8", 0)
    with pytest.raises(UsageError, match="cannot place"):
        p.move("model.layers.0", 5)
    assert p.layer_counts() == [4, 4]
    with pytest.raises(UsageError, match="add up to 7"):
        nbgpu.plan(llama(layers=8), gpus="2x24GiB", strategy=[3, 4])


def test_bad_inputs_are_usage_errors(monkeypatch):
    with pytest.raises(UsageError, match="unknown strategy"):
        nbgpu.plan(llama(), gpus="1x24GiB", strategy="fastest")
    with pytest.raises(UsageError, match="model_type"):
        nbgpu.plan({"hidden_size": 64}, gpus="1x24GiB")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the offline switch: an id that is not cached is refused at once
    with pytest.raises(UsageError, match="not in the Hugging Face cache; HF_HUB_OFFLINE is set, so the hub is not"):
        nbgpu.plan("no-such-org/no-such-model-xyz", gpus="1x24GiB")
    with pytest.raises(UsageError, match="dtype"):
        nbgpu.plan(llama(), gpus="1x24GiB", dtype="int3")
    with pytest.raises(UsageError, match="no GPU is visible"):
        nbgpu.simulate("1x24GiB")
        nbgpu.use("none")
        nbgpu.plan(llama())


def test_config_dict_and_explicit_gpu_list():
    p = nbgpu.plan({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "vocab_size": 1000}, gpus=["16GiB", 40 * GiB])
    assert [d.capacity for d in p.devices] == [16 * GiB, 40 * GiB]
    assert p.config.model_type == "llama"


def test_accelerate_strategy_equals_what_from_pretrained_auto_computes():
    """from_pretrained(device_map="auto", max_memory=...) runs get_balanced_memory then infer_auto_device_map
    (transformers' integrations of accelerate's functions) on the untied meta model."""
    from transformers.integrations.accelerate import get_balanced_memory, infer_auto_device_map

    p = nbgpu.plan(llama(layers=12, hidden=1024, inter=2816), gpus="3x24GiB", strategy="accelerate",
                   cpu_memory="8GiB")
    fresh = nbgpu.plan(llama(layers=12, hidden=1024, inter=2816), gpus="3x24GiB", cpu_memory="8GiB")
    model = fresh._meta.model
    mm = {0: p.devices[0].budget, 1: p.devices[1].budget, 2: p.devices[2].budget, "cpu": 0}
    balanced = get_balanced_memory(model, max_memory=mm, no_split_module_classes=model._no_split_modules)
    expected = infer_auto_device_map(model, max_memory=balanced, no_split_module_classes=model._no_split_modules)
    assert p.device_map == dict(expected)
    assert len(set(p.device_map.values())) == 3
    # accelerate plans weights only: its totals include the KV cache and activations it did not plan for
    assert [d.weights for d in p.devices] != [0, 0, 0]


def test_repr_html_and_text_say_simulated_and_figures_need_no_cdn():
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    from nbgpu.views.plan_view import display_plan, plan_html

    InteractiveShell.instance()  # display() goes to a shell, as in IPython
    p = nbgpu.plan(llama(), gpus="2x24GiB")
    html = plan_html(p)
    assert "SIMULATED" in html and "cuda:1" in html and "<script" not in html and "cdn." not in html
    assert "simulated" in repr(p).lower() and "fits" in repr(p)
    with capture_output() as shown:  # outside a kernel: the status, both figures as Plotly's own output type
        display_plan(p)
    kinds = [set(o.data) for o in shown.outputs]
    assert sum("application/vnd.plotly.v1+json" in k for k in kinds) == 2 and any("text/html" in k for k in kinds)
    bars = [o.data["application/vnd.plotly.v1+json"] for o in shown.outputs
            if "application/vnd.plotly.v1+json" in o.data][1]
    assert {t["name"] for t in bars["data"]} >= {"weights", "KV cache", "activations", "allocator", "context"}


def test_explain_names_each_gpu_also_the_one_left_empty():
    p = nbgpu.plan(llama(layers=4), gpus="2x24GiB", strategy="sequential")
    assert p.layer_counts() == [4, 0]
    lines = p.explain().splitlines()
    empty = next(line for line in lines if "It stays empty" in line)
    assert empty.startswith(p.devices[1].label + ": room ")
    # each item of the memory is named with where its figure comes from
    assert [line.split(":")[0].strip() for line in lines if "calibrated on" in line] == ["allocator", "context"]


def test_a_layer_range_beyond_the_model_names_the_models_layers():
    p = nbgpu.plan(llama(layers=4), gpus="2x24GiB")
    with pytest.raises(UsageError, match=r"the model has layers model\.layers\.0-3$"):
        p.move("model.layers.0-9", 1)


def test_a_fitting_plan_says_no_over_and_flash_attention_gets_no_caveat():
    p = nbgpu.plan(llama(layers=4), gpus="2x24GiB", attn_implementation="flash_attention_2")
    assert p.fits and "OVER" not in "\n".join(p.summary_lines())
    assert not [n for n in p.estimates.notes if "estimated like sdpa" in n]
    sdpa_like = nbgpu.plan(llama(layers=4), gpus="2x24GiB", attn_implementation="flex_attention")
    assert [n for n in sdpa_like.estimates.notes if "attention 'flex_attention': estimated like sdpa" in n]
