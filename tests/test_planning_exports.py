"""Plan exports and views: JSON, a device_map that from_pretrained loads, max_memory (the engine exports are checked
in test_engine_exports.py)."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

import nbgpu
from nbgpu.errors import UsageError


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
    assert set(mm) == {0, 1, "cpu"} and all(isinstance(v, int) for v in mm.values())
    assert get_max_memory(mm) == mm  # accelerate takes the dict as it is (bytes, cuda indexes, "cpu")
    for d in p.devices:  # room for the weights, and what the plan puts beside them still within the budget
        assert d.weights <= mm[d.cuda_index]
        assert mm[d.cuda_index] + d.kv_cache + d.activations + d.allocator + d.context + d.others <= d.budget


def test_max_memory_holds_the_plans_weights_and_never_exceeds_a_card():
    """accelerate, given only max_memory, finds room for every weight on the GPUs; no figure is above a card."""
    from accelerate import infer_auto_device_map

    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8)
    p = nbgpu.plan(cfg, gpus="24GiB,80GiB", batch=8, seq_len=8192)
    assert p.fits
    mm = p.max_memory
    assert all(mm[d.cuda_index] <= d.capacity for d in p.devices)
    found = infer_auto_device_map(p._meta.model, max_memory={**mm, "cpu": 0},
                                  no_split_module_classes=p.no_split_modules)
    assert set(found.values()) <= {0, 1}


def test_max_memory_of_a_plan_that_does_not_fit_is_refused_with_what_is_missing():
    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=8)
    p = nbgpu.plan(cfg, gpus="2xL4", batch=1, seq_len=4096)
    assert not p.fits and all(d.weights > d.capacity for d in p.devices)  # what the old figure gave: above the card
    before = (p.device_map, [d.total for d in p.devices])
    with pytest.raises(UsageError, match=r"no max_memory for a plan that does not fit: .* GiB missing \(over: cuda:0 "
                                         r"= GPU 0 NVIDIA L4 \(simulated\) by .*GiB; cuda:1 .*offload='cpu'"):
        _ = p.max_memory
    assert (p.device_map, [d.total for d in p.devices]) == before


def test_memory_bars_mark_over_in_red():
    from nbgpu.views.memory_bars import OVER, memory_bars

    fig = memory_bars(["a", "b"], {"weights": [10, 30]}, [20, 20])
    over = next(t for t in fig.data if t.name == "over budget")
    assert list(over.y)[1] > 0 and list(over.y)[0] == 0 and over.marker.color == OVER
    assert "OVER" in list(over.x)[1]
    memory_bars(["a", "b"], {"weights": [5, 5]}, [20, 20], fig=fig)
    assert sum(next(t for t in fig.data if t.name == "over budget").y) == 0


def test_editor_moves_layers_and_redraws(opened_state):
    from nbgpu.views.plan_view import PlanEditor

    p = nbgpu.plan(tiny_llama(), gpus="2x24GiB")
    e = PlanEditor(p)
    assert e.boundaries() == [2]
    # the first drawing is in the state the figure widgets' comms opened with, which a front end rendering them
    # before a later change message arrives draws
    shown = {t["name"]: t for t in opened_state[e.bars.model_id]["_widget_data"]}
    assert shown["weights"]["y"][0] * 1024**3 == pytest.approx(p.devices[0].weights)
    assert len(opened_state[e.placement.model_id]["_widget_data"]) == len(e.placement.data) > 0
    e.handles[0].value = 3
    assert p.layer_counts() == [3, 1] and p.device_map["model.layers.2"] == 0
    bar_weights = next(t for t in e.bars.data if t.name == "weights").y
    assert bar_weights[0] * 1024**3 == pytest.approx(p.devices[0].weights)
    assert "fits" in e.status.value
