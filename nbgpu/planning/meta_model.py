"""The model on the meta device: its config, its placement units along the depth, their sizes and tied groups.

Nothing is loaded: the model is built from its config inside accelerate's `init_empty_weights`, sizes come from
accelerate's `compute_module_sizes`, the no-split classes from the model's `_no_split_modules`.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field

from ..errors import UsageError

_LAYER_INDEX = re.compile(r"\.(\d+)$")


@dataclass(frozen=True)
class Unit:
    """One placement unit: a module that goes whole onto one device (a decoder layer, the embeddings, ...)."""

    name: str
    size: int  # bytes of parameters and buffers, tied weights counted once
    cls: str
    layer: int | None = None  # decoder layer index for the model's repeated blocks
    no_split: bool = False


@dataclass
class MetaModel:
    source: object
    config: object  # transformers PretrainedConfig
    dtype: str
    model: object  # the meta-device model, untied as `from_pretrained` sees it when it plans
    units: list[Unit]
    no_split: list[str]
    tied: list[list[str]]  # groups of parameter names sharing one tensor
    tied_units: list[list[str]] = field(default_factory=list)  # the same groups, as unit names
    embed: str | None = None  # the input embedding unit
    head: str | None = None  # the output projection unit (lm_head)
    gated_mlp: bool = True  # gate and up projections (Llama-like) rather than a plain two-layer MLP (GPT-2)

    @property
    def total(self) -> int:
        return sum(u.size for u in self.units)

    def unit(self, name: str) -> Unit:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {u.name: u for u in self.units}


def read_config(source):
    """A transformers config from a local folder, a config.json path, a config object, a dict or a hub id."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        data = dict(source)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise UsageError("a config dict needs a 'model_type' (e.g. 'llama', 'gpt2', 'mistral')")
        try:
            return AutoConfig.for_model(model_type, **data)
        except ValueError as exc:
            raise UsageError(f"cannot build a config for model_type {model_type!r}: {exc}") from None
    if not isinstance(source, (str, os.PathLike)):
        raise UsageError(f"cannot read a model from {type(source).__name__}: give a local checkpoint folder, "
                         "a config object or dict, or a hub id such as 'meta-llama/Llama-3.1-8B'")
    text = os.fspath(source)
    if os.path.isfile(text):
        return AutoConfig.from_pretrained(os.path.dirname(text) or ".") if os.path.basename(text) == "config.json" \
            else _refuse(text, "is a file; give the folder that holds config.json")
    if os.path.isdir(text) and not os.path.isfile(os.path.join(text, "config.json")):
        _refuse(text, "is a folder without config.json")
    try:
        return AutoConfig.from_pretrained(text)
    except (OSError, ValueError) as exc:
        where = "a local folder" if os.path.isdir(text) else "not a local folder, and its config is neither cached " \
            "nor reachable on the hub (offline?)"
        first_line = str(exc).splitlines()[0][:200]
        raise UsageError(f"cannot read the config of {text!r}: {where}. Pass a local checkpoint folder, a config "
                         f"object or a dict instead. ({type(exc).__name__}: {first_line})") from None


def _refuse(text, why):
    raise UsageError(f"{text!r} {why}")


def dtype_name(dtype) -> str:
    import torch

    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if not isinstance(getattr(torch, name, None), torch.dtype) or not getattr(torch, name).is_floating_point:
        raise UsageError(f"unknown dtype {dtype!r}: use 'bfloat16', 'float16' or 'float32'")
    return name


def build(source, dtype: str = "bfloat16") -> MetaModel:
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, find_tied_parameters
    from transformers import AutoModelForCausalLM

    config = read_config(source)
    name = dtype_name(dtype)
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, name))
    except ValueError as exc:
        raise UsageError(f"{type(config).__name__} is not a causal language model transformers can build: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    tied_model = copy.deepcopy(model)  # from_pretrained plans on the untied model; ties change the sizes
    tied_model.tie_weights()
    tied = [sorted(g) for g in find_tied_parameters(tied_model)]
    sizes = compute_module_sizes(tied_model)
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    units = _units(tied_model, sizes, set(no_split))
    meta = MetaModel(source, config, name, model, units, no_split, tied)
    meta.tied_units = [sorted({_owner(units, p) for p in g}) for g in tied]
    meta.tied_units = [g for g in meta.tied_units if len(g) > 1]
    meta.embed = _owner(units, _param_of(model.get_input_embeddings(), model))
    out = model.get_output_embeddings()
    meta.head = _owner(units, _param_of(out, model)) if out is not None else None
    first = next((u.name for u in units if u.layer is not None), None)
    if first is not None:
        names = [n for n, _ in model.named_parameters() if n.startswith(first + ".")]
        meta.gated_mlp = any(k in n for n in names for k in ("gate_proj", "gate_up_proj", "up_proj", ".w3."))
    return meta


def _param_of(module, model) -> str:
    return next(n for n, m in model.named_modules() if m is module) + ".weight"


def _owner(units: list[Unit], param: str) -> str:
    return next(u.name for u in units if param == u.name or param.startswith(u.name + "."))


def _units(model, sizes: dict, no_split: set[str]) -> list[Unit]:
    """Walk the module tree in order; a module is one unit when it is a no-split class, a leaf, or holds
    parameters of its own (accelerate could split those, but a whole unit keeps the map simple and valid)."""
    out: list[Unit] = []

    def visit(prefix: str, module):
        cls = type(module).__name__
        own = any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
        children = list(module.named_children())
        if prefix and (cls in no_split or not children or own):
            match = _LAYER_INDEX.search(prefix)
            out.append(Unit(prefix, sizes.get(prefix, 0), cls, int(match.group(1)) if match and cls in no_split
                            else None, cls in no_split))
            return
        for child, sub in children:
            visit(f"{prefix}.{child}" if prefix else child, sub)

    visit("", model)
    return out
