"""Plan files: format nbgpu-plan/2 validated by its schema, format 1 files loading as they did, and every malformed
file refused with one UsageError that names the field."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

import nbgpu
from nbgpu.errors import UsageError
from nbgpu.planning import plan_file

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
DATA = Path(__file__).parent / "data"
DOCS = Path(__file__).parent.parent / "docs" / "plan-format.md"


def tiny_llama(**extra):
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                    **extra)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(tiny_llama(tie_word_embeddings=True)).save_pretrained(path)
    return path


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a plan file was loaded over the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def weights_per_device(plan) -> dict:
    """The oracle for what a device_map puts where: accelerate's own module sizes."""
    from accelerate.utils import compute_module_sizes

    sizes = compute_module_sizes(plan._meta.model)
    out: dict = {}
    for name, device in plan.device_map.items():
        out[device] = out.get(device, 0) + sizes[name]
    return out


# --- format 1 files load unchanged ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["plan_v1_manual.json", "plan_v1_accelerate.json"])
def test_format_1_files_load_unchanged(name, no_network):
    old = json.loads((DATA / name).read_text())
    p = nbgpu.Plan.load(DATA / name)
    assert p.device_map == old["device_map"]
    assert (p.dtype, p.batch, p.seq_len, p.strategy, p.reserve, p.context, p.offload, p.cpu_memory) == tuple(
        old[k] for k in ("dtype", "batch", "seq_len", "strategy", "reserve", "context", "offload", "cpu_memory"))
    assert [(g.index, g.name, g.uuid, g.memory_total, g.memory_used, g.simulated) for g in p.gpus] == [
        tuple(g[k] for k in ("index", "name", "uuid", "memory_total", "memory_used", "simulated")) for g in old["gpus"]]
    assert p.config.to_dict()["num_hidden_layers"] == old["source"]["value"]["num_hidden_layers"] == 4
    per_device = weights_per_device(p)
    assert [d.weights for d in p.devices] == [per_device.get(i, 0) for i in range(len(p.gpus))]
    assert p.cpu_weights == per_device.get("cpu", 0)


def test_a_format_1_file_of_a_folder_reads_its_config_from_the_folder(folder, tmp_path):
    text = (DATA / "plan_v1_folder.json").read_text().replace("FOLDER", str(folder))
    (tmp_path / "old.json").write_text(text)
    p = nbgpu.Plan.load(tmp_path / "old.json")
    assert p.source == str(folder) and p.device_map == json.loads(text)["device_map"]
    assert p.fingerprint["weights"] == {"model.safetensors": (folder / "model.safetensors").stat().st_size}
    p.save(tmp_path / "new.json")  # saved again in the current format, with the config inside
    assert json.loads((tmp_path / "new.json").read_text())["format"] == "nbgpu-plan/2"
    (tmp_path / "gone.json").write_text(text.replace(str(folder), str(tmp_path / "moved-away")))
    with pytest.raises(UsageError, match="no folder"):
        nbgpu.Plan.load(tmp_path / "gone.json")


def test_a_format_1_file_of_an_uncached_hub_id_is_refused_at_once_without_the_network(tmp_path, no_network):
    text = (DATA / "plan_v1_folder.json").read_text().replace("FOLDER", "no-such-org/no-such-model-xyz")
    (tmp_path / "hub.json").write_text(text)
    start = time.monotonic()
    with pytest.raises(UsageError, match="not in the Hugging Face cache; plan files never go to the network"):
        nbgpu.Plan.load(tmp_path / "hub.json")
    assert time.monotonic() - start < 5  # generous: the refusal asks nothing of the network


# --- format 2 ----------------------------------------------------------------------------------------------

def test_loading_never_reads_the_folder_or_the_network(folder, tmp_path, no_network):
    copy_of = tmp_path / "model"
    shutil.copytree(folder, copy_of)
    p = nbgpu.plan(str(copy_of), gpus="2x24GiB", batch=2, seq_len=256, dtype="float32")
    p.save(tmp_path / "plan.json")
    shutil.rmtree(copy_of)  # the plan file holds the config: the folder is not needed to read it
    q = nbgpu.Plan.load(tmp_path / "plan.json")
    assert q.to_dict() == p.to_dict() and q.source == str(copy_of)
    assert q.fingerprint == p.fingerprint and q.fingerprint["config_sha256"]


def test_the_written_file_passes_the_schema_and_the_docs_name_every_field(tmp_path):
    p = nbgpu.plan(tiny_llama(), gpus="24GiB,80GiB", strategy=[1, 3])
    data = p.to_dict()
    assert plan_file.PlanFile.model_validate(data).format == "nbgpu-plan/2"
    docs = DOCS.read_text()
    for model in (plan_file.PlanFile, plan_file.GPUEntry, plan_file.Source, plan_file.Fingerprint):
        for field in model.model_fields:
            assert f"`{field}`" in docs, f"docs/plan-format.md does not describe {model.__name__}.{field}"


def test_the_run_and_the_parallelism_round_trip(tmp_path):
    p = nbgpu.plan(tiny_llama(), gpus="1x24GiB", batch=3, prompt_len=100, new_tokens=28, prefill_chunk=50,
                   attn_implementation="eager", cache="static")
    data = p.to_dict()
    assert (data["prompt_len"], data["new_tokens"], data["seq_len"], data["parallel"]) == (100, 28, 128, "layers")
    p.save(tmp_path / "p.json")
    back = nbgpu.Plan.load(tmp_path / "p.json")
    assert back.workload == p.workload and [d.total for d in back.devices] == [d.total for d in p.devices]
    data["new_tokens"] = 29  # prompt + new no longer makes seq_len
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="seq_len must be prompt_len \\+ new_tokens"):
        nbgpu.Plan.load(tmp_path / "bad.json")
    tensor = nbgpu.plan(tiny_llama(), gpus="2x24GiB", parallel="tensor", batch=2, seq_len=64)
    tensor.save(tmp_path / "t.json")
    loaded = nbgpu.Plan.load(tmp_path / "t.json")
    assert loaded.parallel == "tensor" and [d.total for d in loaded.devices] == [d.total for d in tensor.devices]
    assert json.loads((tmp_path / "t.json").read_text())["device_map"] is None


# --- malformed files: one UsageError naming the field --------------------------------------------------------

def _set(path, value):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


def _delete(path):
    def change(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return change


MUTATIONS = [  # the malformed files that gave raw exceptions or loaded wrong plans, by what was changed
    ("batch -1", _set(["batch"], -1), "batch: Input should be greater than or equal to 1, found -1"),
    ("seq_len 1.5", _set(["seq_len"], 1.5), "seq_len: Input should be a valid integer, found 1.5"),
    ("batch true", _set(["batch"], True), "batch: Input should be a valid integer, found True"),
    ("negative reserve", _set(["reserve"], -1024), "reserve: Input should be greater than or equal to 0"),
    ("unknown strategy", _set(["strategy"], "fastest"), "strategy: Input should be 'balanced'"),
    ("no source", _delete(["source"]), "source: missing"),
    ("source a list", _set(["source"], ["path_or_id", "x"]), "source: Input should be a valid dictionary"),
    ("gpus a dict", _set(["gpus"], {"index": 0}), "gpus: Input should be a valid list"),
    ("no gpus", _set(["gpus"], []), "gpus: List should have at least 1 item"),
    ("gpu index text", _set(["gpus", 0, "index"], "0"), "gpus[0].index: Input should be a valid integer"),
    ("negative memory", _set(["gpus", 1, "memory_total"], -5), "gpus[1].memory_total: Input should be greater"),
    ("device 1.0", _set(["device_map", "model.layers.0"], 1.0), "device_map['model.layers.0']: expected a cuda"),
    ("device beyond gpus", _set(["device_map", "model.layers.0"], 5), "places modules on cuda:5, but the plan has 2"),
    ("unknown module", _set(["device_map", "model.layers.9"], 0), "device_map: there is no module 'model.layers.9'"),
    ("missing module", _delete(["device_map", "lm_head"]), "device_map: module 'lm_head' has no device"),
    ("unknown field", _set(["colour"], "red"), "colour: unknown field"),
    ("dtype int8", _set(["dtype"], "int8"), "dtype: Input should be 'bfloat16', 'float16', 'float32' or 'float64'"),
    ("offload 0", _set(["offload"], 0), "offload: expected false, true, 'cpu' or 'disk', found 0"),
    ("no model_type", _delete(["config", "model_type"]), "config must hold the model's model_type"),
    ("zero heads", _set(["config", "num_attention_heads"], 0), "num_attention_heads must be a whole number from 1"),
    ("zero layers", _set(["config", "num_hidden_layers"], 0), "num_hidden_layers must be a whole number from 1"),
    ("bad fingerprint", _set(["fingerprint"], {"config_sha256": "abc", "weights": {}}),
     "fingerprint.config_sha256: String should match pattern"),
    ("tied weights split", _set(["device_map", "lm_head"], 1), "tied weights must stay on one device"),
]


@pytest.fixture(scope="module")
def valid_file_data():
    p = nbgpu.plan(tiny_llama(tie_word_embeddings=True), gpus="2x24GiB", strategy=[2, 2])
    return p.to_dict()


@pytest.mark.parametrize("label, change, expected", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_a_malformed_field_is_one_usage_error_naming_it(valid_file_data, tmp_path, label, change, expected):
    data = copy.deepcopy(valid_file_data)
    change(data)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(UsageError) as err:
        nbgpu.Plan.load(tmp_path / "p.json")
    assert expected in str(err.value) and str(tmp_path / "p.json") in str(err.value)


@pytest.mark.parametrize("label, text, expected", [
    ("cut short", None, "is not valid JSON"),
    ("empty", "", "is not valid JSON"),
    ("a list", "[1, 2]", "is not a saved nbgpu plan"),
    ("other format", '{"format": "other"}', "is not a saved nbgpu plan"),
    ("NaN", '{"format": "nbgpu-plan/2", "seq_len": NaN}', "NaN is not a JSON number"),
    ("huge number", '{"format": "nbgpu-plan/2", "seq_len": 1e400}', "out of range"),
    ("key twice", '{"format": "nbgpu-plan/2", "format": "nbgpu-plan/2"}', "appears twice"),
    ("nested deeply", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("not text", b"\xff\xfe\x00binary", "not a text file"),
])
def test_a_file_that_is_not_a_plan_is_a_usage_error(valid_file_data, tmp_path, label, text, expected):
    target = tmp_path / "p.json"
    if text is None:
        text = json.dumps(valid_file_data)[:300]
    target.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UsageError, match=re.escape(expected)):
        nbgpu.Plan.load(target)


def test_paths_that_are_not_plan_files(tmp_path):
    with pytest.raises(UsageError, match="there is no file"):
        nbgpu.Plan.load(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="is not a file"):
        nbgpu.Plan.load(tmp_path)
    with pytest.raises(UsageError, match="must be a path"):
        nbgpu.Plan.load(42)
    big = tmp_path / "weights.bin"
    with open(big, "wb") as fh:
        fh.truncate(plan_file.MAX_FILE + 1)
    with pytest.raises(UsageError, match="larger than 16 MiB"):
        nbgpu.Plan.load(big)


def test_a_plan_of_a_model_type_transformers_lacks_needs_trust_remote_code(valid_file_data, tmp_path):
    data = copy.deepcopy(valid_file_data)
    data["config"]["model_type"] = "marker-model"
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match="trust_remote_code=True"):
        nbgpu.Plan.load(tmp_path / "p.json")


def test_the_error_keeps_pydantics_report_as_its_cause(valid_file_data, tmp_path):
    from pydantic import ValidationError

    data = copy.deepcopy(valid_file_data)
    data["batch"] = -1
    data["seq_len"] = "long"
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(UsageError, match=r"and 1 more problem") as err:
        nbgpu.Plan.load(tmp_path / "p.json")
    assert isinstance(err.value.__cause__, ValidationError) and err.value.__cause__.error_count() == 2
    assert os.fspath(tmp_path / "p.json") in str(err.value)
