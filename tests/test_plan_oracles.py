"""A plan's outputs against hand-computed cases: each GPU's budget and room with the reserve, the driver's reserve
and other processes; where the strategies put the boundary (every split tried by hand); fits with CPU offload;
max_memory; the tensor-parallel size with the KV-head rule and KV replication.

The memory model's pieces (KV cache, activations, allocator) are checked against live storages in
test_memory_model.py; here they are taken as the plan states them and the rules built on them are checked.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from accelerate.utils import compute_module_sizes

import nbgpu
from nbgpu.devices import GPU
from nbgpu.devices.simulated import SimulatedGPUs
from nbgpu.errors import UsageError
from nbgpu.planning import tp_sizes
from nbgpu.planning.explain import tensor_parallel, tensor_parallel_need
from nbgpu.planning.plan import DeviceBudget
from nbgpu.units import GiB, MiB

LLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
LLAMA_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)


def real_gpu(total=80 * GiB, used=0, reserved=None, index=0) -> GPU:
    """A GPU as NVML reads it: `used` counts the driver's reserve, as nvidia-smi does."""
    return GPU(index=index, uuid=None, name="NVIDIA H100 80GB HBM3", pci_bus_id=None, memory_total=total,
               memory_used=used, memory_free=total - used, utilization=0, temperature=30, power_draw=None,
               power_limit=None, pstate=0, persistence_mode=True, compute_capability=(9, 0), mig_mode=False,
               memory_reserved=reserved)


# --- one GPU's budget ------------------------------------------------------------------------------------------

def test_device_budget_by_hand():
    gpu = SimulatedGPUs("24GiB").read().gpus[0]
    d = DeviceBudget(cuda_index=1, gpu=gpu, capacity=24 * GiB, reserve=GiB, others=3 * GiB,
                     driver_reserved=512 * MiB, weights=10 * GiB, kv_cache=2 * GiB, activations=GiB,
                     allocator=256 * MiB, context=512 * MiB, communication=GiB)
    assert d.process == 10 * GiB + 2 * GiB + GiB + 256 * MiB + 512 * MiB + GiB  # what this process will hold
    assert d.total == d.process + 3 * GiB + 512 * MiB  # + other processes + the driver's reserve
    assert d.budget == 23 * GiB  # capacity less the reserve
    assert d.room == 23 * GiB - 512 * MiB - 3 * GiB  # what the plan may use
    assert d.free == 23 * GiB - d.total == 4 * GiB + 768 * MiB
    assert d.over == 0
    assert d.label == "cuda:1 = GPU 0 Simulated GPU 24 GiB (simulated)"
    full = replace(d, weights=19 * GiB)
    assert full.over == 19 * GiB + 2 * GiB + GiB + 256 * MiB + 512 * MiB + GiB + 3 * GiB + 512 * MiB - 23 * GiB
    assert full.free == -full.over
    assert replace(d, reserve=30 * GiB).budget == 0  # a reserve above the card leaves nothing


def test_a_plans_budgets_count_the_reserve_the_driver_and_other_processes():
    gpu = real_gpu(used=2 * GiB + 600 * MiB, reserved=600 * MiB)
    plan = nbgpu.plan(LLAMA_1B, gpus=[gpu], batch=1, seq_len=512, reserve="3GiB", context="1GiB")
    d = plan.devices[0]
    assert (d.capacity, d.reserve, d.driver_reserved, d.others, d.context) == (80 * GiB, 3 * GiB, 600 * MiB,
                                                                               2 * GiB, GiB)
    assert d.budget == 77 * GiB and d.room == 77 * GiB - 600 * MiB - 2 * GiB
    assert d.total == d.weights + d.kv_cache + d.activations + d.allocator + GiB + 2 * GiB + 600 * MiB
    assert d.over == 0 and plan.fits
    tight = nbgpu.plan(LLAMA_1B, gpus=[gpu], batch=1, seq_len=512, reserve=f"{80 * GiB - d.total + 1}B",
                       context="1GiB")
    assert tight.devices[0].over == 1 and not tight.fits and tight.missing() == 1  # one byte over the budget


# --- where the boundary goes -----------------------------------------------------------------------------------

def every_split(gpus, **kwargs) -> list[list[int]]:
    """Per split [k, 16 - k] of the 16 layers: what each GPU's process holds (the plan's own figures)."""
    plan = nbgpu.plan(LLAMA_1B, gpus=gpus, strategy=[8, 8], **kwargs)
    held = []
    for k in range(17):
        plan.set_boundaries([k, 16 - k])
        held.append([d.process for d in plan.devices])
    return held


@pytest.fixture(scope="module")
def splits():
    return every_split(["2GiB", "3GiB"], batch=1, seq_len=1024, context=0)


@pytest.mark.parametrize("reserve, layers_on_first", [(0, 15), (GiB // 4, 13), (GiB // 2, 10)])
def test_sequential_fills_each_gpu_up_to_its_capacity_less_the_reserve(splits, reserve, layers_on_first):
    expected = max(k for k in range(17) if splits[k][0] <= 2 * GiB - reserve)
    assert expected == layers_on_first  # the case is one where the reserve moves the boundary
    plan = nbgpu.plan(LLAMA_1B, gpus=["2GiB", "3GiB"], batch=1, seq_len=1024, context=0, reserve=reserve,
                      strategy="sequential")
    assert plan.layer_counts() == [expected, 16 - expected]
    assert plan.devices[0].process <= plan.devices[0].budget < splits[expected + 1][0]


@pytest.mark.parametrize("reserve, layers_on_first", [(0, 6), (GiB // 2, 5)])
def test_balanced_makes_the_fullest_share_of_room_as_low_as_any_split_can(splits, reserve, layers_on_first):
    rooms = [2 * GiB - reserve, 3 * GiB - reserve]
    share = [max(p / r for p, r in zip(held, rooms)) for held in splits]
    best = min(range(17), key=share.__getitem__)
    assert best == layers_on_first
    plan = nbgpu.plan(LLAMA_1B, gpus=["2GiB", "3GiB"], batch=1, seq_len=1024, context=0, reserve=reserve)
    assert plan.layer_counts() == [best, 16 - best]
    assert plan.balance_ratio == pytest.approx(share[best], rel=1e-6)


# --- offload and fits -------------------------------------------------------------------------------------------

def test_offload_fits_only_while_the_cpu_holds_what_the_gpus_do_not():
    roomy = nbgpu.plan(LLAMA_8B, gpus="2x8GiB", offload="cpu", cpu_memory="64GiB")
    sizes = compute_module_sizes(roomy._meta.model)
    on_cpu = sum(sizes[name] for name, device in roomy.device_map.items() if device == "cpu")
    assert roomy.cpu_weights == on_cpu > 4 * GiB and roomy.fits and roomy.missing() == 0
    assert all(d.over == 0 for d in roomy.devices)
    assert roomy.max_memory["cpu"] == 64 * GiB
    short = nbgpu.plan(LLAMA_8B, gpus="2x8GiB", offload="cpu", cpu_memory="2GiB")
    assert short.cpu_weights == on_cpu and all(d.over == 0 for d in short.devices)  # the GPUs are fine...
    assert not short.fits and short.missing() == on_cpu - 2 * GiB  # ...but the CPU lacks the rest
    assert "DOES NOT FIT" in repr(short)
    with pytest.raises(UsageError, match="does not fit"):
        _ = short.max_memory


# --- max_memory -------------------------------------------------------------------------------------------------

def test_max_memory_leaves_each_gpu_room_for_what_is_not_weights():
    """Per GPU: capacity - reserve - the driver's reserve - other processes - (KV cache, activations, allocator
    and context this plan puts there). The KV cache is written out: 2 x 8 KV heads x 64 dims x 2 bytes per token and
    layer, 2 x 1024 tokens: 4 MiB per layer."""
    gpus = [real_gpu(used=2 * GiB + 600 * MiB, reserved=600 * MiB), real_gpu(used=0, index=1)]
    plan = nbgpu.plan(LLAMA_1B, gpus=gpus, batch=2, prompt_len=1000, new_tokens=24, reserve="2GiB", context="1GiB",
                      cpu_memory="16GiB", strategy=[6, 10])
    mm = plan.max_memory
    assert set(mm) == {0, 1, "cpu"} and mm["cpu"] == 16 * GiB
    for d, layers, others, driver in zip(plan.devices, (6, 10), (2 * GiB, 0), (600 * MiB, 0)):
        assert d.kv_cache == layers * 4 * MiB
        expected = 80 * GiB - 2 * GiB - driver - others - (layers * 4 * MiB + d.activations + d.allocator + GiB)
        assert mm[d.cuda_index] == expected
        assert d.weights < expected < d.budget


# --- tensor parallelism -----------------------------------------------------------------------------------------

# 24 query heads, 6 KV heads, an MLP width that divides by every size the heads allow (8064 = 2^7 x 3^2 x 7)
HEADS_24 = dict(model_type="llama", hidden_size=6144, intermediate_size=16128, num_hidden_layers=24,
                num_attention_heads=24, num_key_value_heads=6, vocab_size=32000)


def test_tensor_parallel_sizes_follow_the_query_and_kv_head_rules():
    small = nbgpu.plan(dict(HEADS_24, hidden_size=3072, intermediate_size=8064, num_hidden_layers=2), gpus="1x80GiB")
    # the divisors of 24 query heads: 1 2 3 4 6 8 12 24; of those, sizes up to 6 must divide the 6 KV heads (not 4)
    # and larger ones must be a multiple of 6 (not 8)
    assert tp_sizes.valid_sizes(small.config, 64) == [1, 2, 3, 6, 12, 24]
    assert "6 KV heads do not divide over 4 GPUs" in tp_sizes.why_not(small.config, 4)
    assert "not a multiple of the 6 KV heads" in tp_sizes.why_not(small.config, 8)
    split = tp_sizes.split(small.config, 12)
    assert (split.heads_per_gpu, split.kv_heads_per_gpu, split.kv_replicas) == (2, 1, 2)
    assert tp_sizes.split(small.config, 24).kv_replicas == 4 and tp_sizes.split(small.config, 3).kv_replicas == 1
    odd_mlp = dict(HEADS_24, hidden_size=3072, intermediate_size=8000, num_hidden_layers=2)
    assert tp_sizes.valid_sizes(nbgpu.plan(odd_mlp, gpus="1x80GiB").config, 64) == [1, 2]  # 8000 = 2^6 x 5^3
    with pytest.raises(UsageError, match="Sizes this model allows: 1, 2, 3, 6, 12, 24"):
        tp_sizes.split(small.config, 4)


def test_the_suggested_tensor_parallel_size_skips_sizes_the_kv_heads_refuse():
    base = nbgpu.plan(HEADS_24, gpus="1x80GiB", batch=1, seq_len=512)
    need = {tp: tensor_parallel_need(base, tp) for tp in (1, 2, 3, 6)}
    assert need[1] > need[2] > need[3] > need[6]
    # a GPU just too small for a third of the model: four GPUs would hold a quarter, but 6 KV heads do not divide
    # over 4, so the answer is 6
    room = need[3] - MiB
    plan = nbgpu.plan(HEADS_24, gpus=[f"{room + GiB}B"], batch=1, seq_len=512)
    assert plan.devices[0].room == room
    assert tensor_parallel(plan) == 6
    assert "Tensor parallel: 6 GPUs (more than the 1 GPU(s) in this plan)" in plan.explain()
    assert tensor_parallel(nbgpu.plan(HEADS_24, gpus=[f"{need[6] - 1 + GiB}B"], batch=1, seq_len=512)) == 12


def test_each_gpu_keeps_one_replicated_kv_head_when_there_are_fewer_kv_heads_than_gpus():
    small = dict(HEADS_24, hidden_size=3072, intermediate_size=8064, num_hidden_layers=4)
    plan = nbgpu.plan(small, gpus="12x80GiB", batch=1, seq_len=512, parallel="tensor")
    # one KV head of 128 dims per GPU (6 heads over 12 GPUs, each on two), keys and values, bf16, 512 tokens, 4 layers
    assert [d.kv_cache for d in plan.devices] == [2 * 128 * 2 * 512 * 4] * 12
    six = nbgpu.plan(small, gpus="6x80GiB", batch=1, seq_len=512, parallel="tensor")
    assert six.devices[0].kv_cache == plan.devices[0].kv_cache  # twelve GPUs hold no less cache each than six
