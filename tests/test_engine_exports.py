"""Each engine export against that engine's own rules (replayed in engine_rules.py from its source at a named
version), for six model families on 2, 3 (mixed sizes) and 8 simulated GPUs: accepted, or refused with the
engine's limit named."""

from __future__ import annotations

import dataclasses
import functools
import re

import pytest
import transformers
import yaml
from engine_rules import (
    check_openllm_recipe,
    check_vllm,
    kt_hidden_state_devices,
    kt_inject,
    kt_tree,
    mlc_shards_error,
    mlc_stage_of_layer,
    mlc_window,
    openllm_can_run,
    parse_mlc_command,
    parse_vllm_command,
    vllm_max_len,
    vllm_tp_error,
)

import nbgpu
from nbgpu.errors import UsageError
from nbgpu.planning.plan import resolve_gpus


def family_configs():
    t = transformers
    return {
        "llama": t.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=12,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096),
        "mixtral": t.MixtralConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
                                   num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                   num_experts_per_tok=2, max_position_embeddings=4096),
        "qwen2": t.Qwen2Config(vocab_size=32000, hidden_size=448, intermediate_size=1184, num_hidden_layers=12,
                               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=8192,
                               tie_word_embeddings=False),
        "gemma2": t.Gemma2Config(vocab_size=32000, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                                 num_attention_heads=8, num_key_value_heads=4, head_dim=32, sliding_window=2048,
                                 max_position_embeddings=8192),
        "gpt2": t.GPT2Config(vocab_size=32000, n_embd=384, n_layer=12, n_head=12, n_positions=1024,
                             bos_token_id=0, eos_token_id=0),
        # DeepSeek-V2's shape: latent attention (kv_lora_rank), routed and shared experts, a dense first layer, YaRN
        "deepseek_v2": t.DeepseekV2Config(
            vocab_size=32000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=6,
            num_attention_heads=16, num_key_value_heads=16, n_routed_experts=8, n_shared_experts=2,
            num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=16384,
            rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}),
    }


CONFIGS = family_configs()
GPU_SETS = {2: "2xA100-80GB", 3: "L4,L4,A100-80GB", 8: "8xH100"}  # 3: mixed sizes (24, 24, 80 GiB)


def layer_counts(n_layers: int, n_gpus: int) -> list[int]:
    """Layers per GPU: even (front-loaded) on equal GPUs; on the mixed set the 80 GiB GPU takes half."""
    if n_gpus == 3:
        return [n_layers // 4, n_layers // 4, n_layers - 2 * (n_layers // 4)]
    base = [n_layers // n_gpus] * n_gpus
    for i in range(n_layers % n_gpus):
        base[i] += 1
    return base


@functools.cache
def _planned(family: str, n_gpus: int, seq_len: int):
    cfg = CONFIGS[family]
    counts = layer_counts(cfg.num_hidden_layers, n_gpus)
    return nbgpu.plan(cfg, gpus=GPU_SETS[n_gpus], batch=4, seq_len=seq_len, strategy=counts)


def make_plan(family: str, n_gpus: int, seq_len: int = 1024):
    """A fresh copy of the plan (tests edit it); the model on the meta device is built once per case."""
    return _planned(family, n_gpus, seq_len).copy()


def stage_layers(plan) -> list[tuple[int, list[int]]]:
    """(cuda index, layers) per GPU holding layers, in layer order, from the plan's device_map."""
    out = []
    for name, dev in plan.device_map.items():
        unit = plan._meta.unit(name)
        if unit.layer is not None:
            if out and out[-1][0] == dev:
                out[-1][1].append(unit.layer)
            else:
                out.append((dev, [unit.layer]))
    return out


def tensor_plan(cfg, gpus, **kw):
    """A tensor-parallel plan (plan.parallel == 'tensor')."""
    return nbgpu.plan(cfg, gpus=gpus, parallel="tensor", **kw)


CASES = [(f, n) for f in CONFIGS for n in GPU_SETS]


# --- vLLM ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,n_gpus", CASES)
def test_vllm_command_is_what_vllm_accepts_and_runs_the_plans_stages(family, n_gpus):
    p = make_plan(family, n_gpus)
    v = p.vllm()
    env, args = parse_vllm_command(v["command"])
    assert args == {**v["engine_args"], "model": "<path-to-checkpoint>"}  # every argument is on the command line
    assert args["max_num_seqs"] == 4 and args["max_model_len"] == 1024 and args["dtype"] == "bfloat16"
    assert env == v["env"]
    stages = check_vllm(args, env, p.config)
    # vLLM's stage k holds exactly the layers the plan put on its k-th GPU
    assert [list(range(a, b)) for a, b in stages] == [layers for _, layers in stage_layers(p)]
    assert args["tensor_parallel_size"] == 1 and args["pipeline_parallel_size"] == len(stage_layers(p))
    assert any("simulated" in n for n in v["notes"]) and "CUDA_VISIBLE_DEVICES" not in env


def test_vllm_refuses_seq_len_beyond_the_models_positions():
    """GPT-2 has 1024 positions (n_positions): vLLM refuses a longer --max-model-len at start."""
    p = nbgpu.plan(CONFIGS["gpt2"], gpus=GPU_SETS[2], batch=4, seq_len=8192)
    assert vllm_max_len(p.config) == 1024
    with pytest.raises(UsageError, match=r"seq_len 8192 exceeds the model's positions, 1024.*with_batch\(seq_len=1024"):
        p.vllm()
    ok = p.with_batch(seq_len=1024).vllm()
    assert "--max-model-len 1024" in ok["command"]


@pytest.mark.parametrize("config,expected_033,expected_085", [
    (transformers.LlamaConfig(max_position_embeddings=2048, rope_scaling={"rope_type": "linear", "factor": 4.0}),
     8192, 8192),
    (transformers.LlamaConfig(max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}), 131072, 131072),
    (transformers.DeepseekV2Config(max_position_embeddings=32768, rope_scaling={
        "type": "yarn", "factor": 4, "original_max_position_embeddings": 4096}), 32768, 16384),
    (transformers.GPT2Config(n_positions=1024), 1024, 1024),
])
def test_positions_as_vllm_derives_them(config, expected_033, expected_085):
    from nbgpu.planning.positions import positions

    assert positions(config).length == vllm_max_len(config, "0.33.0") == expected_033
    assert positions(config, legacy_yarn=True).length == vllm_max_len(config, "0.8.5") == expected_085


def test_vllm_refuses_a_split_it_cannot_run_and_a_plan_that_does_not_fit():
    p = make_plan("llama", 2)
    before = p.device_map
    p.move("model.layers.9-11", 0)  # cuda:0 holds layers 0-5 and 9-11: two runs
    with pytest.raises(UsageError, match=r"contiguous runs of layers, one GPU each.*cuda:0 holds layers 0-5, 9-11"):
        p.vllm()
    assert before != p.device_map
    big = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192)
    short = nbgpu.plan(big, gpus="2x8GiB")
    assert not short.fits
    with pytest.raises(UsageError, match=r"does not fit: .* missing \(over: cuda:0 = GPU 0 .* by .*GiB"):
        short.vllm()
    off = nbgpu.plan(big, gpus="2x8GiB", offload="cpu", cpu_memory="64GiB")
    with pytest.raises(UsageError, match=r"cpu.*--cpu-offload-gb"):
        off.vllm()


def test_vllm_says_where_it_holds_embeddings_and_head_unlike_the_plan():
    p = make_plan("llama", 2)
    p.move("lm_head", 0)  # the plan keeps lm_head beside the embeddings; vLLM builds it on the last stage
    notes = " ".join(p.vllm()["notes"])
    assert "cuda:1 holds" in notes and "more than this plan counts" in notes
    g = make_plan("gemma2", 2)  # vLLM's gemma2.py builds embeddings, norm and lm_head on every stage
    assert "every pipeline stage" in " ".join(g.vllm()["notes"])


def test_real_gpus_get_their_physical_indexes_in_stage_order():
    sim = resolve_gpus("4xH100")
    real = [dataclasses.replace(g, simulated=False, index=i) for i, g in zip((5, 2, 7, 0), sim)]
    p = nbgpu.plan(CONFIGS["deepseek_v2"], gpus=real[:3], batch=2, seq_len=2048, strategy=[2, 2, 2])
    p.move("model.layers.0-1", 2).move("model.layers.4-5", 0)  # stages now run on cuda:2, cuda:1, cuda:0
    p.move(["model.embed_tokens"], 2).move(["model.norm", "lm_head"], 0)
    v = p.vllm()
    assert v["env"]["CUDA_VISIBLE_DEVICES"] == "7,2,5" and v["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    env, args = parse_vllm_command(v["command"])
    assert env["CUDA_VISIBLE_DEVICES"] == "7,2,5"
    assert not any("simulated" in n for n in v["notes"])


# --- tensor parallelism (vLLM's rule, shared with the planner) ------------------------------------------------

@pytest.mark.parametrize("family", list(CONFIGS))
def test_tp_sizes_are_exactly_those_vllm_accepts(family):
    from nbgpu.planning import tp_sizes

    cfg = CONFIGS[family]
    assert tp_sizes.valid_sizes(cfg, 64) == [tp for tp in range(1, 65) if vllm_tp_error(cfg, tp) is None]


def test_vllm_replicates_kv_heads_where_mlc_does_not():
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                                   num_attention_heads=16, num_key_value_heads=2)
    p = tensor_plan(cfg, "4xA100-80GB", batch=1, seq_len=1024)
    v = p.vllm()
    env, args = parse_vllm_command(v["command"])
    assert args["tensor_parallel_size"] == 4 and args["pipeline_parallel_size"] == 1
    check_vllm(args, env, cfg)  # 2 KV heads, each on 2 of the 4 GPUs
    assert mlc_shards_error(cfg, 4) is not None
    with pytest.raises(UsageError, match=r"tensor_parallel_shards=4 .* 2 KV heads do not divide over 4 GPUs \(MLC-LLM "
                                         r"does not replicate KV heads\).*accepts for this model: 1, 2"):
        p.mlc()
    with pytest.raises(UsageError, match="no tensor parallelism"):
        p.ktransformers_rules()
    recipe = p.openllm()["recipe"]
    (_, entry), = recipe.items()
    assert entry["engine_config"]["tensor_parallel_size"] == 4 and entry["service_config"]["resources"]["gpu"] == 4


def test_tensor_parallel_refused_where_heads_do_not_divide():
    layers = nbgpu.plan(CONFIGS["qwen2"], gpus="8xH100", batch=1, seq_len=1024)  # 28 heads
    assert vllm_tp_error(layers.config, 8) == "attention heads"
    with pytest.raises(UsageError, match=r"the 28 attention heads do not divide over 8 GPUs. Sizes this model "
                                         r"allows: 1, 2, 4"):
        tensor_plan(CONFIGS["qwen2"], "8xH100", batch=1, seq_len=1024)
    two = tensor_plan(CONFIGS["qwen2"], "2xH100", batch=1, seq_len=1024)
    env, args = parse_vllm_command(two.vllm()["command"])
    check_vllm(args, env, two.config)
    _, _, over = parse_mlc_command(two.mlc()["command"])
    assert over["tensor_parallel_shards"] == 2 and mlc_shards_error(two.config, 2) is None


def test_tensor_parallel_suggestion_counts_replicated_kv_heads():
    """70B shape on 80 GiB GPUs: 8 KV heads. vLLM takes 16 GPUs (each KV head on two); the suggestion may too."""
    from nbgpu.planning.explain import tensor_parallel

    cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                   num_attention_heads=64, num_key_value_heads=8)
    p = nbgpu.plan(cfg, gpus="1xH100", batch=1, seq_len=4096)
    assert tensor_parallel(p) == 2
    tiny = nbgpu.plan(cfg, gpus="1x8GiB", batch=1, seq_len=4096)
    tp = tensor_parallel(tiny)  # 141 GB of weights over 7 GiB budgets: more GPUs than KV heads
    assert tp > 8 and vllm_tp_error(cfg, tp) is None and tp % 8 == 0


# --- MLC-LLM --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,n_gpus", CASES)
def test_mlc_overrides_are_what_mlc_accepts_or_refused_with_its_limit(family, n_gpus):
    p = make_plan(family, n_gpus)
    stages = stage_layers(p)
    n_layers, counts = p.config.num_hidden_layers, [len(ls) for _, ls in stages]
    kind = p.config.model_type
    if kind not in {"llama", "nemotron", "olmo", "olmo2"}:
        with pytest.raises(UsageError, match=rf"pipeline stages only for llama, nemotron, olmo, olmo2, not {kind}"):
            p.mlc()
        return
    if n_layers % len(stages):
        with pytest.raises(UsageError, match=rf"for {n_layers} layers over {len(stages)} stages does not give"):
            p.mlc()
        with pytest.raises(AssertionError):
            mlc_stage_of_layer(n_layers, len(stages))  # MLC's own weights and forward would disagree
        return
    even = [n_layers // len(stages)] * len(stages)
    if counts != even:
        with pytest.raises(UsageError, match=rf"evenly over its {len(stages)} stages \({re.escape(str(even))}\), this "
                                             rf"plan has {re.escape(str(counts))}"):
            p.mlc()
        return
    m = p.mlc()
    env, model, over = parse_mlc_command(m["command"])
    assert over == m["overrides"] and over["pipeline_parallel_stages"] == len(stages)
    assert over["context_window_size"] == 1024 <= mlc_window(p.config) and over["max_num_sequence"] == 4
    owner = mlc_stage_of_layer(n_layers, len(stages))
    assert [[i for i in range(n_layers) if owner[i] == s] for s in range(len(stages))] == [ls for _, ls in stages]


def test_mlc_refuses_a_sequence_beyond_its_context_window():
    g = make_plan("gemma2", 2, seq_len=4096)  # 8192 positions, but MLC's Gemma 2 uses its 2048-token window
    assert mlc_window(g.config) == 2048 and vllm_max_len(g.config) == 8192
    with pytest.raises(UsageError, match=r"seq_len 4096 exceeds MLC-LLM's context window, 2048 \(sliding_window"):
        g.mlc()
    g.vllm()  # vLLM takes it


def test_mlc_single_gpu_plan_needs_no_split():
    p = nbgpu.plan(CONFIGS["qwen2"], gpus="1xA100-80GB", batch=2, seq_len=2048)
    _, _, over = parse_mlc_command(p.mlc()["command"])
    assert over == {"max_num_sequence": 2, "context_window_size": 2048}


# --- KTransformers ----------------------------------------------------------------------------------------------

def kt_check(plan) -> dict:
    """Replay KTransformers' rule matching over its module tree for this model, and assert that every weight
    lands where the plan put it (KTransformers' own placements excepted: embeddings and routed experts on the
    CPU) and that the model operator moves the hidden states to each layer's GPU."""
    text = plan.ktransformers_rules()
    assert text.startswith("# KTransformers v0.4.1")
    rules = yaml.safe_load(text)
    arch = type(plan._meta.model).__name__
    tree = kt_tree(plan._meta.model, arch, plan.config)
    injected = kt_inject(rules, tree)
    dm = plan.device_map
    n = plan.config.num_hidden_layers
    layer_dev = {i: f"cuda:{dm[f'model.layers.{i}']}" for i in range(n)}
    one_gpu = arch in ("LlamaForCausalLM", "MixtralForCausalLM")
    if one_gpu:
        layer_dev = dict.fromkeys(range(n), "cuda:0")
    for name, _, owns in tree:
        if not owns or name not in injected:
            continue  # modules under a recursive: False operator load with it
        kw = injected[name]["kwargs"]
        if name == "model.embed_tokens":
            assert kw["generate_device"] == "cpu"
        elif name.startswith("model.layers."):
            want = layer_dev[int(name.split(".")[2])]
            if name.endswith("experts"):
                assert injected[name]["class"].endswith("KTransformersExperts")
                assert (kw["prefill_device"], kw["out_device"], kw["generate_device"]) == (want, want, "cpu"), name
            else:
                assert kw.get("generate_device", "cuda:0") == want, (name, kw)
        elif name == "lm_head":
            assert kw["generate_device"] == ("cuda:0" if one_gpu else f"cuda:{dm['lm_head']}")
    for i in range(n):
        attn = injected[f"model.layers.{i}.self_attn"]
        if arch.startswith("Deepseek"):
            assert attn["class"].endswith("KDeepseekV2Attention") and attn["kwargs"]["generate_device"] == layer_dev[i]
    if not one_gpu:
        assert injected["model"]["class"].endswith(("KDeepseekV2Model", "KQwen2MoeModel"))
        ran = kt_hidden_state_devices(injected, n)
        assert ran == [layer_dev[i] for i in range(n)]
        assert injected["model.norm"]["kwargs"]["generate_device"] == ran[-1]  # the norm runs after the last layer
    return injected


@pytest.mark.parametrize("family,n_gpus", CASES)
def test_ktransformers_rules_place_each_module_or_name_its_limit(family, n_gpus):
    p = make_plan(family, n_gpus)
    arch = type(p._meta.model).__name__
    if family == "deepseek_v2":
        injected = kt_check(p)
        assert injected["model.layers.1.mlp"]["class"].endswith("KDeepseekV2MoE")
        assert injected["model.layers.0.mlp"]["class"] == "default"  # the dense first layer
    elif family in ("llama", "mixtral"):
        with pytest.raises(UsageError, match=rf"runs {arch} on one GPU only: .*operators/models.py"):
            p.ktransformers_rules()
    else:
        with pytest.raises(UsageError, match=rf"runs DeepseekV2ForCausalLM, .* not {arch}"):
            p.ktransformers_rules()


def test_ktransformers_one_gpu_families_and_qwen2_moe():
    llama = nbgpu.plan(CONFIGS["llama"], gpus="1xA100-80GB")
    injected = kt_check(llama)
    assert injected["model"]["class"].endswith("KLlamaModel")
    assert injected["model.rotary_emb"]["class"].endswith("RotaryEmbeddingV2")  # KLlamaModel's own RoPE too
    mix = kt_check(nbgpu.plan(CONFIGS["mixtral"], gpus="1xA100-80GB"))
    assert mix["model.layers.0.block_sparse_moe"]["class"].endswith("KMistralSparseMoEBlock")
    qwen = transformers.Qwen2MoeConfig(vocab_size=32000, hidden_size=512, intermediate_size=1024,
                                       moe_intermediate_size=256, shared_expert_intermediate_size=512,
                                       num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=4,
                                       num_experts=8, num_experts_per_tok=2)
    q = kt_check(nbgpu.plan(qwen, gpus="3xA100-80GB", strategy=[1, 3, 2]))
    assert q["model"]["kwargs"]["transfer_map"] == {1: "cuda:1", 4: "cuda:2"}
    assert q["model.layers.0.mlp"]["class"].endswith("KQwen2MoeSparseMoeBlock")


def test_ktransformers_moves_hidden_states_back_and_refuses_a_norm_away_from_the_last_layer():
    p = make_plan("deepseek_v2", 2)  # layers 0-2 on cuda:0, 3-5 on cuda:1
    p.move("model.layers.4-5", 0).move(["model.norm", "lm_head"], 0)
    injected = kt_check(p)
    assert injected["model"]["kwargs"]["transfer_map"] == {3: "cuda:1", 4: "cuda:0"}
    p.move("model.norm", 1)
    with pytest.raises(UsageError, match=r"final norm where the last layer ran \(cuda:0\).*"
                                         r"plan.move\('model.norm', 0\)"):
        p.ktransformers_rules()
    p.move("model.layers.5", "cpu")
    with pytest.raises(UsageError, match="puts modules on cpu"):
        p.ktransformers_rules()


# --- OpenLLM ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,n_gpus", CASES)
def test_openllm_recipe_is_what_openllm_reads_or_refused(family, n_gpus):
    p = make_plan(family, n_gpus)
    if n_gpus == 3:  # L4, L4, A100-80GB: one gpu_type cannot say that
        with pytest.raises(UsageError, match=r"mixes NVIDIA A100-SXM4-80GB and NVIDIA L4: pass gpu_type= for GPUs with "
                                             r"at least 80 GiB \(e.g. 'nvidia-a100-80gb'\)"):
            p.openllm()
        o = p.openllm(gpu_type="nvidia-a100-80gb")
    else:
        o = p.openllm()
    name, entry = check_openllm_recipe(o["recipe"])
    engine, res = entry["engine_config"], entry["service_config"]["resources"]
    env = {e["name"]: e["value"] for e in entry["service_config"].get("envs", [])}
    stages = check_vllm(engine, env, p.config, version="0.8.5")
    assert [list(range(a, b)) for a, b in stages] == [ls for _, ls in stage_layers(p)]
    assert res["gpu"] == engine["tensor_parallel_size"] * engine["pipeline_parallel_size"]
    expected = {2: "nvidia-a100-80gb", 3: "nvidia-a100-80gb", 8: "nvidia-tesla-h100"}[n_gpus]
    assert res["gpu_type"] == expected
    if n_gpus == 3:
        assert openllm_can_run(entry, p.gpus) == 0.0  # by OpenLLM's rule the two L4s cannot take an 80 GiB share
        a100 = resolve_gpus("3xA100-80GB")
        assert openllm_can_run(entry, a100) > 0
    else:
        assert openllm_can_run(entry, p.gpus) > 0
        assert any("simulated" in n for n in o["notes"])


def test_openllm_accelerator_names_and_refusals():
    from nbgpu.planning.engines.openllm import accelerator
    from nbgpu.units import GiB

    assert accelerator("NVIDIA H100 80GB HBM3", 79.6 * GiB) == "nvidia-tesla-h100"
    assert accelerator("NVIDIA A100-SXM4-80GB", 80 * GiB) == "nvidia-a100-80gb"
    assert accelerator("NVIDIA A100-PCIE-40GB", 40 * GiB) == "nvidia-tesla-a100"
    assert accelerator("NVIDIA L4", 22.5 * GiB) == "nvidia-l4"
    assert accelerator("NVIDIA GeForce RTX 3060 Ti", 8 * GiB) == "nvidia-rtx-3060-ti"
    assert accelerator("Tesla T4", 15 * GiB) == "nvidia-tesla-t4"
    assert accelerator("NVIDIA H200", 140.4 * GiB) == "nvidia-h200-141gb"
    assert accelerator("NVIDIA L40S", 48 * GiB) is None
    assert accelerator("Simulated GPU 24 GiB", 24 * GiB) is None
    p = nbgpu.plan(CONFIGS["llama"], gpus="2x24GiB", strategy=[6, 6])
    with pytest.raises(UsageError, match=r"'Simulated GPU 24 GiB' is a simulated GPU with no model name: "
                                         r"pass gpu_type="):
        p.openllm()
    with pytest.raises(UsageError, match="not in OpenLLM's accelerator table"):
        p.openllm(gpu_type="nvidia-l40s")
    with pytest.raises(UsageError, match="has 16 GiB as OpenLLM counts it, less than the 24 GiB"):
        p.openllm(gpu_type="nvidia-tesla-t4")
    (_, entry), = p.openllm(gpu_type="nvidia-l4")["recipe"].items()
    assert entry["service_config"]["envs"] == [{"name": "VLLM_PP_LAYER_PARTITION", "value": "6,6"}]


def test_openllm_follows_vllm_0_8_5_positions():
    """The recipe runs vLLM 0.8.5, whose YaRN length is original_max_position_embeddings x factor."""
    cfg = transformers.DeepseekV2Config(**{**CONFIGS["deepseek_v2"].to_dict(), "max_position_embeddings": 32768})
    p = nbgpu.plan(cfg, gpus="2xH100", batch=1, seq_len=20000, strategy=[3, 3])
    assert vllm_max_len(cfg, "0.33.0") == 32768 and vllm_max_len(cfg, "0.8.5") == 16384
    p.vllm()
    with pytest.raises(UsageError, match=r"OpenLLM serves through vLLM, and vLLM 0.8.5 .* exceeds the model's "
                                         r"positions, 16384 \(original_max_position_embeddings x RoPE factor 4\)"):
        p.openllm()


# --- explain and the plan view ------------------------------------------------------------------------------------

def test_explain_and_view_say_when_seq_len_exceeds_positions_and_what_each_export_needs():
    from nbgpu.views.plan_view import status_html

    p = make_plan("gpt2", 2, seq_len=8192)
    text = p.explain()
    assert "seq_len 8192 exceeds the model's positions, 1024 (max_position_embeddings)" in text
    exports = text[text.index("Exports"):]
    assert "vLLM: not exported: vLLM 0.33.0 cannot take this plan: seq_len 8192 exceeds" in exports
    assert "MLC-LLM: not exported:" in exports and "1024 (n_positions)" in exports
    assert "KTransformers: not exported:" in exports and "not GPT2LMHeadModel" in exports
    assert "exceeds the model's positions, 1024" in status_html(p)
    ok = make_plan("deepseek_v2", 2, seq_len=4096)
    text = ok.explain()
    assert "exceeds the model's positions" not in text and "exceeds the model's positions" not in status_html(ok)
    assert "vLLM: --tensor-parallel-size 1 --pipeline-parallel-size 2 (VLLM_PP_LAYER_PARTITION=3,3)" in text
    assert "KTransformers: optimize rules" in text and "OpenLLM: a recipe for 2 x nvidia-a100-80gb" in text


@pytest.mark.parametrize("family,n_gpus", CASES)
def test_device_map_covers_every_weight_as_accelerate_checks_it(family, n_gpus):
    import warnings

    from accelerate.utils import check_device_map

    p = make_plan(family, n_gpus)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown module name is a warning there
        check_device_map(p._meta.model, p.device_map)


def test_ktransformers_deepseek_v3_gate_and_moe_operators():
    cfg = transformers.DeepseekV3Config(
        vocab_size=32000, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=16, num_key_value_heads=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, n_group=1, topk_group=1)
    injected = kt_check(nbgpu.plan(cfg, gpus="2xH100", strategy=[2, 2]))
    assert injected["model.layers.3.mlp"]["class"].endswith("KDeepseekV3MoE")
    assert injected["model.layers.3.mlp.gate"]["class"].endswith("KMoEGate")
    assert injected["model.layers.3.mlp.gate"]["kwargs"]["generate_device"] == "cuda:1"
    assert injected["model"]["kwargs"]["transfer_map"] == {2: "cuda:1"}


def test_ktransformers_routed_experts_keep_their_own_weights_on_the_cpu():
    """KTransformersExperts loads its experts' weights itself (generate on the CPU): the rule must stop the walk
    (`recursive: False`), or the per-expert Linear layers below it would be replaced and placed on the GPU."""
    p = make_plan("deepseek_v2", 2)
    injected = kt_check(p)
    experts = [name for name, v in injected.items() if v["class"].endswith("KTransformersExperts")]
    assert experts and all(n.startswith("model.layers.") and n.endswith(".mlp.experts") for n in experts)
    below = [name for name in injected for e in experts if name.startswith(e + ".")]
    assert below == []


def test_ktransformers_linear_layers_generate_with_marlin_and_prefill_with_torch_on_their_layers_gpu():
    """As KTransformers' multi-GPU rule files write them (DeepSeek-V2-Chat-multi-gpu.yaml at v0.4.1)."""
    p = make_plan("deepseek_v2", 2)  # layers 0-2 on cuda:0, 3-5 on cuda:1
    injected = kt_check(p)
    linear = {n: r["kwargs"] for n, r in injected.items() if r["class"].endswith("KTransformersLinear")}
    assert any(".layers.0." in n for n in linear) and any(".layers.5." in n for n in linear)
    for name, kwargs in linear.items():
        owner = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        device = f"cuda:{p.device_map[owner]}"
        assert kwargs == {"generate_device": device, "prefill_device": device, "generate_op": "KLinearMarlin",
                          "prefill_op": "KLinearTorch"}, name
