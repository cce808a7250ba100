"""Where a model comes from: a local checkpoint folder, a config object or dict, or a hub id.

Read without running code shipped with the model (`trust_remote_code` stays False unless the user passes True to
nbgpu), without waiting on a hub that cannot be reached (the local cache and HF_HUB_OFFLINE first, then one request
with a short timeout), and checked before transformers builds anything from it. A checkpoint folder also gets a
fingerprint (its config and the names and sizes of its weight files), so that a plan can tell when the folder it was
made for has been replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from .. import checks
from ..errors import UsageError
from ..units import format_size
from .memory import text_config

HUB_TIMEOUT = 1.2  # seconds: one request to the hub (a HEAD answers in a fraction of that), then it is unreachable
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".msgpack", ".h5", ".index.json")
_TRUE = {"1", "ON", "YES", "TRUE"}
# config field -> (largest value taken, required): bounds far above any released model, so a typo is caught
CONFIG_FIELDS = {
    "num_hidden_layers": (1024, True),
    "hidden_size": (2**18, True),
    "num_attention_heads": (2**14, True),
    "vocab_size": (2**24, True),
    "num_key_value_heads": (2**14, False),
    "head_dim": (2**14, False),
    "intermediate_size": (2**21, False),
    "max_position_embeddings": (2**31, False),
    "n_inner": (2**21, False),  # GPT-2's intermediate size
    "num_local_experts": (4096, False),
    "num_experts": (4096, False),
    "n_routed_experts": (4096, False),
}


def from_library(what: str, call):
    """Run a call into transformers / huggingface_hub / safetensors on a person's input: whatever it raises
    becomes a UsageError that says what could not be done, with the library's error kept as its cause."""
    try:
        return call()
    except UsageError:
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - the input is what is wrong; the cause is kept on the error
        first = (str(err).strip().splitlines() or [""])[0][:300]
        raise UsageError(f"{what}: {type(err).__name__}: {first}") from err


# --- local folder or hub id --------------------------------------------------------------------------------

def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, not only when huggingface_hub was imported."""
    from huggingface_hub import is_offline_mode

    return is_offline_mode() or any(os.environ.get(n, "").strip().upper() in _TRUE
                                    for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", ".", "~")) or text.endswith(("/", os.sep)) or text.count("/") > 1
            or (os.sep != "/" and os.sep in text))


def locate(source) -> tuple[str, str]:
    """('folder', path) for a local checkpoint folder (or its config.json), ('hub', repo id) for a hub id."""
    text = checks.path(source, "model")
    if os.path.isfile(text):
        if os.path.basename(text) == "config.json":
            return "folder", os.path.dirname(text) or "."
        raise UsageError(f"{text!r} is a file; give the folder that holds config.json")
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise UsageError(f"{text!r} is a folder without config.json: give a checkpoint folder "
                             "(save_pretrained writes one)")
        return "folder", text
    if _looks_like_path(text):
        raise UsageError(f"there is no folder {text!r}: give an existing checkpoint folder, a config, or a hub id "
                         "such as 'meta-llama/Llama-3.1-8B'")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as err:
        raise UsageError(f"{checks.shown(text)} is neither a folder here nor a hub id (organisation/name): "
                         "give an existing checkpoint folder, a config object or dict, or a hub id") from err
    return "hub", text


def cached_config(repo_id: str) -> str | None:
    """The path of the hub model's config.json in the local Hugging Face cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    found = from_library(f"cannot look up {repo_id!r} in the Hugging Face cache",
                         lambda: try_to_load_from_cache(repo_id, "config.json"))
    return found if isinstance(found, str) else None


def check_model(source) -> None:
    """The quick part of reading a model, before torch or transformers is imported: a folder exists and holds a
    config, a hub id is cached or answers (so that an offline machine is told at once, not after the imports)."""
    if isinstance(source, (str, os.PathLike)):
        kind, where = locate(source)
        if kind == "hub":
            check_hub(where)


_ANSWERED: dict[str, float] = {}  # hub id -> when the hub last said it has it (asked again after a minute)


def check_hub(repo_id: str) -> bool:
    """True when the config is in the local cache; else ask the hub once (at most HUB_TIMEOUT seconds, no retries)
    whether the model is there. Offline, unreachable or unknown: a UsageError within about two seconds."""
    if cached_config(repo_id) is not None:
        return True
    if not offline() and time.monotonic() - _ANSWERED.get(repo_id, -3600.0) < 60:
        return False
    if offline():
        raise UsageError(f"{repo_id!r} is not a local folder and its config is not in the Hugging Face cache; "
                         "HF_HUB_OFFLINE is set, so the hub is not asked. Pass a local checkpoint folder or a config "
                         "(or download the model first).")
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    outcome: dict = {}

    def probe():
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=HUB_TIMEOUT)
            outcome["ok"] = True
        except Exception as err:  # noqa: BLE001 - reported below, with the cause kept
            outcome["error"] = err

    # a thread bounds the whole request, name resolution included (a resolver can hang far beyond the timeout)
    worker = threading.Thread(target=probe, name="nbgpu-hub-probe", daemon=True)
    worker.start()
    worker.join(HUB_TIMEOUT + 0.2)
    if outcome.get("ok"):
        _ANSWERED[repo_id] = time.monotonic()
        return False
    err = outcome.get("error")
    reason = "no answer" if err is None else f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
    missing = type(err).__name__ in ("RepositoryNotFoundError", "EntryNotFoundError", "RemoteEntryNotFoundError",
                                     "GatedRepoError")
    where = "the hub has no such model, or it is gated" if missing else \
        f"the hub could not be reached within {HUB_TIMEOUT:g} s (offline?)"
    raise UsageError(f"{repo_id!r} is not a local folder, its config is not in the Hugging Face cache, and {where}. "
                     f"Pass a local checkpoint folder or a config instead. ({reason})") from err


# --- the config --------------------------------------------------------------------------------------------

def read_config_file(folder: str) -> dict:
    """config.json of a checkpoint folder, as a dict (without asking transformers)."""
    where = os.path.join(folder, "config.json")
    try:
        with open(where, "rb") as fh:
            data = json.loads(fh.read(16 * 1024**2 + 1))
    except (OSError, ValueError, RecursionError) as err:
        raise UsageError(f"cannot read {where}: {type(err).__name__}: {err}"[:400]) from err
    if not isinstance(data, dict):
        raise UsageError(f"{where} holds {type(data).__name__}, not a JSON object: it is not a model config")
    return data


def refuse_remote_code(data: dict, where: str, trust_remote_code: bool) -> None:
    """A config whose `auto_map` names code shipped with the model, for a model type transformers does not have:
    refused unless the user passed trust_remote_code=True to nbgpu. For a model type transformers has, its own
    class is used (as transformers does with trust_remote_code=False) and nothing from the folder runs."""
    auto_map = data.get("auto_map")
    if not auto_map or trust_remote_code:
        return
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    flat = [r for ref in refs for r in (ref if isinstance(ref, (list, tuple)) else [ref]) if isinstance(r, str)]
    files = sorted({ref.split("--")[-1].rsplit(".", 1)[0] + ".py" for ref in flat}) or ["(unnamed)"]
    raise UsageError(f"{where} asks to run code shipped with the model (its auto_map names {', '.join(files)}); "
                     "nbgpu never runs a model's own code unless you pass trust_remote_code=True to nbgpu.plan or "
                     "nbgpu.load. Read those files first: they run with your permissions.")


def read_config(source, trust_remote_code: bool = False):
    """A transformers config from a local folder, a config.json path, a config object, a dict or a hub id;
    checked (check_config) before it is returned."""
    from transformers import AutoConfig, PretrainedConfig

    trust = checks.boolean(trust_remote_code, "trust_remote_code")
    if isinstance(source, PretrainedConfig):
        config = source
    elif isinstance(source, dict):
        data = dict(source)
        model_type = data.pop("model_type", None)
        if not model_type or not isinstance(model_type, str):
            raise UsageError("a config dict needs a 'model_type' (e.g. 'llama', 'gpt2', 'mistral')")
        check_config_dict(data)
        config = from_library(f"cannot build a config for model_type {model_type!r}",
                              lambda: AutoConfig.for_model(model_type, **data))
    elif isinstance(source, (str, os.PathLike)):
        kind, where = locate(source)
        if kind == "folder":
            refuse_remote_code(read_config_file(where), os.path.join(where, "config.json"), trust)
            config = from_library(f"cannot read the config in {where!r}",
                                  lambda: AutoConfig.from_pretrained(where, trust_remote_code=trust))
        else:
            cached = check_hub(where)
            if cached:
                refuse_remote_code(read_config_file(os.path.dirname(cached_config(where))),
                                   f"{where}'s config.json", trust)
            config = from_library(f"cannot read the config of {where!r} from the hub",
                                  lambda: AutoConfig.from_pretrained(where, trust_remote_code=trust,
                                                                     local_files_only=cached))
    else:
        raise UsageError(f"cannot read a model from {type(source).__name__}: give a local checkpoint folder, "
                         "a config object or dict, or a hub id such as 'meta-llama/Llama-3.1-8B'")
    check_config(config)
    return config


def check_config_dict(data: dict) -> None:
    """The fields of check_config that a config dict gives, checked before transformers divides by them."""
    for field, (largest, _) in CONFIG_FIELDS.items():
        if data.get(field) is not None:
            checks.integer(data[field], f"the config's {field}", 1, largest)


def check_config(config) -> None:
    """The numbers every estimate divides by or loops over: whole, positive, within bounds, and heads that
    divide as attention needs them to."""
    cfg = text_config(config)
    name = type(config).__name__
    values = {}
    for field, (largest, required) in CONFIG_FIELDS.items():
        value = getattr(cfg, field, None)
        if value is None and not required:
            continue
        if value is None:
            raise UsageError(f"{name} has no {field}: nbgpu plans transformer language models (layers of attention "
                             "heads); this config does not describe one")
        values[field] = checks.integer(value, f"the config's {field}", 1, largest)
    heads, hidden = values["num_attention_heads"], values["hidden_size"]
    kv = values.get("num_key_value_heads", heads)
    if kv > heads or heads % kv:
        raise UsageError(f"{name}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})")
    if "head_dim" not in values and hidden % heads:
        raise UsageError(f"{name}: hidden_size ({hidden}) must divide evenly into num_attention_heads ({heads}) "
                         "heads, or the config must give head_dim")


def max_positions(config) -> int | None:
    """How many tokens the model has positions for (max_position_embeddings and its other names), or None."""
    cfg = text_config(config)
    for field in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        value = getattr(cfg, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# --- the checkpoint on disk -----------------------------------------------------------------------------------

def fingerprint(folder: str) -> dict:
    """What identifies a checkpoint folder cheaply: the SHA-256 of its config.json, and the name and size of each
    weight file (a changed model changes one of them; hashing gigabytes of weights would take minutes)."""
    with open(os.path.join(folder, "config.json"), "rb") as fh:
        config_sha = hashlib.sha256(fh.read()).hexdigest()
    weights = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(WEIGHT_SUFFIXES):
            weights[entry.name] = entry.stat().st_size
    return {"config_sha256": config_sha, "weights": weights}


def fingerprint_differences(expected: dict, folder: str) -> list[str]:
    """How the folder differs now from the fingerprint taken when the plan was made (empty: the same)."""
    now = fingerprint(folder)
    out = []
    if now["config_sha256"] != expected["config_sha256"]:
        out.append("config.json has changed")
    before, after = expected["weights"], now["weights"]
    for name in sorted(set(before) | set(after)):
        if name not in after:
            out.append(f"{name} is gone")
        elif name not in before:
            out.append(f"{name} is new")
        elif before[name] != after[name]:
            out.append(f"{name} was {format_size(before[name], 'auto')}, is {format_size(after[name], 'auto')}")
    return out


def check_weights(folder: str) -> None:
    """Every safetensors file of the folder opens (header read, sizes checked against the file): a truncated or
    damaged file is refused before from_pretrained starts."""
    from safetensors import safe_open

    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(".safetensors"):
            def open_it(where=entry.path):
                with safe_open(where, framework="pt"):
                    pass

            from_library(f"{entry.path} is damaged or incomplete (copy or download it again)", open_it)
