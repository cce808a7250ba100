"""Each finding of the bad-input review, by its exact input: a clear UsageError (the library's error kept as its cause)
or the right result, and nothing changed by a refused call."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

import nbgpu
from nbgpu import checks, devices
from nbgpu.errors import UsageError
from nbgpu.magics import gpus_magic

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def _save(config, path):
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    cfg = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"}, eos_token_id=2,
                                   bos_token_id=1)
    return _save(cfg, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=300, n_positions=32, bos_token_id=1,
                                  eos_token_id=2)
    return _save(cfg, tmp_path_factory.mktemp("gpt2"))


# --- the checks themselves ----------------------------------------------------------------------------------

def test_integers_are_integers():
    assert checks.integer(np.int64(3), "n") == 3 and type(checks.integer(np.uint8(3), "n")) is int
    for bad in (True, np.True_, 1.0, "1", None, [1]):
        with pytest.raises(UsageError, match="n must be a whole number"):
            checks.integer(bad, "n")
    with pytest.raises(UsageError, match="from 1 to 4, not 5"):
        checks.integer(5, "n", 1, 4)


def test_dtypes_go_through_torchs_own_names():
    assert checks.dtype("double") == "float64" and checks.dtype(torch.float64) == "float64"
    assert checks.dtype("half") == "float16" and checks.dtype("torch.bfloat16") == "bfloat16"
    assert checks.dtype("bf16") == "bfloat16" and checks.dtype("float") == "float32"
    for bad in ("int8", "float8_e4m3fn", "onnx", "__class__", 5, None):
        with pytest.raises(UsageError, match="dtype"):
            checks.dtype(bad)


def test_double_plans_eight_bytes_per_value():
    """The finding: dtype='double' quarter-sized the KV cache (it was counted at 2 bytes a value)."""
    p = nbgpu.plan(TINY, gpus="1x24GiB", dtype="double", batch=3, seq_len=100)
    head_dim = 64 // 4
    per_layer = 2 * 2 * head_dim * 100 * 3 * 8  # K and V, 2 kv heads, 100 tokens, batch 3, 8 bytes
    assert p.dtype == "float64" and p.devices[0].kv_cache == 4 * per_layer
    half = nbgpu.plan(TINY, gpus="1x24GiB", dtype=torch.float16, batch=3, seq_len=100)
    assert half.devices[0].kv_cache * 4 == p.devices[0].kv_cache


def test_zero_heads_is_refused_before_transformers_divides_by_it():
    with pytest.raises(UsageError, match="num_attention_heads must be a whole number from 1"):
        nbgpu.plan({**TINY, "num_attention_heads": 0}, gpus="1x24GiB")
    with pytest.raises(UsageError, match="multiple of num_key_value_heads"):
        nbgpu.plan({**TINY, "num_key_value_heads": 3}, gpus="1x24GiB")
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4)
    cfg.num_attention_heads = 0  # a config object edited after it was made
    with pytest.raises(UsageError, match="num_attention_heads"):
        nbgpu.plan(cfg, gpus="1x24GiB")


def test_use_with_auto_as_text_is_a_usage_error_and_numpy_counts_work():
    devices.simulate("2x24GiB")
    with pytest.raises(UsageError, match="auto .* must be a whole number"):
        nbgpu.use(auto="2")
    with pytest.raises(UsageError, match="max_util"):
        nbgpu.use(auto=1, max_util=float("nan"))
    assert len(nbgpu.use(auto=np.int64(1)).targets) == 1


def test_an_unclosed_quote_in_a_magic_is_a_usage_error_and_changes_nothing():
    devices.simulate("2x24GiB")
    before = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    with pytest.raises(UsageError, match="No closing quotation") as err:
        gpus_magic('"0,1')
    assert isinstance(err.value.__cause__, ValueError)  # shlex's own error, kept
    assert {k: os.environ.get(k) for k in before} == before and devices.simulated().visible is None


# --- plans --------------------------------------------------------------------------------------------------

def test_a_float_device_is_refused_and_the_plan_is_unchanged():
    """The finding: plan.move(..., 1.0) was taken and dropped that layer's weights from every GPU's total."""
    p = nbgpu.plan(TINY, gpus="2x24GiB", strategy=[2, 2])
    before = p.to_dict()
    with pytest.raises(UsageError, match="cannot place 'model.layers.0' on 1.0"):
        p.move("model.layers.0", 1.0)
    assert p.to_dict() == before
    p.move("model.layers.0", np.int64(1)).move("model.layers.1", "cuda:1")
    assert p.layer_counts() == [0, 4]
    assert sum(d.weights for d in p.devices) == sum(u.size for u in p.units)  # every weight counted once


def test_edits_check_their_arguments():
    p = nbgpu.plan(TINY, gpus="2x24GiB")
    with pytest.raises(UsageError, match="batch must be a whole number"):
        p.with_batch(batch=0)  # was silently read as "keep the batch"
    assert p.with_batch(batch=np.int64(2)).batch == 2
    with pytest.raises(UsageError, match="list of layer counts"):
        p.set_boundaries(4)
    p.set_boundaries(np.array([1, 3]))  # numpy counts, as a slider may give
    assert p.layer_counts() == [1, 3]
    with pytest.raises(UsageError, match="names no module"):
        p.move([], 0)


def test_a_missing_folder_is_named_not_mistaken_for_a_hub_id(tmp_path):
    """The finding: OSError 'Repo id must be in the form ...' for a folder that does not exist."""
    missing = str(tmp_path / "models" / "llama")
    for call in (lambda: nbgpu.plan(missing, gpus="1x24GiB"), lambda: nbgpu.load(missing, show=False)):
        with pytest.raises(UsageError, match="there is no folder"):
            call()


def test_a_sequence_longer_than_the_models_positions_is_flagged_in_the_plan():
    p = nbgpu.plan(TINY, gpus="1x24GiB", seq_len=512)
    assert p.max_positions == 512 and not p.exceeds_positions
    assert nbgpu.plan(TINY, gpus="1x24GiB", seq_len=513).exceeds_positions


# --- hub ids offline ----------------------------------------------------------------------------------------

def test_offline_a_hub_id_is_refused_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    for call in (lambda: nbgpu.plan("org/model", gpus="1x24GiB"), lambda: nbgpu.load("org/model", show=False)):
        with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
            call()
    assert time.monotonic() - start < 5


def test_a_hub_id_that_cannot_be_resolved_is_refused_within_seconds(monkeypatch):
    """One request with a short timeout, no retries (it took 23-26 s of retries before)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://nbgpu-test.invalid")  # .invalid never resolves (RFC 2606)
    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "ENDPOINT", "http://nbgpu-test.invalid")
    start = time.monotonic()
    with pytest.raises(UsageError, match="could not be reached"):
        nbgpu.plan("no-such-org/no-such-model-xyz", gpus="1x24GiB")
    assert time.monotonic() - start < 5


def test_a_hub_whose_name_resolution_hangs_is_given_up_on(monkeypatch):
    """A resolver can hang far beyond any request timeout: the probe runs in a thread that is abandoned."""
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: time.sleep(6))
    start = time.monotonic()
    with pytest.raises(UsageError, match="could not be reached within 1.2 s"):
        nbgpu.plan("no-such-org/hanging-resolver", gpus="1x24GiB")
    assert time.monotonic() - start < 5


def test_a_name_that_is_neither_a_folder_nor_a_hub_id():
    with pytest.raises(UsageError, match="neither a folder here nor a hub id") as err:
        nbgpu.plan("not a model!", gpus="1x24GiB")
    assert type(err.value.__cause__).__name__ == "HFValidationError"


# --- load ---------------------------------------------------------------------------------------------------

def test_a_truncated_weights_file_is_refused_with_the_file_named(llama_folder, tmp_path):
    import shutil

    from safetensors import SafetensorError

    broken = tmp_path / "broken"
    shutil.copytree(llama_folder, broken)
    weights = broken / "model.safetensors"
    plan = nbgpu.plan(str(broken), gpus="1x24GiB", dtype="float32")
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 100)
    with pytest.raises(UsageError, match="model.safetensors is damaged or incomplete") as err:
        nbgpu.load(str(broken), show=False)
    assert isinstance(err.value.__cause__, SafetensorError)
    with pytest.raises(UsageError, match="not the checkpoint this plan was made for"):
        nbgpu.load(plan, show=False)  # its size changed since the plan


def test_a_plan_refuses_a_folder_that_now_holds_another_model(llama_folder, tmp_path):
    """The finding: nbgpu.load(plan) after the folder was replaced loaded it and reported -100%."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(llama_folder, folder)
    devices.simulate("2x24GiB")
    plan = nbgpu.plan(str(folder), batch=1, seq_len=64, dtype="float32")
    assert nbgpu.load(plan, show=False).nbgpu_load.warnings == []  # the same folder loads
    shutil.rmtree(folder)
    other = transformers.LlamaConfig(**{k: v for k, v in TINY.items() if k != "model_type"} | {"num_hidden_layers": 2})
    _save(other, folder)
    with pytest.raises(UsageError, match=r"not the checkpoint this plan was made for \(config.json has changed; "
                                         r"model.safetensors was"):
        nbgpu.load(plan, show=False)


def test_load_checks_its_own_arguments(llama_folder):
    with pytest.raises(UsageError, match="show must be True or False"):
        nbgpu.load(llama_folder, show="no")
    with pytest.raises(UsageError, match="trust_remote_code must be True or False"):
        nbgpu.load(llama_folder, show=False, trust_remote_code=1)
    with pytest.raises(UsageError, match="dtype"):
        nbgpu.load(llama_folder, show=False, dtype="int3")


def test_errors_of_from_pretrained_become_usage_errors_with_the_cause(llama_folder):
    with pytest.raises(UsageError, match="the model could not be loaded: transformers says") as err:
        nbgpu.load(llama_folder, show=False, device_map="the moon")
    assert err.value.__cause__ is not None


# --- bench --------------------------------------------------------------------------------------------------

def test_bench_of_a_path_says_to_load_it_first():
    with pytest.raises(UsageError, match=r"not str. Load it first: model = nbgpu.load\('path'\)"):
        nbgpu.bench("path")


def test_bench_refuses_more_tokens_than_the_model_has_positions(llama_folder):
    model = nbgpu.load(llama_folder, show=False)
    start = time.monotonic()
    with pytest.raises(UsageError, match="512 positions"):
        nbgpu.bench(model, new_tokens=10**9)  # ran until killed
    assert time.monotonic() - start < 5


def test_gpt2_runs_up_to_its_positions_and_no_further(gpt2_folder):
    """The finding: prompt_len + new_tokens beyond n_positions ended in a raw IndexError. Oracle: transformers
    warns past max_length == n_positions (32) and fails outright at 34 tokens."""
    model = nbgpu.load(gpt2_folder, show=False)
    result = nbgpu.bench(model, prompt_len=20, new_tokens=12, repeats=1, warmup=0, explain=False)
    assert result.generated_tokens == 12
    for prompt_len, new_tokens in ((20, 13), (20, 14), (30, 10**6)):
        with pytest.raises(UsageError, match=f"prompt_len={prompt_len} plus new_tokens={new_tokens} is "
                                             f"{prompt_len + new_tokens} tokens, but this model has 32 positions"):
            nbgpu.bench(model, prompt_len=prompt_len, new_tokens=new_tokens)
    ids = torch.randint(0, 300, (1, 20))
    with pytest.raises(IndexError):  # what nbgpu now refuses, as plain transformers meets it
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, min_new_tokens=14,
                       do_sample=False, pad_token_id=0)


def test_bench_arguments_are_checked(llama_folder):
    model = nbgpu.load(llama_folder, show=False)
    for kwargs, message in ((dict(batch=True), "batch"), (dict(repeats=2.0), "repeats"),
                            (dict(compile="no"), "compile"), (dict(seed=-1), "seed"), (dict(label=5), "label")):
        with pytest.raises(UsageError, match=message):
            nbgpu.bench(model, **kwargs)
    result = nbgpu.bench(model, batch=np.int64(1), prompt_len=np.int32(4), new_tokens=np.int64(3), repeats=1,
                         warmup=0, explain=False)
    assert type(result.batch) is int and result.generated_tokens == 3


def test_compare_refuses_what_is_not_a_list_of_results():
    for bad in (5, None, "run"):
        with pytest.raises(UsageError, match="compare takes"):
            nbgpu.compare(bad)
