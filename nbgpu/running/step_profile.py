"""Where one decode step's time goes on each GPU, from the kernels the GPUs really ran (torch.profiler / CUPTI).

A few tokens are generated with the very generation config that was measured (eager or compiled, CUDA graphs
included) while the profiler records; a logits processor launches a tiny marker kernel on every GPU after each
token, so the kernels between the last two markers of a GPU are one decode step's. Each kernel is put in a
category by its name: matrix products, communication (NCCL collectives) or other work; the rest of the step the
GPU was idle (waiting for the host, or for another GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

MARKER = "spin_kernel"  # what torch.cuda._sleep launches
_MATRIX = ("gemm", "cutlass", "xmma", "cublas", "matmul", "nvjet", "splitk", "gemv", "wgmma")
_COMM = ("nccl", "allreduce", "all_reduce", "allgather", "all_gather", "reducescatter", "reduce_scatter")


def category(kernel: str) -> str:
    name = kernel.lower()
    if any(k in name for k in _COMM):
        return "communication"
    if any(k in name for k in _MATRIX):
        return "matrix"
    return "other"


@dataclass(frozen=True)
class Span:
    device: int
    start_us: float  # from the step's start on that GPU
    end_us: float
    name: str
    category: str


@dataclass(frozen=True)
class StepProfile:
    """One decode step's kernels per GPU; times in microseconds from the step's start."""

    spans: tuple[Span, ...]
    step_us: dict  # device -> time from this step's marker to the next on that GPU

    def busy_us(self, device) -> float:
        """Time at least one kernel ran on `device` (overlapping kernels counted once)."""
        total, end = 0.0, None
        for s in sorted((s for s in self.spans if s.device == device), key=lambda s: s.start_us):
            if end is None or s.start_us > end:
                total, end = total + s.end_us - s.start_us, s.end_us
            elif s.end_us > end:
                total, end = total + s.end_us - end, s.end_us
        return total

    def by_category(self, device) -> dict[str, float]:
        out = {"matrix": 0.0, "communication": 0.0, "other": 0.0}
        for s in self.spans:
            if s.device == device:
                out[s.category] += s.end_us - s.start_us
        return out


class _Markers:
    """Logits processor: a marker kernel on every GPU after each token."""

    def __init__(self, devices):
        self.devices = list(devices)

    def __call__(self, input_ids, scores):
        import torch

        for d in self.devices:
            with torch.cuda.device(d):
                torch.cuda._sleep(1)
        return scores


def profile_decode(model, ids, gen, cuda_devices, processors=(), tokens: int = 4,
                   common_clock: bool = True) -> StepProfile | None:
    """Profile `tokens` tokens of generate with `gen` (a copy with that many tokens) and return the last full
    decode step per GPU; None where the profiler saw no kernel (CUPTI unavailable)."""
    import copy

    import torch
    from torch.profiler import ProfilerActivity, profile

    gen = copy.deepcopy(gen)
    gen.update(max_new_tokens=tokens, min_new_tokens=tokens)
    devices = list(cuda_devices)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                       logits_processor=[*processors, _Markers(devices)])
        for d in devices:
            torch.cuda.synchronize(d)
    kernels = [(e.device_index, e.time_range.start, e.time_range.end, e.name) for e in prof.events()
               if e.device_type.name == "CUDA" and e.device_index in devices]
    return from_kernels(kernels, devices, common_clock)


def from_kernels(kernels, devices, common_clock: bool = True) -> StepProfile | None:
    """Kernels (device, start_us, end_us, name) to the last full step between markers on each device. With
    `common_clock` (one process: CUPTI stamps every GPU on one clock) all devices share the earliest start as
    their origin, so the spans show which GPU worked when; otherwise each device starts at its own marker."""
    windows, mine = {}, {}
    for d in devices:
        mine[d] = sorted((k for k in kernels if k[0] == d), key=lambda k: k[1])
        marks = [k for k in mine[d] if MARKER in k[3]]
        if len(marks) < 2:
            return None
        windows[d] = (marks[-2][2], marks[-1][1])
    origin = min(start for start, _ in windows.values())
    spans, steps = [], {}
    for d, (start, end) in windows.items():
        zero = origin if common_clock else start
        steps[d] = end - zero
        spans += [Span(d, k[1] - zero, k[2] - zero, k[3], category(k[3]))
                  for k in mine[d] if k[1] >= start and k[2] <= end and MARKER not in k[3]]
    return StepProfile(tuple(spans), steps)
