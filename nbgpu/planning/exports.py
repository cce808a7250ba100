"""A Plan in other tools' terms: KTransformers YAML rules, vLLM, MLC-LLM and OpenLLM/BentoML settings (JSON files:
plan_file.py). `plan.device_map` and `plan.max_memory` are already what transformers/accelerate accept."""

from __future__ import annotations

import re

from .explain import tensor_parallel

# --- KTransformers ------------------------------------------------------------------------------------------

def _device_name(device) -> str:
    return f"cuda:{device}" if isinstance(device, int) else "cpu"


def _runs(plan) -> list[tuple[object, list]]:
    """Consecutive units on one device, in model order: [(device, [units])]."""
    out: list[tuple[object, list]] = []
    for u in plan.units:
        dev = plan._assignment[u.name]
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
