"""On GPUs: each GPU's planned memory against NVML's peak for the model's processes, for random-weight Llama shapes,
one GPU, a layer split over two and (with --tensor) tensor parallelism over two.

    python bench/plan_vs_measured.py [--shapes 1B,8B] [--gpus 1,2] [--tensor] [--json OUT.jsonl]

For each (batch, prompt, new tokens) the run is measured in two parts, to spare thousands of decode steps: the
prefill is `generate` with the real prompt (one token), then the end of the run is `generate` of the last 32 tokens
with a KV cache already holding prompt + new - 32 tokens (so the cache, its growth and the logits are those of the
end of a full run). NVML is sampled every 3 ms during both; the torch allocator's peaks are read beside it.
Prints figures only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import threading
import time

GiB = 1024**3
CONFIGS = [(1, 128, 128), (4, 4096, 4096), (8, 8192, 256)]
TAIL = 32
SHAPES = {
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}


class NVMLPeak(threading.Thread):
    """The largest memory NVML reports for `pids` on each GPU (summed over the pids), sampled every 3 ms."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        import pynvml

        pynvml.nvmlInit()
        self.nv, self.pids = pynvml, set(pids)
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.peak = [0] * len(self.handles)
        self.per_pid: dict = {}
        self.done = threading.Event()

    def read(self):
        for i, h in enumerate(self.handles):
            procs = [p for p in self.nv.nvmlDeviceGetComputeRunningProcesses(h) if p.pid in self.pids]
            self.peak[i] = max(self.peak[i], sum(p.usedGpuMemory or 0 for p in procs))
            for p in procs:
                key = (i, p.pid)
                self.per_pid[key] = max(self.per_pid.get(key, 0), p.usedGpuMemory or 0)

    def run(self):
        while not self.done.is_set():
            self.read()
            time.sleep(0.003)

    def stop(self):
        self.done.set()
        self.join()
        self.read()
        return self.peak


def save_model(shape: str, folder: str) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = os.path.join(folder, f"llama-{shape}")
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=16384)
    with torch.device("cuda:0"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return path


def probe(model, batch, prompt, new, devices, kv_heads_local, vocab):
    """Prefill with the real prompt, then the run's end; returns the allocator's peaks per device."""
    import torch
    from transformers import DynamicCache

    from nbgpu.running import placement

    first = model.get_input_embeddings().weight.device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, prompt), generator=gen).to(first)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, min_new_tokens=1, do_sample=False)
    held = prompt + new - TAIL
    cfg = model.config
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    where = placement.layer_devices(model, placement.actual_map(model))
    cache = DynamicCache(config=cfg)
    for i in range(cfg.num_hidden_layers):
        device = where[i] if where and isinstance(where[i], int) else first
        k = torch.zeros(batch, kv_heads_local, held, hd, dtype=torch.bfloat16, device=device)
        cache.update(k, torch.zeros_like(k), i)
        del k
    full = torch.randint(0, vocab, (batch, held + 1), generator=gen).to(first)
    with torch.no_grad():
        out = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=TAIL, min_new_tokens=TAIL,
                             do_sample=False, **{placement.cache_argument(model): cache})
    assert out.shape[1] == prompt + new + 1
    del cache, out, full, ids
    return {d: (torch.cuda.max_memory_allocated(d), torch.cuda.max_memory_reserved(d)) for d in devices}


def layer_split(path: str, shape: str, n_gpus: int, report):
    import torch
    from transformers import AutoModelForCausalLM

    import nbgpu

    model, loaded_map = None, None
    for batch, prompt, new in CONFIGS:
        plan = nbgpu.plan(path, gpus=n_gpus, batch=batch, prompt_len=prompt, new_tokens=new)
        if plan.device_map != loaded_map:
            del model
            gc.collect()
            torch.cuda.empty_cache()
            model = AutoModelForCausalLM.from_pretrained(path, device_map=plan.device_map, dtype=torch.bfloat16)
            loaded_map = plan.device_map
        gc.collect()
        torch.cuda.empty_cache()
        devices = list(range(n_gpus))
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
        sampler = NVMLPeak([os.getpid()])
        sampler.start()
        try:
            peaks = probe(model, batch, prompt, new, devices, model.config.num_key_value_heads,
                          model.config.vocab_size)
            error = None
        except torch.OutOfMemoryError as err:
            peaks, error = {}, str(err).splitlines()[0]
        nvml = sampler.stop()
        report(shape, f"{n_gpus} GPU" if n_gpus == 1 else f"split {n_gpus}", plan, (batch, prompt, new),
               {d: nvml[plan.devices[d].gpu.index] for d in devices}, peaks, error)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def _tp_worker(rank, world, path, port, configs, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    kwargs = {"tp_plan": "auto"}
    if hasattr(transformers, "DistributedConfig"):
        kwargs = {"distributed_config": transformers.DistributedConfig(tp_plan="auto")}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()
    device = torch.cuda.current_device()
    for batch, prompt, new in configs:
        torch.distributed.barrier()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        queue.put(("start", rank, (batch, prompt, new)))
        torch.distributed.barrier()
        peaks = probe(model, batch, prompt, new, [device], model.config.num_key_value_heads // world,
                      model.config.vocab_size)
        torch.distributed.barrier()
        queue.put(("done", rank, (batch, prompt, new), peaks[device]))
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def tensor_parallel(path: str, shape: str, report):
    import socket

    import torch.multiprocessing as mp

    import nbgpu

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").Queue()
    ctx = mp.start_processes(_tp_worker, args=(2, path, port, CONFIGS, queue), nprocs=2, join=False,
                             start_method="spawn")
    pids = [p.pid for p in ctx.processes]
    for config in CONFIGS:
        starts = [queue.get(timeout=600) for _ in range(2)]
        assert all(s[0] == "start" for s in starts)
        sampler = NVMLPeak(pids)
        sampler.start()
        done = [queue.get(timeout=600) for _ in range(2)]
        nvml = sampler.stop()
        plan = nbgpu.plan(path, gpus=2, batch=config[0], prompt_len=config[1], new_tokens=config[2],
                          parallel="tensor")
        peaks = {d[1]: d[3] for d in done}
        report(shape, "tensor 2", plan, config, {d: nvml[plan.devices[d].gpu.index] for d in range(2)}, peaks, None,
               per_pid={f"GPU {g} pid {p}": v for (g, p), v in sampler.per_pid.items()})
    ctx.join()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1B,8B")
    parser.add_argument("--gpus", default="1,2")
    parser.add_argument("--tensor", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    import torch

    import nbgpu

    nbgpu.simulate(None)
    print(f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}")
    rows = []

    def report(shape, how, plan, config, nvml, peaks, error, per_pid=None):
        for d in plan.devices:
            measured = nvml.get(d.cuda_index)
            diff = None if not measured else (d.process - measured) / measured
            row = dict(shape=shape, how=how, batch=config[0], prompt=config[1], new=config[2], gpu=d.cuda_index,
                       planned=d.process, nvml_peak=measured, diff=diff, planned_weights=d.weights,
                       planned_kv=d.kv_cache, planned_activations=d.activations, planned_allocator=d.allocator,
                       planned_context=d.context + d.communication,
                       allocated_peak=peaks.get(d.cuda_index, (None, None))[0],
                       reserved_peak=peaks.get(d.cuda_index, (None, None))[1], error=error, per_pid=per_pid)
            rows.append(row)
            fmt = "n/a" if diff is None else f"{diff:+.1%}"
            gib = "n/a" if not measured else f"{measured / GiB:.2f}"
            print(f"{shape:>3} {how:<9} b{config[0]} p{config[1]} n{config[2]} cuda:{d.cuda_index}: planned "
                  f"{d.process / GiB:.2f} GiB, NVML peak {gib} GiB, {fmt}" + (f"  ({error})" if error else ""),
                  flush=True)
        if per_pid:
            print("    NVML per process: " + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in per_pid.items()))

    with tempfile.TemporaryDirectory() as folder:
        for shape in args.shapes.split(","):
            path = save_model(shape, folder)
            for n in map(int, args.gpus.split(",")):
                if n <= torch.cuda.device_count():
                    layer_split(path, shape, n, report)
            if args.tensor and torch.cuda.device_count() >= 2 and shape == "8B":
                tensor_parallel(path, shape, report)
    worst = max((abs(r["diff"]) for r in rows if r["diff"] is not None), default=None)
    print(f"largest difference: {worst:.1%}" if worst is not None else "nothing measured")
    if args.json:
        with open(args.json, "w") as fh:
            fh.write("\n".join(json.dumps(r) for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
