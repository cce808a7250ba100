"""`nbgpu.bench`: steady-state generation figures, timed honestly.

Warm-up runs are discarded; every timestamp is taken after synchronising all GPUs the model uses; each run makes
exactly `new_tokens` tokens per sequence (end-of-sequence is suppressed), greedily.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field

from .. import devices
from ..errors import UsageError
from ..units import format_size
from . import arguments, oom, placement, roofline, timeline
from .load import SIMULATED_NOTE


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
            "run": self.label, "devices": ",".join(map(str, self.devices)),
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
        lines = [
            f"{self.label}{sim}: {'compiled' if self.compiled else 'eager'}, batch {self.batch}, prompt "
            f"{self.prompt_len}, {self.new_tokens} new tokens, {self.repeats} runs after {self.warmup} warm-up",
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
        return "\n".join(lines)

    def figure(self):
        from ..views.bench_view import bench_figure

        return bench_figure(self)

    def _repr_html_(self) -> str:
        from ..views.bench_view import bench_html

        return bench_html(self)


class _StepClock:
    """A logits processor that notes the time each token's logits are ready, after synchronising the GPUs."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores


def _generation_config(model, new_tokens: int, compile: bool):
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    gen = copy.deepcopy(base) if base is not None else GenerationConfig()
    eos = gen.eos_token_id if gen.eos_token_id is not None else getattr(model.config, "eos_token_id", None)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    gen.update(do_sample=False, temperature=None, top_p=None, top_k=None, num_beams=1,
               max_new_tokens=new_tokens, min_new_tokens=new_tokens, max_length=None,
               pad_token_id=pad if pad is not None else 0, stop_strings=None)
    if compile:
        from transformers import CompileConfig

        gen.cache_implementation = "static"
        gen.compile_config = CompileConfig(mode="reduce-overhead", fullgraph=False)
    return gen


def _prompts(model, batch, prompt_len, tokenizer, prompt, seed):
    import torch

    device = model.get_input_embeddings().weight.device
    if prompt is not None:
        if tokenizer is None:
            raise UsageError("a text prompt needs its tokenizer: bench(model, tokenizer=tok, prompt='...')")
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:1]
        ids = ids.repeat(batch, 1)
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, prompt_len), generator=gen)
    return ids.to(device)


def _label(model, compile: bool, devices_used, simulated: bool) -> str:
    name = str(getattr(model.config, "_name_or_path", "") or type(model).__name__).rstrip("/").split("/")[-1]
    if simulated:
        n = len({d for d in placement.gpu_map(model).values() if isinstance(d, int)})
        where = f"{n} simulated GPU" + ("s" if n != 1 else "")
    else:
        plural = "s" if len(devices_used) > 1 else ""
        where = "CPU" if devices_used == ["cpu"] else f"{len(devices_used)} GPU{plural}"
    return f"{name} {where} {'compiled' if compile else 'eager'}"


def bench(model, batch: int = 1, prompt_len: int = 128, new_tokens: int = 128, repeats: int = 5, warmup: int = 1,
          compile: bool = False, *, tokenizer=None, prompt: str | None = None, label: str | None = None,
          explain: bool = True, seed: int = 0) -> BenchResult:
    """Time `repeats` generate runs of `model` after `warmup` discarded ones.

    Random prompts of `prompt_len` tokens by default; with `tokenizer` and `prompt`, that text (its length sets
    prompt_len). `compile=True` uses transformers' static cache and torch.compile (CUDA only; two warm-up runs at
    least, the first compiles). `explain` adds the roofline estimate and a timeline of one decode step.
    The prompt plus the new tokens must fit the model's positions (max_position_embeddings).
    """
    batch, prompt_len, new_tokens, repeats, warmup, compile, label, explain, seed = arguments.bench_arguments(
        model, batch, prompt_len, new_tokens, repeats, warmup, compile, tokenizer, prompt, label, explain, seed)
    for name, value, low in (("batch", batch, 1), ("prompt_len", prompt_len, 1), ("new_tokens", new_tokens, 2),
                             ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be a whole number of at least {low}, not {value!r}")
    import torch

    sim = devices.simulated()
    simulated = sim is not None or bool(getattr(getattr(model, "nbgpu_load", None), "simulated", False))
    gpus = placement.cuda_devices(model)
    if compile and not gpus:
        raise UsageError("compile=True needs the model on a CUDA GPU: transformers compiles generate only there "
                         f"(this model runs on the CPU{', simulated GPUs' if simulated else ''}); use compile=False")
    if compile:
        warmup = max(warmup, 2)  # the first run compiles, the next records CUDA graphs
    sync = placement.synchronizer(gpus)
    ids = _prompts(model, batch, prompt_len, tokenizer, prompt, seed)
    prompt_len = ids.shape[1]
    gen = _generation_config(model, new_tokens, compile)
    mask = torch.ones_like(ids)
    used = gpus or ["cpu"]

    def one_run():
        clock = _StepClock(sync)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen,
                                 logits_processor=[clock])
        sync()
        made = out.shape[1] - prompt_len
        del out
        if made != new_tokens or len(clock.times) != new_tokens:
            raise RuntimeError(f"generate made {made} tokens per sequence, not {new_tokens}")
        return clock.times[0] - start, clock.times[-1] - clock.times[0], \
            [b - a for a, b in zip(clock.times, clock.times[1:])]

    def measure():
        for _ in range(warmup):
            one_run()
        for d in gpus:
            torch.cuda.reset_peak_memory_stats(d)
        runs = [one_run() for _ in range(repeats)]
        peak = {d: torch.cuda.max_memory_allocated(d) for d in gpus}
        return runs, peak

    _simulate_load(model, sim, busy=True)
    try:
        runs, peak = oom.guarded(measure, lambda s: _bench_oom(s, model, batch, prompt_len, new_tokens))
        on_gpus = any(isinstance(d, int) for d in placement.gpu_map(model).values())
        steps = timeline.decode_step(model, ids, simulated) if explain and on_gpus else None
    finally:
        _simulate_load(model, sim, busy=False)
    result = BenchResult(
        label=label or _label(model, compile, used, simulated),
        batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        repeats=repeats, warmup=warmup, compiled=compile, simulated=simulated, devices=used,
        ttft=[r[0] for r in runs], decode_seconds=[r[1] for r in runs],
        step_latencies=[x for r in runs for x in r[2]], generated_tokens=batch * new_tokens, peak_memory=peak,
        timeline=steps,
    )
    if explain and on_gpus:
        result.roofline = roofline.estimate(model, batch, prompt_len, new_tokens, result.decode_tokens_per_s,
                                            simulated)
    return result


def _simulate_load(model, sim, busy: bool) -> None:
    """While a simulated run goes, each simulated GPU shows its share of the weights as utilisation."""
    report = getattr(model, "nbgpu_load", None)
    if sim is None or report is None:
        return
    total = sum(g.weights for g in report.gpus) or 1
    for g in report.gpus:
        if g.gpu_index is not None:
            sim.set_utilization(g.gpu_index, round(100 * g.weights / total) if busy else 0)


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
