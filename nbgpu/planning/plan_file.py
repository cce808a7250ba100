"""Plan files: `plan.save(path)` and `Plan.load(path)`, format "nbgpu-plan/2" (docs/plan-format.md).

The file is validated on load by a pydantic schema (typed, bounded, unknown fields refused, strict: no 1.0 for 1, no
true for 1, no NaN), then checked against the model it describes (device_map names its modules, devices exist).
The model's config is stored in the file, so loading a plan reads neither the network nor the checkpoint folder.
Every invalid file gives one UsageError naming the field and what was expected. Files of format "nbgpu-plan/1" load
as they did: the config comes from their folder, or from the Hugging Face cache for a hub id (never the network).
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, ValidationError, model_validator

from .. import checks, files
from ..devices import GPU
from ..errors import UsageError
from .memory import ATTENTION

FORMAT = "nbgpu-plan/2"
FORMAT_V1 = "nbgpu-plan/1"
MAX_FILE = 16 * 1024**2  # bytes: a plan file is a few KB; anything this large is some other file
STRATEGIES = ("balanced", "sequential", "accelerate", "manual", "balanced+offload", "sequential+offload")

Bytes = Annotated[int, Field(ge=0, le=checks.MAX_SIZE)]
Tokens = Annotated[int, Field(ge=1, le=checks.MAX_TOKENS)]
Name = Annotated[str, Field(min_length=1, max_length=512)]


def _device(value):
    ok_int = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < checks.MAX_GPUS
    if not ok_int and value not in ("cpu", "disk"):
        raise ValueError(f"expected a cuda index from 0 to {checks.MAX_GPUS - 1}, 'cpu' or 'disk'")
    return value


def _offload(value):
    if not isinstance(value, bool) and value not in ("cpu", "disk"):
        raise ValueError("expected false, true, 'cpu' or 'disk'")
    return value


Device = Annotated[Any, AfterValidator(_device)]
Offload = Annotated[Any, AfterValidator(_offload)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class GPUEntry(_Strict):
    index: int = Field(ge=0, le=1023, description="the GPU's index as nvidia-smi prints it (simulated: its number)")
    name: str | None = Field(max_length=256)
    uuid: str | None = Field(max_length=128)
    memory_total: Bytes | None = Field(description="bytes; null where NVML could not read it")
    memory_used: Bytes | None = Field(description="bytes used by other processes when the plan was made")
    memory_reserved: Bytes | None = Field(None, description="bytes the driver keeps for itself (NVML); null if unknown")
    simulated: bool


class Source(_Strict):
    kind: Literal["path_or_id", "config"]
    value: str | None = Field(max_length=4096, description="the checkpoint folder or hub id; null for a config")

    @model_validator(mode="after")
    def _value_matches_kind(self):
        if (self.kind == "path_or_id") != isinstance(self.value, str) or self.value == "":
            raise ValueError("a path_or_id source needs its folder or hub id as value; a config source has null")
        return self


class Fingerprint(_Strict):
    config_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    weights: dict[Name, Bytes] = Field(max_length=100_000)


class PlanFile(_Strict):
    format: Literal["nbgpu-plan/2"]
    source: Source
    config: dict[str, JsonValue] = Field(description="the model's config as transformers writes it (model_type ...)")
    trust_remote_code: bool = False
    fingerprint: Fingerprint | None = None
    dtype: Literal[checks.DTYPES]
    batch: int = Field(ge=1, le=checks.MAX_BATCH)
    seq_len: Tokens
    prompt_len: Tokens | None = Field(None, description="the prompt's tokens (seq_len - new_tokens)")
    new_tokens: Annotated[int, Field(ge=0, le=checks.MAX_TOKENS)] | None = None
    prefill_chunk: Tokens | None = None
    attn_implementation: Literal[ATTENTION] = "sdpa"
    cache: Literal["dynamic", "static"] = "dynamic"
    parallel: Literal["layers", "tensor"] = "layers"
    strategy: Literal[STRATEGIES]
    reserve: Bytes
    context: Bytes
    offload: Offload
    cpu_memory: Bytes
    gpus: list[GPUEntry] = Field(min_length=1, max_length=checks.MAX_GPUS)
    device_map: dict[Annotated[str, Field(max_length=512)], Device] | None = Field(
        min_length=1, max_length=100_000, description="null for a tensor-parallel plan")
    max_memory: dict[Annotated[str, Field(max_length=8)], Bytes] | None = Field(
        max_length=checks.MAX_GPUS + 1, description="null for a plan that does not fit, or a tensor-parallel one")
    fits: bool

    @model_validator(mode="after")
    def _consistent(self):
        model_type = self.config.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise ValueError("config must hold the model's model_type (e.g. 'llama')")
        if (self.device_map is None) != (self.parallel == "tensor"):
            raise ValueError("a layer split holds its device_map; a tensor-parallel plan has none (null)")
        if self.prompt_len is not None and self.new_tokens is not None and \
                self.prompt_len + self.new_tokens != self.seq_len:
            raise ValueError("seq_len must be prompt_len + new_tokens")
        used = sorted({d for d in (self.device_map or {}).values() if isinstance(d, int)})
        if used and used[-1] >= len(self.gpus):
            raise ValueError(f"device_map places modules on cuda:{used[-1]}, but the plan has {len(self.gpus)} GPU(s)")
        return self


class SourceV1(_Strict):
    kind: Literal["path_or_id", "config"]
    value: Annotated[str, Field(min_length=1, max_length=4096)] | dict[str, JsonValue]

    @model_validator(mode="after")
    def _value_matches_kind(self):
        if (self.kind == "path_or_id") != isinstance(self.value, str):
            raise ValueError("a path_or_id source holds the folder or hub id; a config source the config")
        return self


class PlanFileV1(_Strict):
    """The first format: the config only for plans made from a config; no fingerprint."""

    format: Literal["nbgpu-plan/1"]
    source: SourceV1
    dtype: Annotated[str, Field(max_length=40)]
    batch: int = Field(ge=1, le=checks.MAX_BATCH)
    seq_len: Tokens
    strategy: Literal[STRATEGIES]
    reserve: Bytes
    context: Bytes
    offload: Offload
    cpu_memory: Bytes
    gpus: list[GPUEntry] = Field(min_length=1, max_length=checks.MAX_GPUS)
    device_map: dict[Annotated[str, Field(max_length=512)], Device] = Field(min_length=1, max_length=100_000)
    max_memory: dict[Annotated[str, Field(max_length=8)], Bytes] = Field(max_length=checks.MAX_GPUS + 1)
    fits: bool


# --- writing ------------------------------------------------------------------------------------------------

def _config_json(config) -> dict:
    """The config as transformers writes it to config.json."""
    from .sources import from_library

    return from_library("config: transformers cannot write this config as JSON",
                        lambda: json.loads(config.to_json_string(use_diff=False)))


def _device_value(device):
    return device if isinstance(device, str) else int(device)


def to_dict(plan) -> dict:
    """The plan as the JSON object of format nbgpu-plan/2 (plain ints and strings only)."""
    meta = plan._meta
    src = plan.source
    source = {"kind": "path_or_id", "value": os.fspath(src)} if isinstance(src, (str, os.PathLike)) \
        else {"kind": "config", "value": None}
    return {
        "format": FORMAT,
        "source": source,
        "config": _config_json(plan.config),
        "trust_remote_code": bool(getattr(meta, "trust_remote_code", False)),
        "fingerprint": getattr(meta, "fingerprint", None),
        "dtype": plan.dtype, "batch": int(plan.batch), "seq_len": int(plan.seq_len),
        "prompt_len": int(plan.prompt_len), "new_tokens": int(plan.new_tokens),
        "prefill_chunk": plan.workload.prefill_chunk, "attn_implementation": plan.workload.attention,
        "cache": plan.workload.cache, "parallel": plan.parallel,
        "strategy": plan.strategy if isinstance(plan.strategy, str) else "manual",
        "reserve": int(plan.reserve), "context": int(plan.context),
        "offload": plan.offload if isinstance(plan.offload, str) else bool(plan.offload),
        "cpu_memory": int(plan.cpu_memory),
        "gpus": [{"index": int(g.index), "name": g.name, "uuid": g.uuid,
                  "memory_total": None if g.memory_total is None else int(g.memory_total),
                  "memory_used": None if g.memory_used is None else int(g.memory_used),
                  "memory_reserved": None if g.memory_reserved is None else int(g.memory_reserved),
                  "simulated": bool(g.simulated)} for g in plan.gpus],
        "device_map": {str(k): _device_value(v) for k, v in plan.device_map.items()}
        if plan.parallel == "layers" else None,
        "max_memory": {str(k): int(v) for k, v in plan.max_memory.items()}
        if plan.parallel == "layers" and plan.fits else None,
        "fits": bool(plan.fits),
    }


def save(plan, path) -> None:
    """Write the plan whole to a temporary file beside `path`, then rename it: an old file at `path` is replaced
    in one step, or left byte-identical when anything fails."""
    where = checks.path(path, "path")
    data = to_dict(plan)
    _validate(PlanFile, data, "this plan")  # what is written loads again
    _reads_back(data["config"])
    files.write_json(where, data)


# --- reading ------------------------------------------------------------------------------------------------

def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice in one object")
    return dict(pairs)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text} is out of range")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def read_json(where: str) -> object:
    """Strict JSON: UTF-8, no NaN or Infinity, no key twice in one object, at most MAX_FILE bytes."""
    try:
        with open(where, "rb") as fh:
            raw = fh.read(MAX_FILE + 1)
    except OSError as err:
        raise UsageError(f"cannot read {where}: {err.strerror or err}") from err
    if len(raw) > MAX_FILE:
        raise UsageError(f"{where} is larger than {MAX_FILE // 1024**2} MiB: it is not a plan file")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_float=_finite,
                          parse_constant=_refuse_constant)
    except UnicodeDecodeError as err:
        raise UsageError(f"{where} is not a text file (not UTF-8): it is not a plan file") from err
    except RecursionError as err:
        raise UsageError(f"{where} is nested too deeply to be a plan file") from err
    except ValueError as err:  # JSONDecodeError is a ValueError, as are the hooks' refusals
        raise UsageError(f"{where} is not valid JSON ({err}): it is not a plan file, or it was cut short") from err


def _where(loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier():
            out += f".{part}" if out else part
        else:
            out += f"[{part!r}]"
    return out or "the file"


def _message(err: dict) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "missing":
        return f"{_where(err['loc'])}: missing (every plan file has it)"
    if kind == "extra_forbidden":
        return f"{_where(err['loc'])}: unknown field (see docs/plan-format.md for the fields of a plan file)"
    msg = re.sub(r" or instance of \w+", "", msg.removeprefix("Value error, "))
    return f"{_where(err['loc'])}: {msg}, found {checks.shown(err.get('input'), 60)}"


def _validate(model, data, where: str):
    try:
        return model.model_validate(data)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise UsageError(f"{where} is not a valid nbgpu plan: {_message(errors[0])}{more}") from err


def load(path, cls, trust_remote_code: bool = False):
    """A `cls` (Plan) from `save`: the same model, the GPUs as saved (not the ones present now), the same
    placement. The class is given, so that this module needs not import the plan module that calls it."""
    where = checks.existing_file(path, "plan file")
    trust = checks.boolean(trust_remote_code, "trust_remote_code")
    data = read_json(where)
    fmt = data.get("format") if isinstance(data, dict) else None
    if fmt not in (FORMAT, FORMAT_V1):
        raise UsageError(f"{where} is not a saved nbgpu plan (format {checks.shown(fmt)}, expected {FORMAT!r})")
    try:
        if fmt == FORMAT_V1:
            data = _upgrade(_validate(PlanFileV1, data, where), trust)
        return _plan(_validate(PlanFile, data, where), where, trust, cls)
    except UsageError as err:
        if where in str(err):
            raise
        raise UsageError(f"{where} is not a usable nbgpu plan: {err}") from err


def _upgrade(old: PlanFileV1, trust: bool) -> dict:
    """A format-1 file as format 2: its config from the source folder (or the Hugging Face cache)."""
    from .sources import cached_config, locate, read_config

    data = old.model_dump(mode="json")
    data["format"] = FORMAT
    data["dtype"] = checks.dtype(old.dtype, "dtype")
    if old.source.kind == "config":
        data["source"] = {"kind": "config", "value": None}
        data["config"] = old.source.value
        return data
    kind, place = locate(old.source.value)
    if kind == "hub" and cached_config(place) is None:
        raise UsageError(f"this plan (format {FORMAT_V1}) was made for {place!r}, whose config is not in the Hugging "
                         "Face cache; plan files never go to the network. Download the model's config first, or "
                         "plan again and save in the current format (it holds the config).")
    data["config"] = _config_json(read_config(place, trust))
    if kind == "folder":
        from .sources import fingerprint

        data["fingerprint"] = fingerprint(place)
    return data


def _config(stored: dict, source: Source, trust: bool):
    from transformers import CONFIG_MAPPING, AutoConfig

    from .sources import check_config_dict, from_library, read_config

    cfg = dict(stored)
    model_type = cfg.pop("model_type")
    check_config_dict(cfg)
    if model_type not in CONFIG_MAPPING:
        if trust and source.kind == "path_or_id":
            return read_config(source.value, True)  # the model's own code, as the user asked
        raise UsageError(f"config.model_type {model_type!r} is not a model transformers has: this plan was made "
                         "with code shipped with the model; pass trust_remote_code=True to Plan.load to read it from "
                         "the model's folder")
    config = from_library("config: transformers cannot read the stored config",
                          lambda: AutoConfig.for_model(model_type, **cfg))
    _reads_back(_config_json(config))  # a plan read from a file can be written again, and read again
    return config


def _reads_back(stored: dict) -> None:
    """The config as written can be read by transformers (some values it takes, it writes in a form it refuses)."""
    from transformers import CONFIG_MAPPING, AutoConfig

    from .sources import from_library

    cfg = dict(stored)
    model_type = cfg.pop("model_type", None)
    if model_type in CONFIG_MAPPING:
        from_library("config: transformers writes this config in a form it cannot read back",
                     lambda: AutoConfig.for_model(model_type, **cfg))


def _check_device_map(meta, device_map: dict, strategy: str) -> None:
    units = [u.name for u in meta.units]
    if strategy == "accelerate":  # the exact map accelerate made: any module of the model
        names = {n for n, _ in meta.model.named_modules()}
        unknown = [k for k in device_map if k not in names]
    else:
        unknown = [k for k in device_map if k not in units]
        missing = [u for u in units if u not in device_map]
        if missing:
            raise UsageError(f"device_map: module {missing[0]!r} has no device (a plan places every module)")
    if unknown:
        raise UsageError(f"device_map: there is no module {unknown[0]!r} in this {type(meta.config).__name__}")


def _plan(file: PlanFile, where: str, trust: bool, cls):
    from .memory import workload
    from .meta_model import build
    from .strategies import units_from_map

    config = _config(file.config, file.source, trust)
    source = file.source.value if file.source.kind == "path_or_id" else config
    meta = build(source, file.dtype, trust_remote_code=file.trust_remote_code and trust, config=config)
    meta.fingerprint = file.fingerprint.model_dump() if file.fingerprint is not None else None
    meta.trust_remote_code = file.trust_remote_code
    gpus = [GPU(index=g.index, uuid=g.uuid, name=g.name, pci_bus_id=None, memory_total=g.memory_total,
                memory_used=g.memory_used, memory_free=None, utilization=None, temperature=None, power_draw=None,
                power_limit=None, pstate=None, persistence_mode=None, compute_capability=None, mig_mode=None,
                memory_reserved=g.memory_reserved, simulated=g.simulated) for g in file.gpus]
    run = workload(file.batch, None if file.prompt_len is not None else file.seq_len, file.prompt_len,
                   file.new_tokens, file.prefill_chunk, file.attn_implementation, file.cache)
    if file.parallel == "tensor":
        return cls(meta, gpus, workload=run, strategy="balanced", reserve=file.reserve, context=file.context,
                   offload=False, cpu_memory=file.cpu_memory, parallel="tensor")
    device_map = dict(file.device_map)
    _check_device_map(meta, device_map, file.strategy)
    raw = device_map if file.strategy == "accelerate" else None
    return cls(meta, gpus, workload=run, strategy=file.strategy, reserve=file.reserve, context=file.context,
               offload=file.offload, cpu_memory=file.cpu_memory, assignment=units_from_map(meta, device_map),
               raw_map=raw)
