"""`nbgpu.predict(plan)`: the modelled bench figures of a plan, with nothing loaded or run.

The same cost model that times runs on simulated GPUs (`cost_model`), applied to a plan's placement on its GPUs (real,
simulated, or described: `gpus="8xH100"`). The result is a BenchResult labelled "modelled", so `nbgpu.compare` puts
predictions beside runs.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import UsageError
from . import cost_model, placement
from .bench import BenchResult


def predict(plan, batch: int | None = None, prompt_len: int = 128, new_tokens: int = 128, compile: bool = False,
            label: str | None = None) -> BenchResult:
    """Modelled time to first token, decode speed and one decode step per GPU for `plan` (its placement, GPUs and
    dtype; `batch` defaults to the plan's). Nothing is loaded: the figures rest on the GPUs' published bandwidth and
    compute and on host costs calibrated on real GPUs (see the result's `modelled`)."""
    for attr in ("units", "config", "dtype", "devices", "parallel", "assignment"):
        if not hasattr(plan, attr):
            raise UsageError(f"predict takes a plan from nbgpu.plan(...), not {type(plan).__name__}")
    batch = plan.batch if batch is None else batch
    for name, value, low in (("batch", batch, 1), ("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 2)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be a whole number of at least {low}, not {value!r}")
    gpus = {d.cuda_index: d.gpu for d in plan.devices}
    assignment = dict(plan.assignment)
    m, why = cost_model.machine(plan.units, plan.config, plan.dtype, gpus,
                                lambda name: placement.device_of(assignment, name), plan.parallel, compile)
    if m is None:
        raise UsageError("cannot model this plan's timings: " + "; ".join(why))
    n = len(m.gpus)
    names = sorted({g.name for g in m.gpus.values()})
    sim = " simulated" if plan.simulated else ""
    kind = "tensor parallel" if plan.parallel == "tensor" else ("a layer split" if n > 1 else "one GPU")
    where = f"{n}{sim} {' + '.join(names)}, {kind}"
    modelled = cost_model.run(m, batch, prompt_len, new_tokens, cost_model.describe(m, where), plan.simulated)
    mode = "compiled" if compile else "eager"
    name = str(getattr(plan.config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1] or "model"
    label = label or f"{name} {where} {mode}" + (f" batch {batch}" if batch > 1 else "")
    # nothing ran, so `simulated` (ran on the CPU for simulated GPUs) is False; the label names simulated GPUs
    result = BenchResult(
        label=label if cost_model.MODELLED in label else f"{label} ({cost_model.MODELLED})",
        batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, repeats=1, warmup=0, compiled=compile,
        simulated=False, devices=sorted(m.gpus), ttft=[], decode_seconds=[], step_latencies=[],
        generated_tokens=batch * new_tokens, modelled=modelled.description,
        notes=["predicted from the plan: nothing was loaded or run", *modelled.notes])
    return replace(result, **modelled.bench_fields(1))
