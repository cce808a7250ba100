"""How true is nbgpu.bench? Its decode tokens/s against a hand-written loop that measures the same thing (decode
only, the same prompt and number of tokens, greedy, every GPU synchronised), interleaved round by round so drift
hits both alike; the median of the rounds, and the spread of the per-round differences as the noise.

    python bench/fidelity.py [--rounds 7]    # on GPUs: 1 GPU compiled (static cache, CUDA graphs) and a layer split
                                             # eager; on the CPU: a tiny model, eager
Prints figures only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

SHAPES = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def hand_loop_eager(model, ids, new_tokens, sync):
    """Decode tokens/s of: prefill, then one forward per token with a DynamicCache, greedy, synchronised."""
    import torch
    from transformers import DynamicCache

    from nbgpu.running import placement

    name = placement.cache_argument(model)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=ids, use_cache=True, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
            sync()
        return ids.shape[0] * (new_tokens - 1) / (time.perf_counter() - start)


def hand_loop_compiled(model, ids, new_tokens, sync):
    """The same with a static cache and the forward transformers compiles for generate (CUDA graphs)."""
    import torch
    from transformers import StaticCache

    from nbgpu.running import placement, protocol

    gen = protocol.generation_config(model, new_tokens, compile=True)
    step = model.get_compiled_call(gen.compile_config)
    name = placement.cache_argument(model)
    batch, prompt = ids.shape
    device = ids.device
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens)
        position = torch.arange(prompt, device=device)
        out = model(input_ids=ids, cache_position=position, use_cache=True, **{name: cache})
        token = out.logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for t in range(prompt, prompt + new_tokens - 1):
            torch.compiler.cudagraph_mark_step_begin()
            position = torch.tensor([t], device=device)
            out = step(input_ids=token, cache_position=position, position_ids=position[None].expand(batch, 1),
                       use_cache=True, **{name: cache})
            token = out.logits[:, -1:].argmax(-1)
            sync()
        return batch * (new_tokens - 1) / (time.perf_counter() - start)


def compare(label, model, compiled, rounds, batch=1, prompt_len=128, new_tokens=128, repeats=3):
    import torch

    import nbgpu
    from nbgpu.running import placement

    sync = placement.synchronizer(placement.cuda_devices(model))
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len),
                        generator=torch.Generator().manual_seed(0)).to(device)
    loop = hand_loop_compiled if compiled else hand_loop_eager
    for _ in range(2):  # warm both paths (compiles, records CUDA graphs) before any round counts
        loop(model, ids, new_tokens, sync)
    nbgpu.bench(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=1, compile=compiled,
                explain=False)
    ours, loops = [], []
    for _ in range(rounds):
        ours.append(nbgpu.bench(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                                warmup=0 if not compiled else 2, compile=compiled, explain=False).decode_tokens_per_s)
        loops.append(statistics.median(loop(model, ids, new_tokens, sync) for _ in range(repeats)))
    diffs = sorted((a - b) / b for a, b in zip(ours, loops))
    ours_m, loop_m = statistics.median(ours), statistics.median(loops)
    print(f"[{label}] nbgpu.bench {ours_m:,.1f} tokens/s, hand-written loop {loop_m:,.1f} tokens/s: difference "
          f"{(ours_m - loop_m) / loop_m:+.2%} (medians of {rounds} interleaved rounds of {repeats} runs; per-round "
          f"differences {diffs[0]:+.2%} .. {diffs[-1]:+.2%}, median {statistics.median(diffs):+.2%})", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import nbgpu

    nbgpu.simulate(None)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: a tiny model on the CPU, eager (the figures say nothing of GPUs)")
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES["tiny"])).eval()
        compare("tiny, CPU, eager", model, False, args.rounds, prompt_len=32, new_tokens=32)
        return 0
    print(f"GPU: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory() as path:
        with torch.device("cuda:0"):
            AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES["1B"]), dtype=torch.bfloat16).save_pretrained(path)
        torch.cuda.empty_cache()
        one = nbgpu.load(nbgpu.plan(path, gpus=1, prompt_len=128, new_tokens=args.new_tokens), show=False)
        compare("1B, 1 GPU, compiled", one, True, args.rounds, new_tokens=args.new_tokens)
        del one
        torch.cuda.empty_cache()
        if torch.cuda.device_count() >= 2:
            split = nbgpu.load(nbgpu.plan(path, gpus=2, prompt_len=128, new_tokens=args.new_tokens), show=False)
            compare("1B, layer split over 2, eager", split, False, args.rounds, new_tokens=args.new_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
