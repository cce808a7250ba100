"""Running out of memory in load or generate: release what the failed call held, then say what was missing and
what would fit, so the kernel stays usable."""

from __future__ import annotations

import gc
import re
import sys
import traceback
from dataclasses import dataclass

from ..errors import UsageError
from ..units import SizeError, format_size, parse_size

_TRIED = re.compile(r"Tried to allocate ([\d.]+ ?[KMGT]?i?B)")
_GPU = re.compile(r"GPU (\d+) has a total capacity of ([\d.]+ ?[KMGT]?i?B) of which ([\d.]+ ?[KMGT]?i?B) is free")
_CPU = re.compile(r"DefaultCPUAllocator: (?:can't allocate memory|not enough memory)(?:: you tried to allocate (\d+))?")


class NotEnoughMemory(UsageError):
    """Out of memory; what was held has been released. `missing` in bytes where known, `plan` a plan that fits."""

    def __init__(self, message: str, missing: int | None = None, device=None, plan=None):
        super().__init__(message)
        self.missing, self.device, self.plan = missing, device, plan


@dataclass(frozen=True)
class Shortage:
    """What an out-of-memory message says."""

    text: str
    tried: int | None  # bytes of the allocation that failed
    free: int | None  # bytes free on the device at the time
    device: int | str | None  # cuda index or "cpu"

    @property
    def missing(self) -> int | None:
        if self.tried is None:
            return None
        return max(self.tried - (self.free or 0), 0) or self.tried

    def describe(self) -> str:
        where = f"cuda:{self.device}" if isinstance(self.device, int) else (self.device or "the device")
        if self.tried is None:
            return f"out of memory on {where}"
        free = f", {format_size(self.free, 'auto')} was free" if self.free is not None else ""
        return (f"out of memory on {where}: {format_size(self.missing, 'auto')} more was needed "
                f"(tried to allocate {format_size(self.tried, 'auto')}{free})")


def _size(text: str | None) -> int | None:
    try:
        return parse_size(text.replace(" ", "")) if text else None
    except SizeError:
        return None


def parse(message: str) -> Shortage:
    """Read torch's out-of-memory message ('Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ...')."""
    tried = _TRIED.search(message)
    gpu = _GPU.search(message)
    cpu = _CPU.search(message)
    if cpu:
        return Shortage(message, int(cpu.group(1)) if cpu.group(1) else None, None, "cpu")
    return Shortage(message, _size(tried.group(1)) if tried else None, _size(gpu.group(3)) if gpu else None,
                    int(gpu.group(1)) if gpu else None)


def is_oom(exc: BaseException) -> bool:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and bool(_CPU.search(str(exc)))


def _drop_traceback(exc: BaseException) -> None:
    """Free the locals of every frame the exception (and its chain) keeps alive: they hold the tensors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if exc.__traceback__ is not None:
            traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


def release_memory() -> None:
    """Drop an earlier out-of-memory error IPython keeps for %debug, collect garbage, empty the CUDA cache."""
    last = getattr(sys, "last_value", None) or getattr(sys, "last_exc", None)
    if last is not None and is_oom(last):
        _drop_traceback(last)
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                setattr(sys, name, None)
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def guarded(call, on_oom):
    """call() -> its result; on out-of-memory, release everything the call held, then raise on_oom(shortage).

    The new error is raised outside the `except` block so it does not chain to (and keep alive) the old one.
    """
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - anything but out-of-memory is re-raised untouched
        if not is_oom(exc):
            raise
        shortage = parse(str(exc))
        _drop_traceback(exc)
        del exc
    call = None  # noqa: F841 - the closure may hold the arguments
    release_memory()
    raise on_oom(shortage)


def plan_that_fits(plan, shortage: Shortage):
    """A re-plan of `plan` (smaller batches, then shorter sequences) that fits and needs at least `missing` bytes
    less on the device that ran out than `plan` did; None when none does."""
    if plan is None:
        return None
    batch, seq_len = int(plan.batch), int(plan.seq_len)
    candidates = []
    b = batch // 2
    while b >= 1:
        candidates.append((b, seq_len))
        b //= 2
    s = seq_len // 2
    while s >= 16:
        candidates.append((1, s))
        s //= 2
    before = {d.cuda_index: d.total for d in plan.devices}
    for b, s in candidates:
        try:
            cand = plan.with_batch(batch=b, seq_len=s)
        except Exception:  # noqa: BLE001 - a candidate the planner refuses is simply not offered
            continue
        if cand is None or not cand.fits:
            continue
        after = {d.cuda_index: d.total for d in cand.devices}
        if shortage.device in before and shortage.device in after and shortage.missing is not None:
            if before[shortage.device] - after[shortage.device] >= shortage.missing:
                return cand
        elif sum(after.values()) < sum(before.values()):
            return cand
    return None


def plan_call(plan) -> str:
    source = plan.source if isinstance(plan.source, str) else "<config>"
    return f"nbgpu.plan({source!r}, batch={plan.batch}, seq_len={plan.seq_len})"
