"""On a GPU: planned memory of one GPU against the measured peak after loading a random-weight Llama-shaped model
and running `generate` at the planned batch and length (target: within 5%).

Run on a GPU machine: python bench/plan_vs_measured.py [batch] [seq_len]
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import nbgpu
from nbgpu.units import GiB


def main(batch=4, seq_len=4096, new_tokens=32):
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8)
    with tempfile.TemporaryDirectory() as path:
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(nbgpu.visibility.current().targets[0].gpu.index)
        before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
        plan = nbgpu.plan(path, gpus=1, batch=batch, seq_len=seq_len)
        d = plan.devices[0]
        model = AutoModelForCausalLM.from_pretrained(path, device_map=plan.device_map, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        loaded = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, cfg.vocab_size, (batch, seq_len - new_tokens), device="cuda")
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        peak_alloc = torch.cuda.max_memory_allocated()
        peak_reserved = torch.cuda.max_memory_reserved()
        process = pynvml.nvmlDeviceGetMemoryInfo(handle).used - before  # context + reserved pool now
        context = process - torch.cuda.memory_reserved()
        planned = d.weights + d.kv_cache + d.activations + d.context
        measured = peak_reserved + context
        print(f"batch {batch} x {seq_len} tokens on {d.gpu.name}")
        print(f"weights:  planned {d.weights / GiB:.3f} GiB, allocated after load {loaded / GiB:.3f} GiB")
        print(f"KV+act:   planned {(d.kv_cache + d.activations) / GiB:.3f} GiB, measured peak allocated above weights "
              f"{(peak_alloc - loaded) / GiB:.3f} GiB")
        print(f"context:  planned {d.context / GiB:.3f} GiB, measured {context / GiB:.3f} GiB")
        print(f"total:    planned {planned / GiB:.3f} GiB, measured peak (reserved + context) {measured / GiB:.3f} GiB,"
              f" off by {(planned - measured) / measured:+.1%}")


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
