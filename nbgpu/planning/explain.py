"""Plain-text explanations of a Plan: what each GPU holds and where each figure comes from, why each boundary sits
where it does (or why a GPU stays empty), what is over, how many GPUs of this size would hold the model, which
tensor-parallel size would, and what each engine export needs."""

from __future__ import annotations

from ..devices.calibration import DEFAULT as CALIBRATION
from ..errors import UsageError
from ..units import format_size
from . import strategies, tensor_plan, tp_sizes
from .positions import beyond


def explain(plan) -> str:
    lines = list(plan.summary_lines())
    lines.append("")
    lines += positions_lines(plan)
    lines.append("Where the figures come from:")
    lines += [f"  {piece}: {source}" for piece, source in plan.estimates.sources.items()]
    lines += [f"Note: {n}" for n in plan.estimates.notes]
    lines.append("")
    lines += _tensor(plan) if plan.parallel == "tensor" else _boundaries(plan)
    for d in plan.devices:
        if d.over:
            lines.append(f"{d.label} is over its budget by {format_size(d.over)}: move modules off it "
                         "(plan.move), lower batch or the lengths, or add GPUs.")
    lines += _offload(plan)
    lines.append("")
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


def _room_text(d) -> str:
    parts = [f"budget {format_size(d.budget)} (capacity less the {format_size(d.reserve)} reserve)"]
    if d.driver_reserved:
        parts.append(f"less the driver's {format_size(d.driver_reserved)}")
    if d.others:
        parts.append(f"less {format_size(d.others)} that other processes use")
    return ", ".join(parts)


def _boundaries(plan) -> list[str]:
    out = []
    if plan.strategy == "balanced" and plan.balance_ratio is not None:
        out.append(f"Strategy balanced: contiguous layers per GPU so that the fullest GPU uses "
                   f"{plan.balance_ratio:.0%} of its room (the lowest share possible), then the emptiest GPU as full "
                   "as that allows.")
    elif plan.strategy == "sequential":
        out.append("Strategy sequential: each GPU is filled to its room before the next one is used.")
    elif plan.strategy == "accelerate":
        out.append("Strategy accelerate: the split from_pretrained(device_map='auto') makes with these budgets; it "
                   "plans weights only, so the KV cache and activations above may not fit where it put layers.")
    elif str(plan.strategy).endswith("+offload"):
        out.append("The GPUs cannot hold the model: they are filled in order and the rest of the model, from its "
                   "end, is offloaded.")
    else:
        out.append("Placed by hand (plan.move or a manual strategy).")
    target = plan.balance_ratio if plan.strategy == "balanced" else None
    names = [u.name for u in plan.units]
    for d in plan.devices:
        held = plan.layers_on(d.cuda_index)
        line = f"{d.label}: room {format_size(d.room)} = {_room_text(d)}."
        if not held:
            line += " It stays empty: " + _why_empty(plan, d)
        else:
            first_layer = d.activations + d.allocator
            line += (f" It holds {len(held)} module(s); with its first decoder layer it takes on the prefill "
                     f"activations and allocator overhead (~{format_size(first_layer)}) and the context "
                     f"({format_size(d.context)}).")
            if target is not None:
                line += f" Target: {target:.0%} of its room = {format_size(target * d.room)}."
        out.append(line)
    assignment = plan.assignment
    for a, b in zip(names, names[1:]):
        da, db = assignment[a], assignment[b]
        if da != db and isinstance(da, int) and isinstance(db, int):
            room = plan.devices[da]
            with_b = _with(plan, da, b)
            out.append(f"Boundary cuda:{da} -> cuda:{db} after {a}: cuda:{da} holds {format_size(room.process)}; "
                       f"adding {b} would bring it to {format_size(with_b)}"
                       + (f", above the {target:.0%} target ({format_size(target * room.room)})."
                          if target is not None else "."))
    return out


def _with(plan, device: int, name: str) -> int:
    """This plan's process memory on `device` if unit `name` moved there too."""
    new = dict(plan.assignment)
    new[name] = device
    return plan._tally(new)[0][device].process


def _why_empty(plan, d) -> str:
    if d.room <= 0:
        return "no room left on it (see above)."
    layers = sum(1 for u in plan.units if u.layer is not None)
    if layers < len(plan.gpus):
        return f"the model has {layers} decoder layers for {len(plan.gpus)} GPUs."
    if plan.strategy in ("sequential",) or str(plan.strategy).endswith("+offload"):
        return "the GPUs before it hold the whole model."
    return "placed so by hand or by accelerate's map."


def _tensor(plan) -> list[str]:
    h = plan.heads
    kv = (f"{h.kv_heads_per_gpu} of the {h.kv_heads} KV heads" if h.kv_replicas == 1 else
          f"one KV head, replicated on {h.kv_replicas} GPUs (fewer KV heads than GPUs)")
    return [
        f"Tensor parallel over {plan.tp} GPUs: each GPU holds {h.heads_per_gpu} of the {h.heads} attention heads and "
        f"{kv}, a 1/{plan.tp} slice of every MLP, the embeddings and the output projection; "
        f"{format_size(plan._replicated, 'auto')} (norms and other parameters the model's tp_plan does not name) is "
        "replicated on every GPU.",
        "Every decoder layer ends its attention and its MLP with an all-reduce of the hidden state across the GPUs "
        "(two per layer per step): fast over NVLink, costly over PCIe without peer-to-peer. The hidden state and the "
        "prefill's layer input stay whole on every GPU.",
        f"Communication: NCCL's buffers and the peers' mappings, {format_size(CALIBRATION.communication)} per GPU "
        f"(calibrated for 2 GPUs on {CALIBRATION.measured_on}).",
    ]


def _offload(plan) -> list[str]:
    from .memory import DISK_BANDWIDTH, PCIE_BANDWIDTH

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


def _first_room(plan) -> int:
    return plan.devices[0].room + plan.devices[0].others if plan.devices else 0


def fewest_gpus(plan, limit: int = 64) -> int | None:
    """The fewest empty GPUs like cuda:0 (same reserve) that hold this plan's model in a layer split, or None."""
    room = _first_room(plan)
    if room <= 0:
        return None
    costs = getattr(plan, "_costs", None) or strategies.Costs(plan._meta, plan.estimates, plan.context)
    for n in range(1, limit + 1):
        if strategies.sequential(costs, [room] * n) is not None:
            return n
    return None


def fewest_gpus_text(plan) -> str:
    n = fewest_gpus(plan)
    size = format_size(plan.devices[0].capacity, digits=0)
    if n is None:
        return f"No number of empty {size} GPUs (up to 64) holds this model in layers: a single module is too large."
    return f"Fewest empty {size} GPUs that hold this run with its layers split across them: {n}."


def tensor_parallel_need(plan, tp: int) -> int:
    """What each GPU holds under `tp`-way tensor parallelism for this plan's run (bytes, estimate)."""
    heads = tp_sizes.split(plan.config, tp)
    shard, _ = tensor_plan.shard_bytes(plan._meta, tp)
    mem = plan.estimates.device(list(plan.estimates.kv_total), True, True,
                                kv_share=heads.kv_heads_per_gpu / heads.kv_heads, tp=tp,
                                slack_blocks=CALIBRATION.slack_blocks_tensor)
    comm = CALIBRATION.communication if tp > 1 else 0
    return shard + mem.kv_cache + mem.activations + mem.allocator + plan.context + comm


def tensor_parallel(plan, limit: int = 64) -> int | None:
    """The smallest tensor-parallel size the attention allows (vLLM's rule, KV heads replicated where there are
    fewer than GPUs) whose share fits each GPU like cuda:0; None when none up to `limit` does."""
    room = _first_room(plan)
    try:
        tensor_plan.tp_plan(plan._meta)
    except UsageError:
        return None
    for tp in tp_sizes.valid_sizes(plan.config, limit):
        if tensor_parallel_need(plan, tp) <= room:
            return tp
    return None


def tensor_parallel_text(plan) -> str:
    tp = tensor_parallel(plan)
    if tp is None:
        try:
            tensor_plan.tp_plan(plan._meta)
        except UsageError as err:
            return f"Tensor parallel: {err}."
        return "No tensor-parallel size this model's heads allow fits on GPUs of this size."
    have = len(plan.gpus)
    more = "" if tp <= have else f" (more than the {have} GPU(s) in this plan)"
    return (f"Tensor parallel: {tp} GPUs{more} is the smallest size the heads allow whose share fits each GPU "
            f"(estimate; plan it with parallel='tensor'). It costs an all-reduce per attention and per MLP block.")
