"""Which tensor-parallel sizes a model's attention allows, and how its heads spread over the GPUs.

The rule is vLLM's (`ModelConfig.verify_with_parallel_config` and `QKVParallelLinear`): the query heads must divide
evenly over the GPUs; the KV heads too when there are at least as many of them as GPUs, and otherwise the GPU count
must be a multiple of the KV heads, each KV head then replicated on `tp // kv_heads` GPUs.
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
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    return heads, getattr(cfg, "num_key_value_heads", None) or heads


def why_not(config, tp: int) -> str | None:
    """None when `tp` GPUs can share this model's attention, else the reason."""
    heads, kv = head_counts(config)
    if heads % tp:
        return f"the {heads} attention heads do not divide over {tp} GPUs"
    if kv >= tp and kv % tp:
        return f"the {kv} KV heads do not divide over {tp} GPUs"
    if kv < tp and tp % kv:
        return f"{tp} GPUs are not a multiple of the {kv} KV heads (each KV head must be replicated evenly)"
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
