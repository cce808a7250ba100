"""`nbgpu.load`: transformers `from_pretrained` with a plan's placement, then the memory it really took per GPU."""

from __future__ import annotations

import os
import tempfile
import time
import warnings
import weakref
from contextlib import contextmanager

from .. import checks, devices, visibility
from ..errors import UsageError
from ..planning.meta_model import dtype_name
from . import arguments, oom, placement
from .report import SIMULATED_NOTE, TOLERANCE, GPUMemory, LoadReport, differences  # noqa: F401
from .report import show as show_report


@arguments.library_errors("the model could not be loaded")
def load(plan_or_model, *, show: bool = True, **from_pretrained_kwargs):
    """Load a model with transformers and measure the memory it took on each GPU.

    `plan_or_model` is an `nbgpu.plan(...)` (its device_map, max_memory and dtype are used) or a path / hub id
    (then `device_map="auto"` unless given). Other keyword arguments go to `from_pretrained` and win over the plan's.
    Returns the model; `model.nbgpu_load` holds the `LoadReport`, which is also displayed in a notebook (`show`).
    With simulated GPUs the model runs on the CPU and the memory is recorded on the simulated GPUs.
    Out of memory: everything is released and `NotEnoughMemory` says what was missing and which plan would fit.
    Code shipped with the model never runs unless you pass trust_remote_code=True; a plan is refused when its
    folder no longer holds the checkpoint it was made for.
    """
    show = checks.boolean(show, "show")
    arguments.load_arguments(plan_or_model, from_pretrained_kwargs)
    if getattr(plan_or_model, "parallel", None) == "tensor":  # worker processes, one per GPU
        from .tensor_parallel import load_plan

        return load_plan(plan_or_model, show=show, **from_pretrained_kwargs)
    plan = None if isinstance(plan_or_model, (str, os.PathLike)) else plan_or_model
    sim = devices.simulated()
    source, kwargs = _arguments(plan, plan_or_model, sim, from_pretrained_kwargs)
    simulated = sim is not None or bool(getattr(plan, "simulated", False))

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    gpu_ids = [] if simulated else _gpu_targets(kwargs.get("device_map"), torch)
    if gpu_ids:
        torch.cuda.init()  # the allocator's per-device stats exist only once CUDA has started in this process
    before = {d: torch.cuda.memory_allocated(d) for d in gpu_ids}
    for d in gpu_ids:
        torch.cuda.reset_peak_memory_stats(d)
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # the "Loading weights" bar
    start = time.perf_counter()
    try:
        model = oom.guarded(lambda: AutoModelForCausalLM.from_pretrained(source, **kwargs),
                            lambda shortage: _load_oom(shortage, plan, source))
    finally:
        if not bar_was_on:
            hf_logging.disable_progress_bar()
    seconds = time.perf_counter() - start
    model.eval()

    report = _report(model, plan, source, sim, simulated, seconds, before, torch,
                     from_pretrained_kwargs.get("device_map"))
    model.nbgpu_load = report
    for w in report.warnings:
        warnings.warn(w, stacklevel=2)
    if show:
        show_report(report)
    return model


def _arguments(plan, plan_or_model, sim, user_kwargs):
    kwargs = dict(user_kwargs)
    if plan is None:
        source = os.fspath(plan_or_model)
        if sim is None:
            kwargs.setdefault("device_map", "auto")
        else:
            kwargs["device_map"] = {"": "cpu"}
            kwargs.pop("max_memory", None)
        return source, kwargs
    for attr in ("source", "device_map", "max_memory", "dtype", "devices", "fits", "simulated"):
        if not hasattr(plan, attr):
            raise UsageError(f"nbgpu.load takes a plan from nbgpu.plan(...) or a model path, not {type(plan).__name__}")
    if not isinstance(plan.source, (str, os.PathLike)):
        raise UsageError("this plan was made from a config, which has no weights to load: save the model with "
                         "save_pretrained (or give a hub id) and plan from that path")
    if not plan.simulated and sim is not None:
        raise UsageError("simulated GPUs are active, but this plan is for real GPUs: run `%gpus --simulate off` "
                         "or make the plan again under simulation")
    if not plan.fits:
        raise UsageError("this plan does not fit (see plan.explain()): use a smaller batch or seq_len, more GPUs, "
                         "or allow offload, then load the new plan")
    import torch

    kwargs.setdefault("dtype", getattr(torch, plan.dtype) if isinstance(plan.dtype, str) else plan.dtype)
    workload = getattr(plan, "workload", None)
    if workload is not None:
        kwargs.setdefault("attn_implementation", workload.attention)
    if plan.simulated:  # GPUs that are not here: run on the CPU, keep the plan's placement for the figures
        kwargs["device_map"] = {"": "cpu"}
        kwargs.pop("max_memory", None)
    else:
        kwargs.setdefault("device_map", dict(plan.device_map))
        kwargs.setdefault("max_memory", dict(plan.max_memory))
        if "disk" in set(kwargs["device_map"].values()):
            kwargs.setdefault("offload_folder", tempfile.mkdtemp(prefix="nbgpu-offload-"))
    return os.fspath(plan.source), kwargs


def _gpu_targets(device_map, torch) -> list[int]:
    if not torch.cuda.is_available():
        return []
    if isinstance(device_map, dict):
        return sorted({d for d in map(placement.normalise, device_map.values()) if isinstance(d, int)})
    if device_map in (None, "cpu"):
        return []
    return list(range(torch.cuda.device_count()))


def _load_oom(shortage: oom.Shortage, plan, source):
    fit = oom.plan_that_fits(plan, shortage)
    if fit is not None:
        offer = f"A plan that fits now: {oom.plan_call(fit)} (in the error's .plan; pass it to nbgpu.load)."
    elif plan is not None:
        offer = ("No smaller batch or sequence makes it fit: plan with more GPUs or allow CPU offload, e.g. "
                 f"nbgpu.plan({source!r}, ...) with offload.")
    else:
        offer = f"Make a plan first: nbgpu.plan({source!r}, batch=..., seq_len=...), or pass max_memory=..."
    return oom.NotEnoughMemory(f"Loading {source} ran {shortage.describe()}. The memory it held has been released "
                               f"and the kernel is usable. {offer}", shortage.missing, shortage.device, fit)


def _simulated_placement(model, device_map, sim) -> dict:
    """Where the model would go on the simulated GPUs this kernel sees, as accelerate places it."""
    if isinstance(device_map, dict):
        return {k: placement.normalise(v) for k, v in device_map.items()}
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    targets = visibility.current().targets
    if not targets:
        raise UsageError("no simulated GPU is visible: `%gpus --simulate 2x24GiB` or `%gpus 0,1` first")
    max_memory = {n: t.gpu.memory_free for n, t in enumerate(targets)}
    no_split = getattr(model, "_no_split_modules", None) or []
    with _quiet_about_simulated_devices():
        if device_map in ("balanced", "balanced_low_0", "auto", None) and len(targets) > 1:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        found = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    return {k: placement.normalise(v) for k, v in found.items()}


class _SimulatedDeviceFilter:
    """accelerate's get_max_memory warns that GPU N 'is not available' when torch sees no such GPU: true of
    simulated GPUs by design, so that one message is dropped while accelerate places the model on them."""

    @staticmethod
    def filter(record) -> bool:
        return "is not available, available devices are" not in record.getMessage()


@contextmanager
def _quiet_about_simulated_devices():
    import logging

    log = logging.getLogger("accelerate.utils.modeling")
    log.addFilter(_SimulatedDeviceFilter)
    try:
        yield
    finally:
        log.removeFilter(_SimulatedDeviceFilter)


def _report(model, plan, source, sim, simulated, seconds, before, torch, user_device_map) -> LoadReport:
    vis = visibility.current()
    if simulated:
        where = dict(plan.device_map) if plan is not None else _simulated_placement(model, user_device_map, sim)
        where = {k: placement.normalise(v) for k, v in where.items()}
    else:
        where = placement.actual_map(model)
    tensor_bytes = placement.bytes_per_device(model, where)
    planned = {d.cuda_index: d for d in plan.devices} if plan is not None else {}
    cuda_ids = sorted({*planned, *(d for d in tensor_bytes if isinstance(d, int))})

    if sim is not None:  # record the planned memory on the simulated GPUs for as long as the model lives
        for n in cuda_ids:
            gpu = _gpu_for(vis, planned, n)
            nbytes = planned[n].weights if n in planned else tensor_bytes.get(n, 0)
            if gpu is not None and nbytes:
                sim.allocate(gpu.index, nbytes)
                weakref.finalize(model, sim.allocate, gpu.index, -nbytes)

    inventory = {g.index: g for g in devices.read()}
    rows = []
    for n in cuda_ids:
        gpu = _gpu_for(vis, planned, n)
        if simulated and sim is None:  # planned for GPUs that are not here: the plan's own reading of them
            now = gpu
        else:
            now = inventory.get(gpu.index) if gpu is not None else None
        real = not simulated and n in before
        own = None
        if now is not None and now.processes:
            own = sum(p.used_memory or 0 for p in now.processes if p.pid == os.getpid()) or None
        rows.append(GPUMemory(
            cuda_index=n, gpu_index=gpu.index if gpu else None, gpu_name=gpu.name if gpu else None,
            planned_weights=planned[n].weights if n in planned else None,
            planned_total=planned[n].total if n in planned else None,
            weights=tensor_bytes.get(n, 0),
            allocated=torch.cuda.memory_allocated(n) - before[n] if real else None,
            reserved=torch.cuda.memory_reserved(n) if real else None,
            peak_reserved=torch.cuda.max_memory_reserved(n) if real else None,
            nvml_process=own, nvml_used=now.memory_used if now else None,
        ))
    report = LoadReport(
        source=source, plan=plan, simulated=simulated, placement=where, gpus=rows, seconds=seconds,
        dtype=dtype_name(next(model.parameters()).dtype),
        cpu_weights=tensor_bytes.get("cpu", 0),
        disk_weights=tensor_bytes.get("disk", 0),
    )
    report.warnings = differences(report)
    return report


def _gpu_for(vis, planned, n):
    if n in planned:
        return planned[n].gpu
    return vis.targets[n].gpu if n < len(vis.targets) else None
