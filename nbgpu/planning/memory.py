"""Memory other than weights: the KV cache per decoder layer, activations and logits, the CUDA context.

All figures here are estimates from the config (the weights are exact sizes from accelerate). The KV cache follows
how transformers' DynamicCache stores it: 2 x kv_heads x head_dim per token per layer, `min(seq_len, window)` tokens
for sliding-window and chunked layers, the compressed latent (kv_lora_rank + rope dims) for latent attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..devices.simulated import CONTEXT_BYTES

DEFAULT_CONTEXT = CONTEXT_BYTES  # CUDA context + framework workspace per GPU in use
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def dtype_bytes(dtype: str) -> int:
    return _BYTES.get(dtype, 2)


@dataclass
class Estimates:
    kv_per_layer: dict[int, int]  # decoder layer index -> KV cache bytes at the planned batch and length
    layer_activations: int  # peak temporaries while one decoder layer runs its prefill
    input_activations: int  # embeddings output on the input GPU
    logits: int  # on the lm_head GPU
    notes: list[str] = field(default_factory=list)  # what could not be estimated exactly


def text_config(config):
    """The language model's part of a config (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


def layer_types(config) -> list[str]:
    """Per decoder layer, its cache kind, mirroring transformers' cache_utils.get_layer_types_and_kwargs."""
    cfg = text_config(config)
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is None:
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) is not False:
            types = ["sliding_attention"] * n
        elif getattr(cfg, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    return list(types)


def kv_bytes_per_token(config, dtype: str) -> tuple[int, str]:
    """Bytes one token of one sequence takes in one attention layer's cache, and how that was worked out."""
    cfg = text_config(config)
    b = dtype_bytes(dtype)
    if getattr(cfg, "kv_lora_rank", None):
        rope = getattr(cfg, "qk_rope_head_dim", 0) or 0
        return (cfg.kv_lora_rank + rope) * b, f"latent attention: kv_lora_rank {cfg.kv_lora_rank} + rope {rope}"
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return 2 * kv_heads * head_dim * b, f"2 x {kv_heads} kv heads x {head_dim} head_dim"


def estimate(config, dtype: str, batch: int, seq_len: int) -> Estimates:
    cfg = text_config(config)
    b = dtype_bytes(dtype)
    per_token, _ = kv_bytes_per_token(cfg, dtype)
    notes: list[str] = []
    kv: dict[int, int] = {}
    unknown = set()
    for i, kind in enumerate(layer_types(cfg)):
        if kind in ("full_attention", "attention", "global_attention"):
            tokens = seq_len
        elif kind in ("sliding_attention", "hybrid_sliding", "reference_sliding_attention"):
            tokens = min(seq_len, getattr(cfg, "sliding_window", None) or seq_len)
        elif kind == "chunked_attention":
            tokens = min(seq_len, getattr(cfg, "attention_chunk_size", None) or seq_len)
        elif kind in ("dummy", "moe", "mlp"):
            tokens = 0
        else:
            unknown.add(kind)
            tokens = 0
        kv[i] = per_token * tokens * batch
    if getattr(cfg, "kv_lora_rank", None):
        notes.append("latent attention: the cache holds the compressed latent as transformers stores it; "
                     "engines that expand it per head need more")
    if unknown:
        notes.append(f"layers of kind {', '.join(sorted(unknown))} keep a state that is not estimated (counted as 0)")

    hidden = cfg.hidden_size
    inter = _intermediate(cfg)
    tokens = batch * seq_len
    # prefill of one layer: residual + normed input + q/k/v/o projections, and the MLP's gate, up and product
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    attn = tokens * (2 * heads * head_dim + 2 * hidden) * b
    mlp = tokens * 3 * inter * b
    layer_act = tokens * 2 * hidden * b + max(attn, mlp)
    # generate() keeps logits of the last position only, upcast to float32, plus the processed scores
    logits = batch * cfg.vocab_size * 4 * 2
    return Estimates(kv, layer_act, tokens * hidden * b, logits, notes)


def _intermediate(cfg) -> int:
    experts_per_token = getattr(cfg, "num_experts_per_tok", None)
    moe = getattr(cfg, "moe_intermediate_size", None)
    if experts_per_token and moe:
        return moe * experts_per_token + (getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
    return getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size
