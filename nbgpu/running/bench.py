"""`nbgpu.bench`: steady-state generation figures, timed honestly.

Warm-up runs are discarded; every timestamp is taken after synchronising all GPUs the model uses; each run makes
exactly `new_tokens` tokens per sequence (end-of-sequence is suppressed), greedily.
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from dataclasses import dataclass, field

from .. import devices
from ..errors import UsageError
from ..units import format_size
from . import (
    arguments,
    cost_model,
    oom,
    placement,
    protocol,
    roofline,
    split_compile,
    step_profile,
    tensor_parallel,
    timeline,
)
from .report import SIMULATED_NOTE


@dataclass
class BenchResult:
    """Figures of `repeats` measured generate runs (after `warmup` discarded ones). Times in seconds."""

    label: str
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int
    warmup: int
    compiled: bool
    simulated: bool
    devices: list  # where the model ran: cuda indexes, or ["cpu"]
    ttft: list[float]  # per repeat: start of generate -> first token's logits ready
    decode_seconds: list[float]  # per repeat: first token -> last token
    step_latencies: list[float]  # every decode step of every repeat
    generated_tokens: int  # per repeat, counted from the output: batch * new_tokens
    peak_memory: dict = field(default_factory=dict)  # cuda index -> bytes (torch allocator)
    roofline: roofline.Roofline | None = None
    timeline: timeline.Timeline | None = None
    notes: list[str] = field(default_factory=list)  # what a reader needs to read the figures right
    modelled: str | None = None  # None: measured; else what the modelled timings rest on (simulated GPUs)
    cpu_times: dict | None = None  # modelled runs: the CPU run's own ttft / decode_seconds / step_latencies (proof of
    # the code path, never shown as a GPU's speed)

    # --- derived figures (medians across repeats) ---
    @property
    def ttft_s(self) -> float:
        return statistics.median(self.ttft)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.ttft_s

    def _decode_rates(self) -> list[float]:
        return [self.batch * (self.new_tokens - 1) / s for s in self.decode_seconds]

    @property
    def decode_tokens_per_s(self) -> float:
        return statistics.median(self._decode_rates())

    @property
    def decode_spread(self) -> tuple[float, float]:
        """Lowest and highest decode tokens/s across repeats."""
        rates = self._decode_rates()
        return min(rates), max(rates)

    def _percentile(self, q: float) -> float:
        import numpy as np

        return float(np.percentile(self.step_latencies, q))

    @property
    def latency_p50_s(self) -> float:
        return self._percentile(50)

    @property
    def latency_p90_s(self) -> float:
        return self._percentile(90)

    def summary(self) -> dict:
        """The figures as one flat dict (a row of `compare`)."""
        lo, hi = self.decode_spread
        frac = self.roofline.fraction if self.roofline else None
        bound = self.roofline.tokens_per_s if self.roofline else None
        return {
            "run": self.label, "timing": "modelled" if self.modelled else "measured",
            "devices": ",".join(map(str, self.devices)),
            "mode": "compiled" if self.compiled else "eager", "batch": self.batch,
            "prompt_len": self.prompt_len, "new_tokens": self.new_tokens, "repeats": self.repeats,
            "ttft_ms": self.ttft_s * 1e3, "prefill_tok_s": self.prefill_tokens_per_s,
            "decode_tok_s": self.decode_tokens_per_s, "decode_tok_s_min": lo, "decode_tok_s_max": hi,
            "latency_p50_ms": self.latency_p50_s * 1e3, "latency_p90_ms": self.latency_p90_s * 1e3,
            "roofline_tok_s (estimate)": bound, "roofline_fraction": frac,
            "peak_memory": {f"cuda:{k}": v for k, v in self.peak_memory.items()},
            "simulated": self.simulated,
        }

    def __repr__(self) -> str:
        lo, hi = self.decode_spread
        sim = f" [{SIMULATED_NOTE}]" if self.simulated else ""
        if self.modelled:
            sim = f" [{SIMULATED_NOTE}; timings {cost_model.MODELLED}]" if self.simulated else \
                f" [timings {cost_model.MODELLED}]"
        lines = [
            f"{self.label}{sim}: {'compiled' if self.compiled else 'eager'}, batch {self.batch}, prompt "
            f"{self.prompt_len}, {self.new_tokens} new tokens, {self.repeats} runs "
            + ("modelled alike" if self.modelled else f"after {self.warmup} warm-up"),
            f"  time to first token {self.ttft_s * 1e3:.1f} ms, prefill {self.prefill_tokens_per_s:,.0f} tokens/s",
            f"  decode {self.decode_tokens_per_s:,.1f} tokens/s (runs {lo:,.1f} .. {hi:,.1f}), per-token latency "
            f"p50 {self.latency_p50_s * 1e3:.2f} ms, p90 {self.latency_p90_s * 1e3:.2f} ms",
        ]
        if self.peak_memory:
            peaks = ", ".join(f"cuda:{k} {format_size(v, 'auto')}" for k, v in self.peak_memory.items())
            lines.append("  peak memory " + peaks)
        if self.roofline is not None:
            lines.append("  " + repr(self.roofline))
        if self.timeline is not None:
            lines.append("  " + repr(self.timeline))
        if self.modelled:
            lines.append(f"  timings: {self.modelled}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _prompts(vocab: int, batch, prompt_len, tokenizer, prompt, seed):
    """The prompt ids on the CPU: random tokens, or `prompt` through its tokenizer, repeated for the batch."""
    import torch

    if prompt is not None:
        if tokenizer is None:
            raise UsageError("a text prompt needs its tokenizer: bench(model, tokenizer=tok, prompt='...')")
        return tokenizer(prompt, return_tensors="pt").input_ids[:1].repeat(batch, 1)
    return torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))


def _bench_tensor_parallel(model, *, batch, prompt_len, new_tokens, repeats, warmup, compile, tokenizer, prompt,
                           label, explain, seed) -> BenchResult:
    """The same protocol in every worker, rank 0's clock; with `explain`, on GPUs, where one decode step's time
    went on each GPU (matrix, communication, other, idle), from each worker's profile."""
    model.check_running()
    ids = _prompts(model.config.get_text_config().vocab_size, batch, prompt_len, tokenizer, prompt, seed)
    # simulated GPUs: the workers run eager on the CPU and the timings are modelled for the simulated GPUs
    modelled = cost_model.for_tensor_model(model, batch, ids.shape[1], new_tokens, compile) \
        if model.simulated else None
    if compile and model.simulated and modelled is None:
        raise UsageError("compile=True needs the model on CUDA GPUs: transformers compiles generate only there "
                         "(these workers run on the CPU for simulated GPUs, whose figures cannot be modelled); use "
                         "compile=False")
    run_compiled = compile and not model.simulated
    if run_compiled:
        warmup = max(warmup, 2)  # the first run compiles, the next records CUDA graphs
    # modelled timings are the same on every run: the workers run generate once, to prove the path and the tokens
    cpu_repeats, cpu_warmup = (1, 0) if modelled is not None else (repeats, warmup)
    tensor_parallel.simulated_busy(model, True, modelled.busy if modelled is not None else None)
    try:
        runs, peaks = model.measure(ids, new_tokens=new_tokens, repeats=cpu_repeats, warmup=cpu_warmup,
                                    compile=run_compiled)
        profile = model.profile_decode(ids, compile=run_compiled) if explain and not model.simulated else None
    finally:
        tensor_parallel.simulated_busy(model, False)
    steps = None if profile is None else timeline.from_profile(
        profile, "kernels the profiler saw in one decode step, in each worker (CUPTI); each GPU from its own step's "
                 "start (one process per GPU, no common clock)")
    where = f"{model.world_size} simulated GPUs" if model.simulated else str(model.world_size)
    mode = "compiled" if compile else "eager"
    result = BenchResult(
        label=label or f"{model.name} tensor-parallel {where} {mode}" + (f" batch {batch}" if batch > 1 else ""),
        batch=batch, prompt_len=ids.shape[1], new_tokens=new_tokens, repeats=repeats, warmup=warmup,
        compiled=compile, simulated=model.simulated, devices=list(range(model.world_size)),
        ttft=[r.ttft for r in runs], decode_seconds=[r.decode for r in runs],
        step_latencies=[x for r in runs for x in r.steps], generated_tokens=batch * new_tokens, peak_memory=peaks,
        timeline=steps)
    if modelled is not None:
        result = cost_model.apply(result, modelled, explain=explain)
    if explain:
        result.roofline = roofline.estimate_tensor_parallel(model, batch, result.prompt_len, new_tokens,
                                                            result.decode_tokens_per_s)
    return result


def _label(model, compile: bool, devices_used, simulated: bool) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__).rstrip("/").split("/")[-1]
    if simulated:
        n = len({d for d in placement.gpu_map(model).values() if isinstance(d, int)})
        where = f"{n} simulated GPU" + ("s" if n != 1 else "")
    else:
        plural = "s" if len(devices_used) > 1 else ""
        where = "CPU" if devices_used == ["cpu"] else f"{len(devices_used)} GPU{plural}"
    return f"{name} {where} {'compiled' if compile else 'eager'}"


SPLIT_COMPILED = ("compiled on a layer split: the hand-over between GPUs breaks the compiled graph inside the layer "
                  "loop, so each decoder layer is a compiled graph of its own and the host's work per layer remains "
                  "(faster than the eager split, slower than compiled on one GPU)")


class Sweep(list):
    """BenchResults of one model at several batch sizes (`nbgpu.bench(model, batch=[1, 8, 32])`)."""

    @property
    def label(self) -> str:
        return self[0].label.rsplit(" batch", 1)[0] if self else "empty sweep"

    def __repr__(self) -> str:
        rows = [f"  batch {r.batch:>4}: decode {r.decode_tokens_per_s:,.1f} tokens/s, per-token p50 "
                f"{r.latency_p50_s * 1e3:.2f} ms" for r in self]
        sim = f" [{SIMULATED_NOTE}]" if any(r.simulated for r in self) else ""
        if any(r.modelled for r in self):
            sim = f" [{SIMULATED_NOTE}; timings {cost_model.MODELLED}]" if sim else f" [timings {cost_model.MODELLED}]"
        return "\n".join([f"{self.label}: batch sweep{sim}", *rows]) if self else "Sweep([])"


def bench(model, batch: int | list[int] = 1, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 5,
          warmup: int = 1, compile: bool = False, *, tokenizer=None, prompt: str | None = None,
          label: str | None = None, explain: bool = True, seed: int = 0) -> BenchResult | Sweep:
    """Time `repeats` generate runs of `model` after `warmup` discarded ones.

    Random prompts of `prompt_len` tokens by default; with `tokenizer` and `prompt`, that text (its length sets
    prompt_len). `compile=True` uses transformers' static cache and torch.compile (CUDA only; two warm-up runs at
    least, the first compiles); on a model split over GPUs, each GPU's layers become one compiled graph and the
    hand-over between GPUs stays outside. `explain` adds the roofline estimate and where one decode step's time
    went on each GPU. A list of batch sizes runs one benchmark per size and returns a Sweep.
    """
    if isinstance(batch, (list, tuple)):
        if not batch or len(batch) > 64:
            raise UsageError(f"batch={batch!r}: give 1 to 64 batch sizes, e.g. batch=[1, 8, 32]")
        return Sweep(bench(model, b, prompt_len, new_tokens, repeats, warmup, compile, tokenizer=tokenizer,
                           prompt=prompt, label=f"{label} batch {b}" if label else None, explain=explain, seed=seed)
                     for b in batch)
    batch, prompt_len, new_tokens, repeats, warmup, compile, label, explain, seed = arguments.bench_arguments(
        model, batch, prompt_len, new_tokens, repeats, warmup, compile, tokenizer, prompt, label, explain, seed)
    if isinstance(model, tensor_parallel.TensorParallelModel):  # runs the same protocol in every worker
        return _bench_tensor_parallel(model, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                                     repeats=repeats, warmup=warmup, compile=compile, tokenizer=tokenizer,
                                     prompt=prompt, label=label, explain=explain, seed=seed)

    sim = devices.simulated()
    simulated = sim is not None or bool(getattr(getattr(model, "nbgpu_load", None), "simulated", False))
    gpus = placement.cuda_devices(model)
    ids = _prompts(model.config.get_text_config().vocab_size, batch, prompt_len, tokenizer, prompt, seed)
    ids = ids.to(model.get_input_embeddings().weight.device)
    prompt_len = ids.shape[1]
    # simulated GPUs: the CPU runs the model (eager) and the timings are modelled for the simulated GPUs
    modelled = cost_model.for_model(model, batch, prompt_len, new_tokens, compile) if simulated else None
    if compile and not gpus and modelled is None:
        why = cost_model.why_not(model) if simulated else None
        raise UsageError("compile=True needs the model on a CUDA GPU: transformers compiles generate only there "
                         f"(this model runs on the CPU{', simulated GPUs' if simulated else ''}); use compile=False"
                         + (f". {why}" if why else ""))
    compile_here = compile and bool(gpus)
    if compile_here:
        warmup = max(warmup, 2)  # the first run compiles, the next records CUDA graphs
    sync = placement.synchronizer(gpus)
    gen = protocol.generation_config(model, new_tokens, compile_here)
    split = len(gpus) > 1
    processors = [protocol.CudaGraphStep()] if compile_here and split else []
    used = gpus or ["cpu"]

    # modelled timings are the same on every run: the CPU runs generate once, to prove the path and the tokens
    cpu_repeats, cpu_warmup = (1, 0) if modelled is not None else (repeats, warmup)

    def measure():
        return protocol.measure(model, ids, gen, repeats=cpu_repeats, warmup=cpu_warmup, sync=sync,
                                cuda_devices=gpus, processors=processors)

    _simulate_load(model, sim, busy=True, modelled=modelled)
    try:
        with split_compile.light_transfers(model) if compile_here else nullcontext():
            runs, peak = oom.guarded(measure, lambda s: _bench_oom(s, model, batch, prompt_len, new_tokens))
            explain_here = explain and modelled is None
            steps = _timeline(model, ids, gen, gpus, processors, simulated) if explain_here else None
    finally:
        _simulate_load(model, sim, busy=False)
    result = BenchResult(
        label=label or _label(model, compile, used, simulated) + (f" batch {batch}" if batch > 1 else ""),
        batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        repeats=repeats, warmup=warmup, compiled=compile, simulated=simulated, devices=used,
        ttft=[r.ttft for r in runs], decode_seconds=[r.decode for r in runs],
        step_latencies=[x for r in runs for x in r.steps], generated_tokens=batch * new_tokens, peak_memory=peak,
        timeline=steps,
        notes=[SPLIT_COMPILED] if compile and split else [],
    )
    if modelled is not None:
        result = cost_model.apply(result, modelled, explain=explain)
    elif simulated and cost_model.why_not(model):
        result.notes.append(f"CPU wall clock, not a GPU's speed: {cost_model.why_not(model)}")
    if explain and (gpus or simulated):
        result.roofline = roofline.estimate(model, batch, prompt_len, new_tokens, result.decode_tokens_per_s,
                                            simulated)
    return result


def _timeline(model, ids, gen, gpus, processors, simulated):
    """Where one decode step went: the profiler's kernels on GPUs (the measured path itself), the host clock
    around each placed module on the CPU."""
    if gpus:
        profile = step_profile.profile_decode(model, ids, gen, gpus, processors)
        if profile is None:
            return None
        return timeline.from_profile(profile, "kernels the profiler saw in one decode step of the measured path "
                                              "(CUPTI), on one clock for every GPU")
    on_gpus = any(isinstance(d, int) for d in placement.gpu_map(model).values())
    return timeline.decode_step(model, ids, simulated) if on_gpus else None


def _simulate_load(model, sim, busy: bool, modelled=None) -> None:
    """While a simulated run goes, each simulated GPU shows as utilisation the share of a step it is modelled busy
    (as nvidia-smi counts it: time a kernel ran), else its share of the weights."""
    report = getattr(model, "nbgpu_load", None)
    if sim is None or report is None:
        return
    total = sum(g.weights for g in report.gpus) or 1
    share = modelled.busy if modelled is not None else {g.cuda_index: g.weights / total for g in report.gpus}
    for g in report.gpus:
        if g.gpu_index is not None:
            sim.set_utilization(g.gpu_index, round(100 * share.get(g.cuda_index, 0.0)) if busy else 0)


def _bench_oom(shortage: oom.Shortage, model, batch, prompt_len, new_tokens):
    report = getattr(model, "nbgpu_load", None)
    plan = report.plan if report is not None else None
    fit = None
    if plan is not None:
        plan_now = plan
        if (plan.batch, plan.seq_len) != (batch, prompt_len + new_tokens) and hasattr(plan, "with_batch"):
            try:
                plan_now = plan.with_batch(batch=batch, seq_len=prompt_len + new_tokens)
            except Exception:  # noqa: BLE001 - fall back to the plan the model was loaded with
                plan_now = plan
        fit = oom.plan_that_fits(plan_now, shortage)
    if fit is not None:
        offer = (f"This model's placement fits batch={fit.batch}, seq_len={fit.seq_len}: "
                 f"{oom.plan_call(fit)} (in the error's .plan).")
    elif batch > 1:
        offer = f"Try bench(model, batch={batch // 2}) or shorter prompt_len/new_tokens."
    else:
        offer = "Try a shorter prompt_len/new_tokens, or load with a plan that leaves room for the KV cache."
    return oom.NotEnoughMemory(f"Generating batch={batch}, {prompt_len}+{new_tokens} tokens ran "
                               f"{shortage.describe()}. The memory it held has been released and the kernel is "
                               f"usable. {offer}", shortage.missing, shortage.device, fit)
