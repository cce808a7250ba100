"""`mlc_llm serve` overrides for a plan, as MLC-LLM v0.20.0 (commit bb586e51) takes them.

- python/mlc_llm/cli/serve.py `EngineConfigOverride.from_str`: --overrides "key=value;..." with keys from a fixed
  list (max_num_sequence, context_window_size, tensor_parallel_shards, pipeline_parallel_stages, ...).
- cpp/serve/engine.cc: tensor_parallel_shards x pipeline_parallel_stages workers on consecutive GPUs.
- Tensor parallelism (python/mlc_llm/model/<family>/*_model.py): the KV heads divide over the shards (no KV
  replication), latent attention divides its query heads, every MLP intermediate size divides.
- Pipeline stages: only models that mark each weight's stage (llama, nemotron, olmo, olmo2: `_set_pp`, checked in
  interface/compile.py); layer i goes to stage i // (layers // stages), so the layers must split evenly.
- The context window is the model's max_position_embeddings (GPT-2: n_positions; Gemma 2: its sliding window);
  a longer one is cut back to it without an error (cpp/serve/config.cc), so a longer seq_len is refused here.
"""

from __future__ import annotations

from .. import tp_sizes
from ..memory import text_config
from . import common

VERSION = "MLC-LLM v0.20.0"
OVERRIDE_KEYS = ("max_num_sequence", "max_total_seq_length", "prefill_chunk_size", "max_history_size",
                 "gpu_memory_utilization", "spec_draft_length", "spec_tree_width", "prefix_cache_mode",
                 "prefix_cache_max_num_recycling_seqs", "prefill_mode", "context_window_size", "sliding_window_size",
                 "attention_sink_size", "tensor_parallel_shards", "pipeline_parallel_stages", "opt")
PIPELINE_FAMILIES = ("llama", "nemotron", "olmo", "olmo2")


def context_window(config) -> tuple[int | None, str]:
    """The context window MLC-LLM compiles for this model, and the config field it comes from."""
    cfg = text_config(config)
    kind = getattr(cfg, "model_type", "")
    if kind == "gemma2" and getattr(cfg, "sliding_window", None):
        return cfg.sliding_window, "sliding_window (MLC-LLM's Gemma 2 uses it as the context window)"
    names = ("n_positions", "max_sequence_length") if kind == "gpt2" else \
        ("context_window_size", "max_position_embeddings", "max_sequence_length")
    for name in names:
        if getattr(cfg, name, None):
            return getattr(cfg, name), name
    return None, ""


def why_not_shards(config, shards: int) -> str | None:
    """None when MLC-LLM can split this model over `shards` GPUs, else why not."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    if getattr(cfg, "kv_lora_rank", None):
        if heads % shards:
            return f"the {heads} attention heads do not divide over {shards} GPUs"
    else:
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        if kv % shards:
            return f"the {kv} KV heads do not divide over {shards} GPUs (MLC-LLM does not replicate KV heads)"
    for name, size in tp_sizes.mlp_sizes(cfg).items():
        if size % shards:
            return f"the MLP's {name} ({size}) does not divide over {shards} GPUs"
    return None


def mlc(plan) -> dict:
    """{'overrides', 'env', 'command', 'notes', 'checked_against'}; UsageError naming MLC-LLM's limit when the
    plan cannot be served as planned."""
    window, field = context_window(plan.config)
    reasons = [common.not_fitting(plan),
               common.offloaded(plan, "MLC-LLM keeps every weight on its GPUs"),
               common.beyond_positions(plan, window, f"MLC-LLM's context window, {window} ({field})")
               if window else None]
    notes = ["MLC-LLM serves weights converted with `mlc_llm convert_weight` and `mlc_llm gen_config`: give that "
             "folder as the model; a --model-lib compiled for other shard or stage counts overrides these"]
    overrides = {"max_num_sequence": plan.batch, "context_window_size": plan.seq_len}
    if common.parallel(plan) == "tensor":
        order = list(range(len(plan.gpus)))
        why = why_not_shards(plan.config, len(order))
        if why:
            ok = [s for s in range(1, 65) if why_not_shards(plan.config, s) is None]
            reasons.append(f"tensor_parallel_shards={len(order)} is refused by MLC-LLM because {why} (shard counts it "
                           f"accepts for this model: {', '.join(map(str, ok))})")
        if len(order) > 1:
            overrides["tensor_parallel_shards"] = len(order)
    else:
        stages = common.stages(plan)
        order = [dev for dev, _ in stages]
        reasons.append(_stage_reason(plan, stages))
        if len(stages) > 1:
            overrides["pipeline_parallel_stages"] = len(stages)
            notes.append("with pipeline stages every stage keeps the embeddings and lm_head (llama_model.py `_set_pp`)")
    common.refuse(VERSION, reasons)
    env, device_notes = common.visible_devices_env(plan, order, "MLC-LLM")
    text = ";".join(f"{k}={v}" for k, v in overrides.items())
    command = " ".join([*common.env_prefix(env), "mlc_llm serve", common.quoted_model(plan), "--device cuda",
                        f'--overrides "{text}"'])
    return {"overrides": overrides, "env": env, "command": command,
            "notes": common.model_notes(plan) + notes + device_notes, "checked_against": VERSION}


def _stage_reason(plan, stages) -> str | None:
    if len(stages) <= 1:
        return None
    devices = [dev for dev, _ in stages]
    if len(set(devices)) < len(devices):
        return "MLC-LLM's pipeline stages are one contiguous run of layers per GPU; this plan returns to a GPU"
    family = common.model_type(plan)
    if family not in PIPELINE_FAMILIES:
        tp = [s for s in range(2, len(plan.gpus) + 1) if why_not_shards(plan.config, s) is None]
        alt = f"tensor parallelism over {', '.join(map(str, tp))} GPUs would be accepted" if tp else \
            "no tensor-parallel split of it fits MLC-LLM's rules on these GPUs either"
        return (f"MLC-LLM splits layers into pipeline stages only for {', '.join(PIPELINE_FAMILIES)}, not "
                f"{family or common.architecture(plan)} (its weights carry no stage); {alt}, or plan on one GPU")
    n_layers = sum(len(layers) for _, layers in stages)
    counts = [len(layers) for _, layers in stages]
    if n_layers % len(stages):
        return (f"MLC-LLM puts layer i on stage i // (layers // stages), which for {n_layers} layers over "
                f"{len(stages)} stages does not give {len(stages)} stages; use a stage count that divides "
                f"{n_layers}")
    even = [n_layers // len(stages)] * len(stages)
    if counts != even:
        return (f"MLC-LLM splits the {n_layers} layers evenly over its {len(stages)} stages ({even}), this plan "
                f"has {counts}; plan.set_boundaries({even}) if that fits")
    return None
