"""How long a sequence a model takes: its positions, as vLLM derives the longest `max_model_len` it accepts.

vLLM 0.33.0 (vllm/transformers_utils/model_arch_config_convertor.py `derive_max_model_len_and_key`, and
vllm/config/model.py `_get_and_verify_max_len`): the smallest of the config's length keys, replaced by
`model_max_length` where set; times the RoPE scaling factor, except for the RoPE kinds whose
`max_position_embeddings` is already the scaled length (llama3, yarn, longrope, ...) and for Gemma 3. A longer
`--max-model-len` is refused at start unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1, which vLLM warns gives NaNs (RoPE)
or out-of-bounds reads (absolute positions).

vLLM 0.8.5 (vllm/config.py `_get_and_verify_max_len`), which OpenLLM's vllm-chat recipes pin, differs for YaRN only:
there the length is `original_max_position_embeddings` times the factor (`legacy_yarn=True`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .memory import text_config

LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
               "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
# RoPE kinds whose max_position_embeddings already counts the scaling (vLLM does not multiply by `factor`)
PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")
PRESCALED_ROPE_0_8 = ("su", "longrope", "llama3")  # vLLM 0.8.5


@dataclass(frozen=True)
class Positions:
    length: int  # the longest sequence, in tokens
    key: str  # the config field it comes from
    factor: float = 1.0  # RoPE scaling applied on top

    def __str__(self) -> str:
        scaled = f" x RoPE factor {self.factor:g}" if self.factor != 1 else ""
        return f"{self.length} ({self.key}{scaled})"


def rope_parameters(config) -> list[dict]:
    """The config's RoPE parameter dicts (one per layer kind when nested), transformers 5 or 4 naming."""
    cfg = text_config(config)
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if not isinstance(params, dict) or not params:
        return []
    if any(isinstance(v, dict) for v in params.values()):
        return [v for v in params.values() if isinstance(v, dict) and v]
    return [params]


def positions(config, legacy_yarn: bool = False) -> Positions | None:
    """The model's positions, or None where the config names no length (vLLM then takes any max_model_len)."""
    cfg = text_config(config)
    length, key = None, None
    for name in LENGTH_KEYS:
        value = getattr(cfg, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and (length is None or value < length):
            length, key = value, name
    if getattr(cfg, "model_max_length", None):
        length, key = cfg.model_max_length, "model_max_length"
    if length is None:
        return None
    factor = 1.0
    if "gemma3" not in str(getattr(cfg, "model_type", "")):
        for rp in rope_parameters(cfg):
            kind = rp.get("rope_type") or rp.get("type") or "default"
            if legacy_yarn and kind == "yarn" and rp.get("original_max_position_embeddings"):
                length, key = rp["original_max_position_embeddings"], "original_max_position_embeddings"
                factor = rp.get("factor", factor)
            elif kind not in (PRESCALED_ROPE_0_8 if legacy_yarn else PRESCALED_ROPE):
                factor = rp.get("factor", factor)
        factor = 1.0 if factor is None else float(factor)
    return Positions(int(length * factor), key, factor)


def beyond(plan, legacy_yarn: bool = False) -> Positions | None:
    """The model's positions when the plan's seq_len exceeds them, else None."""
    pos = positions(plan.config, legacy_yarn)
    return pos if pos is not None and plan.seq_len > pos.length else None
