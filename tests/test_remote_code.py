"""nbgpu never runs code shipped with a model unless the user passes trust_remote_code=True to nbgpu.

Each folder below has a config.json whose auto_map points at Python files that write a marker file when they are
imported: the marker is the oracle for "the model's code ran"."""

from __future__ import annotations

import builtins
import json

import pytest

import nbgpu
from nbgpu.errors import UsageError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

AUTO_MAP = {"AutoConfig": "configuration_marker.MarkerConfig",
            "AutoModelForCausalLM": "modeling_marker.MarkerForCausalLM"}


def _write_code(folder, marker):
    (folder / "configuration_marker.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the model\\'s code ran')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class MarkerConfig(LlamaConfig):\n"
        "    model_type = 'marker-model'\n")
    (folder / "modeling_marker.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('the model\\'s code ran')\n"
        "from transformers import LlamaForCausalLM\n"
        "from .configuration_marker import MarkerConfig\n\n\n"
        "class MarkerForCausalLM(LlamaForCausalLM):\n"
        "    config_class = MarkerConfig\n")


def _tiny():
    return transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture
def asked(monkeypatch):
    """transformers asks "Do you wish to run the custom code? [y/N]" through input(): record every question."""
    questions = []

    def answer(prompt=""):
        questions.append(prompt)
        return "y"  # the answer that ran the code before

    monkeypatch.setattr(builtins, "input", answer)
    return questions


@pytest.fixture
def custom_type(tmp_path):
    """A model type transformers does not have: only the folder's own code could build it."""
    folder = tmp_path / "custom"
    folder.mkdir()
    config = _tiny().to_dict()
    config.update(model_type="marker-model", auto_map=AUTO_MAP, architectures=["MarkerForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    _write_code(folder, tmp_path / "MARKER")
    return folder, tmp_path / "MARKER"


@pytest.fixture
def known_type(tmp_path):
    """A Llama checkpoint whose config also names code of its own: transformers' Llama is used, the code is not."""
    folder = tmp_path / "llama-with-code"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(_tiny()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = AUTO_MAP
    (folder / "config.json").write_text(json.dumps(config))
    _write_code(folder, tmp_path / "MARKER")
    return folder, tmp_path / "MARKER"


def test_plan_refuses_a_model_that_needs_its_own_code_and_names_the_file(custom_type, asked):
    folder, marker = custom_type
    with pytest.raises(UsageError) as err:
        nbgpu.plan(str(folder), gpus="1x24GiB")
    message = str(err.value)
    assert str(folder / "config.json") in message and "configuration_marker.py" in message
    assert "modeling_marker.py" in message and "trust_remote_code=True" in message
    assert not marker.exists() and asked == []


def test_load_refuses_it_too(custom_type, asked):
    folder, marker = custom_type
    with pytest.raises(UsageError, match="trust_remote_code=True"):
        nbgpu.load(str(folder), show=False)
    assert not marker.exists() and asked == []


def test_a_known_model_type_is_built_by_transformers_own_class_and_the_code_never_runs(known_type, asked):
    folder, marker = known_type
    plan = nbgpu.plan(str(folder), gpus="2x24GiB", dtype="float32")
    assert type(plan._meta.model).__name__ == "LlamaForCausalLM"
    model = nbgpu.load(str(folder), show=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not marker.exists() and asked == []


def test_the_marker_does_appear_when_the_user_trusts_the_code(custom_type, asked, monkeypatch, tmp_path):
    """The control: the same folder with trust_remote_code=True runs the code (so the tests above could fail)."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder, marker = custom_type
    try:
        nbgpu.plan(str(folder), gpus="1x24GiB", trust_remote_code=True)
    except UsageError:
        pass  # building it may fail afterwards; what matters is that the code was allowed to run
    assert marker.exists()


def test_trust_remote_code_must_be_said_plainly():
    with pytest.raises(UsageError, match="trust_remote_code must be True or False"):
        nbgpu.plan({"model_type": "llama"}, gpus="1x24GiB", trust_remote_code="yes")
