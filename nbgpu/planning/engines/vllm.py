"""vLLM engine arguments and the `vllm serve` command for a plan, as vLLM 0.33.0 (commit 4ba787ec9) takes them.

A layer split becomes pipeline parallelism: one stage per GPU in layer order, the layer counts pinned with
VLLM_PP_LAYER_PARTITION (vllm/distributed/utils.py `get_pp_indices`: one count per stage, adding up to the
model's layers). A tensor-parallel plan becomes --tensor-parallel-size len(plan.gpus), checked with the rule in
tp_sizes.py. --max-model-len is the plan's seq_len, which vLLM refuses above the model's positions
(positions.py); --max-num-seqs is its batch.
"""

from __future__ import annotations

from ...units import format_size
from .. import tp_sizes
from ..positions import beyond
from . import common

VERSION = "vLLM 0.33.0"
# Architectures whose vLLM 0.33.0 class implements SupportsPP (vllm/model_executor/models/registry.py and each
# model's class; MistralForCausalLM, Phi3ForCausalLM and DeepseekV3ForCausalLM inherit it)
PIPELINE_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "GPT2LMHeadModel", "DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM", "Phi3ForCausalLM",
})
# ... whose model file builds the embeddings, norm and lm_head on every pipeline stage (no PPMissingLayer)
EDGES_ON_EVERY_STAGE = frozenset({"MixtralForCausalLM", "Qwen2MoeForCausalLM", "GemmaForCausalLM",
                                  "Gemma2ForCausalLM", "GPT2LMHeadModel"})


def vllm(plan) -> dict:
    """{'engine_args', 'env', 'command', 'notes', 'checked_against'}; UsageError naming vLLM's limit when the
    plan cannot be served as planned."""
    return settings(plan)


def settings(plan, version: str = VERSION, legacy_yarn: bool = False) -> dict:
    """vllm(plan) for a vLLM `version` whose max_model_len rule is 0.33.0's, or 0.8.5's with `legacy_yarn`."""
    pos = beyond(plan, legacy_yarn)
    reasons = [common.beyond_positions(plan, pos.length, f"the model's positions, {pos}") if pos else None,
               common.not_fitting(plan)]
    notes = common.model_notes(plan)
    if common.parallel(plan) == "tensor":
        tp, pp, order, counts = len(plan.gpus), 1, list(range(len(plan.gpus))), None
        why = tp_sizes.why_not(plan.config, tp)
        if why:
            ok = ", ".join(map(str, tp_sizes.valid_sizes(plan.config, 64)))
            reasons.append(f"--tensor-parallel-size {tp} is refused by vLLM because {why} (sizes vLLM accepts for "
                           f"this model: {ok})")
    else:
        reasons.append(common.offloaded(plan, "vLLM offloads a size per GPU (--cpu-offload-gb), not modules"))
        stages = common.stages(plan)
        order, counts = [dev for dev, _ in stages], [len(layers) for _, layers in stages]
        reasons.append(_split_stages(stages))
        tp, pp = 1, len(stages)
        if pp > 1 and common.architecture(plan) not in PIPELINE_ARCHITECTURES:
            notes.append(f"{common.architecture(plan)} was not checked for pipeline parallelism in {version} "
                         "(its model class must implement SupportsPP)")
    common.refuse(version, reasons)
    if pp > 1:
        notes += _edge_modules(plan, order)
    env = {"VLLM_PP_LAYER_PARTITION": ",".join(map(str, counts))} if pp > 1 else {}
    devices_env, device_notes = common.visible_devices_env(plan, order, "vLLM")
    env.update(devices_env)
    args = {"model": common.model_arg(plan), "tensor_parallel_size": tp, "pipeline_parallel_size": pp,
            "max_model_len": plan.seq_len, "max_num_seqs": plan.batch, "dtype": plan.dtype}
    command = " ".join([*common.env_prefix(env), "vllm serve", common.quoted_model(plan),
                        *(f"--{k.replace('_', '-')} {v}" for k, v in args.items() if k != "model")])
    return {"engine_args": args, "env": env, "command": command, "notes": notes + device_notes,
            "checked_against": version}


def _split_stages(stages) -> str | None:
    """vLLM gives each pipeline stage one GPU and one contiguous run of layers."""
    seen: dict[int, list[int]] = {}
    for dev, layers in stages:
        seen.setdefault(dev, []).append(layers)
    split = {dev: runs for dev, runs in seen.items() if len(runs) > 1}
    if not split:
        return None
    dev, runs = next(iter(split.items()))
    spans = ", ".join(f"{r[0]}-{r[-1]}" for r in runs)
    return (f"vLLM's pipeline stages are contiguous runs of layers, one GPU each, but cuda:{dev} holds layers "
            f"{spans}; move them so that every GPU holds one run (plan.move or plan.set_boundaries)")


def _edge_modules(plan, order: list[int]) -> list[str]:
    """Where vLLM holds the embeddings, final norm and lm_head, against the plan: on the first and last stage
    (llama.py, qwen2.py, deepseek_v2.py: with tied embeddings the last stage keeps a copy), or on every stage
    (the models in EDGES_ON_EVERY_STAGE build them unconditionally)."""
    first, last = order[0], order[-1]
    layers = [i for i, (u, _) in enumerate(common.placement(plan)) if u.layer is not None]
    planned: dict = {}
    before = after = 0
    for i, (unit, dev) in enumerate(common.placement(plan)):
        if unit.layer is None:
            planned[dev] = planned.get(dev, 0) + unit.size
            if i < layers[0]:
                before += unit.size
            elif i > layers[-1]:
                after += unit.size
    meta = plan._meta
    tied = any(meta.embed in group and meta.head in group for group in meta.tied_units)
    if common.architecture(plan) in EDGES_ON_EVERY_STAGE:
        held = {dev: before + after for dev in order}
        where = "on every pipeline stage"
    else:
        held = {first: before, last: after + (meta.unit(meta.embed).size if tied and meta.embed else 0)}
        where = "on the first stage (embeddings) and the last (norm, lm_head" + \
            (", and a copy of the tied embeddings)" if tied else ")")
    out = []
    free = {d.cuda_index: d.free for d in plan.devices}
    for dev in dict.fromkeys(order):
        extra = held.get(dev, 0) - planned.get(dev, 0)
        if extra > 0:
            text = f"vLLM builds the embeddings, norm and lm_head {where}: cuda:{dev} holds {format_size(extra)} " \
                   "more than this plan counts there"
            if extra > free[dev]:
                text += f", beyond the {format_size(max(0, free[dev]))} the plan leaves free: vLLM will fit fewer " \
                        "sequences of full length at once"
            out.append(text)
    return out
