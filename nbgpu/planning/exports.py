"""A Plan in other tools' terms: JSON (save/load), accelerate's max_memory, and the engine exports (KTransformers
rules, vLLM, MLC-LLM and OpenLLM settings; one module each under engines/, each checked against that engine's rules).
`plan.device_map` is already what transformers/accelerate accept."""

from __future__ import annotations

import json

from ..devices import GPU
from ..errors import UsageError
from .engines.ktransformers import ktransformers_rules  # noqa: F401  (Plan's methods import them from here)
from .engines.mlc import mlc  # noqa: F401
from .engines.openllm import openllm  # noqa: F401
from .engines.vllm import vllm  # noqa: F401

FORMAT = "nbgpu-plan/1"


def _source_for_json(plan):
    src = plan.source
    if isinstance(src, str):
        return {"kind": "path_or_id", "value": src}
    if hasattr(src, "__fspath__"):
        return {"kind": "path_or_id", "value": str(src)}
    return {"kind": "config", "value": plan.config.to_dict()}


def to_dict(plan) -> dict:
    return {
        "format": FORMAT,
        "source": _source_for_json(plan),
        "dtype": plan.dtype, "batch": plan.batch, "seq_len": plan.seq_len,
        "prompt_len": plan.prompt_len, "new_tokens": plan.new_tokens, "prefill_chunk": plan.workload.prefill_chunk,
        "attn_implementation": plan.workload.attention, "cache": plan.workload.cache, "parallel": plan.parallel,
        "strategy": plan.strategy if isinstance(plan.strategy, str) else "manual",
        "reserve": plan.reserve, "context": plan.context, "offload": plan.offload, "cpu_memory": plan.cpu_memory,
        "gpus": [{"index": g.index, "name": g.name, "uuid": g.uuid, "memory_total": g.memory_total,
                  "memory_used": g.memory_used, "simulated": g.simulated} for g in plan.gpus],
        "device_map": plan.device_map if plan.parallel == "layers" else None,
        "max_memory": {str(k): v for k, v in plan.max_memory.items()}
        if plan.parallel == "layers" and plan.fits else None,
        "fits": plan.fits,
    }


def save(plan, path) -> None:
    with open(path, "w") as fh:
        json.dump(to_dict(plan), fh, indent=1)


def load(path):
    """A Plan from `save`: same model, GPUs as saved (not the ones present now) and the same placement."""
    from .meta_model import build
    from .plan import Plan
    from .strategies import units_from_map

    with open(path) as fh:
        data = json.load(fh)
    if data.get("format") != FORMAT:
        raise UsageError(f"{path} is not a saved nbgpu plan (format {data.get('format')!r}, expected {FORMAT!r})")
    src = data["source"]
    if src["kind"] == "config":
        from transformers import AutoConfig

        cfg = dict(src["value"])
        source = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    else:
        source = src["value"]
    meta = build(source, data["dtype"])
    gpus = [GPU(index=g["index"], uuid=g["uuid"], name=g["name"], pci_bus_id=None, memory_total=g["memory_total"],
                memory_used=g["memory_used"], memory_free=None, utilization=None, temperature=None, power_draw=None,
                power_limit=None, pstate=None, persistence_mode=None, compute_capability=None, mig_mode=None,
                simulated=g["simulated"]) for g in data["gpus"]]
    from .plan import workload

    work = workload(data["batch"], None if "prompt_len" in data else data["seq_len"], data.get("prompt_len"),
                    data.get("new_tokens"), data.get("prefill_chunk"), data.get("attn_implementation", "sdpa"),
                    data.get("cache", "dynamic"))
    parallel = data.get("parallel", "layers")
    if parallel == "tensor":
        return Plan(meta, gpus, workload=work, strategy="balanced", reserve=data["reserve"], context=data["context"],
                    offload=False, cpu_memory=data["cpu_memory"], parallel="tensor")
    raw = data["device_map"] if data["strategy"] == "accelerate" else None
    return Plan(meta, gpus, workload=work, strategy=data["strategy"], reserve=data["reserve"],
                context=data["context"], offload=data["offload"], cpu_memory=data["cpu_memory"],
                assignment=units_from_map(meta, data["device_map"]), raw_map=raw)


# --- max_memory ---------------------------------------------------------------------------------------------

def max_memory(plan) -> dict:
    """from_pretrained's max_memory for a plan that fits: per GPU the room left for weights (budget less what the
    plan puts there besides weights and what other processes use), never above the card; and the CPU memory.
    A plan that does not fit is refused with what it lacks, since any figure for it would exceed a card."""
    from .engines.common import missing_text

    if not plan.fits:
        raise UsageError(f"no max_memory for a plan that does not fit: {missing_text(plan)}. Lower batch or seq_len "
                         "(plan.with_batch), add GPUs, or plan with offload='cpu'")
    out = {}
    for d in plan.devices:
        besides_weights = d.process - d.weights
        out[d.cuda_index] = min(max(d.weights, d.room - besides_weights), max(0, d.capacity - d.driver_reserved))
    out["cpu"] = max(plan.cpu_memory, plan.cpu_weights)
    return out
