"""Redraw time of the plan editor: move one boundary handle, re-plan, update placement, bars and feasibility.

Target: under 100 ms per move. Run: .venv/bin/python bench/plan_editor.py
"""

from __future__ import annotations

import statistics
import time

from transformers import LlamaConfig

import nbgpu
from nbgpu.views.plan_view import PlanEditor


def main():
    for name, layers, hidden, inter, gpus in [("Llama-3-8B", 32, 4096, 14336, "2x24GiB"),
                                              ("Llama-3-70B", 80, 8192, 28672, "4xA100-80GB"),
                                              ("Llama-3-405B", 126, 16384, 53248, "8xH100")]:
        cfg = LlamaConfig(vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=64, num_key_value_heads=8)
        plan = nbgpu.plan(cfg, gpus=gpus, batch=4, seq_len=4096)
        editor = PlanEditor(plan)
        start = editor.boundaries()
        times = []
        for step in range(20):
            cuts = list(start)
            cuts[0] = start[0] + (1 if step % 2 else -1)
            t = time.perf_counter()
            editor.set_boundaries(cuts)
            times.append((time.perf_counter() - t) * 1e3)
        print(f"{name:13} on {gpus:12}: redraw median {statistics.median(times):6.1f} ms, "
              f"max {max(times):6.1f} ms over {len(times)} moves")


if __name__ == "__main__":
    main()
