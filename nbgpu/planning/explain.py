"""Plain-text explanations of a Plan: what each GPU holds, why each boundary sits where it does, what is over,
how many GPUs of this size would fit, a tensor-parallel size that would, and what each engine export needs."""

from __future__ import annotations

from ..errors import UsageError
from ..units import format_size
from . import strategies, tp_sizes
from .positions import beyond


def explain(plan) -> str:
    lines = list(plan.summary_lines())
    lines.append("")
    lines += positions_lines(plan)
    lines.append("Weights are exact sizes; KV cache, activations and context are estimates "
                 f"(KV: {_kv_rule(plan)}; context {format_size(plan.context)} per GPU in use).")
    lines += [f"Note: {n}" for n in plan.estimates.notes]
    lines += _boundaries(plan)
    for d in plan.devices:
        if d.over:
            lines.append(f"{d.label} is over its budget by {format_size(d.over)}: move modules off it "
                         "(plan.move), lower batch or seq_len, or add GPUs.")
    lines += _offload(plan)
    lines.append(fewest_gpus_text(plan))
    lines.append(tensor_parallel_text(plan))
    lines += exports_lines(plan)
    return "\n".join(lines)


def positions_lines(plan) -> list[str]:
    """A warning when seq_len is longer than the model's positions (as vLLM derives them)."""
    pos = beyond(plan)
    if pos is None:
        return []
    return [f"seq_len {plan.seq_len} exceeds the model's positions, {pos}: beyond them the model was not trained "
            f"(RoPE gives garbage, learned positions have no entry); vLLM refuses --max-model-len above "
            f"{pos.length}. Plan with seq_len <= {pos.length} (plan.with_batch(seq_len={pos.length})) to export."]


def exports_lines(plan) -> list[str]:
    """Per engine: what its export holds, or what it would need changed (the engine's own limit)."""
    from .engines import ktransformers, mlc, openllm, vllm

    def vllm_text(v):
        a, pp = v["engine_args"], v["env"].get("VLLM_PP_LAYER_PARTITION")
        return (f"--tensor-parallel-size {a['tensor_parallel_size']} --pipeline-parallel-size "
                f"{a['pipeline_parallel_size']}{f' (VLLM_PP_LAYER_PARTITION={pp})' if pp else ''} "
                f"--max-model-len {a['max_model_len']}")

    def openllm_text(o):
        (entry,) = o["recipe"].values()
        res = entry["service_config"]["resources"]
        return f"a recipe for {res['gpu']} x {res['gpu_type']}"

    engines = [
        ("vLLM", vllm.VERSION, lambda: vllm_text(vllm.vllm(plan))),
        ("MLC-LLM", mlc.VERSION,
         lambda: '--overrides "' + ";".join(f"{k}={v}" for k, v in mlc.mlc(plan)["overrides"].items()) + '"'),
        ("KTransformers", ktransformers.VERSION,
         lambda: f"optimize rules ({ktransformers.ktransformers_rules(plan).count('- match:')} rules)"),
        ("OpenLLM", "vLLM 0.8.5 under BentoML", lambda: openllm_text(openllm.openllm(plan))),
    ]
    lines = ["Exports (each checked against its engine's own rules):"]
    for name, version, summary in engines:
        try:
            lines.append(f"  {name}: {summary()}  [{version}]")
        except UsageError as err:
            lines.append(f"  {name}: not exported: {err}")
    return lines


def _kv_rule(plan) -> str:
    from .memory import kv_bytes_per_token

    per_token, rule = kv_bytes_per_token(plan.config, plan.dtype)
    return f"{rule} x {plan.dtype} = {per_token} bytes per token per layer, x {plan.batch} x {plan.seq_len}"


def _boundaries(plan) -> list[str]:
    out = []
    if plan.strategy in ("balanced", "sequential") and plan.balance_ratio is not None:
        out.append(f"Strategy {plan.strategy}: " + (
            f"contiguous modules per GPU so that the fullest GPU is at {plan.balance_ratio:.0%} of its budget, "
            "the lowest such share possible." if plan.strategy == "balanced"
            else "each GPU is filled to its budget before the next one is used."))
    elif plan.strategy == "accelerate":
        out.append("Strategy accelerate: the split from_pretrained(device_map='auto') makes with these budgets; it "
                   "plans weights only, so the KV cache and activations above may not fit where it put layers.")
    elif str(plan.strategy).endswith("+offload"):
        out.append("The GPUs cannot hold the model: they are filled in order and the rest of the model, from its "
                   "end, is offloaded.")
    else:
        out.append("Placed by hand (plan.move or a manual strategy).")
    names = [u.name for u in plan.units]
    for a, b in zip(names, names[1:]):
        da, db = plan._assignment[a], plan._assignment[b]
        if da != db and isinstance(da, int) and isinstance(db, int):
            nxt = plan._costs.unit_bytes(b)
            room = next(d for d in plan.devices if d.cuda_index == da)
            why = (f"{b} ({format_size(nxt)} with its KV cache) would bring cuda:{da} to "
                   f"{format_size(room.total + nxt)} of {format_size(room.budget)}")
            out.append(f"Boundary cuda:{da} -> cuda:{db} after {a}: {why}.")
    return out


def _offload(plan) -> list[str]:
    from .plan import DISK_BANDWIDTH, PCIE_BANDWIDTH

    out = []
    if plan.cpu_weights:
        ms = plan.cpu_weights / PCIE_BANDWIDTH * 1e3
        out.append(f"{format_size(plan.cpu_weights)} of weights stay in CPU memory and cross PCIe for every forward "
                   f"pass: about {ms:.0f} ms more per generated token (estimate at 25 GB/s), far slower than "
                   "weights held on a GPU.")
    if plan.disk_weights:
        ms = plan.disk_weights / DISK_BANDWIDTH * 1e3
        out.append(f"{format_size(plan.disk_weights)} of weights are read from disk for every forward pass: about "
                   f"{ms:.0f} ms more per generated token (estimate at 2 GB/s).")
    return out


def _need(plan) -> int:
    return sum(plan._costs.unit_bytes(u.name) for u in plan.units) + plan.estimates.layer_activations


def fewest_gpus(plan, limit: int = 64) -> int | None:
    """The fewest GPUs like cuda:0 (empty, same reserve and context) that hold this plan's model, or None."""
    budget = plan.devices[0].budget if plan.devices else 0
    if budget <= 0:
        return None
    for n in range(1, limit + 1):
        costs = strategies.Costs(plan._meta, plan.estimates, [0] * n, plan.context)
        try:
            _, ratio = strategies.balanced(costs, [budget] * n)
        except Exception:
            continue
        if ratio <= 1:
            return n
    return None


def fewest_gpus_text(plan) -> str:
    n = fewest_gpus(plan)
    d0 = plan.devices[0]
    size = format_size(d0.capacity, digits=0)
    if n is None:
        return f"No number of empty {size} GPUs (up to 64) holds this model in layers: a single module is too large."
    return f"Fewest empty {size} GPUs that hold this plan (layers split across them): {n}."


def tensor_parallel(plan, limit: int = 64) -> int | None:
    """The smallest tensor_parallel_size vLLM accepts for this model (tp_sizes.why_not) that fits each GPU like
    cuda:0 (weights split evenly, each GPU's share of the KV cache, activations and context whole on each)."""
    weights = sum(u.size for u in plan.units)
    kv = sum(plan.estimates.kv_per_layer.values())
    act = plan.estimates.layer_activations + plan.estimates.input_activations + plan.estimates.logits
    budget = plan.devices[0].budget
    for tp in range(1, limit + 1):
        if tp_sizes.why_not(plan.config, tp):
            continue
        heads = tp_sizes.split(plan.config, tp)
        if weights / tp + kv * heads.kv_heads_per_gpu / heads.kv_heads + act + plan.context <= budget:
            return tp
    return None


def tensor_parallel_text(plan) -> str:
    tp = tensor_parallel(plan)
    if tp is None:
        return "No tensor_parallel_size that vLLM accepts for this model fits on GPUs of this size."
    have = len(plan.gpus)
    more = "" if tp <= have else f" (more than the {have} GPU(s) in this plan)"
    return f"Tensor parallel: tensor_parallel_size={tp} is the smallest that vLLM accepts for this model (attention " \
           f"heads divide, KV heads divide or replicate, MLP widths divide) and that fits each GPU{more} (estimate)."
