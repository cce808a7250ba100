"""Properties of plan files: any valid plan round-trips exactly; any mutation of a valid file is either loaded as
the file says or refused with a UsageError, never another exception."""

from __future__ import annotations

import copy
import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
transformers = pytest.importorskip("transformers")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from strategies import examples, json_values  # noqa: E402

import nbgpu  # noqa: E402
from nbgpu.errors import UsageError  # noqa: E402

INPUTS = ["format", "source", "trust_remote_code", "fingerprint", "dtype", "batch", "seq_len", "prompt_len",
          "new_tokens", "parallel", "strategy", "reserve", "context", "offload", "cpu_memory", "gpus", "device_map"]


def _config(kind, layers, heads, kv_div, tied):
    kv = heads // kv_div
    common = dict(vocab_size=128, num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=256)
    if kind == "gpt2":
        return transformers.GPT2Config(n_embd=8 * heads, n_layer=layers, n_head=heads, vocab_size=128,
                                       n_positions=256, tie_word_embeddings=tied)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[kind]
    return cls(hidden_size=8 * heads, intermediate_size=16 * heads, num_key_value_heads=kv, tie_word_embeddings=tied,
               **common)


configs = st.builds(_config, st.sampled_from(["llama", "gpt2", "mistral", "qwen2"]), st.integers(1, 4),
                    st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.booleans())
gpu_specs = st.lists(st.sampled_from(["2GiB", "24GiB", "80GiB", "H100", "T4"]), min_size=1, max_size=4)


def _counts(layers: int, gpus: int, cuts: list[int]) -> list[int]:
    """Layer counts per GPU that add up to the model's layers (the cut points sorted)."""
    edges = [0, *sorted(min(c, layers) for c in cuts[:gpus - 1]), layers]
    return [b - a for a, b in zip(edges, edges[1:])] + [0] * (gpus - len(edges) + 1)


@st.composite
def plans(draw):
    config = draw(configs)
    gpus = draw(gpu_specs)
    layers = config.num_hidden_layers
    strategy = draw(st.one_of(st.sampled_from(["balanced", "sequential", "accelerate"]),
                              st.lists(st.integers(0, layers), min_size=3, max_size=3).map(
                                  lambda cuts: _counts(layers, len(gpus), cuts))))
    try:
        p = nbgpu.plan(config, gpus=",".join(gpus), batch=draw(st.integers(1, 64)),
                       seq_len=draw(st.integers(1, 8192)), dtype=draw(st.sampled_from(["bfloat16", "float32", "half"])),
                       strategy=strategy, offload=draw(st.sampled_from([False, "cpu", "disk"])),
                       reserve=draw(st.sampled_from([0, "1GiB", 12345])), cpu_memory=draw(st.sampled_from(
                           ["1GiB", "64GiB", 0])))
    except UsageError:
        hypothesis.assume(False)  # a GPU without room for even one layer ...
    for module, device in draw(st.lists(st.tuples(st.sampled_from([u.name for u in p.units]),
                                                  st.sampled_from(p.targets)), max_size=3)):
        try:
            p.move(module, device)
        except UsageError:
            pass  # a tied group split: refused, the plan unchanged
    return p


@examples(40)
@given(plans())
def test_any_valid_plan_round_trips_exactly(tmp_path, plan):
    path = tmp_path / "plan.json"  # one file, written again by each example
    plan.save(path)
    loaded = nbgpu.Plan.load(path)
    assert loaded.to_dict() == plan.to_dict()
    assert [(d.weights, d.kv_cache, d.activations, d.context, d.total) for d in loaded.devices] == \
        [(d.weights, d.kv_cache, d.activations, d.context, d.total) for d in plan.devices]
    assert (loaded.fits, loaded.missing(), loaded.cpu_weights, loaded.disk_weights) == \
        (plan.fits, plan.missing(), plan.cpu_weights, plan.disk_weights)


@pytest.fixture(scope="module")
def valid_files():
    tied = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                    max_position_embeddings=256)
    gpt2 = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=128)
    manual = nbgpu.plan(tied, gpus="24GiB,80GiB", strategy=[1, 2]).move("model.layers.2", "cpu")
    return [manual.to_dict(),
            nbgpu.plan(gpt2, gpus="3x24GiB", strategy="accelerate", cpu_memory="1GiB").to_dict(),
            nbgpu.plan(tied, gpus="2GiB", offload="disk", cpu_memory=1, batch=256, seq_len=8192).to_dict()]


def _paths(node, prefix=()):
    """Every place in the JSON tree a mutation may touch."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@st.composite
def mutated(draw, files):
    data = copy.deepcopy(files[draw(st.integers(0, len(files) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "swap"]))
        if op == "replace":
            parent[key] = draw(json_values)
        elif op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "model.layers.0", "1", "batch", key]))] = draw(json_values)
        elif op == "swap":  # another field's (valid) value in this place
            other = draw(st.sampled_from(paths))
            source = data
            for k in other:
                source = source[k]
            parent[key] = copy.deepcopy(source)
    return data


@examples(250)
@given(st.data())
def test_any_mutation_of_a_valid_file_loads_as_written_or_is_refused(tmp_path, valid_files, data):
    changed = data.draw(mutated(valid_files))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(changed))  # NaN and Infinity are written as JSON does not allow: refused on load
    try:
        loaded = nbgpu.Plan.load(path)
    except UsageError:
        return
    written = loaded.to_dict()
    for field in INPUTS:  # what the file says is what the plan is (max_memory and fits are recomputed)
        assert written[field] == changed.get(field, written[field] if field in
                                            ("trust_remote_code", "fingerprint", "prompt_len", "new_tokens",
                                             "parallel") else object()), field
    config = changed["config"]
    rebuilt = transformers.AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items()
                                                                        if k != "model_type"})
    assert loaded.config.to_dict() == rebuilt.to_dict()  # the file's config, not one from anywhere else
    loaded.save(path)
    assert nbgpu.Plan.load(path).to_dict() == written  # and what it writes back loads the same
