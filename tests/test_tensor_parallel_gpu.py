"""Tensor parallelism on 2 real GPUs through NCCL workers: tokens against one GPU, memory per GPU measured in the
workers and seen by NVML, bench eager and compiled with the step breakdown, Interrupt, a killed worker, close, and
the simulated path on a machine with GPUs.

This test process plays the kernel: it never starts CUDA (checked), so the single-GPU reference and the model
files made on a GPU run in subprocesses.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
psutil = pytest.importorskip("psutil")

import nbgpu  # noqa: E402
from nbgpu import devices, visibility  # noqa: E402
from nbgpu.running import tensor_parallel as tp  # noqa: E402
from nbgpu.running.tensor_parallel import TensorParallelError  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from tp_helpers import SlowSteps  # noqa: E402

pytestmark = pytest.mark.gpu
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def two_gpus():
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    if len(visibility.current().targets) < 2:  # NVML: asking torch would start CUDA in this process
        pytest.skip("needs 2 GPUs visible to this process")


def _nvml_pids() -> dict[int, set[int]]:
    """GPU index -> pids NVML lists on it."""
    return {g.index: {p.pid for p in g.processes} for g in devices.read()}


def _wait_gone_from_nvml(pids, seconds=20.0) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        left = {i: found & set(pids) for i, found in _nvml_pids().items() if found & set(pids)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _save(cfg, path) -> str:
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 160M-parameter Llama in float32: greedy tokens of two GPUs and one GPU then agree step for step."""
    cfg = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                   num_attention_heads=16, num_key_value_heads=8, vocab_size=32000,
                                   max_position_embeddings=2048, eos_token_id=2, bos_token_id=1)
    return _save(cfg, tmp_path_factory.mktemp("tp-gpu-llama"))


@pytest.fixture(scope="module")
def tp_model(small):
    model = tp.start(small, 2, dtype="float32", show=False)
    yield model
    model.close()


REFERENCE = textwrap.dedent("""
    import sys, torch, transformers
    path, ids_file, out_file, new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cuda:0").eval()
    ids = torch.load(ids_file).to("cuda:0")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    torch.save({"sequences": out.sequences.cpu(), "logits": [x.cpu() for x in out.logits]}, out_file)
""")


def _one_gpu(path, ids, new_tokens, tmp_path):
    """The same generate on the first GPU alone, in another process."""
    (tmp_path / "ref.py").write_text(REFERENCE)
    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
           "CUDA_VISIBLE_DEVICES": visibility.current().targets[0].token}
    subprocess.run([sys.executable, str(tmp_path / "ref.py"), path, str(tmp_path / "ids.pt"),
                    str(tmp_path / "ref.pt"), str(new_tokens)], check=True, env=env, timeout=600)
    return torch.load(tmp_path / "ref.pt")


def test_generate_equals_one_gpu_and_memory_is_measured_per_gpu(tp_model, small, tmp_path):
    ids = torch.randint(3, 32000, (2, 32), generator=torch.Generator().manual_seed(0))
    out = tp_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                            pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    ref = _one_gpu(small, ids, 12, tmp_path)
    assert torch.equal(out.sequences, ref["sequences"])
    for mine, theirs in zip(out.logits, ref["logits"]):
        torch.testing.assert_close(mine, theirs, rtol=1e-3, atol=1e-3)

    report = tp_model.nbgpu_load
    print(tp_model, report, sep="\n")
    nvml = _nvml_pids()
    for row, gpu, pid in zip(report.gpus, tp_model.gpus, tp_model.pids):
        assert row.allocated is not None and abs(row.allocated - row.weights) <= 0.05 * row.weights, repr(report)
        assert row.reserved >= row.allocated and row.peak_reserved >= row.reserved
        assert row.nvml_process is not None and row.nvml_process >= row.allocated
        # each worker has a CUDA context on its own GPU only
        assert [i for i, found in nvml.items() if pid in found] == [gpu.index]
    assert not nbgpu.cuda_driver_initialized()


def test_bench_eager_and_compiled_with_the_step_breakdown(tp_model):
    results = []
    for compile in (False, True):
        r = nbgpu.bench(tp_model, batch=1, prompt_len=64, new_tokens=32, repeats=3, compile=compile)
        print(r)
        assert r.generated_tokens == 32 and len(r.step_latencies) == 3 * 31 and r.compiled == compile
        assert set(r.peak_memory) == {0, 1} and all(v > 0 for v in r.peak_memory.values())
        assert r.timeline is not None, "the profiler saw no kernel in the workers"
        for device in (0, 1):  # an all-reduce per attention and MLP block: NCCL kernels on both GPUs
            assert r.timeline.breakdown[device]["communication"] > 0, r.timeline.breakdown
            assert r.timeline.breakdown[device]["matrix"] > 0
        results.append(r)
    print(nbgpu.compare(results))
    assert not nbgpu.cuda_driver_initialized()


def test_interrupt_cancels_on_every_nccl_worker(tp_model):
    ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(1))
    timer = threading.Timer(2.0, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        tp_model.generate(ids, max_new_tokens=1000, logits_processor=[SlowSteps(0.02)], do_sample=False,
                          attention_mask=torch.ones_like(ids))
    timer.join()
    assert not tp_model.closed
    again = tp_model.generate(ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(ids))
    assert again.shape == (1, 20)


def test_close_frees_every_gpu(tp_model):
    pids = tp_model.pids
    tp_model.close()
    assert _wait_gone_from_nvml(pids) == {}
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids)
    assert not nbgpu.cuda_driver_initialized()


def test_a_killed_worker_leaves_no_memory_behind(small):
    model = tp.start(small, 2, dtype="float32", show=False)
    pids = model.pids
    ids = torch.randint(3, 32000, (1, 16), generator=torch.Generator().manual_seed(2))
    killer = threading.Timer(2.0, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    with pytest.raises(TensorParallelError, match="SIGKILL"):
        model.generate(ids, max_new_tokens=1000, logits_processor=[SlowSteps(0.02)], do_sample=False,
                       attention_mask=torch.ones_like(ids))
    killer.join()
    assert _wait_gone_from_nvml(pids) == {}  # rank 0 was waiting in an NCCL all-reduce: it was stopped too


def test_simulated_workers_run_on_the_cpu_on_a_machine_with_gpus(tmp_path):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=256, eos_token_id=2, bos_token_id=1)
    path = _save(cfg, tmp_path / "tiny")
    devices.simulate("2xL4")
    model = tp.start(path, 2, dtype="float32", show=False)
    ids = torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=0)
    pids = model.pids
    devices.simulate(None)
    assert not any(set(pids) & found for found in _nvml_pids().values())  # no worker touched a real GPU
    model.close()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                pad_token_id=0)
    assert torch.equal(out, expected)


MAKE_8B = textwrap.dedent("""
    import sys, torch, transformers
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   rope_theta=500000.0, max_position_embeddings=4096, dtype="bfloat16")
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(sys.argv[1])
""")


def test_8b_shape_planned_vs_measured_per_gpu(tmp_path):
    """The issue's check: the tensor-parallel plan's weights per GPU against what each worker allocated (5%)."""
    (tmp_path / "make.py").write_text(MAKE_8B)
    path = str(tmp_path / "llama-8b")
    env = {**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
           "CUDA_VISIBLE_DEVICES": visibility.current().targets[0].token}
    subprocess.run([sys.executable, str(tmp_path / "make.py"), path], check=True, env=env, timeout=900)
    plan = nbgpu.plan(path, gpus=2, parallel="tensor", dtype="bfloat16", batch=1, seq_len=1024)
    model = nbgpu.load(plan, show=False)
    report = model.nbgpu_load
    print(plan, report, json.dumps([{k: getattr(g, k) for k in ("planned_weights", "weights", "allocated",
                                                                  "reserved", "nvml_process")} for g in report.gpus]),
          sep="\n")
    for g in report.gpus:
        assert abs(g.difference) <= 0.05, repr(report)
    assert report.warnings == []
    pids = model.pids
    model.close()
    assert _wait_gone_from_nvml(pids) == {}
    assert not nbgpu.cuda_driver_initialized()
