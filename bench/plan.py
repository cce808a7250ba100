"""Planner against accelerate on Llama-3 shapes (8B, 70B, 405B) over 2, 4 and 8 simulated 80 GB GPUs.

Prints planning time (meta build included for both; target: nbgpu within 1.5x of accelerate) and balance
(largest / mean per-GPU total with KV cache, activations and context; target <= 1.05 on equal GPUs).
Run: .venv/bin/python bench/plan.py
"""

from __future__ import annotations

import time

from transformers import LlamaConfig

import nbgpu
from nbgpu.units import GiB

SHAPES = {
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
    "Llama-3-405B": dict(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126, num_attention_heads=128),
}


def accelerate_only(cfg, n):
    """What a user of accelerate runs: build on meta, balanced memory, infer_auto_device_map."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import get_balanced_memory, infer_auto_device_map
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    mm = {i: 79 * GiB for i in range(n)}
    mm["cpu"] = 0
    mm = get_balanced_memory(model, max_memory=mm, no_split_module_classes=model._no_split_modules)
    return infer_auto_device_map(model, max_memory=mm, no_split_module_classes=model._no_split_modules)


def best_of(fn, repeat=3):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def balance(totals):
    used = [t for t in totals if t]
    return max(used) / (sum(used) / len(used))


def main():
    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)
    print(f"{'model':14} {'GPUs':>4} {'nbgpu s':>8} {'accel s':>8} {'ratio':>6} {'nbgpu bal':>9} {'accel bal':>9} "
          f"fits")
    for name, shape in SHAPES.items():
        cfg = LlamaConfig(vocab_size=128256, num_key_value_heads=8, **shape)
        for n in (2, 4, 8):
            t_ours, plan = best_of(lambda cfg=cfg, n=n: nbgpu.plan(cfg, gpus=f"{n}xA100-80GB", batch=1, seq_len=4096))
            t_acc, _ = best_of(lambda cfg=cfg, n=n: accelerate_only(cfg, n))
            acc = nbgpu.plan(cfg, gpus=f"{n}xA100-80GB", batch=1, seq_len=4096, strategy="accelerate")
            print(f"{name:14} {n:>4} {t_ours:8.3f} {t_acc:8.3f} {t_ours / t_acc:6.2f} "
                  f"{balance([d.total for d in plan.devices]):9.3f} {balance([d.total for d in acc.devices]):9.3f} "
                  f"{'yes' if plan.fits else 'no, ' + format(plan.missing() / GiB, '.0f') + ' GiB missing'}")


if __name__ == "__main__":
    main()
