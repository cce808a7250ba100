"""Memory other than weights, per GPU: the KV cache, the activations at the peak, the allocator and the context.

What `generate` holds follows from transformers' own code (checked against measured peaks, bench/plan_vs_measured.py):

* KV cache: 2 x kv_heads x head_dim per token and layer (DynamicCache), `min(tokens, window)` for sliding-window and
  chunked layers, the compressed latent (kv_lora_rank + rope dims) for latent attention; prompt + new tokens at the
  end of a run. A dynamic cache grows by concatenation, so the last step also holds a second copy of one layer's
  keys (or values); a static cache (compiled generate) is allocated whole at the first step.
* Prefill activations, for batch x prompt tokens (or a prefill chunk): the decoder layer's input and residual, the
  rotary cos/sin, the embeddings' output on the GPU that holds the embeddings, then the larger of the MLP phase
  (normed input + gate, up and their product: 3 x intermediate; 2 x for a plain MLP) and the attention phase (q, k,
  v, rotary temporaries, the output; eager attention adds the batch x heads x prompt x prompt score matrix in bf16
  and float32). For a Llama 8B shape this is 4.06 x hidden + 3 x intermediate per token, within 1% of the measured
  peak.
* Logits: generate keeps the last position's logits and their float32 copy (and the processed scores).
* Allocator: cuBLAS's workspace, and the slack the caching allocator keeps above what it hands out; the CUDA context.
  These cannot be derived and come from the calibration table (nbgpu/devices/calibration.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import checks
from ..devices.calibration import DEFAULT as CALIBRATION
from ..errors import UsageError

DEFAULT_CONTEXT = CALIBRATION.context
DEFAULT_SEQ_LEN = 2048
PCIE_BANDWIDTH = 25e9  # bytes/s a PCIe 4.0 x16 link moves in practice (estimate for offload slowdowns)
DISK_BANDWIDTH = 2e9  # bytes/s of a fast NVMe drive (estimate)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_FULL = ("full_attention", "attention", "global_attention")
_WINDOWED = ("sliding_attention", "hybrid_sliding", "reference_sliding_attention")
_STATELESS = ("dummy", "moe", "mlp")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def dtype_bytes(dtype: str) -> int:
    return _BYTES.get(dtype, 2)


def text_config(config):
    """The language model's part of a config (multimodal configs nest it)."""
    getter = getattr(config, "get_text_config", None)
    return getter() if getter else config


@dataclass(frozen=True)
class Workload:
    """What the plan is for: batch x (prompt + new tokens), the prefill chunk, attention and cache kind."""

    batch: int
    prompt_len: int
    new_tokens: int
    prefill_chunk: int | None = None  # generate's prefill_chunk_size: the prompt goes through in chunks of this many
    attention: str = "sdpa"  # transformers' attn_implementation
    cache: str = "dynamic"  # "dynamic" (grows per token) or "static" (compiled generate: allocated whole)

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.new_tokens

    @property
    def chunk(self) -> int:
        """Prompt tokens of one sequence that go through the layers at once."""
        return min(self.prompt_len, self.prefill_chunk or self.prompt_len)


def layer_types(config) -> list[str]:
    """Per decoder layer, its cache kind, mirroring transformers' cache_utils.get_layer_types_and_kwargs."""
    cfg = text_config(config)
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is None:
        if getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True) is not False:
            types = ["sliding_attention"] * n
        elif getattr(cfg, "attention_chunk_size", None) is not None:
            types = ["chunked_attention"] * n
        else:
            types = ["full_attention"] * n
    return list(types)


def head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_bytes_per_token(config, dtype: str) -> tuple[int, str]:
    """Bytes one token of one sequence takes in one attention layer's cache, and how that was worked out."""
    cfg = text_config(config)
    b = dtype_bytes(dtype)
    if getattr(cfg, "kv_lora_rank", None):
        rope = getattr(cfg, "qk_rope_head_dim", 0) or 0
        return (cfg.kv_lora_rank + rope) * b, f"latent attention: kv_lora_rank {cfg.kv_lora_rank} + rope {rope}"
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = head_dim(cfg)
    return 2 * kv_heads * hd * b, f"2 x {kv_heads} kv heads x {hd} head_dim"


def kv_per_layer(config, dtype: str, batch: int, tokens: int) -> tuple[dict[int, int], set[str]]:
    """KV cache bytes of each decoder layer holding `tokens` tokens of `batch` sequences; unknown layer kinds."""
    cfg = text_config(config)
    per_token, _ = kv_bytes_per_token(cfg, dtype)
    out, unknown = {}, set()
    for i, kind in enumerate(layer_types(cfg)):
        if kind in _FULL:
            held = tokens
        elif kind in _WINDOWED:
            held = min(tokens, getattr(cfg, "sliding_window", None) or tokens)
        elif kind == "chunked_attention":
            held = min(tokens, getattr(cfg, "attention_chunk_size", None) or tokens)
        else:
            if kind not in _STATELESS:
                unknown.add(kind)
            held = 0
        out[i] = per_token * held * batch
    return out, unknown


def intermediate(cfg) -> int:
    """The MLP width a token goes through: for mixture-of-experts, its experts' widths added (plus shared ones)."""
    experts_per_token = getattr(cfg, "num_experts_per_tok", None)
    moe = getattr(cfg, "moe_intermediate_size", None) or (getattr(cfg, "intermediate_size", None)
                                                          if getattr(cfg, "num_local_experts", None) else None)
    if experts_per_token and moe:
        shared = getattr(cfg, "shared_expert_intermediate_size", 0) or 0
        shared += (getattr(cfg, "n_shared_experts", 0) or 0) * moe
        return moe * experts_per_token + shared
    return getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * cfg.hidden_size


@dataclass
class Estimates:
    """Every non-weight figure of a plan, for the whole model; `device()` sums them for one GPU's share."""

    workload: Workload
    dtype: str
    kv_total: dict[int, int]  # layer -> KV bytes at the end of the run (prompt + new tokens)
    kv_prompt: dict[int, int]  # layer -> KV bytes after the prefill
    hidden: int
    width: int  # MLP intermediate a token goes through (the MLP phase's width)
    mlp_widths: int  # how many intermediates are live at the MLP's peak: gate, up and product (3); a plain MLP 2,
    # or 4 with GPT-2's tanh GELU written out in Python (0.5 x input and two temporaries beside its input)
    attention_width: int  # q + k + v + rotary temporaries + output, per token, in elements
    rope_width: int  # cos and sin per token, in elements
    score_bytes: int  # eager attention's score matrices at the prefill's peak (0 for sdpa/flash)
    logits: int  # on the GPU of the output projection
    workspace: int = CALIBRATION.workspace
    slack_blocks: float = CALIBRATION.slack_blocks
    notes: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)  # piece -> where its figure comes from

    @property
    def tokens(self) -> int:
        """Tokens that go through the layers at once in the prefill."""
        return self.workload.batch * self.workload.chunk

    def transient(self, holds_embeddings: bool, tp: int = 1) -> int:
        """Peak temporaries of one decoder layer's prefill on a GPU (the model's hidden state is whole on every GPU
        under tensor parallelism; the MLP and attention widths are split)."""
        b = dtype_bytes(self.dtype)
        stream = 2 * self.hidden + self.rope_width + (self.hidden if holds_embeddings else 0)
        mlp = self.hidden + self.mlp_widths * self.width // tp
        attn = self.hidden + self.attention_width // tp
        return self.tokens * (stream + max(mlp, attn)) * b + self.score_bytes // tp

    def largest_block(self, tp: int = 1) -> int:
        return self.tokens * max(self.width // tp, self.hidden) * dtype_bytes(self.dtype)

    def device(self, layers: list[int], holds_embeddings: bool, holds_head: bool, kv_share: float = 1.0,
               tp: int = 1, slack_blocks: float | None = None) -> DeviceMemory:
        """One GPU's KV cache, activations at its peak and allocator overhead, for the decoder layers it runs."""
        return self.device_sums(sum(self.kv_total.get(i, 0) for i in layers),
                                sum(self.kv_prompt.get(i, 0) for i in layers),
                                max((self.kv_total.get(i, 0) for i in layers), default=0), bool(layers),
                                holds_embeddings, holds_head, kv_share, tp, slack_blocks)

    def device_sums(self, kv_end: int, kv_prefill: int, largest_kv: int, has_layers: bool, holds_embeddings: bool,
                    holds_head: bool, kv_share: float = 1.0, tp: int = 1,
                    slack_blocks: float | None = None) -> DeviceMemory:
        """`device` from the sums over its layers (KV at the end and after the prefill, the largest layer's KV)."""
        static = self.workload.cache == "static"
        kv_end = int(kv_end * kv_share)
        kv_prefill = kv_end if static else int(kv_prefill * kv_share)
        growth = 0 if static else int(largest_kv * kv_share) // 2  # keys (or values) copied as the cache grows
        logits = self.logits if holds_head else 0
        if has_layers:
            peak = max(kv_prefill + self.transient(holds_embeddings, tp), kv_end + growth)
            slack = int((self.slack_blocks if slack_blocks is None else slack_blocks) * self.largest_block(tp))
            allocator = self.workspace + slack
        else:
            peak = kv_end + (self.tokens * self.hidden * dtype_bytes(self.dtype) if holds_embeddings else 0)
            allocator = self.workspace if holds_head else 0
        return DeviceMemory(kv_cache=kv_end, activations=peak - kv_end + logits, allocator=allocator)


@dataclass(frozen=True)
class DeviceMemory:
    kv_cache: int  # what the cache holds at the end of the run
    activations: int  # above the cache at this GPU's peak (prefill temporaries, or the cache's growth, + logits)
    allocator: int  # cuBLAS workspace + the caching allocator's slack (calibrated)


def _attention_width(cfg) -> tuple[int, int]:
    """Per token, elements of q, k, v, the rotary temporaries and the attention output; and of cos + sin."""
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hd = head_dim(cfg)
    if getattr(cfg, "kv_lora_rank", None):  # latent attention: q and k carry rope and nope parts
        hd = (getattr(cfg, "qk_nope_head_dim", 0) or 0) + (getattr(cfg, "qk_rope_head_dim", 0) or 0) or hd
        kv_heads = heads
    rope = int(hd * (getattr(cfg, "partial_rotary_factor", 1.0) or 1.0))
    q, kv = heads * hd, 2 * kv_heads * hd
    return q + kv + 2 * q + q, 2 * rope


def mlp_widths(cfg, gated: bool) -> int:
    """Intermediates live at once in the MLP: gate, up and their product; or the plain MLP's input and output of
    its activation, four with a tanh GELU written out in Python (GPT-2's gelu_new)."""
    if gated:
        return 3
    act = getattr(cfg, "activation_function", None) or getattr(cfg, "hidden_act", None)
    return 4 if act == "gelu_new" else 2


def estimate(config, dtype: str, workload: Workload, gated: bool = True) -> Estimates:
    cfg = text_config(config)
    b = dtype_bytes(dtype)
    w = workload
    kv_total, unknown = kv_per_layer(cfg, dtype, w.batch, w.seq_len)
    kv_prompt, _ = kv_per_layer(cfg, dtype, w.batch, w.prompt_len)
    attention_width, rope_width = _attention_width(cfg)
    heads = cfg.num_attention_heads
    scores = 0
    if w.attention == "eager":  # bf16 scores, their float32 softmax and its bf16 copy, plus the causal mask
        scores = w.batch * heads * w.chunk * w.prompt_len * (2 * b + 4) + w.batch * w.chunk * w.prompt_len * b
    # generate keeps the last position: logits, their float32 copy and the processed scores
    logits = w.batch * cfg.vocab_size * (b + 4 + 4)
    est = Estimates(w, dtype, kv_total, kv_prompt, cfg.hidden_size, intermediate(cfg), mlp_widths(cfg, gated),
                    attention_width, rope_width, scores, logits)
    kv_rule = kv_bytes_per_token(cfg, dtype)[1]
    est.sources = {
        "weights": "exact: accelerate's module sizes",
        "KV cache": f"{kv_rule} x {b} bytes x {w.batch} x ({w.prompt_len} + {w.new_tokens}) tokens per layer",
        "activations": f"prefill of {w.batch} x {w.chunk} tokens: layer input, residual, rotary, embeddings' output, "
                       f"then the larger of the MLP ({est.mlp_widths} x {est.width}) and attention "
                       f"({w.attention}{', with the score matrix' if scores else ''}) phases; logits of the last "
                       "position in float32 (transformers' forward, checked against measured peaks)",
        "allocator": f"cuBLAS workspace and the allocator's slack ({CALIBRATION.slack_blocks:g} x the largest prefill "
                     f"block), calibrated on {CALIBRATION.measured_on}",
        "context": f"CUDA context, calibrated on {CALIBRATION.measured_on}",
    }
    if getattr(cfg, "kv_lora_rank", None):
        est.notes.append("latent attention: the cache holds the compressed latent as transformers stores it; "
                         "engines that expand it per head need more")
    if unknown:
        est.notes.append(f"layers of kind {', '.join(sorted(unknown))} keep a state that is not estimated "
                         "(counted as 0)")
    if getattr(cfg, "num_experts_per_tok", None):
        est.notes.append("mixture of experts: the MLP phase assumes every token's experts are evaluated at once "
                         "(an upper bound for transformers' expert loop; not calibrated)")
    if w.attention not in ("sdpa", "eager", "flash_attention_2", "flash_attention_3"):
        est.notes.append(f"attention {w.attention!r}: estimated like sdpa (no score matrix)")
    return est


def workload(batch, seq_len, prompt_len, new_tokens, prefill_chunk, attn_implementation, cache) -> Workload:
    """The run a plan is for. Only seq_len (the old form): the whole length is planned as a prompt (the largest
    prefill). prompt_len and/or new_tokens: the prefill follows the prompt, the KV cache prompt + new tokens."""
    batch = checks.integer(batch, "batch", 1, checks.MAX_BATCH)
    total = None if seq_len is None else checks.integer(seq_len, "seq_len", 1, checks.MAX_TOKENS)
    prompt = None if prompt_len is None else checks.integer(prompt_len, "prompt_len", 1, checks.MAX_TOKENS)
    new = None if new_tokens is None else checks.integer(new_tokens, "new_tokens", 0, checks.MAX_TOKENS)
    if prompt is None and new is None:
        prompt, new = (DEFAULT_SEQ_LEN if total is None else total), 0
    elif new is None:
        new = 0 if total is None else total - prompt
        if new < 0:
            raise UsageError(f"prompt_len={prompt} is longer than seq_len={total}: give prompt_len <= seq_len")
    elif prompt is None:
        prompt = (DEFAULT_SEQ_LEN if total is None else total) - new
        if prompt < 1:
            raise UsageError(f"new_tokens={new} leaves no prompt in seq_len={total or DEFAULT_SEQ_LEN}: give "
                             "prompt_len, or a longer seq_len")
    elif total is not None and prompt + new != total:
        raise UsageError(f"seq_len={total} is not prompt_len + new_tokens = {prompt} + {new}: give two of them")
    chunk = None if prefill_chunk is None else checks.integer(prefill_chunk, "prefill_chunk", 1, checks.MAX_TOKENS)
    attention = checks.choice(attn_implementation, "attn_implementation", ATTENTION)
    cache = checks.choice(cache, "cache", ("dynamic", "static"))
    return Workload(batch, prompt, new, chunk, attention, cache)
