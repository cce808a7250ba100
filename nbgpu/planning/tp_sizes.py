"""Which tensor-parallel sizes a model allows, and how its heads spread over the GPUs.

The rule is vLLM 0.33.0's (commit 4ba787ec9):
- `ModelConfig.verify_with_parallel_config` (vllm/config/model.py): the query heads divide over the GPUs;
- `QKVParallelLinear` (vllm/model_executor/layers/linear.py): the KV heads divide over the GPUs when there are at
  least as many of them, otherwise the GPU count is a multiple of the KV heads, each KV head then replicated on
  `tp // kv_heads` GPUs;
- latent attention (`DeepseekV2MLAAttention`, vllm/model_executor/models/deepseek_v2.py) splits the query heads
  only; its cache is one latent per token that every GPU keeps whole (`ModelConfig.get_num_kv_heads` is 1 for MLA);
- `ColumnParallelLinear` and `FusedMoEConfig` divide every MLP's intermediate size (dense, routed experts, shared
  experts) over the GPUs, asserting it divides evenly.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .memory import text_config


@dataclass(frozen=True)
class HeadSplit:
    tp: int
    heads: int  # query heads of the model
    kv_heads: int
    heads_per_gpu: int
    kv_heads_per_gpu: int
    kv_replicas: int  # GPUs holding each KV head (1: no replication)


def head_counts(config) -> tuple[int, int]:
    """(query heads, KV heads); latent attention counts as one KV head (its latent), kept whole on every GPU."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    if getattr(cfg, "kv_lora_rank", None):
        return heads, 1
    return heads, getattr(cfg, "num_key_value_heads", None) or heads


def mlp_sizes(config) -> dict[str, int]:
    """The intermediate sizes that tensor parallelism splits, by config field."""
    cfg = text_config(config)
    out = {}
    dense = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
    if dense is None and getattr(cfg, "model_type", None) == "gpt2":
        dense = 4 * cfg.hidden_size  # GPT-2's n_inner=None means 4 x hidden (vLLM's gpt2.py does the same)
    if dense:
        out["intermediate_size"] = dense
    for name in ("moe_intermediate_size", "shared_expert_intermediate_size"):
        if getattr(cfg, name, None):
            out[name] = getattr(cfg, name)
    shared = getattr(cfg, "n_shared_experts", None)
    if shared and getattr(cfg, "moe_intermediate_size", None):
        out["moe_intermediate_size x n_shared_experts"] = cfg.moe_intermediate_size * shared
    return out


def why_not(config, tp: int) -> str | None:
    """None when `tp` GPUs can share this model as vLLM splits it, else the reason."""
    heads, kv = head_counts(config)
    if heads % tp:
        return f"the {heads} attention heads do not divide over {tp} GPUs"
    if kv >= tp and kv % tp:
        return f"the {kv} KV heads do not divide over {tp} GPUs"
    if kv < tp and tp % kv:
        return f"{tp} GPUs are not a multiple of the {kv} KV heads (each KV head must be replicated evenly)"
    for name, size in mlp_sizes(config).items():
        if size % tp:
            return f"the MLP's {name} ({size}) does not divide over {tp} GPUs"
    return None


def split(config, tp: int) -> HeadSplit:
    """How `tp` GPUs share the heads; UsageError naming the rule when they cannot."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise UsageError(f"a tensor-parallel size is a whole number of GPUs, at least 1, not {tp!r}")
    reason = why_not(config, tp)
    if reason:
        ok = ", ".join(map(str, valid_sizes(config, 64)))
        raise UsageError(f"tensor parallelism over {tp} GPUs is not possible: {reason}. Sizes this model allows: {ok}")
    heads, kv = head_counts(config)
    replicas = max(1, tp // kv)
    return HeadSplit(tp, heads, kv, heads // tp, max(1, kv // tp), replicas)


def valid_sizes(config, limit: int = 64) -> list[int]:
    return [tp for tp in range(1, limit + 1) if why_not(config, tp) is None]
