"""On a GPU machine: the plan's memory for one GPU against what loading and generate add, measured as differences
(earlier tests may have left a context, a cuBLAS workspace or cached blocks behind)."""

from __future__ import annotations

import gc

import pytest
import torch

import nbgpu

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def test_planned_weights_cache_and_activations_match_what_generate_adds(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    nbgpu.devices.simulate(None)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=8,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    batch, prompt, new = 4, 4096, 8
    plan = nbgpu.plan(str(tmp_path), gpus=1, batch=batch, prompt_len=prompt, new_tokens=new)
    d = plan.devices[0]
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=plan.device_map, dtype=torch.bfloat16)
    loaded = torch.cuda.memory_allocated(0)
    assert loaded - before == d.weights  # weights are exact sizes
    torch.cuda.reset_peak_memory_stats(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda:0")
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False)
    added = torch.cuda.max_memory_allocated(0) - loaded - ids.nbytes
    planned = d.kv_cache + d.activations + d.allocator - int(plan.estimates.slack_blocks *
                                                             plan.estimates.largest_block())
    print(f"planned KV + activations + workspace {planned / 2**30:.3f} GiB, generate added {added / 2**30:.3f} GiB")
    assert abs(planned - added) / added < 0.05
