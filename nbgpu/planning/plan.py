"""The Plan: which unit of the model goes on which device, and what each GPU will hold before anything loads."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace
from types import MappingProxyType

from .. import checks
from ..devices import GPU
from ..devices.calibration import DEFAULT as CALIBRATION
from ..errors import UsageError
from ..units import GiB, format_size, parse_size
from . import memory, sources, strategies, tensor_plan, tp_sizes
from .meta_model import MetaModel, build, dtype_name

DEFAULT_RESERVE = "1GiB"
PARALLEL = ("layers", "tensor")


@dataclass(frozen=True)
class DeviceBudget:
    """What one GPU will hold under the plan (bytes). Weights are exact; the rest are estimates."""

    cuda_index: int
    gpu: GPU
    capacity: int
    reserve: int  # kept free on purpose (plan(reserve=...))
    others: int  # memory other processes (and this one) already use on this GPU now
    driver_reserved: int = 0  # what the driver keeps for itself (NVML's reserved memory)
    weights: int = 0
    kv_cache: int = 0
    activations: int = 0
    allocator: int = 0  # cuBLAS workspace + the caching allocator's slack
    context: int = 0
    communication: int = 0  # tensor parallelism: NCCL's buffers and the peers' mappings

    @property
    def process(self) -> int:
        """What this model's process will hold on the GPU at its peak (what NVML will show for it)."""
        return self.weights + self.kv_cache + self.activations + self.allocator + self.context + self.communication

    @property
    def total(self) -> int:
        return self.process + self.others + self.driver_reserved

    @property
    def budget(self) -> int:
        return max(0, self.capacity - self.reserve)

    @property
    def room(self) -> int:
        """What this plan may use: the budget less the driver's reserve and other processes' memory."""
        return self.budget - self.driver_reserved - self.others

    @property
    def free(self) -> int:
        return self.budget - self.total

    @property
    def over(self) -> int:
        return max(0, self.total - self.budget)

    @property
    def label(self) -> str:
        sim = " (simulated)" if self.gpu.simulated else ""
        return f"cuda:{self.cuda_index} = GPU {self.gpu.index} {self.gpu.name or ''}{sim}".rstrip()


def resolve_gpus(gpus, visible: list[GPU] | None = None) -> list[GPU]:
    """None: the visible GPUs (cuda:N order; `visible`, else read now); an int: the first N of them; a simulate spec
    ('2x24GiB', '24GiB,80GiB', 'A100-80GB'); or a list of inventory GPUs and/or sizes ('24GiB', 80e9)."""
    from ..devices.simulated import SimulatedGPUs

    if gpus is None or (isinstance(gpus, numbers.Integral) and not isinstance(gpus, bool)):
        if visible is None:
            from ..visibility import current

            visible = [t.gpu for t in current().targets]
        if gpus is None:
            if not visible:
                raise UsageError("no GPU is visible to plan for: pass gpus='2x24GiB' (or a list of sizes) to plan "
                                 "for GPUs this machine does not have, or run nbgpu.simulate('4xL4')")
            return list(visible)
        count = checks.integer(gpus, "gpus", 1, checks.MAX_GPUS)
        if count > len(visible):
            raise UsageError(f"gpus={count}: this kernel sees {len(visible)} GPU(s); give 1..{len(visible)} "
                             "or a spec such as '4x24GiB'")
        return list(visible[:count])
    if isinstance(gpus, str):
        return list(SimulatedGPUs(gpus).read().gpus)
    if isinstance(gpus, (list, tuple)):
        out = []
        for item in gpus:
            if isinstance(item, GPU):
                out.append(item)
            elif isinstance(item, str):
                out += [replace(g, index=len(out) + i) for i, g in enumerate(SimulatedGPUs(item).read().gpus)]
            elif isinstance(item, numbers.Real) and not isinstance(item, bool):
                nbytes = checks.size(item, "a GPU's memory in gpus=", allow_zero=False)
                out.append(replace(SimulatedGPUs(f"{nbytes}B").read().gpus[0], index=len(out)))
            else:
                raise UsageError(f"cannot read {checks.shown(item)} as a GPU: give an inventory GPU or a size such as "
                                 "'24GiB'")
            if len(out) > checks.MAX_GPUS:
                raise UsageError(f"gpus= names more than {checks.MAX_GPUS} GPUs: plan for at most {checks.MAX_GPUS}")
        if not out:
            raise UsageError("gpus=[] names no GPU")
        return out
    raise UsageError(f"cannot read gpus={checks.shown(gpus)}: give None, a count, a spec such as '2x24GiB', or a list")


class Plan:
    """A placement of a causal LM over GPUs (then CPU and disk), with per-GPU memory, before any weight loads.

    `parallel="layers"`: contiguous layers per GPU (a device_map). `parallel="tensor"`: every layer split over
    every GPU (transformers' tp_plan="auto", loaded in one worker process per GPU). Edit a layer split with
    `move`; export with `device_map`, `max_memory`, `save`, `ktransformers_rules()`, `vllm()`, `mlc()`,
    `openllm()`. Nothing here touches a GPU or reads the machine: `plan()` reads it and passes it in.
    """

    def __init__(self, meta: MetaModel, gpus: list[GPU], *, workload: memory.Workload, strategy, reserve: int,
                 context: int, offload, cpu_memory: int, parallel: str = "layers", assignment: dict | None = None,
                 raw_map: dict | None = None):
        self._meta = meta
        self.gpus = list(gpus)
        self.workload = workload
        self.strategy = strategy
        self.reserve, self.context = reserve, context
        self.offload = offload
        self.cpu_memory = cpu_memory
        self.parallel = parallel
        self.estimates = memory.estimate(meta.config, meta.dtype, workload, gated=meta.gated_mlp)
        self.balance_ratio = None
        self._raw_map = raw_map  # an exact accelerate map (strategy='accelerate'), kept until edited
        if parallel == "tensor":
            self.heads = tp_sizes.split(meta.config, len(self.gpus))
            self._shard, self._replicated = tensor_plan.shard_bytes(meta, len(self.gpus))
            self._assignment = {u.name: "all" for u in meta.units}
            self._account()
            return
        self._costs = strategies.Costs(meta, self.estimates, context)
        self._assignment = dict(assignment) if assignment is not None else self._place()
        self._check_tied(self._assignment)
        self._account()

    # --- the contract ------------------------------------------------------------------------------------
    @property
    def source(self):
        return self._meta.source

    @property
    def config(self):
        return self._meta.config

    @property
    def source_label(self) -> str:
        """The model's source in a few words: its folder or hub id, or the kind of config it was made from."""
        return _source_label(self.source)

    @property
    def dtype(self) -> str:
        return self._meta.dtype

    @property
    def batch(self) -> int:
        return self.workload.batch

    @property
    def seq_len(self) -> int:
        """Tokens each sequence holds at the end: prompt + new tokens."""
        return self.workload.seq_len

    @property
    def prompt_len(self) -> int:
        return self.workload.prompt_len

    @property
    def new_tokens(self) -> int:
        return self.workload.new_tokens

    @property
    def tp(self) -> int:
        """GPUs that share every layer (1 for a layer split)."""
        return len(self.gpus) if self.parallel == "tensor" else 1

    @property
    def fingerprint(self) -> dict | None:
        """The checkpoint folder as it was when planned (config hash, weight files and sizes); None otherwise."""
        return self._meta.fingerprint

    @property
    def simulated(self) -> bool:
        return any(g.simulated for g in self.gpus)

    @property
    def assignment(self) -> MappingProxyType:
        """Unit -> device (cuda index, 'cpu', 'disk'; 'all' under tensor parallelism), read-only."""
        return MappingProxyType(self._assignment)

    @property
    def device_map(self) -> dict:
        self._layers_only("device_map")
        if self._raw_map is not None:
            return dict(self._raw_map)
        return dict(self._assignment)

    @property
    def max_memory(self) -> dict:
        """Room for weights per GPU (what the plan places there, never above the card), plus the CPU; refused
        (UsageError, with what is missing) for a plan that does not fit."""
        self._layers_only("max_memory")
        from .exports import max_memory

        return max_memory(self)

    @property
    def fits(self) -> bool:
        return not any(d.over for d in self.devices) and not self._cpu_over

    def layers_on(self, device) -> list[str]:
        return [name for name, dev in self._assignment.items() if dev == device]

    @property
    def units(self):
        return list(self._meta.units)

    @property
    def tied_groups(self) -> list[list[str]]:
        return [list(g) for g in self._meta.tied]

    @property
    def no_split_modules(self) -> list[str]:
        return list(self._meta.no_split)

    @property
    def max_positions(self) -> int | None:
        """The model's position limit (max_position_embeddings or n_positions), where the config has one."""
        cfg = memory.text_config(self.config)
        return getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)

    @property
    def exceeds_positions(self) -> bool:
        limit = self.max_positions
        return limit is not None and self.seq_len > limit

    @property
    def targets(self) -> list:
        """Valid devices to place on: cuda indexes, then 'cpu' and 'disk'."""
        return [*range(len(self.gpus)), "cpu", "disk"]

    def _layers_only(self, what: str) -> None:
        if self.parallel == "tensor":
            raise UsageError(f"a tensor-parallel plan has no {what}: every layer is split over every GPU. Load it "
                             "with nbgpu.load(plan) (one worker per GPU), or plan parallel='layers' for a device_map")

    # --- placing -----------------------------------------------------------------------------------------
    @staticmethod
    def _others(gpu: GPU) -> int:
        return max(0, int(gpu.memory_used or 0) - int(gpu.memory_reserved or 0))

    def _rooms(self) -> list[int]:
        return [max(0, (g.memory_total or 0) - self.reserve) - int(g.memory_reserved or 0) - self._others(g)
                for g in self.gpus]

    def _place(self) -> dict:
        s = self.strategy
        if isinstance(s, str):
            if s not in strategies.STRATEGIES:
                raise UsageError(f"unknown strategy {s!r}: choose {', '.join(strategies.STRATEGIES)}, a dict "
                                 "{module or range: device}, or a list of layer counts per GPU")
            if s == "accelerate":
                self._raw_map = strategies.accelerate_map(self._meta, self._accelerate_memory())
                return strategies.units_from_map(self._meta, self._raw_map)
            rooms = self._rooms()
            assignment, ratio = strategies.balanced(self._costs, rooms)
            self.balance_ratio = ratio
            if s == "sequential":
                assignment = strategies.sequential(self._costs, rooms) or assignment
            if ratio > 1 and self.offload:
                assignment = strategies.offload(self._costs, rooms, self._overs, self.cpu_memory,
                                                self.offload == "disk" or self.offload is True)
                self.strategy, self.balance_ratio = f"{s}+offload", None
            return assignment
        assignment = strategies.manual(self._meta, s, self.targets)
        return self._tie_followers(assignment, s)

    def _accelerate_memory(self) -> dict:
        mem = {i: max(0, r) for i, r in enumerate(self._rooms())}
        mem["cpu"] = self.cpu_memory if self.offload else 0
        return mem

    def _tie_followers(self, assignment: dict, spec) -> dict:
        """Tied units the user did not name go where the named one (else the first of the group) goes."""
        named = set(strategies.select(self._meta, list(spec))) if isinstance(spec, dict) else set()
        order = [u.name for u in self._meta.units]
        for group in self._meta.tied_units:
            named_in = [n for n in group if n in named]
            source = named_in[0] if named_in else min(group, key=order.index)
            for name in group:
                if name not in named:
                    assignment[name] = assignment[source]
        return assignment

    def _check_tied(self, assignment: dict) -> None:
        from .meta_model import _owner

        for params in self._meta.tied:
            units = sorted({_owner(self._meta.units, p) for p in params})
            placed = {u: assignment[u] for u in units}
            if len(set(map(str, placed.values()))) > 1:
                where = ", ".join(f"{u} -> {d!r}" for u, d in placed.items())
                raise UsageError(f"tied weights must stay on one device: {' = '.join(params)} share one tensor, "
                                 f"but this places {where}. Move {' and '.join(units)} together, e.g. "
                                 f"plan.move({list(units)!r}, {next(iter(placed.values()))!r})")

    # --- accounting --------------------------------------------------------------------------------------
    def _budget(self, i: int, g: GPU, **figures) -> DeviceBudget:
        return DeviceBudget(cuda_index=i, gpu=g, capacity=int(g.memory_total or 0), reserve=self.reserve,
                            others=self._others(g), driver_reserved=int(g.memory_reserved or 0), **figures)

    def _tally_tensor(self) -> list[DeviceBudget]:
        tp = len(self.gpus)
        mem = self.estimates.device(list(self.estimates.kv_total), True, True,
                                    kv_share=self.heads.kv_heads_per_gpu / self.heads.kv_heads, tp=tp,
                                    slack_blocks=CALIBRATION.slack_blocks_tensor)
        comm = CALIBRATION.communication if tp > 1 else 0
        return [self._budget(i, g, weights=self._shard, kv_cache=mem.kv_cache, activations=mem.activations,
                             allocator=mem.allocator, context=self.context, communication=comm)
                for i, g in enumerate(self.gpus)]

    def _tally(self, assignment: dict) -> tuple[list[DeviceBudget], int, int]:
        meta = self._meta
        n = len(self.gpus)
        weights, layers = [0] * n, [[] for _ in range(n)]
        embed, head, used = [False] * n, [False] * n, [False] * n
        cpu = disk = largest_offloaded = 0
        gpu_devs = [d for d in assignment.values() if isinstance(d, int)]
        main = min(gpu_devs) if gpu_devs else 0  # accelerate runs offloaded modules on the first GPU of the map
        for u in meta.units:
            dev = assignment[u.name]
            run_on = dev if isinstance(dev, int) else main
            if isinstance(dev, int):
                weights[dev] += u.size
            else:
                largest_offloaded = max(largest_offloaded, u.size)
                cpu += u.size if dev == "cpu" else 0
                disk += u.size if dev == "disk" else 0
            used[run_on] = True
            if u.layer is not None:
                layers[run_on].append(u.layer)
            embed[run_on] = embed[run_on] or u.name == meta.embed
            head[run_on] = head[run_on] or u.name == meta.head
        out = []
        for i, g in enumerate(self.gpus):
            mem = self.estimates.device(layers[i], embed[i], head[i]) if used[i] else None
            offloaded = largest_offloaded if i == main and (cpu or disk) else 0  # one module copied in at a time
            out.append(self._budget(
                i, g, weights=weights[i], kv_cache=mem.kv_cache if mem else 0,
                activations=(mem.activations if mem else 0) + offloaded, allocator=mem.allocator if mem else 0,
                context=self.context if used[i] else 0))
        return out, cpu, disk

    def _overs(self, assignment: dict) -> list[int]:
        return [d.over for d in self._tally(assignment)[0]]

    def _account(self) -> None:
        if self.parallel == "tensor":
            self.devices, self.cpu_weights, self.disk_weights = self._tally_tensor(), 0, 0
        else:
            self.devices, self.cpu_weights, self.disk_weights = self._tally(self._assignment)
        self._cpu_over = max(0, self.cpu_weights - self.cpu_memory)

    # --- editing -----------------------------------------------------------------------------------------
    def move(self, modules, device) -> Plan:
        """Move modules ('model.layers.20-31', a name, or a list) to a device (cuda index, 'cpu', 'disk').
        Refused with the plan unchanged when a name is unknown, inside a no-split module, or splits tied weights."""
        self._layers_only("layers to move")
        device = strategies.check_device(device, self.targets, modules)
        names = strategies.select(self._meta, modules)
        if not names:
            raise UsageError(f"{checks.shown(modules)} names no module: give a module name, a range such as "
                             "'model.layers.20-31', or a list of them")
        new = dict(self._assignment)
        for name in names:
            new[name] = device
        self._check_tied(new)
        self._assignment, self._raw_map = new, None
        self.strategy = "manual"
        self._account()
        return self

    def set_boundaries(self, counts: list[int]) -> Plan:
        """Decoder layers per GPU in order (e.g. [14, 18]); the editor's handles call this."""
        self._layers_only("layer boundaries")
        if hasattr(counts, "tolist") and not isinstance(counts, (list, tuple)):  # a numpy array
            counts = counts.tolist()
        if not isinstance(counts, (list, tuple)):
            raise UsageError(f"set_boundaries takes a list of layer counts per GPU, e.g. [14, 18], not "
                             f"{checks.shown(counts)}")
        new = self._tie_followers(strategies.manual(self._meta, list(counts), self.targets), None)
        self._check_tied(new)
        self._assignment, self._raw_map, self.strategy = new, None, "manual"
        self._account()
        return self

    def layer_counts(self) -> list[int]:
        """Decoder layers on each GPU, in cuda order (every layer on every GPU under tensor parallelism)."""
        layers = [u for u in self._meta.units if u.layer is not None]
        if self.parallel == "tensor":
            return [len(layers)] * len(self.gpus)
        return [sum(1 for u in layers if self._assignment[u.name] == i) for i in range(len(self.gpus))]

    def _again(self, workload: memory.Workload, **changes) -> Plan:
        keep = self.strategy if isinstance(self.strategy, str) else "balanced"
        keep = keep.split("+")[0] if keep != "manual" else "balanced"
        args = dict(workload=workload, strategy=keep, reserve=self.reserve, context=self.context,
                    offload=self.offload, cpu_memory=self.cpu_memory, parallel=self.parallel)
        args.update(changes)
        return Plan(self._meta, self.gpus, **args)

    def copy(self) -> Plan:
        return self._again(self.workload, strategy=self.strategy,
                           assignment=None if self.parallel == "tensor" else self._assignment, raw_map=self._raw_map)

    def with_batch(self, batch: int | None = None, seq_len: int | None = None) -> Plan:
        """The same model, GPUs and strategy, planned again for another batch and/or total length (the prompt
        shrinks with the length; the new tokens stay where they fit)."""
        batch = self.batch if batch is None else checks.integer(batch, "batch", 1, checks.MAX_BATCH)
        total = self.seq_len if seq_len is None else checks.integer(seq_len, "seq_len", 1, checks.MAX_TOKENS)
        new = min(self.new_tokens, total - 1)
        work = replace(self.workload, batch=batch, prompt_len=total - new, new_tokens=new)
        return self._again(work)

    # --- explanations and exports (see explain.py, exports.py) -------------------------------------------
    def explain(self) -> str:
        from .explain import explain

        return explain(self)

    def missing(self) -> int:
        """Bytes the GPUs lack for this plan (0 when it fits)."""
        return sum(d.over for d in self.devices) + self._cpu_over

    def to_dict(self) -> dict:
        """The plan as the JSON object `save` writes (format nbgpu-plan/2, docs/plan-format.md)."""
        from .plan_file import to_dict

        return to_dict(self)

    def save(self, path) -> None:
        """Write the plan as JSON; the file is written whole and renamed, so a failure leaves an old one intact."""
        from .plan_file import save

        save(self, path)

    @classmethod
    def load(cls, path, trust_remote_code: bool = False) -> Plan:
        """A plan from `save`, validated field by field; reads neither the network nor the model's folder."""
        from .plan_file import load

        return load(path, cls, trust_remote_code)

    def ktransformers_rules(self) -> str:
        from .exports import ktransformers_rules

        return ktransformers_rules(self)

    def vllm(self) -> dict:
        from .exports import vllm

        return vllm(self)

    def mlc(self) -> dict:
        from .exports import mlc

        return mlc(self)

    def openllm(self, gpu_type: str | None = None) -> dict:
        from .exports import openllm

        return openllm(self, gpu_type)

    # --- text ----------------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        w = self.workload
        how = f"tensor parallel over {self.tp} GPUs" if self.parallel == "tensor" else \
            f"strategy {_strategy_label(self.strategy)}"
        head = f"{'[simulated GPUs] ' if self.simulated else ''}Plan for {_source_label(self.source)} " \
               f"({self.dtype}, batch {w.batch} x ({w.prompt_len} prompt + {w.new_tokens} new) tokens, {how})"
        lines = [head]
        for d in self.devices:
            span = "a slice of every layer" if self.parallel == "tensor" else _span(self.layers_on(d.cuda_index))
            comm = f", communication {format_size(d.communication)}" if d.communication else ""
            lines.append(f"  {d.label}: {format_size(d.total)} / {format_size(d.budget)} budget "
                         f"(weights {format_size(d.weights)}, KV {format_size(d.kv_cache)}, act ~"
                         f"{format_size(d.activations)}, allocator ~{format_size(d.allocator)}, context "
                         f"{format_size(d.context)}{comm}, others {format_size(d.others)}, driver "
                         f"{format_size(d.driver_reserved)})  {span}" +
                         (f"  OVER by {format_size(d.over)}" if d.over else ""))
        if self.cpu_weights or self.disk_weights:
            lines.append(f"  offloaded: {format_size(self.cpu_weights)} to CPU, {format_size(self.disk_weights)} to "
                         "disk")
        lines.append("  fits" if self.fits else f"  DOES NOT FIT: {format_size(self.missing())} missing")
        if self.exceeds_positions:
            lines.append(f"  {self.seq_len} tokens exceed the model's {self.max_positions} positions")
        return lines

    def __repr__(self) -> str:
        return "\n".join(self.summary_lines())


def _source_label(source) -> str:
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        return str(source)
    if isinstance(source, dict):
        return f"config dict ({source.get('model_type', '?')})"
    return type(source).__name__


def _strategy_label(strategy) -> str:
    return strategy if isinstance(strategy, str) else "manual"


def _span(names: list[str]) -> str:
    if not names:
        return "(nothing)"
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} modules)"


def _cpu_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def plan(model, gpus=None, dtype="bfloat16", batch: int = 1, seq_len: int | None = None, strategy="balanced",
         reserve=DEFAULT_RESERVE, offload=False, context=memory.DEFAULT_CONTEXT, cpu_memory=None, *,
         prompt_len: int | None = None, new_tokens: int | None = None, prefill_chunk: int | None = None,
         attn_implementation: str = "sdpa", cache: str = "dynamic", parallel: str = "layers",
         trust_remote_code: bool = False) -> Plan:
    """Plan where each layer of a causal LM goes and what every GPU will hold, before anything loads.

    model: local checkpoint folder, config object or dict (with 'model_type'), or hub id (config only).
    gpus: None (the GPUs this kernel sees, in cuda:N order), an int (the first N of them), a simulate spec
        ('2x24GiB', '24GiB,80GiB', '4xA100-80GB') or a list of inventory GPUs and/or sizes.
    batch, prompt_len, new_tokens: the run to plan for (prefill activations follow the prompt, or prefill_chunk
        where generate prefills in chunks; the KV cache holds prompt + new tokens). seq_len alone (default 2048)
        plans the whole length as a prompt.
    attn_implementation: 'sdpa' (default), 'eager' (adds the score matrix), 'flash_attention_2', ...
    cache: 'dynamic' (generate's default) or 'static' (compiled generate).
    parallel: 'layers' (contiguous layers per GPU, a device_map) or 'tensor' (every layer split over the GPUs).
    strategy: 'balanced', 'sequential', 'accelerate' (what device_map='auto' gives), a dict {module or range
        ('model.layers.0-15'): device}, or a list of decoder-layer counts per GPU.
    reserve: memory kept free on every GPU; context: CUDA context per GPU in use (calibrated default).
    offload: False (report what is missing), 'cpu' (offload to CPU memory), 'disk' or True (CPU, then disk).
    cpu_memory: CPU memory offered for offload (default: available RAM now).
    trust_remote_code: run code shipped with the model (its config's auto_map) to build it; off unless you say so.
    """
    reserve, context = checks.size(reserve, "reserve"), checks.size(context, "context")
    cpu_memory = checks.optional_size(cpu_memory, "cpu_memory")
    offload = checks.choice(offload, "offload", (False, None, True, "cpu", "disk"))
    parallel = checks.choice(parallel, "parallel", PARALLEL)
    trust_remote_code = checks.boolean(trust_remote_code, "trust_remote_code")
    if parallel == "tensor" and (offload or strategy != "balanced"):
        raise UsageError("a tensor-parallel plan splits every layer over every GPU: it takes no strategy and no "
                         "offload (plan parallel='layers' for those)")
    work = memory.workload(batch, seq_len, prompt_len, new_tokens, prefill_chunk, attn_implementation, cache)
    sources.check_model(model)  # a missing folder or an unreachable hub id is told before torch is imported
    dtype = checks.dtype(dtype)
    gpu_list = resolve_gpus(gpus)
    reserve_b, context_b = parse_size(reserve), parse_size(context)
    cpu_b = _cpu_available() if cpu_memory is None else parse_size(cpu_memory)
    meta = build(model, dtype_name(dtype), trust_remote_code=trust_remote_code)
    return Plan(meta, gpu_list, workload=work, strategy=strategy, reserve=reserve_b, context=context_b,
                offload=offload or False, cpu_memory=cpu_b, parallel=parallel)


__all__ = ["DeviceBudget", "GiB", "Plan", "plan", "resolve_gpus"]
