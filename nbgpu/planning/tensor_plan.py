"""Tensor parallelism as transformers does it (`tp_plan="auto"`): every GPU holds a slice of every layer.

The weights are divided as the model's own tensor-parallel plan (`model.tp_plan`, from the config's
`base_model_tp_plan`) divides them: column-wise styles split the output dimension, row-wise styles the input one
(their bias stays whole), the embeddings split the vocabulary; parameters the plan does not name (norms, routers)
are replicated on every GPU. A dimension that does not divide evenly gives the first GPUs one more row, so the
figure here is the largest GPU's share.
"""

from __future__ import annotations

import math
import re

from ..errors import UsageError

_DIM1 = ("rowwise", "packed_rowwise", "local_rowwise")  # weights split along their input dimension
_WHOLE = ("replicated_with_grad_allreduce", "sequence_parallel", "mla_kv_a_proj", "moe_tp_experts", "ep_router",
          "isolated", "gather")


def _pattern(key: str) -> re.Pattern:
    return re.compile("^" + re.escape(key).replace(r"\*", r"\d+") + r"(\.|$)")


def tp_plan(meta) -> dict[str, str]:
    plan = getattr(meta.model, "tp_plan", None)
    plan = plan if isinstance(plan, dict) else getattr(meta.model, "_tp_plan", None) or {}
    if not plan:
        raise UsageError(f"transformers has no tensor-parallel plan for {type(meta.model).__name__} "
                         "(tp_plan='auto' cannot load it): plan a layer split instead (parallel='layers')")
    return dict(plan)


def style_of(plan: dict[str, str], param: str) -> str | None:
    """The style of the longest plan key that names this parameter or a module above it."""
    best = None
    for key, style in plan.items():
        if _pattern(key).match(param) and (best is None or len(key) > len(best[0])):
            best = (key, style)
    return best[1] if best else None


def shard_bytes(meta, tp: int) -> tuple[int, int]:
    """(bytes the fullest GPU holds, bytes replicated on every GPU) under `tp`-way tensor parallelism."""
    plan = tp_plan(meta)
    model = meta.model
    followers = {name for group in meta.tied for name in group[1:]}  # a tied tensor counts once
    seen, total, whole = set(), 0, 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or name in followers:
            continue
        seen.add(id(tensor))
        nbytes = tensor.numel() * tensor.element_size()
        style = style_of(plan, name)
        if style is None or style in _WHOLE or tensor.dim() == 0 or (name.endswith("bias") and style in _DIM1):
            total, whole = total + nbytes, whole + nbytes
            continue
        dim = 1 if style in _DIM1 and tensor.dim() > 1 else 0
        if tensor.dim() == 3:  # packed experts (experts, out, in): the expert dimension stays whole
            dim = 2 if style in _DIM1 else 1
        rows = tensor.shape[dim]
        total += nbytes * math.ceil(rows / tp) // rows
    return total, whole
