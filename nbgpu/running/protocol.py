"""The measuring protocol of `nbgpu.bench`, shared by the kernel and tensor-parallel workers.

Warm-up runs are discarded; every timestamp is taken after synchronising all GPUs the model uses; each run makes
exactly `new_tokens` tokens per sequence (end-of-sequence is suppressed), greedily. The same code runs in this
process (one GPU, a layer split, the CPU) and inside each tensor-parallel worker, so every path is timed alike.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

COMPILE_MODE = "reduce-overhead"  # static cache + CUDA graphs


@dataclass(frozen=True)
class RunTimes:
    """One measured generate run: seconds to the first token, from first to last token, and each decode step."""

    ttft: float
    decode: float
    steps: tuple[float, ...]


class StepClock:
    """A logits processor that notes when each token's logits are ready, after synchronising the GPUs."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


class CudaGraphStep:
    """Marks the start of each compiled step for CUDA graph trees, so outputs of the previous replay (the static
    cache's updates) are not read after being overwritten (torch.compiler.cudagraph_mark_step_begin)."""

    def __call__(self, input_ids, scores):
        import torch

        torch.compiler.cudagraph_mark_step_begin()
        return scores


def generation_config(model, new_tokens: int, compile: bool):
    """Greedy, exactly `new_tokens` tokens; with `compile`, a static cache and transformers' compiled decode step."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    gen = copy.deepcopy(base) if base is not None else GenerationConfig()
    eos = gen.eos_token_id if gen.eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    gen.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
               max_new_tokens=new_tokens, min_new_tokens=new_tokens, max_length=None,
               pad_token_id=pad if pad is not None else 0, stop_strings=None)
    if compile:
        from transformers import CompileConfig

        gen.cache_implementation = "static"
        gen.compile_config = CompileConfig(mode=COMPILE_MODE, fullgraph=False)
    return gen


def one_run(model, ids, gen, sync, processors=()) -> RunTimes:
    """Time one generate call; RuntimeError if it did not make exactly gen.max_new_tokens tokens."""
    import torch

    clock = StepClock(sync)
    mask = torch.ones_like(ids)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                             logits_processor=[*processors, clock])
    sync()
    made = out.shape[1] - ids.shape[1]
    del out
    wanted = gen.max_new_tokens
    if made != wanted or len(clock.times) != wanted:
        raise RuntimeError(f"generate made {made} tokens per sequence, not {wanted}")
    t = clock.times
    return RunTimes(t[0] - start, t[-1] - t[0], tuple(b - a for a, b in zip(t, t[1:])))


def measure(model, ids, gen, *, repeats: int, warmup: int, sync, cuda_devices=(), processors=()):
    """`warmup` discarded runs, then `repeats` measured ones; returns (runs, peak allocated bytes per cuda index)."""
    import torch

    for _ in range(warmup):
        one_run(model, ids, gen, sync, processors)
    for d in cuda_devices:
        torch.cuda.reset_peak_memory_stats(d)
    runs = [one_run(model, ids, gen, sync, processors) for _ in range(repeats)]
    peak = {d: torch.cuda.max_memory_allocated(d) for d in cuda_devices}
    return runs, peak
