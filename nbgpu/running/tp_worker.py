"""One tensor-parallel worker: a process per GPU, started by `torch.multiprocessing.start_processes` (spawn).

It joins a torch.distributed group (NCCL on GPUs, gloo on the CPU for simulated GPUs), loads its shard of the
model with transformers' `tp_plan="auto"`, then runs the kernel's commands (generate, bench, profile) until told to
stop, the command pipe closes, or the kernel dies (PR_SET_PDEATHSIG). Every rank runs every command with the same
inputs, so the collectives meet. Its stdout and stderr (Python's and C's, file descriptors 1 and 2) go back to the
kernel through the command pipe, and are flushed before each reply, so they show in the cell that made the call.

Cancellation is cooperative (see tensor_parallel.py): every generated token passes a `CancelPoint`, which counts the
tokens in shared memory and raises `Cancelled` at the count the kernel set, the same count on every rank.
"""

from __future__ import annotations

import codecs
import ctypes
import io
import os
import pickle
import signal
import sys
import threading
import time
import traceback

NO_MULTICAST = {  # NVLink multicast (NVLS) can take a shared host's GPUs down: off unless the user set them
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
NEVER = 2**62  # the cancel count while no cancellation is asked for
_PR_SET_PDEATHSIG = 1
_FLUSH = b"\x00nbgpu-flush\x00"  # written to fds 1 and 2 to know every byte before it has gone to the kernel


class Cancelled(Exception):
    """Raised on every rank at the same generated token when the kernel cancels the call."""

    def __init__(self, step: int):
        super().__init__(f"cancelled at token {step}")
        self.step = step


class CancelPoint:
    """A logits processor: counts this rank's generated tokens and raises `Cancelled` at the kernel's stop count.

    `shared` holds one count per rank and, last, the stop count; the kernel sets the stop count to one more than the
    highest count, under the same lock, so every rank (at most one token apart, the collectives see to that) next
    reaches exactly that count and stops there."""

    def __init__(self, shared, rank: int):
        self.shared, self.rank, self.fired = shared, rank, False

    def __call__(self, input_ids, scores):
        with self.shared.get_lock():
            self.shared[self.rank] += 1
            count, stop = self.shared[self.rank], self.shared[len(self.shared) - 1]
        if count >= stop:
            self.fired = True
            raise Cancelled(count)
        return scores


class _CPUPickler(pickle.Pickler):
    """Pickles any GPU tensor as a CPU copy: unpickling a CUDA tensor in the kernel would start CUDA there."""

    def reducer_override(self, obj):
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor) and obj.device.type != "cpu":
            local = obj.to_local() if hasattr(obj, "to_local") else obj
            return local.detach().cpu().__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        return NotImplemented


class Channel:
    """The worker's end of the command pipe: pickled messages, sent whole by one thread at a time."""

    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()

    def send(self, *message) -> None:
        buffer = io.BytesIO()
        _CPUPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
        with self.lock:
            self.conn.send_bytes(buffer.getbuffer())

    def receive(self) -> bytes:
        return self.conn.recv_bytes()


def _bar_on_stdout(factory, args, kwargs):
    """transformers' tqdm hook: a progress bar written to stdout unless its caller chose a file."""
    return factory(*args, **{"file": sys.stdout, **kwargs})


class OutputForwarder:
    """Sends everything written to fds 1 and 2 (print, warnings, tqdm, C++ logs) to the kernel as ("out", ...)."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.seen = {1: threading.Event(), 2: threading.Event()}
        for fd, name in ((1, "stdout"), (2, "stderr")):
            read, write = os.pipe()
            os.dup2(write, fd)
            os.close(write)
            threading.Thread(target=self._pump, args=(read, fd, name), daemon=True, name=f"nbgpu-{name}").start()
        for stream in (sys.stdout, sys.stderr):
            if stream is not None and hasattr(stream, "reconfigure"):
                stream.reconfigure(line_buffering=True)

    def _pump(self, read: int, fd: int, name: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = b""
        while True:
            chunk = os.read(read, 65536)
            if not chunk:
                return
            pending += chunk
            while (at := pending.find(_FLUSH)) >= 0:
                self._emit(name, decoder.decode(pending[:at]))
                pending = pending[at + len(_FLUSH):]
                self.seen[fd].set()
            keep = next((n for n in range(len(_FLUSH) - 1, 0, -1) if pending.endswith(_FLUSH[:n])), 0)
            cut = len(pending) - keep
            self._emit(name, decoder.decode(pending[:cut]))
            pending = pending[cut:]

    def _emit(self, name: str, text: str) -> None:
        if text:
            try:
                self.channel.send("out", name, text)
            except OSError:  # the kernel has gone; the worker ends with it
                pass

    def flush(self, timeout: float = 10.0) -> None:
        """Return once everything written so far has been sent to the kernel (so it precedes the next reply)."""
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        for fd in (1, 2):
            self.seen[fd].clear()
            os.write(fd, _FLUSH)
            self.seen[fd].wait(timeout)


# --- process set-up -----------------------------------------------------------------------------------------

def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this worker when the kernel dies, whatever the worker is doing (stuck in a collective included)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the kernel died before the line above ran
        os._exit(1)


def _environment(rank: int, spec: dict) -> None:
    """torchrun's variables, the GPUs this worker sees, and no NVLink multicast unless the user set it."""
    world = str(spec["world_size"])
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=world, LOCAL_WORLD_SIZE=world,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    for name, value in NO_MULTICAST.items():
        os.environ.setdefault(name, value)
    if spec["simulated"]:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # a simulated GPU is a CPU process, even on a machine with GPUs
    else:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(spec["visible_tokens"])


def _distributed_kwargs(world_size: int) -> dict:
    """`distributed_config=DistributedConfig(tp_plan="auto")` where transformers has it, else `tp_plan="auto"`."""
    import dataclasses

    try:
        from transformers import DistributedConfig
    except ImportError:
        return {"tp_plan": "auto"}
    fields = {f.name for f in dataclasses.fields(DistributedConfig)} if dataclasses.is_dataclass(DistributedConfig) \
        else set()
    if "tp_plan" not in fields:
        return {"tp_plan": "auto"}
    return {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=world_size)}


def local_bytes(model) -> int:
    """Bytes of this rank's parameters and buffers: a DTensor counts its local shard only."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.numel() * local.element_size()
    return total


class Worker:
    """The loaded shard and the commands it runs."""

    def __init__(self, rank: int, spec: dict, shared):
        import datetime

        import torch
        import torch.distributed as dist

        self.rank, self.spec, self.shared = rank, spec, shared
        self.on_gpu = not spec["simulated"]
        init = f"tcp://127.0.0.1:{spec['port']}"
        timeout = datetime.timedelta(seconds=spec["timeout_s"])
        if self.on_gpu:
            torch.cuda.set_device(rank)
            self.device = torch.device("cuda", rank)
            dist.init_process_group("nccl", init_method=init, rank=rank, world_size=spec["world_size"],
                                    timeout=timeout, device_id=self.device)
            self.before = torch.cuda.memory_allocated(rank)
            torch.cuda.reset_peak_memory_stats(rank)
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(spec["threads"])  # the CPU's cores shared between the workers
            dist.init_process_group("gloo", init_method=init, rank=rank, world_size=spec["world_size"],
                                    timeout=timeout)
        self.model = None

    def load(self) -> dict:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        # the "Loading weights" bar, from rank 0 only, on stdout: in a notebook stderr reads as a warning (a
        # transformers without tqdm hooks shows no bar)
        set_hook = getattr(hf_logging, "set_tqdm_hook", None)
        if self.rank == 0 and set_hook is not None:
            hf_logging.enable_progress_bar()
            set_hook(_bar_on_stdout)
        else:
            hf_logging.disable_progress_bar()
        kwargs = dict(self.spec["from_pretrained"])
        if self.spec.get("dtype"):
            kwargs.setdefault("dtype", getattr(torch, self.spec["dtype"]))
        start = time.perf_counter()
        kwargs.update(_distributed_kwargs(self.spec["world_size"]))
        model = AutoModelForCausalLM.from_pretrained(self.spec["source"], **kwargs)
        model.eval()
        self.model = model
        param = next(model.parameters())
        info = {"pid": os.getpid(), "seconds": time.perf_counter() - start, "weights": local_bytes(model),
                "dtype": str(param.dtype).replace("torch.", ""), "allocated": None, "reserved": None,
                "peak_reserved": None}
        if self.on_gpu:
            info.update(allocated=torch.cuda.memory_allocated(self.rank) - self.before,
                        reserved=torch.cuda.memory_reserved(self.rank),
                        peak_reserved=torch.cuda.max_memory_reserved(self.rank))
        if self.rank == 0:
            info.update(config=model.config, generation_config=model.generation_config)
        return info

    # --- commands: each returns what the kernel gets from this rank -------------------------------------------
    def _to_device(self, value):
        import torch

        if isinstance(value, torch.Tensor):
            return value.to(self.device)
        return value

    def generate(self, cancel: CancelPoint, input_ids, kwargs: dict):
        import torch
        from transformers import LogitsProcessorList

        kwargs = {k: self._to_device(v) for k, v in kwargs.items()}
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), cancel])
        with torch.no_grad():
            out = self.model.generate(input_ids=self._to_device(input_ids), **kwargs)
        out = _to_cpu(out)  # on every rank: a DTensor in the output is gathered by a collective
        return out if self.rank == 0 else None

    def _cuda(self) -> list[int]:
        return [self.rank] if self.on_gpu else []

    def bench(self, cancel: CancelPoint, ids, new_tokens: int, repeats: int, warmup: int, compile: bool):
        from . import placement, protocol

        gen = protocol.generation_config(self.model, new_tokens, compile)
        processors = [cancel, *([protocol.CudaGraphStep()] if compile else [])]
        runs, peak = protocol.measure(self.model, self._to_device(ids), gen, repeats=repeats, warmup=warmup,
                                      sync=placement.synchronizer(self._cuda()), cuda_devices=self._cuda(),
                                      processors=processors)
        return {"runs": runs if self.rank == 0 else None, "peak": peak.get(self.rank)}

    def profile(self, cancel: CancelPoint, ids, new_tokens: int, compile: bool):
        """One decode step's kernels on this rank's GPU (step_profile), or None on the CPU."""
        from . import protocol, step_profile

        if not self.on_gpu:
            return None
        gen = protocol.generation_config(self.model, new_tokens, compile)
        processors = [cancel, *([protocol.CudaGraphStep()] if compile else [])]
        return step_profile.profile_decode(self.model, self._to_device(ids), gen, self._cuda(), processors,
                                           common_clock=False)  # each rank's own clock: one process per GPU

    def release(self) -> None:
        """After a failed command: free what it held (the caches, its tensors)."""
        from . import oom

        oom.release_memory()


def _to_cpu(value):
    """Tensors (also inside tuples, lists, dicts and transformers' ModelOutput) moved to the CPU for the kernel."""
    import torch

    if isinstance(value, torch.Tensor):
        local = value.full_tensor() if hasattr(value, "full_tensor") else value
        return local.detach().cpu()
    if isinstance(value, dict):  # ModelOutput is an OrderedDict
        from transformers.cache_utils import Cache

        # each rank's KV cache holds its own heads only: no use to the kernel
        items = {k: _to_cpu(v) for k, v in value.items() if not isinstance(v, Cache)}
        return type(value)(**items) if hasattr(value, "to_tuple") else items
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _error(exc: BaseException) -> tuple:
    from . import oom

    return ("error", type(exc).__name__, str(exc), traceback.format_exc(), oom.is_oom(exc))


def main(rank: int, spec: dict, conns: list, shared) -> None:
    """The worker's life: set up, load, serve commands, leave the process group."""
    conn = conns[rank]
    for other, c in enumerate(conns):  # each worker keeps only its own end, so a dead one is seen as EOF
        if other != rank:
            c.close()
    # Kernel -> Interrupt signals the kernel's whole process group; the kernel cancels the call cooperatively.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(spec["parent_pid"])
    _environment(rank, spec)
    channel = Channel(conn)
    output = OutputForwarder(channel)
    worker = None
    try:
        try:
            worker = Worker(rank, spec, shared)
            info = worker.load()
        except BaseException as exc:
            output.flush()
            channel.send(*_error(exc))
            return
        output.flush()
        channel.send("ready", info)
        _serve(worker, channel, output)
    finally:
        output.flush()
        _leave_group()


def _serve(worker: Worker, channel: Channel, output: OutputForwarder) -> None:
    commands = {"generate": worker.generate, "bench": worker.bench, "profile": worker.profile}
    while True:
        try:
            data = channel.receive()
        except (EOFError, OSError):  # the kernel has gone
            return
        cancel = CancelPoint(worker.shared, worker.rank)
        try:
            try:
                name, *args = pickle.loads(data)
            except Exception as exc:  # every rank fails alike here, before any collective
                raise RuntimeError(f"the worker could not read the call's arguments ({exc}). Objects defined in the "
                                   "notebook itself cannot reach the worker processes: define them in a module "
                                   "(a .py file next to the notebook) and import them") from exc
            if name == "stop":
                return
            result = commands[name](cancel, *args)
        except BaseException as exc:
            reply = ("cancelled", cancel.shared[worker.rank]) if cancel.fired else _error(exc)
            del exc
            worker.release()
        else:
            reply = ("done", result)
        output.flush()
        channel.send(*reply)


def _leave_group() -> None:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
