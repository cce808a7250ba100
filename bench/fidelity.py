"""How true is nbgpu.bench? Its decode tokens/s against a hand-written, synchronised greedy decode loop on the same
model in the same run (target: within 3%), and its overhead per token on a tiny model.

    python bench/fidelity.py            # a random-weight Llama-shaped 1B on the GPU; a tiny model on the CPU
Prints figures only.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

import nbgpu
from nbgpu.running import placement

SHAPES = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}


def build(shape: str, device: str):
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def hand_loop(model, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> float:
    """Median decode tokens/s of: prefill, then one forward per token with a DynamicCache, greedy, synchronised."""
    sync = placement.synchronizer(placement.cuda_devices(model))
    device = model.get_input_embeddings().weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    rates = []
    for run in range(repeats + 1):  # the first is a warm-up
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            sync()
            start = time.perf_counter()
            for _ in range(new_tokens - 1):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                token = out.logits[:, -1:].argmax(-1)
                sync()
            seconds = time.perf_counter() - start
        if run:
            rates.append(batch * (new_tokens - 1) / seconds)
    return statistics.median(rates)


def compare(shape: str, device: str, batch=1, prompt_len=128, new_tokens=128, repeats=5, rounds=3):
    """`rounds` alternations of nbgpu.bench and the hand loop (each `repeats` runs), so drift hits both alike."""
    model = build(shape, device)
    ours, loops, result = [], [], None
    for _ in range(rounds):
        result = nbgpu.bench(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=repeats,
                             explain=device == "cuda")
        ours.append(result.decode_tokens_per_s)
        loops.append(hand_loop(model, batch, prompt_len, new_tokens, repeats))
    ours_m, loop_m = statistics.median(ours), statistics.median(loops)
    print(f"[{shape} on {device}] nbgpu.bench decode {ours_m:,.1f} tokens/s; hand-written loop {loop_m:,.1f} "
          f"tokens/s; difference {(ours_m - loop_m) / loop_m:+.2%} (medians of {rounds} alternating rounds; "
          f"bench {min(ours):,.1f}..{max(ours):,.1f}, loop {min(loops):,.1f}..{max(loops):,.1f})")
    print(f"    per token: bench {1e3 * batch / ours_m:.3f} ms, loop {1e3 * batch / loop_m:.3f} ms, "
          f"bench overhead {1e3 * batch * (1 / ours_m - 1 / loop_m):+.3f} ms/token")
    if result.roofline is not None:
        print("    " + repr(result.roofline))
    if result.timeline is not None:
        print("    " + repr(result.timeline))
    return result


def main():
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}")
        compare("1B", "cuda")
        compare("tiny", "cuda")
    else:
        print("no CUDA GPU here: the comparison runs on the CPU with a tiny model (the figures say nothing of GPUs)")
        compare("tiny", "cpu", prompt_len=32, new_tokens=32, repeats=3)


if __name__ == "__main__":
    main()
