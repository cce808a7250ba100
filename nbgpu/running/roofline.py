"""The memory-bandwidth bound for decoding: every new token reads all weights and the KV cache once.

With a layer split the GPUs work one after another, so a decode step takes at least
sum over GPUs of (bytes on that GPU / its bandwidth). An estimate: peak bandwidth from NVML clocks or the specs
table; real kernels reach 80-90% of it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from .. import visibility
from ..devices import specs
from ..planning import memory
from ..planning.meta_model import dtype_name
from ..units import format_size
from . import placement


@dataclass(frozen=True)
class GPUBound:
    cuda_index: int
    gpu_name: str | None
    weights: int  # bytes read per step
    kv_cache: int  # bytes read per step, at the average context length
    bandwidth: float | None  # bytes/s, peak

    @property
    def seconds(self) -> float | None:
        return None if not self.bandwidth else (self.weights + self.kv_cache) / self.bandwidth


@dataclass(frozen=True)
class Roofline:
    """Decode tokens/s the memory bandwidth allows (an estimate) and the fraction the run reached."""

    gpus: tuple[GPUBound, ...]
    batch: int
    context: int  # average tokens in the KV cache during decode
    measured_tokens_per_s: float | None
    simulated: bool
    note: str = "estimate: peak memory bandwidth (NVML clocks / known GPUs table); real kernels reach 80-90%"
    together: bool = False  # tensor parallel: the GPUs read their shares at once (else one after another)

    @property
    def step_seconds(self) -> float | None:
        """A layer split: each GPU in turn (the sum); tensor parallel: all at once (the slowest GPU)."""
        times = [g.seconds for g in self.gpus]
        if not times or None in times:
            return None
        return max(times) if self.together else sum(times)

    @property
    def tokens_per_s(self) -> float | None:
        step = self.step_seconds
        return None if not step else self.batch / step

    @property
    def fraction(self) -> float | None:
        """Measured / bound; None when the run was on the CPU (simulated) or the bound is unknown."""
        if self.simulated or not self.tokens_per_s or self.measured_tokens_per_s is None:
            return None
        return self.measured_tokens_per_s / self.tokens_per_s

    def __repr__(self) -> str:
        bound = "n/a (bandwidth unknown)" if self.tokens_per_s is None else f"{self.tokens_per_s:,.0f} tokens/s"
        frac = "" if self.fraction is None else f", reached {self.fraction:.1%}"
        sim = " [bound for the simulated GPUs; the run was on CPU]" if self.simulated else ""
        per = "; ".join(f"cuda:{g.cuda_index} {format_size(g.weights + g.kv_cache, 'auto')} read at "
                        f"{'n/a' if not g.bandwidth else f'{g.bandwidth / 1e12:.2f} TB/s'}" for g in self.gpus)
        return f"decode roofline ({self.note}): {bound}{frac}{sim} — {per}"


def bandwidth(gpu) -> float | None:
    if gpu is None:
        return None
    if gpu.memory_bandwidth:
        return float(gpu.memory_bandwidth)
    spec = specs.match_name(gpu.name)
    return spec.bandwidth if spec else None


def estimate(model, batch: int, prompt_len: int, new_tokens: int, measured_tokens_per_s: float | None,
             simulated: bool) -> Roofline:
    where = placement.gpu_map(model)
    weights = placement.bytes_per_device(model, where)
    context = prompt_len + new_tokens // 2
    dtype = dtype_name(next(model.parameters()).dtype)
    kv_per_layer, _ = memory.kv_per_layer(model.config, dtype, batch, context)  # the planner's rule
    kv = defaultdict(int)
    for layer, device in enumerate(placement.layer_devices(model, where)):
        kv[device] += kv_per_layer.get(layer, 0)
    targets = visibility.current().targets
    report = getattr(model, "nbgpu_load", None)
    planned = {d.cuda_index: d.gpu for d in report.plan.devices} if report is not None and report.plan else {}
    bounds = []
    for n in sorted(d for d in weights if isinstance(d, int)):
        gpu = planned.get(n) or (targets[n].gpu if n < len(targets) else None)
        bounds.append(GPUBound(n, gpu.name if gpu else None, weights[n], kv[n], bandwidth(gpu)))
    return Roofline(tuple(bounds), batch, context, measured_tokens_per_s, simulated)


def estimate_tensor_parallel(model, batch: int, prompt_len: int, new_tokens: int,
                             measured_tokens_per_s: float | None) -> Roofline:
    """The bound for a tensor-parallel model: each GPU reads its shard and its share of the KV cache every step,
    all GPUs at once; the all-reduces between them are left out (a bound)."""
    report = model.nbgpu_load
    context = prompt_len + new_tokens // 2
    kv_per_layer, _ = memory.kv_per_layer(model.config, report.dtype, batch, context)
    heads = getattr(getattr(report, "plan", None), "heads", None)
    share = heads.kv_heads_per_gpu / heads.kv_heads if heads is not None else 1 / model.world_size
    kv = int(sum(kv_per_layer.values()) * share)
    bounds = tuple(GPUBound(row.cuda_index, gpu.name, row.weights, kv, bandwidth(gpu))
                   for row, gpu in zip(report.gpus, model.gpus))
    return Roofline(bounds, batch, context, measured_tokens_per_s, model.simulated, together=True)
