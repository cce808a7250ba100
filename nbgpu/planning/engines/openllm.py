"""An OpenLLM recipe for a plan: OpenLLM serves a model with vLLM under BentoML.

The recipe is an entry of openllm-models' src/recipe.yaml (bentoml/openllm-models at f0027d6, read by src/make.py):
`"<name>:<version>"` -> project `vllm-chat`, `service_config` (name, traffic, resources {gpu, gpu_type}, envs as
[{name, value}]), `engine_config` (vLLM's engine arguments, `model` required; tensor_parallel_size defaults to
the GPU count) and `alias` (make.py tags the build with the first). That project pins vllm==0.8.5
(src/templates/requirements.txt.j2), so the engine arguments are checked with vLLM 0.8.5's max_model_len rule.

`gpu_type` must be a key of OpenLLM's accelerator table (bentoml/OpenLLM src/openllm/accelerator_spec.py at
ec2355c, ACCELERATOR_SPECS): `can_run` looks it up and asks for that many GPUs of at least its memory. A GPU's
NVML name is mapped to the key of the same model whose memory the card has; simulated GPUs have no real model.
"""

from __future__ import annotations

import math
import re

from ...errors import UsageError
from ...units import GiB
from . import common, vllm

VERSION = "OpenLLM recipe format (openllm-models f0027d6, accelerator_spec.py ec2355c) with vLLM 0.8.5"
# OpenLLM's ACCELERATOR_SPECS: key -> (model, memory in GiB as OpenLLM counts it)
ACCELERATORS = {
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
# keys the published recipes use, preferred where two keys name the same card
RECIPE_KEYS = ("nvidia-a100-80gb", "nvidia-h200-141gb", "nvidia-l4", "nvidia-rtx-3060", "nvidia-tesla-a100",
               "nvidia-tesla-h100")


def accelerator(nvml_name: str | None, memory: int | None) -> str | None:
    """OpenLLM's key for a GPU: same model (longest model name found in the NVML name), the largest memory the
    card has (OpenLLM counts a card's GiB rounded up); None where OpenLLM's table has no such model."""
    if not nvml_name:
        return None
    hits = [k for k, (model, _) in ACCELERATORS.items()
            if re.search(rf"(?<![A-Za-z0-9]){re.escape(model)}(?![A-Za-z0-9])", nvml_name, re.IGNORECASE)]
    if not hits:
        return None
    longest = max(len(ACCELERATORS[k][0]) for k in hits)
    hits = [k for k in hits if len(ACCELERATORS[k][0]) == longest]
    have = math.ceil((memory or 0) / GiB)
    within = [k for k in hits if ACCELERATORS[k][1] <= have] or \
        [k for k in hits if ACCELERATORS[k][1] == min(ACCELERATORS[h][1] for h in hits)]
    best = max(ACCELERATORS[k][1] for k in within)
    return min((k for k in within if ACCELERATORS[k][1] == best), key=lambda k: (k not in RECIPE_KEYS, k))


def openllm(plan, gpu_type: str | None = None) -> dict:
    """{'recipe': {"name:version": entry}, 'notes', 'checked_against'}. gpu_type: OpenLLM's accelerator key for
    the GPUs you deploy on (default: mapped from the plan's GPUs). UsageError naming OpenLLM's or vLLM's limit."""
    try:
        v = vllm.settings(plan, "vLLM 0.8.5 (OpenLLM's vllm-chat recipes)", legacy_yarn=True)
    except UsageError as err:
        raise UsageError(f"OpenLLM serves through vLLM, and {err}") from None
    args = v["engine_args"]
    count = args["tensor_parallel_size"] * args["pipeline_parallel_size"]
    used = _used_gpus(plan)
    key, notes = _gpu_type(plan, used, gpu_type)
    name = _recipe_name(plan)
    service = {"name": name, "traffic": {"timeout": 300}, "resources": {"gpu": count, "gpu_type": key}}
    envs = [{"name": k, "value": val} for k, val in v["env"].items() if k == "VLLM_PP_LAYER_PARTITION"]
    if envs:
        service["envs"] = envs
    entry = {"project": "vllm-chat", "service_config": service, "engine_config": dict(args), "alias": ["nbgpu"]}
    notes = [n for n in v["notes"] if not n.startswith("simulated GPUs")] + notes
    notes.append("OpenLLM fetches engine_config.model from the Hugging Face Hub (bentoml.models.HuggingFaceModel): "
                 "it must be a hub id")
    if args["pipeline_parallel_size"] > 1:
        notes.append("BentoML assigns the GPUs: the i-th it gives runs pipeline stage i")
    return {"recipe": {f"{name}:nbgpu": entry}, "notes": notes, "checked_against": VERSION}


def _used_gpus(plan) -> list:
    if common.parallel(plan) == "tensor":
        return list(plan.gpus)
    return [plan.gpus[dev] for dev in dict.fromkeys(dev for dev, _ in common.stages(plan))]


def _gpu_type(plan, used: list, gpu_type: str | None) -> tuple[str, list[str]]:
    need = max(math.ceil((g.memory_total or 0) / GiB) for g in used)
    if gpu_type is not None:
        if gpu_type not in ACCELERATORS:
            raise UsageError(f"gpu_type={gpu_type!r} is not in OpenLLM's accelerator table; give one of "
                             f"{', '.join(ACCELERATORS)}")
        has = ACCELERATORS[gpu_type][1]
        if has < need:
            raise UsageError(f"gpu_type={gpu_type!r} has {has:g} GiB as OpenLLM counts it, less than the {need} GiB "
                             "GPUs this plan was made for: its split would not hold there; plan for those GPUs "
                             f"(gpus='{len(used)}x{has:g}GiB') and export that plan")
        return gpu_type, []
    keys = {}
    for g in used:
        key = accelerator(g.name, g.memory_total)
        if key is None:
            what = "a simulated GPU with no model name" if g.simulated else "a GPU OpenLLM's table does not list"
            raise UsageError(f"OpenLLM's recipe names the GPU model (gpu_type, a key of its accelerator table); "
                             f"{g.name!r} is {what}: pass gpu_type= for the GPUs you deploy on, with at least "
                             f"{need} GiB (e.g. {_suggest(need)})")
        keys[key] = g
    if len(keys) > 1:
        raise UsageError(f"OpenLLM asks for {len(used)} GPUs of one type, and this plan mixes "
                         f"{' and '.join(sorted({g.name for g in keys.values()}))}: pass gpu_type= for GPUs with at "
                         f"least {need} GiB (e.g. {_suggest(need)}), on which this split holds")
    key, g = next(iter(keys.items()))
    notes = []
    if g.simulated:
        notes.append(f"gpu_type {key} comes from simulated GPUs ({g.name}): check it against the GPUs you deploy on")
    if ACCELERATORS[key][1] > math.ceil((g.memory_total or 0) / GiB):
        notes.append(f"OpenLLM counts {key} as {ACCELERATORS[key][1]:g} GiB and this {g.name} has "
                     f"{math.ceil((g.memory_total or 0) / GiB)} GiB: `openllm` would not pick it on this machine")
    return key, notes


def _suggest(need: int) -> str:
    fits = sorted((mem, k) for k, (_, mem) in ACCELERATORS.items() if mem >= need and k in RECIPE_KEYS)
    return repr(fits[0][1]) if fits else "a larger GPU"


def _recipe_name(plan) -> str:
    arg = common.model_arg(plan)
    base = "model" if arg == "<path-to-checkpoint>" else arg.rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^a-z0-9.-]+", "-", base.lower()).strip("-.") or "model"
