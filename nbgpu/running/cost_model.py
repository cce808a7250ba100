"""Modelled timings: what generation would take on GPUs that are not here (simulated GPUs, or a plan's GPUs).

On simulated GPUs a model runs on the CPU, whose clock says nothing about a GPU. The run still happens (it proves the
code path and the exact token counts), but every time `nbgpu.bench` reports for it comes from this model, labelled
"modelled", and the same from run to run.

One forward pass, decoder layer by decoder layer (the embeddings read only their token rows; the head reads its
whole matrix for the last position):

* GPU time of a layer = the larger of (its weights + its KV cache) / (the GPU's memory bandwidth x the fraction real
  kernels reach) and its FLOPs (2 per weight per token, plus attention over the context) / (the GPU's bf16 compute x
  the fraction prefill kernels reach). Published figures per GPU model (devices/specs.py); fractions calibrated.
* Host time of a layer: launching its kernels, per way of running (eager, accelerate's hooks of a layer split,
  DTensor of tensor parallelism, compiled, compiled split), plus generate's own work per token. Calibrated on real
  GPUs (devices/speed_calibration.py): these figures cannot come from published data.
* The host issues a layer while the GPU runs what was issued before: a layer ends when the GPU has done its work
  and the host has issued all of it, so a step takes the larger of the GPU's and the host's time where they overlap
  (eager decoding of a small model is host-bound: that is why a split is not faster).
* Layer split: the GPUs work one after another, plus a hand-off of the hidden state at every change of GPU
  (the link's latency + bytes / bandwidth, from the topology). Tensor parallelism: every GPU does 1/n of every
  layer, plus an all-reduce after attention and after the MLP (a ring: NCCL's fixed cost, 2(n-1) hops of the
  weakest link, 2(n-1)/n of the bytes over its bandwidth; halved bandwidth where peer-to-peer is not available).
* Offloaded units (CPU, disk) are copied to the GPU for every forward (PCIe of the GPU, or the disk's bandwidth).

Not modelled: mixture-of-experts routing (every expert counted as read: an upper bound), kernel fusion beyond the
calibrated fractions, clocks that drop under power or heat, other processes on the GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import devices
from ..devices import link_figures, specs
from ..devices.speed_calibration import DEFAULT as CALIBRATION
from ..devices.speed_calibration import HostPath
from ..planning.memory import dtype_bytes, head_dim, kv_per_layer, text_config
from . import placement
from .timeline import Interval, Timeline

_EAGER_OF = {"compiled": "eager", "compiled_split": "hooks", "compiled_tensor": "dtensor"}
DISK_BANDWIDTH = 2e9  # bytes/s of a fast NVMe drive, as the planner's offload estimate
MODELLED = "modelled"


@dataclass(frozen=True)
class Stage:
    """One placed unit along the depth: what it reads and computes per token."""

    name: str
    device: object  # cuda index, "cpu" or "disk"; under tensor parallelism every GPU
    weights: int  # bytes read per forward
    params: int  # weights that multiply each token (2 FLOPs each)
    layer: int | None  # decoder layer index; None for embeddings, norm, head
    attention_share: float = 0.0  # part of a layer's weights in its attention block (tensor parallelism)


@dataclass(frozen=True)
class GPUFigures:
    cuda_index: int
    name: str
    bandwidth: float  # bytes/s, peak
    flops: float | None  # FLOP/s, peak for the model's dtype; None: not known
    pcie: float  # bytes/s one way to the host, for offloaded weights


@dataclass(frozen=True)
class Hop:
    """A link between two GPUs as the model uses it."""

    bandwidth: float  # bytes/s one way
    latency: float  # s per hop
    label: str
    p2p: bool | None = True


@dataclass(frozen=True)
class Machine:
    """Everything the model needs about where a model runs."""

    stages: tuple[Stage, ...]
    gpus: dict  # cuda index -> GPUFigures
    parallel: str  # "layers" or "tensor"
    path: HostPath
    config: object
    dtype: str
    links: dict = field(default_factory=dict)  # (cuda a, cuda b) -> Hop; tensor parallelism: key "ring"
    notes: tuple[str, ...] = ()
    prefill: HostPath | None = None  # the host's work in the prefill where it differs (compiled: eager prefill)


@dataclass(frozen=True)
class Modelled:
    """Modelled figures of one bench configuration (seconds)."""

    ttft: float
    steps: tuple[float, ...]
    timeline: Timeline
    description: str
    notes: tuple[str, ...]

    @property
    def busy(self) -> dict[int, float]:
        return self.timeline.busy()

    def bench_fields(self, repeats: int) -> dict:
        """BenchResult fields: every repeat the same (a model has no noise)."""
        return dict(ttft=[self.ttft] * repeats, decode_seconds=[sum(self.steps)] * repeats,
                    step_latencies=list(self.steps) * repeats, timeline=self.timeline)


# --- the GPU's and the host's work -------------------------------------------------------------------------------

def _flops_per_s(gpu, dtype: str) -> tuple[float | None, str | None]:
    spec = specs.match_name(gpu.name)
    bf16 = gpu.bf16_flops or (spec.bf16_flops if spec else None)
    if bf16 is None:
        return None, f"{gpu.name}: no bf16 tensor-core figure, so compute time is not modelled (memory only)"
    if dtype == "float32":
        return bf16 / 2, "float32: modelled at half the bf16 tensor-core rate (TF32)"
    return bf16, None


def gpu_figures(cuda_index: int, gpu, dtype: str) -> tuple[GPUFigures | None, list[str]]:
    """The published figures of `gpu` for the model; None where its bandwidth is not known (a GPU given by size)."""
    from .roofline import bandwidth

    bw = bandwidth(gpu)
    if not bw:
        return None, [f"cuda:{cuda_index} ({gpu.name}) has no known memory bandwidth: timings cannot be modelled "
                      f"(simulate a named model, e.g. {devices.DEFAULT_SPEC})"]
    spec = specs.match_name(gpu.name)
    flops, note = _flops_per_s(gpu, dtype)
    pcie = link_figures.pcie_bandwidth(spec.pcie_generation if spec else 4, 16)
    return GPUFigures(cuda_index, gpu.name, bw, flops, pcie), [note] if note else []


def layer_seconds(stage: Stage, gpu: GPUFigures, kv_bytes: float, attention_width: int, batch: int, tokens: int,
                  context: float, share: float = 1.0) -> tuple[float, float]:
    """(matrix, other) seconds of one unit on one GPU: `tokens` new tokens per sequence attending to `context`
    tokens on average; `share` of the unit (tensor parallelism). `kv_bytes`: the whole unit's KV cache at that
    context; `attention_width`: heads x head_dim. Matrix: weight reads and products; other: the KV cache and
    attention."""
    weights = stage.weights * share
    if stage.layer is None:
        tokens = 1  # generate keeps the logits of the last position only (logits_to_keep=1)
    flops_w = 2 * stage.params * share * batch * tokens
    kv = flops_a = 0.0
    if stage.layer is not None:
        kv = kv_bytes * share
        flops_a = 4 * batch * tokens * context * attention_width * share  # QK^T and AV
    memory_s = (weights + kv) / (gpu.bandwidth * CALIBRATION.bandwidth_fraction)
    compute_s = 0.0 if gpu.flops is None else (flops_w + flops_a) / (gpu.flops * CALIBRATION.compute_fraction)
    total = max(memory_s, compute_s)
    if total == 0:
        return 0.0, 0.0
    matrix_part = (weights / (weights + kv)) if memory_s >= compute_s and weights + kv else \
        (flops_w / (flops_w + flops_a) if flops_w + flops_a else 1.0)
    return total * matrix_part, total * (1 - matrix_part)


def _host(stage: Stage, path: HostPath) -> float:
    return path.per_layer if stage.layer is not None else 0.0


def all_reduce_seconds(nbytes: float, n: int, hop: Hop) -> float:
    """A ring all-reduce of `nbytes` over `n` GPUs (NCCL's model: a fixed cost, 2(n-1) hops, 2(n-1)/n of the bytes
    over the link)."""
    if n < 2:
        return 0.0
    return (link_figures.COLLECTIVE_BASE_LATENCY + 2 * (n - 1) * hop.latency
            + 2 * (n - 1) / n * nbytes / hop.bandwidth)


def _hand_off_seconds(nbytes: float, hop: Hop) -> float:
    return hop.latency + nbytes / hop.bandwidth


# --- one forward pass ------------------------------------------------------------------------------------------

@dataclass
class _Pass:
    end: float = 0.0
    blocks: list = field(default_factory=list)  # (device, start, end, what, category)


def _forward(m: Machine, batch: int, tokens: int, context: float, path: HostPath) -> _Pass:
    """One forward pass of `tokens` new tokens per sequence: when each GPU works on what, and when it ends."""
    cfg = text_config(m.config)
    activation = batch * tokens * cfg.hidden_size * dtype_bytes(m.dtype)
    # read from the config once per pass, not once per unit (a config attribute costs microseconds)
    kv_of, _ = kv_per_layer(cfg, m.dtype, batch, max(1, round(context)))
    width = cfg.num_attention_heads * head_dim(cfg)

    def seconds(st: Stage, gpu: GPUFigures, share: float = 1.0) -> tuple[float, float]:
        return layer_seconds(st, gpu, kv_of.get(st.layer, 0), width, batch, tokens, context, share)

    out = _Pass()
    host = ready = 0.0
    if m.parallel == "tensor":
        n = len(m.gpus)
        ring = m.links["ring"]
        reduce_s = all_reduce_seconds(activation, n, ring)
        for st in m.stages:
            start_issue, host = host, host + _host(st, path)
            # every GPU does its share; a collective waits for the slowest
            parts = [seconds(st, gpu, 1 / n) for gpu in m.gpus.values()]
            matrix, other = max(p[0] for p in parts), max(p[1] for p in parts)
            if st.layer is None:  # embeddings, norm, head: no all-reduce after them
                end = max(ready + matrix, host)
                if matrix:
                    out.blocks += [(d, end - matrix, end, st.name, "matrix") for d in m.gpus]
                ready = end
                continue
            attention = (matrix * st.attention_share, other, (start_issue + host) / 2, "attention")
            mlp = (matrix * (1 - st.attention_share), 0.0, host, "MLP")
            for mat, kv, issued, part in (attention, mlp):
                end = max(ready + mat + kv, issued)
                for d in m.gpus:
                    out.blocks.append((d, end - mat - kv, end - kv, f"{st.name} {part}", "matrix"))
                    if kv:
                        out.blocks.append((d, end - kv, end, f"{st.name} KV cache", "other"))
                    out.blocks.append((d, end, end + reduce_s, f"all-reduce after {st.name} {part}",
                                       "communication"))
                ready = end + reduce_s
        out.end = max(ready, host)
        return out
    main = min(m.gpus)
    previous = None
    for st in m.stages:
        host += _host(st, path)
        device = st.device if st.device in m.gpus else main  # offloaded units run on the first GPU
        gpu = m.gpus[device]
        if previous is not None and device != previous:
            hop = m.links[(previous, device)]
            h = _hand_off_seconds(activation, hop)
            out.blocks.append((device, ready, ready + h, f"hand-off cuda:{previous} -> cuda:{device} ({hop.label})",
                               "communication"))
            ready += h
        if st.device not in m.gpus:  # copied from CPU memory or disk for every forward
            copy = st.weights / (DISK_BANDWIDTH if st.device == "disk" else gpu.pcie)
            out.blocks.append((device, ready, ready + copy, f"{st.name} copied from {st.device}", "communication"))
            ready += copy
        matrix, other = seconds(st, gpu)
        g = matrix + other
        end = max(ready + g, host)
        if g:
            out.blocks.append((device, end - g, end - other, st.name, "matrix"))
            if other:
                out.blocks.append((device, end - other, end, f"{st.name} KV cache", "other"))
        ready, previous = end, device
    out.end = max(ready, host)
    return out


def _step(m: Machine, batch: int, tokens: int, context: float, prefill: bool = False) -> tuple[float, _Pass]:
    path = (m.prefill or m.path) if prefill else m.path
    forward = _forward(m, batch, tokens, context, path)
    return forward.end + path.per_step, forward


def timeline_of(m: Machine, forward: _Pass, step: float, note: str, simulated: bool = True) -> Timeline:
    intervals = tuple(Interval(d, s * 1e3, e * 1e3, what) for d, s, e, what, _ in sorted(forward.blocks,
                                                                                       key=lambda b: (b[0], b[1])))
    breakdown = {}
    for d in sorted(m.gpus):
        cats = {"matrix": 0.0, "communication": 0.0, "other": 0.0}
        for dev, s, e, _, cat in forward.blocks:
            if dev == d:
                cats[cat] += (e - s) * 1e3
        cats["idle"] = max(0.0, step * 1e3 - sum(cats.values()))
        breakdown[d] = cats
    return Timeline(intervals, step * 1e3, simulated, note, breakdown, modelled=True)


def run(m: Machine, batch: int, prompt_len: int, new_tokens: int, description: str,
        simulated: bool = True) -> Modelled:
    """The modelled figures of generate: the prefill (time to first token), then each decode step at its context."""
    ttft, _ = _step(m, batch, prompt_len, prompt_len / 2, prefill=True)
    steps = tuple(_step(m, batch, 1, prompt_len + i)[0] for i in range(1, new_tokens))
    middle = prompt_len + new_tokens // 2
    step, forward = _step(m, batch, 1, middle)
    note = (f"{MODELLED}: one decode step at {middle} tokens of context, each GPU's work placed as the model "
            f"places it (busy blocks, hand-offs and all-reduces); not a profile of the CPU run")
    return Modelled(ttft, steps, timeline_of(m, forward, step, note, simulated), description, m.notes)


# --- building the machine ----------------------------------------------------------------------------------------

def stages_of(units, config, dtype: str, device_of) -> tuple[Stage, ...]:
    """Stages from a model's placement units (a plan's, or a meta model's); `device_of(unit name)` gives each one's
    device. The embeddings (the first unit outside the layers holding a vocabulary x hidden matrix) read only their
    tokens' rows; the head (the last one) reads its whole matrix, also when it is tied to the embeddings."""
    cfg = text_config(config)
    b = dtype_bytes(dtype)
    heads, hd = cfg.num_attention_heads, head_dim(cfg)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    attention = cfg.hidden_size * hd * (2 * heads + 2 * kv_heads) * b
    vocab_matrix = cfg.vocab_size * cfg.hidden_size * b
    big = [u.name for u in units if u.layer is None and u.size >= vocab_matrix]
    embed = big[0] if len(big) > 1 else None
    head = big[-1] if big else None
    out = []
    for u in units:
        weights = 0 if u.name == embed else u.size
        if u.name == head:
            weights = max(weights, vocab_matrix)
        share = min(1.0, attention / u.size) if u.layer is not None and u.size else 0.0
        out.append(Stage(u.name, device_of(u.name), weights, weights // b, u.layer, share))
    if head is None:  # a head tied to the embeddings with no matrix of its own
        out.append(Stage("lm_head", out[-1].device if out else 0, vocab_matrix, vocab_matrix // b, None))
    return tuple(out)


def _spec_link(a, b) -> Hop:
    """A link between two GPUs that are not in this process's inventory, from their model's usual link."""
    sa, sb = specs.match_name(a.name), specs.match_name(b.name)
    if sa and sb and sa.key == sb.key and sa.default_link == "nvlink":
        bw = link_figures.nvlink_bandwidth(sa.nvlinks, sa.nvlink_generation, sa.compute_capability)
        return Hop(bw, link_figures.NVLINK_HOP_LATENCY, f"NV{sa.nvlinks}, the usual link of {sa.key}")
    gens = [s.pcie_generation for s in (sa, sb) if s]
    bw = link_figures.pcie_bandwidth(min(gens) if gens else 4, 16)
    p2p = all(s.pcie_p2p for s in (sa, sb) if s)
    return _pcie_hop(bw, link_figures.PCIE_HOP_LATENCY, f"PCIe Gen{min(gens) if gens else 4} x16", p2p)


def _pcie_hop(bw, latency, label, p2p) -> Hop:
    if p2p is False:  # staged through host memory: every byte crosses PCIe twice
        return Hop(bw / 2, latency, f"{label}, no peer-to-peer (through host memory)", False)
    return Hop(bw, latency, label, p2p)


def link(a, b) -> Hop:
    """The link between inventory GPUs a and b: the topology's estimate where both are this process's GPUs (real or
    simulated), else their model's usual link."""
    live = {g.index: g for g in devices.read().gpus}
    here = all(g.index in live and live[g.index].uuid == g.uuid and live[g.index].name == g.name for g in (a, b))
    lk = devices.topology().link(a.index, b.index) if here else None
    if lk is None or not lk.estimated_bandwidth:
        return _spec_link(a, b)
    label = f"{lk.label}, {lk.kind}"
    if lk.nvlinks:
        return Hop(lk.estimated_bandwidth, lk.estimated_latency, label, lk.p2p)
    return _pcie_hop(lk.estimated_bandwidth, lk.estimated_latency or link_figures.PCIE_HOP_LATENCY, label, lk.p2p)


def machine(units, config, dtype: str, gpus: dict, device_of, parallel: str,
            compiled: bool) -> tuple[Machine | None, list[str]]:
    """The Machine for a model (its placement units) on `gpus` (cuda index -> inventory GPU); None where a GPU has
    no known bandwidth (the reasons in the list)."""
    figures, notes = {}, []
    for n, gpu in sorted(gpus.items()):
        fig, why = gpu_figures(n, gpu, dtype)
        if fig is None:
            return None, why
        figures[n] = fig
        notes += [w for w in why if w not in notes]
    stages = stages_of(units, config, dtype, (lambda name: "all") if parallel == "tensor" else device_of)
    used = sorted({s.device for s in stages if isinstance(s.device, int)})
    links = {}
    if parallel == "tensor":
        ordered = [gpus[n] for n in sorted(gpus)]
        pairs = [link(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:]]
        links["ring"] = min(pairs, key=lambda h: h.bandwidth) if pairs else Hop(1.0, 0.0, "none")
        key = "compiled_tensor" if compiled else "dtensor"
    else:
        for a in used:
            for b in used:
                if a != b:
                    links[(a, b)] = link(gpus[a], gpus[b])
        if any(s.device in ("cpu", "disk") for s in stages):
            notes.append("offloaded units are copied to the first GPU for every forward")
        split = len(used) > 1
        key = ("compiled_split" if split else "compiled") if compiled else ("hooks" if split else "eager")
        figures = {n: f for n, f in figures.items() if n in used or not used}
    if getattr(text_config(config), "num_experts_per_tok", None):
        notes.append("mixture of experts: every expert's weights counted as read each step (an upper bound)")
    path = CALIBRATION.path(key)
    prefill = None
    if compiled:  # transformers compiles the decode step only: the prefill runs eager
        eager = CALIBRATION.path(_EAGER_OF[key])
        prefill = HostPath(f"{key} prefill", f"{eager.label}, the prefill of compiled generate", eager.per_layer,
                           path.per_step)
    return Machine(stages, figures, parallel, path, config, dtype, links, tuple(notes), prefill), []


def describe(m: Machine, where: str) -> str:
    """One paragraph on what the modelled figures rest on."""
    names = sorted({g.name for g in m.gpus.values()})
    gpu = "; ".join(f"{name}: {g.bandwidth / 1e9:,.0f} GB/s" + (f", {g.flops / 1e12:,.0f} TFLOP/s" if g.flops else "")
                    for name in names for g in [next(x for x in m.gpus.values() if x.name == name)])
    links = ""
    if m.parallel == "tensor":
        ring = m.links["ring"]
        links = f"; an all-reduce after attention and after the MLP over {ring.label} (~{ring.bandwidth / 1e9:,.0f} " \
                f"GB/s, {ring.latency * 1e6:.1f} us per hop)"
    elif m.links:
        hop = next(iter(m.links.values()))
        links = f"; a hand-off per change of GPU over {hop.label} (~{hop.bandwidth / 1e9:,.0f} GB/s)"
    host = f"{m.path.per_layer * 1e3:.3g} ms per layer" + (f" + {m.path.per_step * 1e3:.3g} ms per token"
                                                             if m.path.per_step else "")
    return (f"{MODELLED} for {where} ({gpu}; kernels at {CALIBRATION.bandwidth_fraction:.0%} of the bandwidth and "
            f"{CALIBRATION.compute_fraction:.0%} of the compute){links}; host: {m.path.label}, {host}, calibrated on "
            f"{CALIBRATION.measured_on}")


# --- a loaded model -----------------------------------------------------------------------------------------------

def _units_for(config, dtype: str, plan=None) -> list:
    """The placement units of the model: its plan's where it was loaded from one, else built on the meta device."""
    if plan is not None and getattr(plan, "dtype", None) == dtype and getattr(plan, "units", None):
        return plan.units
    from ..planning.meta_model import build

    return build(config, dtype).units


def for_model(model, batch: int, prompt_len: int, new_tokens: int, compiled: bool) -> Modelled | None:
    """Modelled figures for an in-process model placed on simulated GPUs (its load report's placement); None where
    it is on no GPU or a GPU's figures are not known (`why_not` says why)."""
    from .. import visibility
    from ..planning.meta_model import dtype_name

    report = getattr(model, "nbgpu_load", None)
    where = placement.gpu_map(model)
    used = sorted({placement.normalise(d) for d in where.values()} - {"cpu", "disk"})
    if not used:
        return None
    planned = {d.cuda_index: d.gpu for d in report.plan.devices} if report is not None and report.plan else {}
    targets = visibility.current().targets
    gpus = {n: planned.get(n) or (targets[n].gpu if n < len(targets) else None) for n in used}
    if any(g is None for g in gpus.values()):
        return None
    dtype = dtype_name(next(model.parameters()).dtype)
    units = _units_for(model.config, dtype, report.plan if report is not None else None)
    m, _ = machine(units, model.config, dtype, gpus, lambda name: placement.device_of(where, name), "layers",
                   compiled)
    if m is None:
        return None
    n = len(m.gpus)
    kind = f"{n} simulated {gpus[used[0]].name}" + ("s" if n > 1 else "") + (", a layer split" if n > 1 else "")
    return run(m, batch, prompt_len, new_tokens, describe(m, kind))


def why_not(model) -> str | None:
    """Why a simulated model's timings cannot be modelled, or None."""
    from .. import visibility
    from .roofline import bandwidth

    where = placement.gpu_map(model)
    used = sorted({placement.normalise(d) for d in where.values()} - {"cpu", "disk"})
    targets = visibility.current().targets
    for n in used:
        gpu = targets[n].gpu if n < len(targets) else None
        if gpu is None or not bandwidth(gpu):
            return (f"cuda:{n} is a simulated GPU given only by its size, with no bandwidth or compute figures; "
                    f"simulate a named model (e.g. nbgpu.simulate('{devices.DEFAULT_SPEC}')) for modelled timings")
    return None


def for_tensor_model(model, batch: int, prompt_len: int, new_tokens: int, compiled: bool) -> Modelled | None:
    """Modelled figures for a tensor-parallel model (`TensorParallelModel`) on simulated GPUs."""
    report = model.nbgpu_load
    gpus = dict(enumerate(model.gpus))
    units = _units_for(model.config, report.dtype, report.plan)
    m, _ = machine(units, model.config, report.dtype, gpus, None, "tensor", compiled)
    if m is None:
        return None
    kind = f"{len(gpus)} simulated {model.gpus[0].name}s, tensor parallel"
    return run(m, batch, prompt_len, new_tokens, describe(m, kind))


def apply(result, modelled: Modelled, explain: bool = True):
    """A BenchResult whose timings are `modelled`'s (the CPU run's clock goes into a note, never into a figure)."""
    from dataclasses import replace

    cpu = sum(result.ttft) + sum(result.decode_seconds)
    runs = len(result.ttft)
    proof = (f"the CPU ran generate {runs} time{'s' if runs > 1 else ''} and made exactly {result.new_tokens} tokens "
             f"per sequence (it proves the code path; its {cpu:.2f} s are not shown as a GPU's speed; modelled "
             "timings are the same on every run)")
    fields = modelled.bench_fields(result.repeats)
    if not explain:
        fields["timeline"] = None
    label = result.label if MODELLED in result.label else f"{result.label} ({MODELLED})"
    cpu_times = dict(ttft=result.ttft, decode_seconds=result.decode_seconds, step_latencies=result.step_latencies)
    return replace(result, label=label, modelled=modelled.description, cpu_times=cpu_times,
                   notes=[*result.notes, *modelled.notes, proof], **fields)
