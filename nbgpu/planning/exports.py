"""A Plan in other tools' terms: JSON (save/load), KTransformers YAML rules, vLLM, MLC-LLM and OpenLLM/BentoML
settings. `plan.device_map` and `plan.max_memory` are already what transformers/accelerate accept."""

from __future__ import annotations

import json
import re

from ..devices import GPU
from ..errors import UsageError
from .explain import tensor_parallel

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
        "max_memory": {str(k): v for k, v in plan.max_memory.items()} if plan.parallel == "layers" else None,
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


# --- KTransformers ------------------------------------------------------------------------------------------

def _device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else "cpu"


def _runs(plan) -> list[tuple[object, list]]:
    """Consecutive units on one device, in model order: [(device, [units])]."""
    out: list[tuple[object, list]] = []
    for u in plan.units:
        dev = plan.assignment[u.name]
        if out and out[-1][0] == dev:
            out[-1][1].append(u)
        else:
            out.append((dev, [u]))
    return out


def ktransformers_rules(plan) -> str:
    """KTransformers optimize-rule YAML: one rule per run of modules (regex `match.name` -> device, class
    "default" keeps the module as it is), plus the model's transfer_map where the hidden states change GPU."""
    import yaml

    rules, transfer = [], {}
    for dev, units in _runs(plan):
        layers = [u.layer for u in units if u.layer is not None]
        others = [u.name for u in units if u.layer is None]
        name_res = []
        if layers:
            prefix = units[[u.layer is not None for u in units].index(True)].name.rsplit(".", 1)[0]
            name_res.append(rf"^{re.escape(prefix)}\.({'|'.join(map(str, layers))})\.")
            if layers[0] != plan.units[[u.layer is not None for u in plan.units].index(True)].layer:
                transfer[layers[0]] = _device_name(dev)
        name_res += [rf"^{re.escape(n)}$" for n in others]
        for pattern in name_res:
            rules.append({"match": {"name": pattern},
                          "replace": {"class": "default",
                                      "kwargs": {"generate_device": _device_name(dev),
                                                 "prefill_device": _device_name(dev)}}})
    root = plan.units[0].name.split(".")[0]
    rules.append({"match": {"name": rf"^{root}$"},
                  "replace": {"class": "default", "kwargs": {"per_layer_prefill_intput_threshold": 0,
                                                             "transfer_map": transfer}}})
    return yaml.safe_dump(rules, sort_keys=False)


# --- serving engines ----------------------------------------------------------------------------------------

def _model_arg(plan) -> str:
    return str(plan.source) if isinstance(plan.source, str) else "<path-to-checkpoint>"


def vllm(plan) -> dict:
    """vLLM engine arguments. Pipeline parallel follows this plan's split (VLLM_PP_LAYER_PARTITION pins the
    layer counts); where a tensor-parallel size fits on these GPUs, that is offered too, as vLLM prefers it."""
    counts = [c for c in plan.layer_counts() if c]
    pp = {"tensor_parallel_size": 1, "pipeline_parallel_size": len(counts), "max_model_len": plan.seq_len,
          "max_num_seqs": plan.batch, "dtype": plan.dtype}
    env = {"VLLM_PP_LAYER_PARTITION": ",".join(map(str, counts))} if len(counts) > 1 else {}
    out = {"pipeline": {"engine_args": pp, "env": env,
                        "command": " ".join([*(f"{k}={v}" for k, v in env.items()), "vllm serve", _model_arg(plan),
                                             f"--pipeline-parallel-size {len(counts)}",
                                             f"--max-model-len {plan.seq_len}", f"--dtype {plan.dtype}"])}}
    tp = tensor_parallel(plan)
    if tp is not None and tp <= len(plan.gpus):
        args = {**pp, "tensor_parallel_size": tp, "pipeline_parallel_size": 1}
        out["tensor"] = {"engine_args": args, "env": {},
                         "command": f"vllm serve {_model_arg(plan)} --tensor-parallel-size {tp} "
                                    f"--max-model-len {plan.seq_len} --dtype {plan.dtype}"}
    out["recommended"] = "tensor" if "tensor" in out else "pipeline"
    return out


def mlc(plan) -> dict:
    """MLC-LLM splits by tensor parallelism only: `tensor_parallel_shards`, or None where no size fits."""
    tp = tensor_parallel(plan)
    if tp is None:
        return {"tensor_parallel_shards": None, "note": "no shard count that divides the head counts fits"}
    return {"tensor_parallel_shards": tp,
            "command": f"mlc_llm serve {_model_arg(plan)} --overrides \"tensor_parallel_shards={tp}\""}


def openllm(plan) -> dict:
    """A BentoML service deployment (as OpenLLM runs vLLM): GPU resources and the vLLM engine arguments."""
    v = vllm(plan)
    chosen = v[v["recommended"]]
    gpus = chosen["engine_args"]["tensor_parallel_size"] * chosen["engine_args"]["pipeline_parallel_size"]
    return {"service": {"resources": {"gpu": gpus, "gpu_type": plan.gpus[0].name}, "traffic": {"timeout": 300}},
            "engine_config": {"model": _model_arg(plan), **chosen["engine_args"]},
            "envs": [{"name": k, "value": v_} for k, v_ in chosen["env"].items()]}
