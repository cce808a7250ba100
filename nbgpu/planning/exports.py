"""A Plan in other tools' terms (JSON plan files: plan_file.py): accelerate's max_memory, and the engine exports
(KTransformers rules, vLLM, MLC-LLM and OpenLLM settings; one module each under engines/, each checked against that
engine's rules). `plan.device_map` is already what transformers/accelerate accept."""

from __future__ import annotations

from ..errors import UsageError
from .engines.ktransformers import ktransformers_rules  # noqa: F401  (Plan's methods import them from here)
from .engines.mlc import mlc  # noqa: F401
from .engines.openllm import openllm  # noqa: F401
from .engines.vllm import vllm  # noqa: F401

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
