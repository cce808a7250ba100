"""The model on the meta device: its config, its placement units along the depth, their sizes and tied groups.

Nothing is loaded: the model is built from its config inside accelerate's `init_empty_weights`, sizes come from
accelerate's `compute_module_sizes`, the no-split classes from the model's `_no_split_modules`.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass, field

from .. import checks
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
    fingerprint: dict | None = None  # a checkpoint folder's config hash and weight files (sources.fingerprint)
    trust_remote_code: bool = False  # the user allowed the model's own code (nbgpu.plan(trust_remote_code=True))

    @property
    def total(self) -> int:
        return sum(u.size for u in self.units)

    def unit(self, name: str) -> Unit:
        return self._by_name[name]

    def __post_init__(self):
        self._by_name = {u.name: u for u in self.units}


def read_config(source, trust_remote_code: bool = False):
    """A transformers config from a local folder, a config.json path, a config object, a dict or a hub id
    (see sources.read_config: no code shipped with the model runs, an unreachable hub is refused quickly)."""
    from .sources import read_config as read

    return read(source, trust_remote_code)


def dtype_name(dtype) -> str:
    """Any floating-point dtype by torch's canonical name ('double' and torch.float64 -> 'float64')."""
    return checks.dtype(dtype, allowed=None)


def build(source, dtype: str = "bfloat16", trust_remote_code: bool = False, config=None) -> MetaModel:
    """The model of `source` on the meta device. With `config` (a plan file's), nothing is read from `source`."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes, find_tied_parameters
    from transformers import AutoModelForCausalLM

    from .sources import check_config, fingerprint, from_library, locate

    read_from_source = config is None
    if read_from_source:
        config = read_config(source, trust_remote_code)
    else:
        check_config(config)
    name = dtype_name(dtype)

    def from_config():  # on a copy: from_config writes the dtype into the config it is given (the user's object)
        # torch's meta device as well: transformers then skips initialising weights that hold no data
        with init_empty_weights(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=getattr(torch, name),
                                                    trust_remote_code=trust_remote_code)

    model = from_library(f"transformers cannot build {type(config).__name__} as a causal language model",
                         from_config)
    tied_model = copy.deepcopy(model)  # from_pretrained plans on the untied model; ties change the sizes
    tied_model.tie_weights()
    tied = [sorted(g) for g in find_tied_parameters(tied_model)]
    sizes = compute_module_sizes(tied_model)
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    units = _units(tied_model, sizes, set(no_split))
    meta = MetaModel(source, config, name, model, units, no_split, tied, trust_remote_code=trust_remote_code)
    if meta.total > checks.MAX_SIZE:
        raise UsageError(f"{type(config).__name__} describes a model of {meta.total:.3g} bytes, more than any machine "
                         "holds: check the config's sizes (hidden, intermediate, vocabulary, experts)")
    if read_from_source and isinstance(source, (str, os.PathLike)):
        kind, where = locate(source)
        meta.fingerprint = fingerprint(where) if kind == "folder" else None
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
