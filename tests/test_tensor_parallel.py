"""Tensor parallelism through worker processes on 2 simulated GPUs (gloo on the CPU), with tiny random-weight
models saved with save_pretrained: the tokens and logits against the single-process model, bench figures, output
in the calling cell, and every stop path (close, garbage collection, kernel exit, kernel killed, Interrupt, a killed
worker, a failing call) leaving no process behind.

Starting workers costs seconds per model (each imports torch and transformers), so one Llama handle is shared by
the tests that can share it; the stop-path tests each start their own.
"""

import dataclasses
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
import torch
import transformers
from tp_helpers import FailOnRank, PrintEachStep, SlowSteps  # (tests/ is on sys.path: conftest)

import nbgpu
from nbgpu import devices
from nbgpu.devices.simulated import CONTEXT_BYTES, SimulatedGPUs  # noqa: E402
from nbgpu.errors import UsageError  # noqa: E402
from nbgpu.running import tensor_parallel as tp  # noqa: E402
from nbgpu.running.tensor_parallel import TensorParallelError, TensorParallelModel  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
H, INTER, LAYERS, HEADS, KV, VOCAB = 64, 128, 2, 4, 2, 256


def _children() -> set[int]:
    """Every live descendant of this process except multiprocessing's resource tracker (started once by the first
    spawn, it lives as long as this process, whatever nbgpu does)."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                continue
            if p.status() != psutil.STATUS_ZOMBIE:
                out.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    return out


@pytest.fixture
def no_process_left():
    """Asserts, after the test, that it left no new descendant process (other test files' ones are not counted)."""
    before = _children()
    yield
    assert _children() - before == set()


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _save(config, path) -> str:
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    cfg = transformers.LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                                   max_position_embeddings=512, eos_token_id=2, bos_token_id=1)
    return _save(cfg, tmp_path_factory.mktemp("tp-llama"))


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory):
    cfg = transformers.Qwen2MoeConfig(hidden_size=H, intermediate_size=INTER, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=64, num_hidden_layers=LAYERS,
                                      num_attention_heads=HEADS, num_key_value_heads=KV, vocab_size=VOCAB,
                                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=512)
    return _save(cfg, tmp_path_factory.mktemp("tp-qwen2moe"))


def _two_simulated_gpus():
    return list(SimulatedGPUs("2xL4").read().gpus)


BEFORE_SHARED: set[int] = set()


@pytest.fixture(scope="module")
def llama_tp(llama_path):
    BEFORE_SHARED.update(_children())
    model = tp.start(llama_path, _two_simulated_gpus(), dtype="float32", show=False)
    yield model
    model.close()


def _reference(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(batch=2, length=7, seed=0):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _same_as_single_process(model, path, new_tokens=6):
    ids = _ids()
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)
    out = model.generate(ids, **kwargs)
    with torch.no_grad():
        ref = _reference(path).generate(ids, **kwargs)
    assert out.sequences.device.type == "cpu" and ref.cache is not None and out.cache is None  # a rank's: its heads
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.logits) == len(ref.logits) == new_tokens
    for mine, theirs in zip(out.logits, ref.logits):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


# --- one shared Llama handle ----------------------------------------------------------------------------------

def test_llama_generate_equals_the_single_process_model(llama_tp, llama_path):
    assert isinstance(llama_tp, TensorParallelModel) and llama_tp.world_size == 2 and llama_tp.simulated
    assert _children() - BEFORE_SHARED == set(llama_tp.pids)
    _same_as_single_process(llama_tp, llama_path)
    assert llama_tp.config.vocab_size == VOCAB and llama_tp.generation_config.eos_token_id == 2


def test_each_rank_holds_its_shard(llama_tp, llama_path):
    # hand count: attention and MLP projections, lm_head and (transformers 5.24, distributed/mixin.py) the input
    # embeddings split in two; norms and buffers (rotary frequencies) whole on every rank
    layer = H * H + 2 * KV * (H // HEADS) * H + H * H + 3 * INTER * H
    buffers = sum(b.numel() * b.element_size() for b in _reference(llama_path).buffers())
    shard = 4 * (2 * VOCAB * H // 2 + LAYERS * (layer // 2 + 2 * H) + H) + buffers
    report = llama_tp.nbgpu_load
    assert [g.weights for g in report.gpus] == [shard, shard]
    assert report.simulated and report.dtype == "float32" and report.warnings == []
    assert all(g.allocated is None for g in report.gpus)  # no CUDA allocator on the CPU
    text = repr(llama_tp)
    assert "tensor-parallel over 2 simulated GPUs" in text and "simulated" in text
    assert all(str(pid) in text for pid in llama_tp.pids)


def test_worker_output_shows_in_the_call_that_made_it(llama_tp, capsys):
    ids = _ids(batch=1)
    llama_tp.generate(ids, max_new_tokens=3, do_sample=False, logits_processor=[PrintEachStep()],
                      attention_mask=torch.ones_like(ids))
    out, err = capsys.readouterr()
    for step in (7, 8, 9):  # prompt of 7 tokens: the processor sees 7, 8, 9 tokens
        assert f"[rank 0] token {step} on rank 0\n" in out and f"[rank 1] token {step} on rank 1\n" in out
        assert f"[rank 1] warning {step}\n" in err
    time.sleep(0.5)  # nothing of that call may arrive later, in another cell
    llama_tp.generate(ids, max_new_tokens=2, do_sample=False, attention_mask=torch.ones_like(ids))
    out, err = capsys.readouterr()
    assert "token" not in out and "warning" not in err


def test_bench_runs_the_protocol_in_every_worker(llama_tp):
    result = nbgpu.bench(llama_tp, batch=2, prompt_len=6, new_tokens=5, repeats=3, warmup=1)
    assert result.generated_tokens == 2 * 5 and result.prompt_len == 6 and result.batch == 2
    assert len(result.ttft) == len(result.decode_seconds) == 3 and len(result.step_latencies) == 3 * 4
    cpu = result.cpu_times  # the workers' own clock, one run (simulated GPUs: the figures shown are modelled)
    assert len(cpu["ttft"]) == len(cpu["decode_seconds"]) == 1 and len(cpu["step_latencies"]) == 4
    assert sum(cpu["step_latencies"]) == pytest.approx(cpu["decode_seconds"][0])  # the same clock
    for run in range(3):  # each decode time is the sum of its own steps
        assert sum(result.step_latencies[run * 4:(run + 1) * 4]) == pytest.approx(result.decode_seconds[run])
    assert 0 < result.latency_p50_s <= result.latency_p90_s
    lo, hi = result.decode_spread
    assert lo <= result.decode_tokens_per_s <= hi
    assert result.simulated and result.devices == [0, 1] and result.peak_memory == {}
    assert "tensor-parallel 2 simulated GPUs eager" in result.label and not result.compiled
    assert "simulated" in repr(nbgpu.compare([result]))
    # the roofline: every GPU reads its shard and its share of the cache at once (by hand: 2 of the 4 heads' KV
    # heads here, float32, the average context of 6 + 5 // 2 tokens, both sequences, both layers)
    bound = result.roofline
    kv_per_gpu = (KV // 2) * 2 * (H // HEADS) * 4 * (6 + 5 // 2) * 2 * LAYERS
    assert bound.together and [g.kv_cache for g in bound.gpus] == [kv_per_gpu] * 2
    assert [g.weights for g in bound.gpus] == [row.weights for row in llama_tp.nbgpu_load.gpus]
    slowest = max((g.weights + kv_per_gpu) / g.bandwidth for g in bound.gpus)
    assert bound.tokens_per_s == pytest.approx(2 / slowest) and bound.fraction is None  # simulated: no fraction
    assert result.modelled and "(modelled)" in result.label  # simulated GPUs: the timings are modelled
    compiled = nbgpu.bench(llama_tp, compile=True, new_tokens=3, repeats=1)  # the workers run eager on the CPU
    assert compiled.compiled and "compiled tensor parallel" in compiled.modelled
    with pytest.raises(UsageError, match="new_tokens"):
        nbgpu.bench(llama_tp, new_tokens=1)


def _interrupt_after(seconds, pids=()):
    """Kernel -> Interrupt: SIGINT to the kernel's main thread and (as Jupyter signals the process group) to the
    workers, while the call waits."""
    def fire():
        for pid in pids:
            os.kill(pid, signal.SIGINT)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    timer = threading.Timer(seconds, fire)
    timer.start()
    return timer


def test_interrupt_cancels_the_call_on_every_worker_and_the_model_stays_usable(llama_tp, llama_path, capsys):
    ids = _ids(batch=1)
    timer = _interrupt_after(1.0, llama_tp.pids)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        llama_tp.generate(ids, max_new_tokens=400, do_sample=False, logits_processor=[SlowSteps(0.05)],
                          attention_mask=torch.ones_like(ids))  # 20 s unless cancelled
    timer.join()
    assert time.monotonic() - start < 10
    assert "every worker stopped at the same generated token" in capsys.readouterr().err
    assert not llama_tp.closed and not any(_gone(pid) for pid in llama_tp.pids)
    _same_as_single_process(llama_tp, llama_path, new_tokens=3)  # the collectives are still in step


def test_an_error_on_every_rank_leaves_the_model_usable(llama_tp, llama_path, monkeypatch):
    with pytest.raises(TensorParallelError, match="(?s)ValueError.*max_new_tokens.*still loaded and usable"):
        llama_tp.generate(_ids(), max_new_tokens=0)
    with pytest.raises(UsageError, match="picklable"):
        llama_tp.generate(_ids(), logits_processor=[lambda ids, scores: scores])
    with pytest.raises(UsageError, match="streamer"):
        llama_tp.generate(_ids(), streamer=object())
    with pytest.raises(UsageError, match="input_ids"):
        llama_tp.generate()

    class Defined(PrintEachStep):  # as a class defined in a notebook cell: found in the kernel's __main__ only
        __module__, __qualname__ = "__main__", "Defined"

    monkeypatch.setattr(sys.modules["__main__"], "Defined", Defined, raising=False)
    with pytest.raises(TensorParallelError, match="(?s)could not read the call's arguments.*defined in the notebook"
                                                  ".*still loaded and usable"):
        llama_tp.generate(_ids(), max_new_tokens=2, logits_processor=[Defined()])
    _same_as_single_process(llama_tp, llama_path, new_tokens=2)


def test_close_stops_every_worker_and_the_kernel_never_started_cuda(llama_tp):
    pids = llama_tp.pids
    llama_tp.close()
    assert _children() - BEFORE_SHARED == set() and all(_gone(pid) for pid in pids)
    assert llama_tp.closed and "closed with model.close()" in repr(llama_tp)
    with pytest.raises(UsageError, match="closed"):
        llama_tp.generate(_ids())
    with pytest.raises(UsageError, match="closed"):
        nbgpu.bench(llama_tp, new_tokens=3, repeats=1)
    llama_tp.close()  # again: nothing to do
    assert not nbgpu.cuda_driver_initialized() and not torch.cuda.is_initialized()


# --- a MoE, and a worker killed mid-call --------------------------------------------------------------------

def test_moe_generate_equals_the_single_process_model_and_a_killed_worker_stops_the_rest(moe_path, no_process_left):
    model = tp.start(moe_path, _two_simulated_gpus(), dtype="float32", show=False)
    _same_as_single_process(model, moe_path)
    pids = model.pids
    ids = _ids(batch=1)
    killer = threading.Timer(1.0, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    with pytest.raises(TensorParallelError, match=r"rank 1 .*SIGKILL.* during the call.*load it again"):
        model.generate(ids, max_new_tokens=400, logits_processor=[SlowSteps(0.05)], do_sample=False,
                       attention_mask=torch.ones_like(ids))
    killer.join()
    assert all(_gone(pid) for pid in pids)
    assert model.closed and "SIGKILL" in repr(model)
    with pytest.raises(UsageError, match="closed .*SIGKILL"):
        model.generate(ids)


def test_an_error_on_one_rank_stops_the_others_waiting_for_it(llama_path, monkeypatch, no_process_left):
    monkeypatch.setattr("nbgpu.running.tp_processes.ERROR_GRACE_S", 1.0)
    model = tp.start(llama_path, _two_simulated_gpus(), dtype="float32", show=False)
    pids = model.pids
    ids = _ids(batch=1)
    with pytest.raises(TensorParallelError, match=r"(?s)rank 1 .*raised RuntimeError while rank 0 .*waited for it.*"
                                                  r"a failure on rank 1 only.*load the model again"):
        model.generate(ids, max_new_tokens=5, logits_processor=[FailOnRank(1)], attention_mask=torch.ones_like(ids))
    assert all(_gone(pid) for pid in pids) and model.closed
    with pytest.raises(UsageError, match="closed"):
        model.generate(ids)


# --- through nbgpu.load(plan), and garbage collection ----------------------------------------------------------

def _tensor_plan(path, gpus, weights):
    rows = [SimpleNamespace(cuda_index=i, gpu=g, weights=w, total=2 * w) for i, (g, w) in enumerate(zip(gpus, weights))]
    return SimpleNamespace(parallel="tensor", source=path, dtype="float32", gpus=gpus, devices=rows, fits=True,
                           simulated=True)


def test_a_tensor_parallel_plan_loads_through_nbgpu_load_and_its_memory_goes_with_the_handle(llama_path, capsys,
                                                                                              no_process_left):
    sim = devices.simulate("2xL4")
    plan = nbgpu.plan(llama_path, gpus=2, dtype="float32", parallel="tensor", batch=1, seq_len=64)
    model = nbgpu.load(plan, show=False)
    assert isinstance(model, TensorParallelModel)
    shown = capsys.readouterr()
    assert "[rank 0] Loading weights" in shown.out and "[rank 1] Loading weights" not in shown.out  # rank 0's only
    assert "Loading weights" not in shown.err  # a bar, not a warning
    report = model.nbgpu_load
    planned = [d.weights for d in plan.devices]
    assert [g.planned_weights for g in report.gpus] == planned
    assert [g.planned_total for g in report.gpus] == [d.total for d in plan.devices]
    assert [g.weights for g in report.gpus] == planned and report.warnings == []  # the planner's shard = the load's
    assert [sim.allocated(i) for i in (0, 1)] == planned  # the plan's figures, shown on the simulated GPUs
    assert [g.nvml_process for g in report.gpus] == [w + CONTEXT_BYTES for w in planned]
    assert report.plan is plan and report.simulated
    pids = model.pids
    del model, report
    gc.collect()
    assert all(_gone(pid) for pid in pids)
    assert [sim.allocated(i) for i in (0, 1)] == [0, 0]


def test_refused_requests_start_no_worker(llama_path, no_process_left):
    sim = devices.simulate("2xL4")
    gpus = list(sim.read().gpus)
    with pytest.raises(UsageError, match="does not fit"):
        nbgpu.load(SimpleNamespace(**{**vars(_tensor_plan(llama_path, gpus, [1, 1])), "fits": False}), show=False)
    with pytest.raises(UsageError, match="simulate"):
        nbgpu.load(SimpleNamespace(**{**vars(_tensor_plan(llama_path, gpus, [1, 1])), "simulated": False}),
                   show=False)
    with pytest.raises(UsageError, match="at least 2 GPUs"):
        tp.start(llama_path, 1)
    with pytest.raises(UsageError, match="device_map"):
        tp.start(llama_path, 2, device_map="auto")
    devices.simulate(None)
    real = [dataclasses.replace(g, simulated=False, index=40 + g.index) for g in gpus]  # GPUs no kernel sees
    with pytest.raises(UsageError, match="no CUDA support|not visible"):
        tp.start(llama_path, real)


# --- kernel shutdown and a killed kernel ----------------------------------------------------------------------

KERNEL = textwrap.dedent("""
    import sys, time
    from nbgpu.devices.simulated import SimulatedGPUs
    from nbgpu.running import tensor_parallel as tp

    def main():
        model = tp.start(sys.argv[1], list(SimulatedGPUs("2xL4").read().gpus), dtype="float32", show=False)
        print("PIDS", *model.pids, flush=True)
        if sys.argv[2] == "wait":
            time.sleep(600)
        # "exit": the interpreter ends with the model open, as a kernel that shuts down or restarts

    if __name__ == "__main__":
        main()
""")


def _kernel(tmp_path, llama_path, mode):
    script = tmp_path / "kernel.py"
    script.write_text(KERNEL)
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, str(script), llama_path, mode], stdout=subprocess.PIPE, text=True,
                            env=env)
    for line in proc.stdout:
        if line.startswith("PIDS"):
            return proc, [int(x) for x in line.split()[1:]]
    proc.wait()
    pytest.fail(f"the kernel process ended before its workers started (exit code {proc.returncode})")


def test_kernel_shutdown_stops_the_workers(tmp_path, llama_path):
    proc, pids = _kernel(tmp_path, llama_path, "exit")
    assert proc.wait(timeout=60) == 0
    assert all(_gone(pid) for pid in pids)


def test_a_killed_kernel_takes_its_workers_with_it(tmp_path, llama_path):
    proc, pids = _kernel(tmp_path, llama_path, "wait")
    assert not any(_gone(pid) for pid in pids)
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in pids)
