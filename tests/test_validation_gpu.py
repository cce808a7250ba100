"""On real GPUs: a plan saved and loaded from its file loads the model as the original plan does; the boundary checks
in front of load and bench cost little and refuse what they should (run with -m gpu)."""

from __future__ import annotations

import gc
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gpu_models import saved_llama  # noqa: E402 - tests/ is on the path (conftest)

import nbgpu  # noqa: E402
from nbgpu.errors import UsageError  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory):
    return saved_llama("1B", tmp_path_factory, positions=2048)


def test_a_plan_read_back_from_its_file_loads_the_same_model(llama_1b, tmp_path):
    plan = nbgpu.plan(llama_1b, gpus=1, batch=1, seq_len=1024)
    plan.save(tmp_path / "plan.json")
    again = nbgpu.Plan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    start = time.perf_counter()
    model = nbgpu.load(again, show=False)
    print(f"load through the plan file: {time.perf_counter() - start:.1f} s")
    ids = torch.tensor([[1, 2, 3, 4]], device="cuda:0")
    reference = transformers.AutoModelForCausalLM.from_pretrained(llama_1b, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    del model, reference
    gc.collect()
    torch.cuda.empty_cache()


def test_the_checks_before_load_take_little_time(llama_1b):
    from nbgpu.running import arguments

    plan = nbgpu.plan(llama_1b, gpus=1)
    start = time.perf_counter()
    arguments.load_arguments(plan, {})  # fingerprint of the folder and every safetensors header
    seconds = time.perf_counter() - start
    print(f"checks before load (fingerprint + safetensors headers of a 1B model): {seconds * 1e3:.1f} ms")


def test_bench_refuses_beyond_the_positions_on_a_gpu(llama_1b):
    model = nbgpu.load(llama_1b, show=False, device_map={"": 0})
    with pytest.raises(UsageError, match="2048 positions"):
        nbgpu.bench(model, prompt_len=2000, new_tokens=100)
    result = nbgpu.bench(model, prompt_len=2000, new_tokens=48, repeats=1, warmup=0, explain=False)
    assert result.generated_tokens == 48
    del model
    gc.collect()
    torch.cuda.empty_cache()
