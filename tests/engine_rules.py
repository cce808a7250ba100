"""The engines' own rules, replayed from their source, to check nbgpu's exports against.

None of these engines installs on a CPU machine in reasonable time (vLLM, MLC-LLM and KTransformers need CUDA
builds; OpenLLM pulls BentoML and a pinned vLLM), so each rule is written here from the engine's code at a
named version, with the file it comes from. These are test oracles: they do not import nbgpu's engine modules.
"""

from __future__ import annotations

import argparse
import math
import re
import shlex

GiB = 1024**3


def text_cfg(config):
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


# --- vLLM ---------------------------------------------------------------------------------------------------
# vLLM 0.33.0, commit 4ba787ec9 (the PyPI sdist); 0.8.5 where OpenLLM's vllm-chat pins it.

def vllm_parser() -> argparse.ArgumentParser:
    """`vllm serve [model_tag] [options]` for the options nbgpu writes (vllm/engine/arg_utils.py
    EngineArgs.add_cli_args; dtype choices from vllm/config/model.py ModelDType)."""
    p = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    p.add_argument("model_tag")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--dtype", choices=["auto", "half", "float16", "bfloat16", "float", "float32"], default="auto")
    return p


def split_command(command: str, program: list[str]) -> tuple[dict, list[str]]:
    """Leading VAR=value words, then the words after the program name."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[:len(program)] == program, words
    return env, words[len(program):]


def vllm_max_len(config, version: str = "0.33.0") -> int | None:
    """The longest max_model_len vLLM accepts without VLLM_ALLOW_LONG_MAX_MODEL_LEN.
    0.33.0: vllm/transformers_utils/model_arch_config_convertor.py derive_max_model_len_and_key and
    vllm/config/model.py _get_and_verify_max_len; 0.8.5: vllm/config.py _get_and_verify_max_len."""
    cfg = text_cfg(config)
    keys = ["max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
            "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len"]
    found = [getattr(cfg, k) for k in keys if getattr(cfg, k, None) is not None]
    if not found:
        return None
    derived = min(found)
    if getattr(cfg, "model_max_length", None):
        derived = cfg.model_max_length
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None)
    if isinstance(rope, dict) and rope and not any(isinstance(v, dict) for v in rope.values()) \
            and "gemma3" not in cfg.model_type:
        kind = rope.get("rope_type") or rope.get("type")
        if version == "0.8.5":
            if kind not in ("su", "longrope", "llama3"):
                if kind == "yarn":
                    derived = rope["original_max_position_embeddings"]
                derived *= rope.get("factor", 1.0)
        elif kind not in ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling"):
            derived *= rope.get("factor", 1.0) or 1.0
    return int(derived)


def vllm_tp_error(config, tp: int) -> str | None:
    """Why vLLM refuses `tp`: ModelConfig.verify_with_parallel_config (heads), QKVParallelLinear (KV heads,
    divided or replicated), DeepseekV2MLAAttention (query heads only), ColumnParallelLinear / FusedMoEConfig
    (intermediate sizes)."""
    cfg = text_cfg(config)
    heads = cfg.num_attention_heads
    if heads % tp:
        return "attention heads"
    if not getattr(cfg, "kv_lora_rank", None):
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        if (tp >= kv and tp % kv) or (tp < kv and kv % tp):
            return "KV heads"
    sizes = [getattr(cfg, n, None) for n in ("intermediate_size", "moe_intermediate_size",
                                             "shared_expert_intermediate_size")]
    if cfg.model_type == "gpt2":
        sizes.append(cfg.n_inner or 4 * cfg.hidden_size)
    if getattr(cfg, "n_shared_experts", None):
        sizes.append(cfg.moe_intermediate_size * cfg.n_shared_experts)
    if any(s and s % tp for s in sizes):
        return "intermediate size"
    return None


def get_pp_indices(num_layers: int, rank: int, pp: int, partition: str | None) -> tuple[int, int]:
    """vllm/distributed/utils.py get_pp_indices."""
    if partition is not None:
        parts = [int(x) for x in partition.split(",")]
        if len(parts) != pp:
            raise ValueError(f"{len(parts)=} does not match {pp=}")
        if sum(parts) != num_layers:
            raise ValueError(f"{sum(parts)=} does not match {num_layers=}")
    else:
        parts = [num_layers // pp] * pp
        for i in range(2, num_layers % pp + 2):
            parts[-i] += 1
    start = sum(parts[:rank])
    return start, start + parts[rank]


def check_vllm(engine_args: dict, env: dict, config, version: str = "0.33.0") -> list[tuple[int, int]]:
    """Assert vLLM starts with these arguments; returns each pipeline stage's [start, end) layers."""
    cfg = text_cfg(config)
    limit = vllm_max_len(config, version)
    assert limit is None or engine_args["max_model_len"] <= limit, (engine_args["max_model_len"], limit)
    tp, pp = engine_args["tensor_parallel_size"], engine_args["pipeline_parallel_size"]
    assert vllm_tp_error(config, tp) is None, vllm_tp_error(config, tp)
    return [get_pp_indices(cfg.num_hidden_layers, r, pp, env.get("VLLM_PP_LAYER_PARTITION")) for r in range(pp)]


def parse_vllm_command(command: str) -> tuple[dict, dict]:
    env, words = split_command(command, ["vllm", "serve"])
    ns = vllm_parser().parse_args(words)
    return env, {"model": ns.model_tag, "tensor_parallel_size": ns.tensor_parallel_size,
                 "pipeline_parallel_size": ns.pipeline_parallel_size, "max_model_len": ns.max_model_len,
                 "max_num_seqs": ns.max_num_seqs, "dtype": ns.dtype}


# --- MLC-LLM ------------------------------------------------------------------------------------------------
# MLC-LLM v0.20.0, commit bb586e51.

MLC_OVERRIDE_KEYS = {  # python/mlc_llm/cli/serve.py EngineConfigOverride.from_str
    "max_num_sequence": int, "max_total_seq_length": int, "prefill_chunk_size": int, "max_history_size": int,
    "gpu_memory_utilization": float, "spec_draft_length": int, "spec_tree_width": int, "prefix_cache_mode": str,
    "prefix_cache_max_num_recycling_seqs": int, "prefill_mode": str, "context_window_size": int,
    "sliding_window_size": int, "attention_sink_size": int, "tensor_parallel_shards": int,
    "pipeline_parallel_stages": int, "opt": str}


def parse_mlc_command(command: str) -> tuple[dict, str, dict]:
    env, words = split_command(command, ["mlc_llm", "serve"])
    p = argparse.ArgumentParser(prog="mlc_llm serve", exit_on_error=False)
    p.add_argument("model")
    p.add_argument("--device", default="auto")
    p.add_argument("--overrides", default="")
    ns = p.parse_args(words)
    sub = argparse.ArgumentParser(exit_on_error=False)
    for key, kind in MLC_OVERRIDE_KEYS.items():
        sub.add_argument(f"--{key}", type=kind)
    over = sub.parse_args([f"--{i}" for i in ns.overrides.split(";") if i])  # from_str's own parsing
    return env, ns.model, {k: v for k, v in vars(over).items() if v is not None}


def mlc_window(config) -> int:
    """The context window MLC compiles: model/<family>/*_model.py Config.__post_init__ (Gemma 2: sliding_window)."""
    cfg = text_cfg(config)
    if cfg.model_type == "gemma2":
        return cfg.sliding_window
    if cfg.model_type == "gpt2":
        return cfg.n_positions
    return cfg.max_position_embeddings


def mlc_shards_error(config, shards: int) -> str | None:
    """The checks in llama_model.py / gemma_model.py / qwen2_model.py (KV heads), gpt2_model.py (n_head, n_inner),
    deepseek_v2_model.py (heads, intermediate, moe_intermediate) and the MLPs of each."""
    cfg = text_cfg(config)
    if cfg.model_type == "gpt2":
        if cfg.n_head % shards or (cfg.n_inner or 4 * cfg.n_embd) % shards:
            return "gpt2"
        return None
    if cfg.model_type in ("deepseek_v2", "deepseek_v3"):
        sizes = [cfg.num_attention_heads, cfg.intermediate_size, cfg.moe_intermediate_size]
    else:
        sizes = [cfg.num_key_value_heads, cfg.intermediate_size]
    return "divisibility" if any(s % shards for s in sizes) else None


def mlc_stage_of_layer(num_layers: int, stages: int) -> list[int]:
    """llama_model.py `_set_pp`: the stage each layer's weights are compiled into; the forward's boundaries
    (LlamaModel.layer_partition, ceil division) must agree, or weights and compute disagree."""
    by_weights = [i // (num_layers // stages) for i in range(num_layers)]
    per = (num_layers + stages - 1) // stages
    by_forward = [i // per for i in range(num_layers)]
    assert by_weights == by_forward and max(by_weights) == stages - 1, (by_weights, by_forward)
    return by_weights


MLC_PIPELINE_FAMILIES = {"llama", "nemotron", "olmo", "olmo2"}  # models whose weights carry "pipeline_stages"


# --- KTransformers ------------------------------------------------------------------------------------------
# KTransformers v0.4.1, commit e40ba6d: ktransformers/optimize/optimize.py gen_optimize_config,
# ktransformers/operators/models.py (KDeepseekV2Model / KQwen2MoeModel forward), ktransformers/models/modeling_*.py.

# KTransformers builds its own modeling classes; where transformers' names differ, its module tree has:
KT_PER_LAYER_ROPE = {  # a RoPE inside each attention (class and its bases), no model-level one
    "DeepseekV2ForCausalLM": lambda yarn: ["DeepseekV2YarnRotaryEmbedding", "DeepseekV2RotaryEmbedding"] if yarn
    else ["DeepseekV2RotaryEmbedding"],
    "DeepseekV3ForCausalLM": lambda yarn: ["DeepseekV3YarnRotaryEmbedding", "DeepseekV3RotaryEmbedding"] if yarn
    else ["DeepseekV3RotaryEmbedding"],
    "Qwen2MoeForCausalLM": lambda yarn: ["Qwen2MoeRotaryEmbedding"],
    "MixtralForCausalLM": lambda yarn: ["MixtralRotaryEmbedding"],
    "LlamaForCausalLM": lambda yarn: ["LlamaRotaryEmbedding"],  # modeling_llama.py also keeps the model-level one
}
KT_CLASS = {"DeepseekV2Moe": "DeepseekV2MoE", "DeepseekV2TopkRouter": "MoEGate", "DeepseekV3TopkRouter": "MoEGate",
            "Qwen2MoeTopKRouter": "Linear", "MixtralTopKRouter": "Linear"}


def kt_tree(model, arch: str, config) -> list[tuple[str, list[str], bool]]:
    """(name, class and base names, owns weights) for each module of KTransformers' model, in walk order."""
    rope = getattr(text_cfg(config), "rope_parameters", None) or {}
    yarn = rope.get("rope_type") == "yarn" or rope.get("type") == "yarn"
    out = []
    for name, module in model.named_modules():
        if name == "model.rotary_emb" and arch != "LlamaForCausalLM":
            continue
        chain = [c.__name__ for c in type(module).__mro__]
        chain = [KT_CLASS.get(chain[0], chain[0]), *chain]
        if arch == "MixtralForCausalLM":
            name = re.sub(r"\.mlp(\.|$)", r".block_sparse_moe\1", name)  # modeling_mixtral.py names it so
        owns = any(True for _ in module.parameters(recurse=False))
        out.append((name, chain, owns))
        if name.endswith(".self_attn") and arch in KT_PER_LAYER_ROPE:
            out.append((name + ".rotary_emb", [*KT_PER_LAYER_ROPE[arch](yarn), "Module"], False))
    return out


def kt_inject(rules: list[dict], tree) -> dict[str, dict]:
    """gen_optimize_config: first matching rule per module (class by isinstance, name by re.search), kwargs kept,
    `recursive: False` skips the module's descendants; unmatched modules are "default" on cuda:0."""
    out, skipped = {}, []
    for name, chain, _ in tree:
        if any(name.startswith(s + ".") for s in skipped):
            continue
        for rule in rules:
            match = rule["match"]
            assert "class" in match or "name" in match, rule
            if "class" in match and match["class"].rsplit(".", 1)[1] not in chain:
                continue
            if "name" in match and re.search(match["name"], name) is None:
                continue
            assert "replace" in rule, rule
            out[name] = {"class": rule["replace"].get("class", "default"),
                         "kwargs": dict(rule["replace"].get("kwargs", {}))}
            if "recursive" in rule and not bool(rule["recursive"]):
                skipped.append(name)
            break
        else:
            out[name] = {"class": "default", "kwargs": {"generate_device": "cuda:0", "prefill_device": "cuda:0"}}
    return out


def kt_hidden_state_devices(injected: dict, num_layers: int) -> list[str]:
    """Where KDeepseekV2Model / KQwen2MoeModel run each decoder layer: the hidden states start on the input's
    device (cuda:0) and move only at the layers in transfer_map."""
    transfer = injected["model"]["kwargs"].get("transfer_map") or {}
    device, out = "cuda:0", []
    for i in range(num_layers):
        device = transfer.get(i, device)
        out.append(device)
    return out


# --- OpenLLM ------------------------------------------------------------------------------------------------
# bentoml/OpenLLM src/openllm/accelerator_spec.py at ec2355c; bentoml/openllm-models src/make.py at f0027d6.

OPENLLM_ACCELERATORS = {
    "nvidia-gtx-1650": ("GTX 1650", 4.0), "nvidia-gtx-1060": ("GTX 1060", 6.0),
    "nvidia-gtx-1080-ti": ("GTX 1080 Ti", 11.0), "nvidia-rtx-3060": ("RTX 3060", 12.0),
    "nvidia-rtx-3060-ti": ("RTX 3060 Ti", 8.0), "nvidia-rtx-3070-ti": ("RTX 3070 Ti", 8.0),
    "nvidia-rtx-3080": ("RTX 3080", 10.0), "nvidia-rtx-3080-ti": ("RTX 3080 Ti", 12.0),
    "nvidia-rtx-3090": ("RTX 3090", 24.0), "nvidia-rtx-4070-ti": ("RTX 4070 Ti", 12.0),
    "nvidia-tesla-p4": ("P4", 8.0), "nvidia-tesla-p100": ("P100", 16.0), "nvidia-tesla-k80": ("K80", 12.0),
    "nvidia-tesla-t4": ("T4", 16.0), "nvidia-tesla-v100": ("V100", 16.0), "nvidia-l4": ("L4", 24.0),
    "nvidia-tesla-l4": ("L4", 24.0), "nvidia-tesla-a10g": ("A10G", 24.0), "nvidia-a100-80g": ("A100", 80.0),
    "nvidia-a100-80gb": ("A100", 80.0), "nvidia-tesla-a100": ("A100", 40.0), "nvidia-tesla-h100": ("H100", 80.0),
    "nvidia-h200-141gb": ("H200", 141.0), "nvidia-blackwell-b100": ("B100", 192.0),
    "nvidia-blackwell-gb200": ("GB200", 192.0),
}


def check_openllm_recipe(recipe: dict) -> tuple[str, dict]:
    """make.py's reading of one recipe.yaml entry: "<repo>:<version>", project, alias[0], engine_config.model,
    service_config.resources and envs; returns (name, entry)."""
    assert len(recipe) == 1
    (name, entry), = recipe.items()
    repo, version = name.split(":")  # make.py: exactly one ':'
    assert repo and version and entry["project"] == "vllm-chat"
    assert entry["alias"] and isinstance(entry["alias"][0], str)
    assert entry["engine_config"]["model"]
    res = entry["service_config"]["resources"]
    assert isinstance(res["gpu"], int) and res["gpu"] >= 1 and res["gpu_type"] in OPENLLM_ACCELERATORS
    for env in entry["service_config"].get("envs", []):
        assert set(env) <= {"name", "value"} and env["name"]
    return name, entry


def openllm_can_run(entry: dict, gpus) -> float:
    """accelerator_spec.py can_run on a machine with these GPUs (memory as get_local_machine_spec counts it)."""
    res = entry["service_config"]["resources"]
    required = OPENLLM_ACCELERATORS[res["gpu_type"]][1]
    have = [math.ceil(g.memory_total / GiB) for g in gpus]
    if res["gpu"] > len([m for m in have if m >= required]):
        return 0.0
    return required * res["gpu"] / sum(have)
