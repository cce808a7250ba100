"""Plan exports and views: JSON, a device_map that from_pretrained loads, KTransformers rules, engine settings."""

from __future__ import annotations

import os
import re

import pytest

import nbgpu
from nbgpu.errors import UsageError

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


def tiny_llama(tied=False):
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_llama(tied=True))
    model.save_pretrained(path)
    return str(path), model


def test_device_map_loads_with_from_pretrained(saved_model, tmp_path):
    path, reference = saved_model
    p = nbgpu.plan(path, gpus="2x24GiB", dtype="float32")
    assert p.source == path and p.config.num_hidden_layers == 4
    p.move("model.layers.2", "cpu").move("model.layers.3", "disk")
    # no GPU here: the GPU entries become "cpu"; the disk entry is offloaded for real
    device_map = {k: ("cpu" if isinstance(v, int) else v) for k, v in p.device_map.items()}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, device_map=device_map,
                                                              offload_folder=str(tmp_path), dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference(ids).logits, atol=1e-5)
    assert any(f.endswith(".dat") or f.endswith(".safetensors") for f in os.listdir(tmp_path)) or \
        model.hf_device_map["model.layers.3"] == "disk"
    assert p.disk_weights == p._meta.unit("model.layers.3").size


def test_json_round_trip(tmp_path):
    p = nbgpu.plan(tiny_llama(), gpus="24GiB,80GiB", batch=2, seq_len=512, strategy=[1, 3])
    p.move("model.layers.1", 0)
    f = tmp_path / "plan.json"
    p.save(f)
    q = nbgpu.Plan.load(f)
    assert q.device_map == p.device_map
    assert [d.total for d in q.devices] == [d.total for d in p.devices]
    assert (q.batch, q.seq_len, q.dtype, q.simulated) == (2, 512, "bfloat16", True)
    assert q.max_memory == p.max_memory
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(UsageError, match="not a saved nbgpu plan"):
        nbgpu.Plan.load(tmp_path / "bad.json")


def test_max_memory_is_accepted_by_accelerate():
    from accelerate.utils import get_max_memory

    p = nbgpu.plan(tiny_llama(), gpus="2x24GiB", cpu_memory="4GiB")
    mm = p.max_memory
    assert set(mm) == {0, 1, "cpu"}
    assert all(mm[d.cuda_index] >= d.weights for d in p.devices)
    assert get_max_memory(mm) == mm


def test_ktransformers_rules_match_every_module_to_its_device():
    import yaml

    p = nbgpu.plan(tiny_llama(), gpus="3x24GiB", strategy=[1, 2, 1])
    rules = yaml.safe_load(p.ktransformers_rules())
    placed = [r for r in rules if "generate_device" in r["replace"]["kwargs"]]
    for name, dev in p.device_map.items():
        hits = [r["replace"]["kwargs"]["generate_device"] for r in placed
                if re.search(r["match"]["name"], name + ".weight") or re.search(r["match"]["name"], name)]
        assert hits and set(hits) == {f"cuda:{dev}"}, name
    transfer = next(r for r in rules if "transfer_map" in r["replace"]["kwargs"])["replace"]["kwargs"]["transfer_map"]
    assert transfer == {1: "cuda:1", 3: "cuda:2"}


def test_engine_settings():
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                                   num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8)
    p = nbgpu.plan(cfg, gpus="4xA100-80GB", batch=1, seq_len=4096)
    v = p.vllm()
    assert v["pipeline"]["engine_args"]["pipeline_parallel_size"] == 4
    assert v["pipeline"]["env"]["VLLM_PP_LAYER_PARTITION"] == ",".join(map(str, p.layer_counts()))
    # a 70B model does not fit one 80 GB GPU: tensor parallel needs 2 (divides 64 heads and 8 KV heads)
    assert v["tensor"]["engine_args"]["tensor_parallel_size"] == 2 and v["recommended"] == "tensor"
    assert p.mlc()["tensor_parallel_shards"] == 2
    o = p.openllm()
    assert o["service"]["resources"]["gpu"] == 2 and o["engine_config"]["tensor_parallel_size"] == 2


def test_memory_bars_mark_over_in_red():
    from nbgpu.views.memory_bars import OVER, memory_bars

    fig = memory_bars(["a", "b"], {"weights": [10, 30]}, [20, 20])
    over = next(t for t in fig.data if t.name == "over budget")
    assert list(over.y)[1] > 0 and list(over.y)[0] == 0 and over.marker.color == OVER
    assert "OVER" in list(over.x)[1]
    memory_bars(["a", "b"], {"weights": [5, 5]}, [20, 20], fig=fig)
    assert sum(next(t for t in fig.data if t.name == "over budget").y) == 0


def test_editor_moves_layers_and_redraws():
    pytest.importorskip("ipywidgets")
    from nbgpu.views.plan_view import PlanEditor

    p = nbgpu.plan(tiny_llama(), gpus="2x24GiB")
    e = PlanEditor(p)
    assert e.boundaries() == [2]
    e.handles[0].value = 3
    assert p.layer_counts() == [3, 1] and p.device_map["model.layers.2"] == 0
    bar_weights = next(t for t in e.bars.data if t.name == "weights").y
    assert bar_weights[0] * 1024**3 == pytest.approx(p.devices[0].weights)
    assert "fits" in e.status.value
