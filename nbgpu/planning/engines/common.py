"""What every engine export needs from a plan: its stages along the depth, the GPUs, the model argument, and
the refusals they share (a plan that does not fit, a sequence longer than the model's positions)."""

from __future__ import annotations

import shlex

from ...errors import UsageError
from ...units import format_size
from ..positions import beyond


def parallel(plan) -> str:
    """'layers' (a split along the depth, the default) or 'tensor' (every layer split over all of plan.gpus)."""
    return getattr(plan, "parallel", "layers")


def placement(plan) -> list[tuple[object, object]]:
    """(unit, device) in model order."""
    return [(u, plan.assignment[u.name]) for u in plan.units]


def stages(plan) -> list[tuple[int, list[int]]]:
    """The GPUs that hold decoder layers, in layer order, each with its layer indexes: [(cuda index, [layers])].
    A GPU whose layers are not one contiguous run appears more than once; offloaded layers are left out."""
    out: list[tuple[int, list[int]]] = []
    for unit, dev in placement(plan):
        if unit.layer is None or not isinstance(dev, int):
            continue
        if out and out[-1][0] == dev:
            out[-1][1].append(unit.layer)
        else:
            out.append((dev, [unit.layer]))
    return out


def layer_device(plan) -> dict[int, object]:
    return {u.layer: dev for u, dev in placement(plan) if u.layer is not None}


def architecture(plan) -> str:
    """The model's class as transformers builds it (what engines read from config.json's `architectures`)."""
    archs = getattr(plan.config, "architectures", None)
    return archs[0] if archs else type(plan._meta.model).__name__


def model_type(plan) -> str:
    from ..memory import text_config

    return str(getattr(text_config(plan.config), "model_type", "") or getattr(plan.config, "model_type", ""))


def model_arg(plan) -> str:
    return str(plan.source) if isinstance(plan.source, str) or hasattr(plan.source, "__fspath__") \
        else "<path-to-checkpoint>"


def quoted_model(plan) -> str:
    arg = model_arg(plan)
    return arg if arg == "<path-to-checkpoint>" else shlex.quote(arg)


def model_notes(plan) -> list[str]:
    if model_arg(plan) == "<path-to-checkpoint>":
        return ["the plan was made from a config: put the checkpoint folder where <path-to-checkpoint> stands"]
    return []


def missing_text(plan) -> str:
    """What a plan that does not fit lacks, GPU by GPU."""
    overs = [f"{d.label} by {format_size(d.over)}" for d in plan.devices if d.over]
    cpu_over = plan.missing() - sum(d.over for d in plan.devices)
    if cpu_over > 0:
        overs.append(f"CPU memory for the offloaded weights by {format_size(cpu_over)}")
    return f"{format_size(plan.missing())} missing (over: {'; '.join(overs)})"


# Each check below returns None, or why the engine cannot take the plan and what to change.

def not_fitting(plan) -> str | None:
    if plan.fits:
        return None
    return (f"the plan does not fit: {missing_text(plan)}; lower batch or seq_len (plan.with_batch), add GPUs, "
            "or allow offload")


def beyond_positions(plan, limit: int | None = None, what: str | None = None) -> str | None:
    """seq_len longer than the model's positions (or than an engine's own `limit`, described by `what`)."""
    if limit is None:
        pos = beyond(plan)
        if pos is None:
            return None
        limit, what = pos.length, f"the model's positions, {pos}"
    elif plan.seq_len <= limit:
        return None
    return (f"seq_len {plan.seq_len} exceeds {what}; plan for at most {limit} tokens "
            f"(plan.with_batch(seq_len={limit}))")


def offloaded(plan, how: str) -> str | None:
    off = sorted({str(dev) for _, dev in placement(plan) if dev in ("cpu", "disk")})
    if off:
        return f"the plan puts modules on {' and '.join(off)}, and {how}; plan without offload"
    return None


def refuse(engine: str, reasons) -> None:
    reasons = [r for r in reasons if r]
    if reasons:
        raise UsageError(f"{engine} cannot take this plan: " + "; and ".join(reasons) + ".")


def gpus_in_order(plan, cuda_indexes: list[int]) -> list:
    return [plan.gpus[i] for i in cuda_indexes]


def visible_devices_env(plan, cuda_indexes: list[int], engine: str) -> tuple[dict, list[str]]:
    """CUDA_VISIBLE_DEVICES that makes the engine's worker k run on the plan's k-th GPU (real GPUs), or a note."""
    gpus = gpus_in_order(plan, cuda_indexes)
    if plan.simulated:
        if cuda_indexes != list(range(len(cuda_indexes))):
            order = ", ".join(f"cuda:{i}" for i in cuda_indexes)
            return {}, [f"simulated GPUs: {engine} runs worker k on the k-th visible GPU; make them {order} in "
                        "that order (CUDA_VISIBLE_DEVICES) on the machine you deploy on"]
        return {}, [f"simulated GPUs: {engine} uses the first {len(cuda_indexes)} visible GPU(s) of the machine "
                    "you deploy on; the plan assumed their sizes"]
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(str(g.index) for g in gpus)}, []


def env_prefix(env: dict) -> list[str]:
    return [f"{k}={shlex.quote(str(v))}" for k, v in env.items()]
