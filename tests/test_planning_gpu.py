"""On a GPU machine: the plan's memory for one GPU against what loading and generate really take."""

from __future__ import annotations

import pytest
import torch

import nbgpu


@pytest.mark.gpu
def test_planned_memory_matches_measured_peak(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    nbgpu.devices.simulate(None)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(tmp_path)
    plan = nbgpu.plan(str(tmp_path), gpus=1, batch=4, seq_len=2048)
    d = plan.devices[0]
    model = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=plan.device_map, dtype=torch.bfloat16)
    loaded = torch.cuda.memory_allocated()
    assert abs(loaded - d.weights) / d.weights < 0.02  # weights are exact sizes
    torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, cfg.vocab_size, (4, 2048 - 16), device="cuda")
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                       do_sample=False)
    used = torch.cuda.max_memory_allocated() - loaded
    planned = d.kv_cache + d.activations
    assert 0.5 * used < planned < 2.0 * used  # estimates: the same order as the measured peak
