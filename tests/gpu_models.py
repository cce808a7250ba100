"""Random-weight Llama shapes for the GPU tests, built on the GPU and saved with save_pretrained."""

import gc

import torch
import transformers

SHAPES = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


def saved_llama(shape: str, tmp_path_factory, positions: int = 4096) -> str:
    """The folder of a bf16 Llama of `shape` with `positions` positions; the GPU memory it took is given back."""
    path = tmp_path_factory.mktemp(f"llama-{shape}")
    cfg = transformers.LlamaConfig(**SHAPES[shape], max_position_embeddings=positions, dtype="bfloat16")
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return str(path)
