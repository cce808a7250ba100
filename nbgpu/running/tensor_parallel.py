"""A tensor-parallel model in the notebook: `nbgpu.load(plan)` for a plan with `parallel="tensor"`.

One worker process per GPU (`torch.multiprocessing.start_processes`, spawn) joins a torch.distributed group (NCCL on
GPUs; gloo on the CPU for simulated GPUs) and loads its shard with transformers' `tp_plan="auto"`. The kernel keeps a
`TensorParallelModel` handle across cells and never starts CUDA itself: `generate`, the bench protocol and the step
profile run in every worker with the same inputs, and rank 0's result comes back as CPU tensors. Worker output shows
in the cell that made the call, each line prefixed by its rank.

Stopping. The workers stop on `close()`, when the handle is garbage-collected (weakref.finalize, which holds only
the processes), at kernel shutdown or restart (atexit; and a worker is SIGKILLed by the kernel's death through
PR_SET_PDEATHSIG, or leaves on EOF of its command pipe), and when one of them dies (the others are stopped and its
exit or traceback is shown). They ignore SIGINT, which Jupyter sends to the kernel's whole process group.

Interrupt (KeyboardInterrupt in the kernel during a call) is cancelled cooperatively. A collective cannot be cut on
one rank alone: a rank that left `generate` early would leave the others waiting in their next all-reduce. So every
generated token passes a check that counts tokens per rank in shared memory; on Interrupt the kernel sets, under the
same lock, a stop count one past the furthest rank, and every rank raises at exactly that token, with no collective
left half-done. The handle stays usable and the KeyboardInterrupt is re-raised. Where no rank reaches a token within
`tp_processes.CANCEL_GRACE_S` (loading, compiling, a long prefill) or on a second Interrupt, the workers are stopped
and the handle says so: cancelling there would need every rank to stop inside the same GPU operation, which none can.
Likewise a rank that raises while the others wait for it in a collective: after `tp_processes.ERROR_GRACE_S` every
worker is stopped and the error is shown; an error every rank raises alike (a bad argument) leaves the model usable.
`PR_SET_PDEATHSIG` follows the thread that started the workers: load from the notebook's main thread (as cells run).
"""

from __future__ import annotations

import atexit
import itertools
import os
import pickle
import time
import warnings
import weakref

from .. import devices, visibility
from ..errors import UsageError
from ..units import format_size
from . import tp_processes
from .report import SIMULATED_NOTE, GPUMemory, LoadReport, differences
from .tp_processes import TensorParallelError

__all__ = ["TensorParallelError", "TensorParallelModel", "load_plan", "start"]

LOAD_TIMEOUT_S = 3600  # the process group's timeout: sharded loading of a large model can take long on one rank

_LIVE: dict[int, tp_processes.Workers] = {}  # every running set of workers, stopped at exit
_KEYS = itertools.count()
_at_exit_registered = False


def _stop_workers(key: int, reason: str) -> None:
    workers = _LIVE.pop(key, None)
    if workers is not None:
        workers.stop(reason)


def _stop_all_at_exit() -> None:
    for key in list(_LIVE):
        _stop_workers(key, "the kernel shut down")


def _register_at_exit() -> None:
    """Registered after multiprocessing's own exit hook (which joins live children), so it runs before it."""
    global _at_exit_registered
    if not _at_exit_registered:
        import multiprocessing.util  # noqa: F401 - its atexit hook must be registered first

        atexit.register(_stop_all_at_exit)
        _at_exit_registered = True


class TensorParallelModel:
    """A model sharded over worker processes, one per GPU. Use it like a transformers model for `generate`;
    `close()` stops the workers. `nbgpu_load` is the LoadReport (per GPU: plan beside measured memory)."""

    def __init__(self, workers: tp_processes.Workers, report: LoadReport, config, generation_config, gpus: list):
        self._workers = workers
        self.nbgpu_load = report
        self.config, self.generation_config = config, generation_config
        self.gpus = list(gpus)
        self._key = next(_KEYS)
        _LIVE[self._key] = workers
        _register_at_exit()
        self._finalize = weakref.finalize(self, _stop_workers, self._key, "the model handle was garbage-collected")

    # --- what it is ------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self._workers.n

    @property
    def simulated(self) -> bool:
        return self.nbgpu_load.simulated

    @property
    def pids(self) -> list[int]:
        return list(self._workers.pids)

    @property
    def closed(self) -> bool:
        return self._workers.reason is not None

    @property
    def name(self) -> str:
        return str(getattr(self.config, "_name_or_path", "") or "model").rstrip("/").split("/")[-1]

    def check_running(self) -> None:
        """UsageError (saying why) when the workers are gone."""
        self._workers.check_running()

    # --- calls -----------------------------------------------------------------------------------------------
    def generate(self, input_ids=None, **generate_kwargs):
        """`generate` on every worker with the same inputs; returns rank 0's output (CPU tensors).

        Keyword arguments go to transformers' generate and must be picklable (no streamer: output is shown). With
        return_dict_in_generate, the output has no KV cache (each rank's cache holds only its heads)."""
        import torch

        self._workers.check_running()
        if input_ids is None:
            input_ids = generate_kwargs.pop("inputs", None)
        if input_ids is None:
            raise UsageError("generate needs input_ids: a tensor of token ids (batch x length), e.g. "
                             "tokenizer(text, return_tensors='pt').input_ids")
        ids = torch.as_tensor(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if "streamer" in generate_kwargs:
            raise UsageError("a streamer cannot run in the workers: the worker output already shows in the cell; "
                             "decode the returned tokens instead")
        _check_picklable(generate_kwargs, "generate's keyword arguments")
        return self._workers.call("generate", ids.cpu(), generate_kwargs)[0]

    def measure(self, ids, *, new_tokens: int, repeats: int, warmup: int, compile: bool = False):
        """The bench protocol (nbgpu.running.protocol) in every worker on the same prompt `ids`.

        Returns (rank 0's RunTimes list, {rank: peak bytes allocated}); peaks are empty on simulated GPUs."""
        replies = self._workers.call("bench", ids.cpu(), new_tokens, repeats, warmup, compile)
        peaks = {rank: r["peak"] for rank, r in enumerate(replies) if r["peak"] is not None}
        return replies[0]["runs"], peaks

    def profile_decode(self, ids, *, new_tokens: int = 16, compile: bool = False):
        """One decode step per GPU from the kernels each worker's GPU ran (step_profile.StepProfile, devices = ranks,
        each rank on its own clock from its step's start); None on simulated GPUs or where CUPTI saw nothing."""
        from .step_profile import StepProfile

        profiles = self._workers.call("profile", ids.cpu(), new_tokens, compile)
        if any(p is None for p in profiles):
            return None
        return StepProfile(tuple(s for p in profiles for s in p.spans),
                           {d: us for p in profiles for d, us in p.step_us.items()})

    def close(self) -> None:
        """Stop the workers and free their memory (idempotent)."""
        self._finalize.detach()
        _stop_workers(self._key, "closed with model.close()")
        self._workers.stop("closed with model.close()")
        self._workers.show_remaining_output()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        kind = "simulated GPUs, gloo workers on the CPU" if self.simulated else "GPUs, NCCL workers"
        sim = f" [{SIMULATED_NOTE}]" if self.simulated else ""
        lines = [f"TensorParallelModel {self.name}: tensor-parallel over {self.world_size} {kind}, "
                 f"{self.nbgpu_load.dtype}{sim}"]
        alive = self._workers.alive()
        for rank, (gpu, row) in enumerate(zip(self.gpus, self.nbgpu_load.gpus)):
            state = "running" if alive[rank] else "stopped"
            alloc = "" if row.allocated is None else f", allocated {format_size(row.allocated, 'auto')}"
            planned = "" if row.planned_weights is None else \
                f" (plan {format_size(row.planned_weights, 'auto')})"
            lines.append(f"  rank {rank}: cuda:{rank} = GPU {gpu.index} {gpu.name or 'n/a'}, pid "
                         f"{self._workers.pids[rank]} {state}; weights {format_size(row.weights, 'auto')}"
                         f"{planned}{alloc}")
        if self.closed:
            lines.append(f"  closed: {self._workers.reason}")
        return "\n".join(lines)


def _check_picklable(value, what: str) -> None:
    try:
        pickle.dumps(value)
    except Exception as exc:  # noqa: BLE001 - any pickling failure means it cannot reach the workers
        raise UsageError(f"{what} must be picklable to reach the worker processes: {exc}") from None


# --- starting ------------------------------------------------------------------------------------------------

def load_plan(plan, *, show: bool = True, **from_pretrained_kwargs) -> TensorParallelModel:
    """`nbgpu.load(plan)` for a plan with parallel='tensor': the plan's GPUs, dtype and per-GPU figures."""
    for attr in ("source", "dtype", "gpus", "devices", "fits", "simulated"):
        if not hasattr(plan, attr):
            raise UsageError(f"nbgpu.load takes a plan from nbgpu.plan(...), not {type(plan).__name__}")
    if not isinstance(plan.source, (str, os.PathLike)):
        raise UsageError("this plan was made from a config, which has no weights to load: save the model with "
                         "save_pretrained (or give a hub id) and plan from that path")
    if not plan.simulated and devices.simulated() is not None:
        raise UsageError("simulated GPUs are active, but this plan is for real GPUs: run `%gpus --simulate off` "
                         "or make the plan again under simulation")
    if not plan.fits:
        raise UsageError("this plan does not fit (see plan.explain()): use a smaller batch or seq_len, or more "
                         "GPUs, then load the new plan")
    return start(plan.source, list(plan.gpus), dtype=plan.dtype, plan=plan, show=show, **from_pretrained_kwargs)


def start(source, gpus=2, *, dtype="bfloat16", plan=None, show: bool = True,
          **from_pretrained_kwargs) -> TensorParallelModel:
    """Load `source` tensor-parallel over `gpus`: a count (the first N GPUs this kernel sees, simulated ones
    included) or a list of GPUs from the inventory. Extra keyword arguments go to `from_pretrained`."""
    from ..planning.meta_model import dtype_name

    gpu_list = _gpus(gpus)
    simulated = plan.simulated if plan is not None else any(g.simulated for g in gpu_list)
    if len(gpu_list) < 2:
        raise UsageError("tensor parallelism needs at least 2 GPUs; for one GPU load without parallel='tensor'")
    if "device_map" in from_pretrained_kwargs or "tp_plan" in from_pretrained_kwargs:
        raise UsageError("a tensor-parallel load places the model itself (tp_plan='auto'): drop device_map/tp_plan")
    _check_picklable(from_pretrained_kwargs, "from_pretrained's keyword arguments")
    n = len(gpu_list)
    spec = dict(world_size=n, port=tp_processes.free_port(), simulated=simulated, source=os.fspath(source),
                visible_tokens=[] if simulated else _tokens(gpu_list), dtype=dtype_name(dtype),
                from_pretrained=from_pretrained_kwargs, parent_pid=os.getpid(), timeout_s=LOAD_TIMEOUT_S,
                threads=max(1, (os.cpu_count() or 1) // n))
    labels = [f"rank {r} (GPU {g.index}{', simulated' if simulated else ''})" for r, g in enumerate(gpu_list)]
    started = time.perf_counter()
    workers = tp_processes.Workers(spec, labels)
    try:
        infos = workers.wait_ready()
        report = _report(infos, gpu_list, plan, spec, simulated, workers, time.perf_counter() - started)
    except BaseException:
        workers.stop("the load did not finish", graceful=False)
        raise
    model = TensorParallelModel(workers, report, infos[0]["config"], infos[0]["generation_config"], gpu_list)
    for w in report.warnings:
        warnings.warn(w, stacklevel=3)
    if show:
        show(report)
    return model


def _gpus(gpus) -> list:
    if isinstance(gpus, int) and not isinstance(gpus, bool):
        visible = [t.gpu for t in visibility.current().targets]
        if not 1 <= gpus <= len(visible):
            raise UsageError(f"gpus={gpus}: this kernel sees {len(visible)} GPU(s): choose them with %gpus (or "
                             "nbgpu.simulate('2xL4') without NVIDIA GPUs)")
        return visible[:gpus]
    if isinstance(gpus, (list, tuple)) and all(isinstance(g, devices.GPU) for g in gpus):
        return list(gpus)
    raise UsageError(f"cannot read gpus={gpus!r}: give a count or a list of GPUs from nbgpu.gpus()")


def _tokens(gpu_list: list) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries for the workers: the kernel's own tokens for those GPUs, in plan order."""
    import torch

    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        raise UsageError("this torch has no CUDA support, so it cannot run workers on GPUs: install a CUDA build "
                         "of torch, or plan for simulated GPUs")
    vis = visibility.current()
    by_index = {t.gpu.index: t.token for t in vis.targets}
    missing = [g.index for g in gpu_list if g.index not in by_index]
    if missing:
        raise UsageError(f"GPU {', '.join(map(str, missing))} is not visible to this kernel "
                         f"(CUDA_VISIBLE_DEVICES={vis.visible_devices!r}): plan for the GPUs it sees (%gpus)")
    return [by_index[g.index] for g in gpu_list]


def _report(infos: list, gpu_list: list, plan, spec: dict, simulated: bool, workers, seconds: float) -> LoadReport:
    """Per GPU: the plan's figures, the shard's bytes and the allocator's figures measured in its worker, and NVML's
    reading of the worker's process, from the kernel. `seconds`: starting the workers and loading, as waited."""
    planned = list(plan.devices) if plan is not None else []
    sim = devices.simulated()
    if sim is not None:  # the plan's figures (else the shards' bytes) shown on the simulated GPUs until close
        for rank, gpu in enumerate(gpu_list):
            nbytes = planned[rank].weights if planned else infos[rank]["weights"]
            sim.allocate(gpu.index, nbytes)
            workers.on_stop.append(lambda index=gpu.index, nbytes=nbytes: sim.allocate(index, -nbytes))
    if simulated and sim is None:  # planned for GPUs that are not here: the plan's own reading of them
        inventory = {g.index: g for g in gpu_list}
    else:  # NVML (or the simulated GPUs), read from the kernel: it never starts CUDA
        inventory = {g.index: g for g in devices.read()}
    rows = []
    for rank, (gpu, info) in enumerate(zip(gpu_list, infos)):
        now = inventory.get(gpu.index)
        pid = os.getpid() if simulated else info["pid"]  # simulated GPUs show their memory under the kernel
        own = None
        if now is not None:
            own = sum(p.used_memory or 0 for p in now.processes if p.pid == pid) or None
        rows.append(GPUMemory(
            cuda_index=rank, gpu_index=gpu.index, gpu_name=gpu.name,
            planned_weights=planned[rank].weights if planned else None,
            planned_total=planned[rank].total if planned else None,
            weights=info["weights"], allocated=info["allocated"], reserved=info["reserved"],
            peak_reserved=info["peak_reserved"], nvml_process=own, nvml_used=now.memory_used if now else None))
    report = LoadReport(source=spec["source"], plan=plan, simulated=simulated,
                        placement={"": tuple(range(len(gpu_list)))}, gpus=rows,
                        seconds=seconds, dtype=infos[0]["dtype"])
    report.warnings = differences(report)
    return report


# --- bench ---------------------------------------------------------------------------------------------------

def simulated_busy(model: TensorParallelModel, busy: bool, share: dict | None = None) -> None:
    """While a simulated run goes, every simulated GPU of a tensor-parallel model shows as utilisation the share of
    a step it is modelled busy (`share`, by rank), else 100% (all work at once)."""
    sim = devices.simulated()
    if sim is None or not model.simulated:
        return
    for row in model.nbgpu_load.gpus:
        if row.gpu_index is not None and row.gpu_index < len(sim):
            percent = round(100 * share.get(row.cuda_index, 0.0)) if share is not None else 100
            sim.set_utilization(row.gpu_index, percent if busy else 0)
