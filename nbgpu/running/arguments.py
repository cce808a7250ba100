"""The boundary checks of `nbgpu.load` and `nbgpu.bench`: what they are given is checked before anything loads or
runs (see nbgpu.checks for the rules), and what the libraries below raise about a person's input becomes a
UsageError with the library's error kept as its cause."""

from __future__ import annotations

import functools
import os

from .. import checks
from ..errors import UsageError
from ..planning import sources

LIBRARIES = ("transformers", "huggingface_hub", "safetensors", "accelerate")
MAX_REPEATS = 10_000
_PLAN_ATTRIBUTES = ("source", "dtype", "devices", "fits", "simulated")  # and a layer split's device_map


def _library_of(err: BaseException) -> str | None:
    """The library the error comes from: its type's package, or the first frame below nbgpu's own."""
    package = type(err).__module__.split(".")[0]
    if package in LIBRARIES:
        return package
    tb = err.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_globals.get("__name__", "").split(".")[0]
        if name != "nbgpu":
            return name if name in LIBRARIES else None
        tb = tb.tb_next
    return None


def library_errors(what: str):
    """Decorator: an exception raised by transformers, huggingface_hub, safetensors or accelerate while the function
    works on a person's input (a folder, a hub id, from_pretrained's arguments) becomes a UsageError saying `what`
    could not be done, with the library's error as its cause. nbgpu's own errors pass through untouched."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UsageError:
                raise
            except Exception as err:  # noqa: BLE001 - only the libraries' errors are turned, the rest re-raised
                library = _library_of(err)
                if library is None:
                    raise
                first = (str(err).strip().splitlines() or [""])[0][:300]
                raise UsageError(f"{what}: {library} says {type(err).__name__}: {first}") from err

        return call

    return wrap


def _check_folder(folder: str, trust: bool) -> None:
    sources.refuse_remote_code(sources.read_config_file(folder), os.path.join(folder, "config.json"), trust)
    sources.check_weights(folder)


def load_arguments(plan_or_model, kwargs: dict) -> None:
    """Check `nbgpu.load`'s arguments (and set trust_remote_code=False unless the user gave True): the folder
    exists and is whole, a hub id is cached or answers quickly, a plan's folder is still the checkpoint it was
    made for."""
    kwargs["trust_remote_code"] = checks.boolean(kwargs.get("trust_remote_code", False), "trust_remote_code")
    trust = kwargs["trust_remote_code"]
    _check_source(plan_or_model, trust)
    if "dtype" in kwargs and kwargs["dtype"] != "auto":
        import torch

        kwargs["dtype"] = getattr(torch, checks.dtype(kwargs["dtype"]))


def _check_source(plan_or_model, trust: bool) -> None:
    if isinstance(plan_or_model, (str, os.PathLike)):
        kind, where = sources.locate(plan_or_model)
        if kind == "folder":
            _check_folder(where, trust)
        else:
            sources.check_hub(where)
        return
    layers = getattr(plan_or_model, "parallel", "layers") == "layers"
    if not all(hasattr(plan_or_model, a) for a in _PLAN_ATTRIBUTES) or \
            (layers and not hasattr(type(plan_or_model), "device_map") and not hasattr(plan_or_model, "device_map")):
        raise UsageError(f"nbgpu.load takes a plan from nbgpu.plan(...) or a model folder / hub id, not "
                         f"{type(plan_or_model).__name__}")
    source = plan_or_model.source
    if not isinstance(source, (str, os.PathLike)):
        return  # a plan made from a config: load() says there are no weights to load
    kind, where = sources.locate(source)
    if kind == "hub":
        sources.check_hub(where)
        return
    expected = getattr(plan_or_model, "fingerprint", None)
    if expected:
        changed = sources.fingerprint_differences(expected, where)
        if changed:
            raise UsageError(f"{where} is not the checkpoint this plan was made for ({'; '.join(changed[:4])}): "
                             f"make a new plan, nbgpu.plan({os.fspath(source)!r}, ...), and load that")
    _check_folder(where, trust)


def bench_arguments(model, batch, prompt_len, new_tokens, repeats, warmup, compile, tokenizer, prompt, label,
                    explain, seed) -> tuple:
    """`nbgpu.bench`'s arguments, checked and converted (numpy integers to int); the prompt plus the new tokens
    must fit the model's positions. Returns (batch, prompt_len, new_tokens, repeats, warmup, compile, label,
    explain, seed)."""
    if not callable(getattr(model, "generate", None)) or getattr(model, "config", None) is None:
        hint = f" Load it first: model = nbgpu.load({model!r})" if isinstance(model, (str, os.PathLike)) else ""
        raise UsageError(f"nbgpu.bench takes a model from nbgpu.load (or from_pretrained), not "
                         f"{type(model).__name__}.{hint}")
    batch = checks.integer(batch, "batch", 1, checks.MAX_BATCH)
    prompt_len = checks.integer(prompt_len, "prompt_len", 1)
    new_tokens = checks.integer(new_tokens, "new_tokens", 2)  # bounded below by the model's positions
    repeats = checks.integer(repeats, "repeats", 1, MAX_REPEATS)
    warmup = checks.integer(warmup, "warmup", 0, MAX_REPEATS)
    compile = checks.boolean(compile, "compile")
    explain = checks.boolean(explain, "explain")
    label = checks.text(label, "label", allow_none=True, max_length=200)
    seed = checks.integer(seed, "seed", 0, 2**63 - 1)
    prompt = checks.text(prompt, "prompt", allow_none=True, max_length=10_000_000)
    if prompt is not None and tokenizer is not None:
        if not callable(tokenizer):
            raise UsageError(f"tokenizer must be a tokenizer (callable on text), not {type(tokenizer).__name__}")
        ids = sources.from_library("the tokenizer could not encode the prompt",
                                   lambda: tokenizer(prompt, return_tensors="pt").input_ids)
        prompt_len = int(ids.shape[-1])
        if prompt_len < 1:
            raise UsageError("the prompt encodes to no token: give a prompt with some text")
        what = f"the prompt ({prompt_len} tokens) plus new_tokens={new_tokens}"
    else:
        what = f"prompt_len={prompt_len} plus new_tokens={new_tokens}"
    checks.positions(prompt_len + new_tokens, sources.max_positions(model.config), what)
    checks.positions(prompt_len + new_tokens, checks.MAX_TOKENS, what)  # a model without a position limit
    return batch, prompt_len, new_tokens, repeats, warmup, compile, label, explain, seed
