"""The Plan: which unit of the model goes on which device, and what each GPU will hold before anything loads."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

from .. import checks
from ..devices import GPU
from ..errors import UsageError
from ..units import GiB, format_size, parse_size
from . import memory, sources, strategies
from .meta_model import MetaModel, build, dtype_name

DEFAULT_RESERVE = "1GiB"
PCIE_BANDWIDTH = 25e9  # bytes/s a PCIe 4.0 x16 link moves in practice (estimate for offload slowdowns)
DISK_BANDWIDTH = 2e9  # bytes/s of a fast NVMe drive (estimate)


@dataclass(frozen=True)
class DeviceBudget:
    """What one GPU will hold under the plan (bytes). Weights are exact; the rest are estimates."""

    cuda_index: int
    gpu: GPU
    capacity: int
    reserve: int
    others: int  # memory other processes (and this one) already use on this GPU now
    weights: int = 0
    kv_cache: int = 0
    activations: int = 0
    context: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.context + self.others

    @property
    def budget(self) -> int:
        return max(0, self.capacity - self.reserve)

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


def resolve_gpus(gpus) -> list[GPU]:
    """None: the visible GPUs (cuda:N order); an int: the first N of them; a simulate spec ('2x24GiB',
    '24GiB,80GiB', 'A100-80GB'); or a list of inventory GPUs, sizes ('24GiB', 80e9) and specs."""
    from ..devices.simulated import SimulatedGPUs
    from ..visibility import current

    if gpus is None or (isinstance(gpus, numbers.Integral) and not isinstance(gpus, bool)):
        visible = [t.gpu for t in current().targets]
        if gpus is None:
            if not visible:
                raise UsageError("no GPU is visible to plan for: pass gpus='2x24GiB' (or a list of sizes) to plan "
                                 "for GPUs this machine does not have, or run nbgpu.simulate('4x24GiB')")
            return visible
        count = checks.integer(gpus, "gpus", 1, checks.MAX_GPUS)
        if count > len(visible):
            raise UsageError(f"gpus={count}: this kernel sees {len(visible)} GPU(s); give 1..{len(visible)} "
                             "or a spec such as '4x24GiB'")
        return visible[:count]
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


def _cpu_available() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


class Plan:
    """A placement of a causal LM over GPUs (then CPU and disk), with per-GPU memory, before any weight loads.

    Edit with `move`, export with `device_map`, `max_memory`, `save`, `ktransformers_rules()`, `vllm()`,
    `mlc()`, `openllm()`. Nothing here touches a GPU.
    """

    def __init__(self, meta: MetaModel, gpus: list[GPU], *, batch: int, seq_len: int, strategy, reserve: int,
                 context: int, offload, cpu_memory: int | None, assignment: dict | None = None,
                 raw_map: dict | None = None):
        self._meta = meta
        self.gpus = list(gpus)
        self.batch, self.seq_len = batch, seq_len
        self.strategy = strategy
        self.reserve, self.context = reserve, context
        self.offload = offload
        self.cpu_memory = _cpu_available() if cpu_memory is None else cpu_memory
        self.estimates = memory.estimate(meta.config, meta.dtype, batch, seq_len)
        self._costs = strategies.Costs(meta, self.estimates, [self._others(g) for g in self.gpus], context)
        self.balance_ratio = None
        self._raw_map = raw_map  # an exact accelerate map (strategy='accelerate'), kept until edited
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
    def dtype(self) -> str:
        return self._meta.dtype

    @property
    def fingerprint(self) -> dict | None:
        """The checkpoint folder as it was when planned (config hash, weight files and sizes); None otherwise."""
        return self._meta.fingerprint

    @property
    def max_positions(self) -> int | None:
        """Tokens the model has positions for (max_position_embeddings), or None where the config has no limit."""
        from .sources import max_positions

        return max_positions(self.config)

    @property
    def exceeds_positions(self) -> bool:
        """True when the planned sequence is longer than the model's positions (a plan may still be made: the
        memory figures hold, but the model cannot run that long without rope scaling or the like)."""
        limit = self.max_positions
        return limit is not None and self.seq_len > limit

    @property
    def simulated(self) -> bool:
        return any(g.simulated for g in self.gpus)

    @property
    def device_map(self) -> dict:
        if self._raw_map is not None:
            return dict(self._raw_map)
        return dict(self._assignment)

    @property
    def max_memory(self) -> dict:
        """Room for weights per GPU (budget less cache, activations, context and others), plus the CPU."""
        out = {d.cuda_index: max(0, d.budget - d.others - d.kv_cache - d.activations - d.context)
               for d in self.devices}
        for d in self.devices:  # never below what the plan already places there
            out[d.cuda_index] = max(out[d.cuda_index], d.weights) if not d.over else d.weights
        out["cpu"] = max(self.cpu_memory, self.cpu_weights)
        return out

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
    def targets(self) -> list:
        """Valid devices to place on: cuda indexes, then 'cpu' and 'disk'."""
        return [*range(len(self.gpus)), "cpu", "disk"]

    # --- placing -----------------------------------------------------------------------------------------
    def _others(self, gpu: GPU) -> int:
        return int(gpu.memory_used or 0)

    def _budgets(self) -> list[int]:
        return [max(0, (g.memory_total or 0) - self.reserve) for g in self.gpus]

    def _place(self) -> dict:
        s = self.strategy
        targets = self.targets
        if isinstance(s, str):
            if s not in strategies.STRATEGIES:
                raise UsageError(f"unknown strategy {s!r}: choose {', '.join(strategies.STRATEGIES)}, a dict "
                                 "{module or range: device}, or a list of layer counts per GPU")
            if s == "accelerate":
                self._raw_map = strategies.accelerate_map(self._meta, self._accelerate_memory())
                return strategies.units_from_map(self._meta, self._raw_map)
            assignment, ratio = strategies.balanced(self._costs, self._budgets())
            self.balance_ratio = ratio
            if s == "sequential":
                assignment = strategies.sequential(self._costs, self._budgets()) or assignment
            if ratio > 1 and self.offload:
                assignment = strategies.offload(self._costs, self._budgets(), self._overs, self.cpu_memory,
                                                self.offload == "disk" or self.offload is True)
                self.strategy, self.balance_ratio = f"{s}+offload", None
            return assignment
        assignment = strategies.manual(self._meta, s, targets)
        return self._tie_followers(assignment, s)

    def _accelerate_memory(self) -> dict:
        mem = {i: max(0, b - self._others(g)) for i, (g, b) in enumerate(zip(self.gpus, self._budgets()))}
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
        for params, units in zip(self._meta.tied, self._tied_unit_groups()):
            placed = {u: assignment[u] for u in units}
            if len(set(map(str, placed.values()))) > 1:
                where = ", ".join(f"{u} -> {d!r}" for u, d in placed.items())
                raise UsageError(f"tied weights must stay on one device: {' = '.join(params)} share one tensor, "
                                 f"but this places {where}. Move {' and '.join(units)} together, e.g. "
                                 f"plan.move({list(units)!r}, {next(iter(placed.values()))!r})")

    def _tied_unit_groups(self):
        from .meta_model import _owner

        return [sorted({_owner(self._meta.units, p) for p in g}) for g in self._meta.tied]

    # --- accounting --------------------------------------------------------------------------------------
    def _tally(self, assignment: dict) -> tuple[list[DeviceBudget], int, int]:
        est, meta = self.estimates, self._meta
        n = len(self.gpus)
        w, kv, act, used, has_layer = [0] * n, [0] * n, [0] * n, [False] * n, [False] * n
        cpu = disk = 0
        gpu_devs = [d for d in assignment.values() if isinstance(d, int)]
        main = min(gpu_devs) if gpu_devs else 0  # accelerate runs offloaded modules on the first GPU of the map
        largest_offloaded = 0
        for u in meta.units:
            dev = assignment[u.name]
            layer_kv = est.kv_per_layer.get(u.layer, 0) if u.layer is not None else 0
            run_on = dev if isinstance(dev, int) else main
            if dev == "cpu":
                cpu += u.size
            elif dev == "disk":
                disk += u.size
            if isinstance(dev, int):
                w[dev] += u.size
            else:
                largest_offloaded = max(largest_offloaded, u.size)
            kv[run_on] += layer_kv
            used[run_on] = True
            if u.layer is not None:
                has_layer[run_on] = True
            if u.name == meta.embed:
                act[run_on] += est.input_activations
            if u.name == meta.head:
                act[run_on] += est.logits
        act[main] += largest_offloaded  # one offloaded module at a time is copied in to run
        out = []
        for i, g in enumerate(self.gpus):
            out.append(DeviceBudget(
                cuda_index=i, gpu=g, capacity=int(g.memory_total or 0), reserve=self.reserve,
                others=self._others(g), weights=w[i], kv_cache=kv[i],
                activations=act[i] + (est.layer_activations if has_layer[i] else 0),
                context=self.context if used[i] else 0))
        return out, cpu, disk

    def _overs(self, assignment: dict) -> list[int]:
        return [d.over for d in self._tally(assignment)[0]]

    def _account(self) -> None:
        self.devices, self.cpu_weights, self.disk_weights = self._tally(self._assignment)
        self._cpu_over = max(0, self.cpu_weights - self.cpu_memory)

    # --- editing -----------------------------------------------------------------------------------------
    def move(self, modules, device) -> Plan:
        """Move modules ('model.layers.20-31', a name, or a list) to a device (cuda index, 'cpu', 'disk').
        Refused with the plan unchanged when a name is unknown, inside a no-split module, or splits tied weights."""
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
        """Decoder layers on each GPU, in cuda order."""
        layers = [u for u in self._meta.units if u.layer is not None]
        return [sum(1 for u in layers if self._assignment[u.name] == i) for i in range(len(self.gpus))]

    def copy(self) -> Plan:
        return Plan(self._meta, self.gpus, batch=self.batch, seq_len=self.seq_len, strategy=self.strategy,
                    reserve=self.reserve, context=self.context, offload=self.offload, cpu_memory=self.cpu_memory,
                    assignment=self._assignment, raw_map=self._raw_map)

    def with_batch(self, batch: int | None = None, seq_len: int | None = None) -> Plan:
        """The same model, GPUs and strategy, planned again for another batch and/or sequence length."""
        manual = not isinstance(self.strategy, str) or self.strategy == "manual"  # a list, a dict, or edits
        strategy = "balanced" if manual else self.strategy.split("+")[0]
        batch = self.batch if batch is None else checks.integer(batch, "batch", 1, checks.MAX_BATCH)
        seq_len = self.seq_len if seq_len is None else checks.integer(seq_len, "seq_len", 1, checks.MAX_TOKENS)
        return Plan(self._meta, self.gpus, batch=batch, seq_len=seq_len, strategy=strategy, reserve=self.reserve,
                    context=self.context, offload=self.offload, cpu_memory=self.cpu_memory)

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

        return load(path, trust_remote_code)

    def ktransformers_rules(self) -> str:
        from .exports import ktransformers_rules

        return ktransformers_rules(self)

    def vllm(self) -> dict:
        from .exports import vllm

        return vllm(self)

    def mlc(self) -> dict:
        from .exports import mlc

        return mlc(self)

    def openllm(self) -> dict:
        from .exports import openllm

        return openllm(self)

    # --- display -----------------------------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        head = f"{'[simulated GPUs] ' if self.simulated else ''}Plan for {_source_label(self.source)} " \
               f"({self.dtype}, batch {self.batch} x {self.seq_len} tokens, strategy {_strategy_label(self.strategy)})"
        lines = [head]
        for d in self.devices:
            span = _span(self.layers_on(d.cuda_index))
            lines.append(f"  {d.label}: {format_size(d.total)} / {format_size(d.budget)} budget "
                         f"(weights {format_size(d.weights)}, KV {format_size(d.kv_cache)}, act ~"
                         f"{format_size(d.activations)}, context {format_size(d.context)}, others "
                         f"{format_size(d.others)})  {span}" + (f"  OVER by {format_size(d.over)}" if d.over else ""))
        if self.cpu_weights or self.disk_weights:
            lines.append(f"  offloaded: {format_size(self.cpu_weights)} to CPU, {format_size(self.disk_weights)} to "
                         "disk")
        lines.append("  fits" if self.fits else f"  DOES NOT FIT: {format_size(self.missing())} missing")
        return lines

    def __repr__(self) -> str:
        return "\n".join(self.summary_lines())

    def _repr_html_(self) -> str:
        from ..views.plan_view import plan_html

        return plan_html(self)

    def _ipython_display_(self) -> None:
        from ..views.plan_view import display_plan

        display_plan(self)


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


def plan(model, gpus=None, dtype="bfloat16", batch: int = 1, seq_len: int = 2048, strategy="balanced",
         reserve=DEFAULT_RESERVE, offload=False, context=memory.DEFAULT_CONTEXT, cpu_memory=None,
         trust_remote_code: bool = False) -> Plan:
    """Plan where each layer of a causal LM goes and what every GPU will hold, before loading anything.

    model: local checkpoint folder, config object or dict (with 'model_type'), or hub id (config only).
    gpus: None (the GPUs this kernel sees, in cuda:N order), an int (the first N of them), a simulate spec
        ('2x24GiB', '24GiB,80GiB', '4xA100-80GB') or a list of inventory GPUs and/or sizes.
    strategy: 'balanced', 'sequential', 'accelerate' (what device_map='auto' gives), a dict {module or range
        ('model.layers.0-15'): device}, or a list of decoder-layer counts per GPU.
    reserve: memory kept free on every GPU; context: CUDA context + framework overhead per GPU in use.
    offload: False (report what is missing), 'cpu' (offload to CPU memory), 'disk' or True (CPU, then disk).
    cpu_memory: CPU memory offered for offload (default: available RAM now).
    trust_remote_code: run code shipped with the model (its config's auto_map) to build it; off unless you say so.
    """
    batch = checks.integer(batch, "batch", 1, checks.MAX_BATCH)
    seq_len = checks.integer(seq_len, "seq_len", 1, checks.MAX_TOKENS)
    reserve, context = checks.size(reserve, "reserve"), checks.size(context, "context")
    cpu_memory = checks.optional_size(cpu_memory, "cpu_memory")
    offload = checks.choice(offload, "offload", (False, None, True, "cpu", "disk"))
    trust_remote_code = checks.boolean(trust_remote_code, "trust_remote_code")
    sources.check_model(model)  # a missing folder or an unreachable hub id is told before torch is imported
    dtype = checks.dtype(dtype)
    gpu_list = resolve_gpus(gpus)
    reserve_b, context_b = parse_size(reserve), parse_size(context)
    cpu_b = None if cpu_memory is None else parse_size(cpu_memory)
    meta = build(model, dtype_name(dtype), trust_remote_code=trust_remote_code)
    return Plan(meta, gpu_list, batch=batch, seq_len=seq_len, strategy=strategy, reserve=reserve_b,
                context=context_b, offload=offload or False, cpu_memory=cpu_b)


__all__ = ["DeviceBudget", "GiB", "Plan", "plan", "resolve_gpus"]
