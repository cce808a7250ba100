"""KTransformers optimize rules (YAML) for a plan, as KTransformers v0.4.1 (commit e40ba6d, the last release with
its rule-injection framework at the top of the repository) reads them.

How KTransformers reads a rule file (ktransformers/optimize/optimize.py `gen_optimize_config`): it walks the
model's modules from the root; each module takes the first rule whose `match.class` it is an instance of and
whose `match.name` regex `re.search`es its dotted name, and is replaced by `replace.class` ("default": kept) built
with `replace.kwargs`; a matched rule's `recursive: False` stops the walk below it; an unmatched module is kept on
cuda:0. A weight loads onto its module's `generate_device` (util/utils.py `load_cur_state_dict`).

Between GPUs only the model operators move the hidden states, at the layers their `transfer_map` names
(operators/models.py: KDeepseekV2Model, KQwen2MoeModel). KLlamaModel takes a transfer_map but its forward never
uses it, and Mixtral has no model operator: KTransformers runs those on one GPU. The rules below mirror the
multi-GPU rule files (optimize_rules/*multi-gpu*.yaml) and the one-GPU files of the families without one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...units import format_size
from . import common

VERSION = "KTransformers v0.4.1"
DEV = {"generate_device": "{dev}", "prefill_device": "{dev}"}
LINEAR = {**DEV, "generate_op": "KLinearMarlin", "prefill_op": "KLinearTorch"}
EXPERTS = {"prefill_device": "{dev}", "prefill_op": "KExpertsTorch", "generate_device": "cpu",
           "generate_op": "KExpertsCPU", "out_device": "{dev}"}
K = "ktransformers."


@dataclass(frozen=True)
class LayerRule:
    suffix: str  # regex after r"^model\.layers\.(<layers>)\."
    match_class: str | None
    replace_class: str
    kwargs: dict | None = None  # "{dev}" stands for the layer's GPU
    recursive: bool = True


@dataclass(frozen=True)
class Family:
    rule_file: str  # the v0.4.1 file these rules mirror
    layer_rules: tuple[LayerRule, ...]
    model_op: str | None  # the operator of `model`; it moves hidden states between GPUs when multi_gpu
    multi_gpu: bool
    one_gpu_why: str = ""


def _linear(exclude: str = "") -> LayerRule:
    return LayerRule(exclude + ".*$", "torch.nn.Linear", K + "operators.linear.KTransformersLinear", LINEAR)


def _experts(path: str) -> LayerRule:
    return LayerRule(path + "$", None, K + "operators.experts.KTransformersExperts", EXPERTS, recursive=False)


_DEEPSEEK = K + "models.modeling_deepseek."
_DEEPSEEK_V3 = K + "models.modeling_deepseek_v3."
FAMILIES = {
    "DeepseekV2ForCausalLM": Family("DeepSeek-V2-Chat-multi-gpu.yaml", (
        # the yarn class first: it subclasses DeepseekV2RotaryEmbedding, and the first matching rule wins
        LayerRule("", _DEEPSEEK + "DeepseekV2YarnRotaryEmbedding", K + "operators.RoPE.YarnRotaryEmbedding", DEV),
        LayerRule("", _DEEPSEEK + "DeepseekV2RotaryEmbedding", K + "operators.RoPE.RotaryEmbedding", DEV),
        _linear(r"(?!self_attn\.kv_b_proj)"),
        LayerRule(r"mlp$", _DEEPSEEK + "DeepseekV2MoE", K + "operators.experts.KDeepseekV2MoE", DEV),
        _experts(r"mlp\.experts"),
        LayerRule(r"self_attn$", None, K + "operators.attention.KDeepseekV2Attention", DEV),
    ), K + "operators.models.KDeepseekV2Model", True),
    "DeepseekV3ForCausalLM": Family("DeepSeek-V3-Chat-multi-gpu.yaml", (
        LayerRule("", _DEEPSEEK_V3 + "DeepseekV3RotaryEmbedding", K + "operators.RoPE.YarnRotaryEmbeddingV3", DEV),
        _linear(r"(?!self_attn\.kv_b_proj)"),
        LayerRule(r"mlp$", _DEEPSEEK_V3 + "DeepseekV3MoE", K + "operators.experts.KDeepseekV3MoE", DEV),
        LayerRule(r"mlp\.gate$", _DEEPSEEK_V3 + "MoEGate", K + "operators.gate.KMoEGate", DEV),
        _experts(r"mlp\.experts"),
        LayerRule(r"self_attn$", None, K + "operators.attention.KDeepseekV2Attention", DEV),
    ), K + "operators.models.KDeepseekV2Model", True),
    "Qwen2MoeForCausalLM": Family("Qwen2-57B-A14B-Instruct-multi-gpu.yaml", (
        LayerRule("", K + "models.modeling_qwen2_moe.Qwen2MoeRotaryEmbedding", K + "operators.RoPE.RotaryEmbedding",
                  DEV),
        _linear(),  # as Qwen2-57B-A14B-Instruct.yaml: the multi-GPU file's r"...([012])$" matches no Linear
        LayerRule(r"mlp$", K + "models.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock",
                  K + "operators.experts.KQwen2MoeSparseMoeBlock", DEV),
        _experts(r"mlp\.experts"),
    ), K + "operators.models.KQwen2MoeModel", True),
    "LlamaForCausalLM": Family("Internlm2_5-7b-Chat-1m.yaml", (
        LayerRule("", K + "models.modeling_llama.LlamaRotaryEmbedding", K + "operators.RoPE.RotaryEmbeddingV2"),
        LayerRule(r"self_attn$", None, K + "operators.attention.KLlamaAttention", DEV),
    ), K + "operators.models.KLlamaModel", False,
        "KLlamaModel takes a transfer_map but its forward never moves the hidden states to another GPU"),
    "MixtralForCausalLM": Family("Mixtral.yaml", (
        LayerRule("", K + "models.modeling_mixtral.MixtralRotaryEmbedding", K + "operators.RoPE.RotaryEmbedding",
                  DEV),
        _linear(),
        LayerRule(r"block_sparse_moe$", K + "models.modeling_mixtral.MixtralSparseMoeBlock",
                  K + "operators.experts.KMistralSparseMoEBlock"),
        _experts(r"block_sparse_moe\.experts"),
    ), None, False, "Mixtral has no model operator that moves the hidden states between GPUs"),
}


def supported() -> str:
    multi = [a for a, f in FAMILIES.items() if f.multi_gpu]
    one = [a for a, f in FAMILIES.items() if not f.multi_gpu]
    return f"{', '.join(multi)} (over several GPUs) and {', '.join(one)} (on one GPU)"


def ktransformers_rules(plan) -> str:
    """The rule file (YAML, with a comment header saying what KTransformers places differently from the plan);
    UsageError naming KTransformers' limit for a family or plan it cannot take."""
    import yaml

    arch = common.architecture(plan)
    family = FAMILIES.get(arch)
    if family is None:
        common.refuse(VERSION, [f"it runs {supported()} (local_chat.py `custom_models`), not {arch}"])
    devices = common.layer_device(plan)
    gpus = sorted({d for d in devices.values() if isinstance(d, int)})
    reasons = [
        "it splits a model by layers (transfer_map) and has no tensor parallelism on GPUs; plan a layer split"
        if common.parallel(plan) == "tensor" else None,
        common.offloaded(plan, "KTransformers itself decides what runs on the CPU (the routed experts); nbgpu "
                               "exports rules for plans whose modules are all on GPUs"),
    ]
    if not family.multi_gpu and len(gpus) > 1:
        reasons.append(f"it runs {arch} on one GPU only: {family.one_gpu_why} (operators/models.py); put the "
                       "whole model on one GPU, or use a family it splits: "
                       + ", ".join(a for a, f in FAMILIES.items() if f.multi_gpu))
    layers = sorted(devices)
    norm_dev = plan.assignment.get(_norm_name(plan))
    last = devices[layers[-1]] if layers else None
    if family.multi_gpu and isinstance(last, int) and isinstance(norm_dev, int) and norm_dev != last:
        reasons.append(f"its model operator applies the final norm where the last layer ran (cuda:{last}), not on "
                       f"cuda:{norm_dev}: plan.move('{_norm_name(plan)}', {last})")
    common.refuse(VERSION, reasons)
    rules = _rules(plan, family, devices)
    return "\n".join(_header(plan, arch, family)) + "\n" + yaml.safe_dump(rules, sort_keys=False)


def _cuda(dev: int, family: Family) -> str:
    return f"cuda:{dev}" if family.multi_gpu else "cuda:0"


def _fill(kwargs: dict | None, device: str) -> dict | None:
    return None if kwargs is None else {k: (device if v == "{dev}" else v) for k, v in kwargs.items()}


def _rule(name: str, match_class: str | None, replace_class: str, kwargs: dict | None, recursive=True) -> dict:
    match = {"name": name, **({"class": match_class} if match_class else {})}
    replace = {"class": replace_class, **({"kwargs": kwargs} if kwargs is not None else {})}
    return {"match": match, "replace": replace, **({} if recursive else {"recursive": False})}


def _norm_name(plan) -> str:
    return next((u.name for u in plan.units if u.name.endswith(".norm") and u.layer is None), "model.norm")


def _rules(plan, family: Family, devices: dict[int, int]) -> list[dict]:
    meta = plan._meta
    by_gpu: dict[int, list[int]] = {}
    for layer, dev in sorted(devices.items()):
        by_gpu.setdefault(dev, []).append(layer)
    prefix = re.escape(next(u.name for u in plan.units if u.layer is not None).rsplit(".", 1)[0])
    layer_re = {dev: rf"^{prefix}\.({'|'.join(map(str, ls))})\." for dev, ls in by_gpu.items()}
    rules = [_rule(rf"^{re.escape(meta.embed)}$", None, "default",
                   {"generate_device": "cpu", "prefill_device": "cpu"})]
    for lr in family.layer_rules:
        if not family.multi_gpu and lr.match_class and not lr.suffix:
            # one GPU: match the class anywhere, as the one-GPU files do (KLlamaModel also has a RoPE of its own)
            rules.append({"match": {"class": lr.match_class},
                          "replace": {"class": lr.replace_class,
                                      **({"kwargs": _fill(lr.kwargs, "cuda:0")} if lr.kwargs else {})}})
            continue
        for dev in by_gpu:
            rules.append(_rule(layer_re[dev] + lr.suffix, lr.match_class, lr.replace_class,
                               _fill(lr.kwargs, _cuda(dev, family)), lr.recursive))
    if family.model_op:
        kwargs = {"per_layer_prefill_intput_threshold": 0}
        if family.multi_gpu:
            kwargs["transfer_map"] = _transfer_map(devices)
        else:
            kwargs.update(generate_device="cuda:0", prefill_device="cuda:0")
        rules.append(_rule("^model$", None, family.model_op, kwargs))
    for dev in by_gpu:
        rules.append(_rule(layer_re[dev], None, "default", _fill(DEV, _cuda(dev, family))))
    head_dev = plan.assignment[meta.head] if meta.head else None
    if head_dev is not None:
        rules.append(_rule(rf"^{re.escape(meta.head)}$", "torch.nn.Linear", K + "operators.linear.KTransformersLinear",
                           _fill(LINEAR, _cuda(head_dev, family))))
    norm = _norm_name(plan)
    if norm in plan.assignment:
        rules.append(_rule(rf"^{re.escape(norm)}$", None, "default",
                           _fill(DEV, _cuda(plan.assignment[norm], family))))
    return rules


def _transfer_map(devices: dict[int, int]) -> dict[int, str]:
    """Layer index -> GPU, wherever the hidden states must move before that layer (they start on cuda:0)."""
    out, current = {}, "cuda:0"
    for layer in sorted(devices):
        want = f"cuda:{devices[layer]}"
        if want != current:
            out[layer], current = want, want
    return out


def _header(plan, arch: str, family: Family) -> list[str]:
    meta = plan._meta
    embed = meta.unit(meta.embed).size if meta.embed else 0
    lines = [f"# {VERSION} optimize rules for {arch}, in the form of ktransformers/optimize/optimize_rules/"
             f"{family.rule_file}",
             f"# from an nbgpu plan on {len(plan.gpus)} {'SIMULATED ' if plan.simulated else ''}GPU(s), "
             f"{plan.dtype}, batch {plan.batch} x {plan.seq_len} tokens",
             f"# KTransformers keeps the embeddings ({format_size(embed)}) on the CPU (its model operators look "
             "tokens up there), runs linear layers with Marlin 4-bit kernels while generating"]
    if any(lr.replace_class.endswith("KTransformersExperts") for lr in family.layer_rules):
        lines.append("# and generates with the routed experts on the CPU (KExpertsCPU), prefilling on their layer's "
                     "GPU: the GPUs hold less than the plan counts")
    if not family.multi_gpu:
        lines.append(f"# one GPU: KTransformers computes on cuda:0; run it with CUDA_VISIBLE_DEVICES set to the "
                     f"GPU you planned for (here GPU {plan.gpus[next(iter(common.layer_device(plan).values()))].index}"
                     f"{', simulated' if plan.simulated else ''})")
    if not plan.fits:
        lines.append(f"# nbgpu counts the experts on the GPUs, and by that count this plan does not fit: "
                     f"{common.missing_text(plan)}")
    lines.append("# use: python -m ktransformers.local_chat --model_path <hf-config-folder> --gguf_path <weights> "
                 "--optimize_config_path <this file>")
    return lines
