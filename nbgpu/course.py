"""Helpers for the course notebooks: one line to set a notebook up, one to build its model, one to check an exercise.

    from nbgpu import course
    machine = course.setup()          # real GPUs where there are some, else simulated ones (said so)
    path = course.model()             # a random-weight Llama saved with save_pretrained (a few MB when simulated)
    course.check(answer, expected)    # an exercise: passes on the right answer, fails (WrongAnswer) on a wrong one

An entry point (the top layer): it may import any part of nbgpu. Nothing here is needed outside the course.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass

from . import devices, gpu_table
from .errors import UsageError

# The course's models: a few MB on simulated GPUs (the CPU runs them), a 1.1B-parameter shape (TinyLlama's) on real
# ones. Random weights produce nonsense text but take the same memory and time as trained ones.
SMALL = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=2048, max_position_embeddings=1024)
REAL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)

_MODELS: dict[tuple, str] = {}  # (config items, dtype) -> saved folder, built once per process


@dataclass(frozen=True)
class Machine:
    """What `setup()` chose: the GPUs the notebook runs on."""

    simulated: bool
    spec: str | None  # the simulate spec, for simulated GPUs
    gpus: int

    @property
    def what_cpu_timings_show(self) -> str:
        if not self.simulated:
            return "measured on this machine's GPUs"
        return (f"models run on the CPU here; every speed shown is modelled for the simulated {self.spec} "
                "(published bandwidth and compute, host costs measured on real GPUs), labelled 'modelled'")

    def __repr__(self) -> str:
        if self.simulated:
            return (f"No NVIDIA GPU in use here: this notebook runs on {self.spec} SIMULATED GPUs. Models run on "
                    "the CPU, which proves the code and the token counts; every speed shown is modelled for the "
                    "simulated GPUs (labelled 'modelled'), never the CPU's clock.")
        return f"This notebook runs on the {self.gpus} real GPU(s) of this machine: every figure is measured."


def setup(spec: str | None = None, *, show: bool = True) -> Machine:
    """Set a course notebook up in one line: load the `%gpus` magics, and use the real GPUs where NVML sees some,
    else simulated ones (`spec`, else $NBGPU_SIMULATE, else the course's default machine, 4 x NVIDIA L4).
    $NBGPU_SIMULATE (or `spec`) simulates even on a machine with GPUs."""
    _load_extension()
    inventory = gpu_table.gpus().inventory
    chosen = spec or os.environ.get("NBGPU_SIMULATE")
    if chosen is None and (len(inventory) == 0 or inventory.simulated):
        chosen = inventory_spec(inventory) or devices.DEFAULT_SPEC
    if chosen is not None:
        devices.simulate(chosen)
    machine = Machine(chosen is not None, chosen, len(devices.read().gpus))
    if show:
        print(repr(machine))
    return machine


def inventory_spec(inventory) -> str | None:
    """The spec of simulated GPUs already active in this process (a notebook run twice keeps its machine)."""
    sim = devices.simulated()
    return sim.spec_text if inventory.simulated and sim is not None else None


def _load_extension() -> None:
    """`%load_ext nbgpu` where IPython runs (idempotent)."""
    import sys

    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython

    ipython = get_ipython()
    if ipython is not None and "nbgpu" not in ipython.extension_manager.loaded:
        ipython.extension_manager.load_extension("nbgpu")


def model(shape: dict | None = None, *, dtype: str = "bfloat16", seed: int = 0) -> str:
    """A random-weight Llama saved with `save_pretrained` to a temporary folder (built once per process, removed
    when the process ends); returns the folder. `shape` (LlamaConfig fields) defaults to a few MB on simulated
    GPUs and a 1.1B-parameter shape on real ones."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    sim = devices.simulated() is not None or not len(devices.read().gpus)
    fields = dict(shape if shape is not None else (SMALL if sim else REAL))
    key = (tuple(sorted(fields.items())), dtype, seed)
    if key in _MODELS and os.path.isdir(_MODELS[key]):
        return _MODELS[key]
    try:
        config = LlamaConfig(**fields)
    except TypeError as exc:
        raise UsageError(f"cannot build a Llama from {fields}: {exc}") from None
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    folder = tempfile.mkdtemp(prefix="nbgpu-llama-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # the kernel leaves no model behind when it ends
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" would print to stderr for a few MB
    try:
        AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype)).save_pretrained(folder)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    _MODELS[key] = folder
    return folder


def describe(path: str) -> str:
    """One line on a saved course model: layers, parameters, bytes."""
    import json

    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    size = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))
    h, i, n, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * (h // heads) * kv + 3 * h * i + 2 * h
    params = n * per_layer + 2 * v * h + h
    from .units import format_size

    return (f"random-weight Llama: {n} layers of width {h}, {params / 1e6:,.1f} M parameters, "
            f"{format_size(size, 'auto')} on disk ({cfg.get('torch_dtype') or cfg.get('dtype')}), in {path}")


# --- exercises -----------------------------------------------------------------------------------------------

class WrongAnswer(AssertionError):
    """A wrong answer to an exercise: shown as its message alone, without a traceback."""

    def _render_traceback_(self):  # IPython shows these lines instead of a traceback
        return [f"WrongAnswer: {self}"]


@dataclass(frozen=True)
class Checked:
    answer: object
    expected: object
    right: bool
    message: str

    def __repr__(self) -> str:
        return self.message


def check(answer, expected, *, tolerance: float = 0.0, why: str = "") -> Checked:
    """Check an exercise's answer. Numbers match within `tolerance` (relative: 0.05 is 5%); text matches ignoring
    case and surrounding spaces; anything else must be equal. A wrong answer raises WrongAnswer (the cell fails);
    no answer yet (`...` or None) only says where to write it. `why` is shown with the verdict."""
    if answer is ... or answer is None:
        return Checked(answer, expected, False, "No answer yet: write it in the cell above (answer = ...) and run "
                                                "both cells again.")
    right = _matches(answer, expected, tolerance)
    reason = f" {why}" if why else ""
    if not right:
        raise WrongAnswer(f"{answer!r} is not it.{reason} Look again at the cells above, change your answer and run "
                          "both cells again.")
    return Checked(answer, expected, True, f"Right: {answer!r}.{reason}")


def _matches(answer, expected, tolerance: float) -> bool:
    if _is_bool(expected) or _is_bool(answer):  # True is not the number 1 in an answer
        return _is_bool(expected) and _is_bool(answer) and bool(answer) == bool(expected)
    if isinstance(expected, (int, float)) and isinstance(answer, (int, float)):
        if tolerance:
            return abs(answer - expected) <= tolerance * abs(expected)
        return answer == expected
    if isinstance(expected, str) and isinstance(answer, str):
        return answer.strip().lower() == expected.strip().lower()
    if isinstance(expected, (list, tuple)) and isinstance(answer, (list, tuple)):
        return len(answer) == len(expected) and all(_matches(a, e, tolerance) for a, e in zip(answer, expected))
    return answer == expected


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ == "bool_"  # numpy's too
