"""Which GPU was busy when during one decode step, and where its time went.

On GPUs the timeline comes from the kernels the profiler saw during the measured path itself (eager or compiled,
`step_profile`); on the CPU (simulated GPUs) forward hooks around each placed module time it with the host clock.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from . import placement


@dataclass(frozen=True)
class Interval:
    cuda_index: int
    start_ms: float
    end_ms: float
    modules: str  # first..last module of the block


@dataclass(frozen=True)
class Timeline:
    intervals: tuple[Interval, ...]
    step_ms: float
    simulated: bool
    note: str
    breakdown: dict = field(default_factory=dict)  # cuda index -> {matrix, communication, other, idle}: ms
    modelled: bool = False  # True: placed by the cost model (simulated GPUs, predictions), not measured

    def busy(self) -> dict[int, float]:
        """Fraction of the step each GPU was working."""
        out: dict[int, float] = {}
        for iv in self.intervals:
            out[iv.cuda_index] = out.get(iv.cuda_index, 0.0) + (iv.end_ms - iv.start_ms)
        return {k: (v / self.step_ms if self.step_ms else 0.0) for k, v in sorted(out.items())}

    def __repr__(self) -> str:
        sim = " [simulated — ran on CPU; blocks placed as on the simulated GPUs]" if self.simulated else ""
        if self.modelled:
            sim = " [modelled for the simulated GPUs, not measured]" if self.simulated else " [modelled, not measured]"
        busy = ", ".join(f"cuda:{k} {v:.0%}" for k, v in self.busy().items())
        parts = [f"one decode step: {self.step_ms:.2f} ms; busy {busy}{sim}"]
        for device, cats in self.breakdown.items():
            parts.append(f"cuda:{device} " + ", ".join(f"{k} {v:.2f} ms" for k, v in cats.items()))
        return "; ".join(parts)


def from_profile(profile, note: str, merge_gap_us: float = 2.0) -> Timeline:
    """A Timeline from a step profile: kernels closer than `merge_gap_us` merged into busy blocks, and per GPU the
    time in matrix products, communication, other kernels and idle."""
    intervals: list[Interval] = []
    for device in sorted(profile.step_us):
        spans = sorted((s for s in profile.spans if s.device == device), key=lambda s: s.start_us)
        block: list = []
        for s in spans:
            if block and s.start_us - max(b.end_us for b in block) > merge_gap_us:
                intervals.append(_block(device, block))
                block = []
            block.append(s)
        if block:
            intervals.append(_block(device, block))
    breakdown = {}
    for device, step_us in sorted(profile.step_us.items()):
        cats = {k: v / 1e3 for k, v in profile.by_category(device).items()}
        cats["idle"] = max(0.0, step_us - profile.busy_us(device)) / 1e3
        breakdown[device] = cats
    step_ms = max(profile.step_us.values(), default=0.0) / 1e3
    return Timeline(tuple(intervals), step_ms, False, note, breakdown)


def _block(device: int, spans) -> Interval:
    kinds: dict[str, float] = {}
    for s in spans:
        kinds[s.category] = kinds.get(s.category, 0.0) + s.end_us - s.start_us
    what = ", ".join(f"{k} {v / 1e3:.3f} ms" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
    end = max(s.end_us for s in spans)
    return Interval(device, spans[0].start_us / 1e3, end / 1e3, f"{len(spans)} kernels: {what}")


def _merge(records) -> list[Interval]:
    """Consecutive module calls on the same device become one block."""
    out: list[Interval] = []
    for device, name, start, end in sorted(records, key=lambda r: r[2]):
        last = out[-1] if out else None
        if last is not None and last.cuda_index == device:
            first_name = last.modules.split(" .. ")[0]
            out[-1] = Interval(device, last.start_ms, max(last.end_ms, end), f"{first_name} .. {name}")
        else:
            out.append(Interval(device, start, end, name))
    return out


def _hooked_modules(model, device_map: dict):
    """(module, name, cuda index) for each entry of the map that sits on a GPU."""
    modules = dict(model.named_modules())
    for name, device in device_map.items():
        device = placement.normalise(device)
        if isinstance(device, int) and name in modules:
            yield modules[name], name or type(model).__name__, device


def decode_step(model, input_ids, simulated: bool) -> Timeline:
    """Prefill `input_ids`, then time one single-token decode step block by block."""
    import torch

    device_map = placement.gpu_map(model)
    real = placement.cuda_devices(model)
    sync = placement.synchronizer(real)
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
        next_ids = out.logits[:, -1:].argmax(-1).to(input_ids.device)
        cache = placement.cache_of(out)
        del out
        records, handles, pending = [], [], {}
        use_events = bool(real) and not simulated
        refs = {}

        def stamp(device):
            if use_events:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(torch.cuda.current_stream(device))
                return ev
            return time.perf_counter()

        def pre(name, device):
            def hook(module, args):
                pending[name] = stamp(device)
            return hook

        def post(name, device):
            def hook(module, args, output):
                records.append((device, name, pending.pop(name), stamp(device)))
            return hook

        for module, name, device in _hooked_modules(model, device_map):
            handles.append(module.register_forward_pre_hook(pre(name, device)))
            handles.append(module.register_forward_hook(post(name, device)))
        try:
            sync()
            devices = sorted({r for r in (d for _, _, d in _hooked_modules(model, device_map))})
            refs = {d: stamp(d) for d in devices}  # all GPUs idle: these mark the same instant on each
            model(input_ids=next_ids, use_cache=True, **{placement.cache_argument(model): cache})
            sync()
        finally:
            for h in handles:
                h.remove()

    def ms(device, mark):
        return refs[device].elapsed_time(mark) if use_events else (mark - refs[device]) * 1e3

    timed = [(d, name, ms(d, a), ms(d, b)) for d, name, a, b in records]
    intervals = _merge(timed)
    step = max((iv.end_ms for iv in intervals), default=0.0) - min((iv.start_ms for iv in intervals), default=0.0)
    origin = min((iv.start_ms for iv in intervals), default=0.0)
    intervals = [Interval(iv.cuda_index, iv.start_ms - origin, iv.end_ms - origin, iv.modules) for iv in intervals]
    note = ("CUDA events around each device's modules (forward hooks); devices aligned at a synchronised start, "
            "to within a few microseconds" if use_events else
            "host clock around each module on the CPU; device = where the module is placed")
    return Timeline(tuple(intervals), step, simulated, note)
