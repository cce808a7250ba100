"""The cost model (nbgpu.running.cost_model) beside the figures measured on real GPUs: what it predicts for the 1B and
8B Llama shapes on one H200, a layer split over two and tensor parallelism over two, against what
bench/split_vs_tensor.py measured on 2 x NVIDIA H200 (torch 2.11.0+cu130, CUDA 13.0, transformers 5.24.0; prompt 128,
32 new tokens). Needs no GPU: the H200s are described, not used.

    python bench/cost_model_vs_measured.py
    python bench/cost_model_vs_measured.py --live     # on a GPU machine: measure the 1B shape here, beside the model

Some measured figures calibrated the model (devices/speed_calibration.py says which); the others test it. `--live`
checks the model on this machine's GPUs (other GPUs than the ones it was calibrated on): 1 GPU eager and compiled,
the layer split and tensor parallelism over two GPUs where there are two, at batch 1 and 16.
"""

from __future__ import annotations

import sys

import nbgpu
from nbgpu.running.prediction import predict

SHAPES = {
    "8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192),
}
# (shape, way, mode, batch) -> (TTFT ms or None, per-token p50 ms), measured on 2 x H200
MEASURED = {
    ("8B", "1 GPU", "eager", 1): (29.9, 25.99), ("8B", "1 GPU", "eager", 16): (58.3, 35.21),
    ("8B", "1 GPU", "compiled", 1): (40.2, 7.68), ("8B", "1 GPU", "compiled", 16): (67.8, 8.88),
    ("8B", "layer split 2", "eager", 1): (46.5, 41.76), ("8B", "layer split 2", "eager", 16): (59.7, 39.86),
    ("8B", "tensor parallel 2", "eager", 1): (45.4, 43.83), ("8B", "tensor parallel 2", "eager", 16): (62.3, 52.88),
    ("8B", "tensor parallel 2", "compiled", 1): (64.2, 11.08),
    ("8B", "tensor parallel 2", "compiled", 16): (67.4, 12.50),
    ("1B", "1 GPU", "eager", 1): (None, 12.41), ("1B", "1 GPU", "eager", 16): (None, 15.08),
    ("1B", "1 GPU", "compiled", 1): (None, 2.64), ("1B", "1 GPU", "compiled", 16): (None, 3.18),
    ("1B", "layer split 2", "eager", 1): (None, 23.32), ("1B", "layer split 2", "eager", 16): (None, 23.13),
    ("1B", "layer split 2", "compiled", 1): (None, 8.09), ("1B", "layer split 2", "compiled", 16): (None, 7.23),
}
WAYS = {"1 GPU": ("H200", "layers"), "layer split 2": ("2xH200", "layers"),
        "tensor parallel 2": ("2xH200", "tensor")}


def main() -> None:
    rows = []
    for (shape, way, mode, batch), (ttft, p50) in MEASURED.items():
        gpus, parallel = WAYS[way]
        plan = nbgpu.plan(SHAPES[shape], gpus=gpus, batch=batch, prompt_len=128, new_tokens=32, parallel=parallel)
        r = predict(plan, batch=batch, prompt_len=128, new_tokens=32, compile=mode == "compiled")
        model_p50 = r.latency_p50_s * 1e3
        model_ttft = r.ttft_s * 1e3
        rows.append((shape, way, mode, batch, p50, model_p50, ttft, model_ttft))
    print(f"{'shape':<5} {'way':<18} {'mode':<8} {'batch':>5}  {'measured ms':>11} {'modelled':>9} {'diff':>6}   "
          f"{'TTFT meas.':>10} {'modelled':>9} {'diff':>6}")
    for shape, way, mode, batch, p50, mp50, ttft, mttft in rows:
        t = "" if ttft is None else f"{ttft:>10.1f} {mttft:>9.1f} {(mttft - ttft) / ttft:>+6.0%}"
        print(f"{shape:<5} {way:<18} {mode:<8} {batch:>5}  {p50:>11.2f} {mp50:>9.2f} {(mp50 - p50) / p50:>+6.0%}   {t}")
    for shape in SHAPES:
        for batch in (1, 16):
            for mode in ("eager", "compiled"):
                meas = {w: p for (s, w, mo, b), (_, p) in MEASURED.items() if (s, mo, b) == (shape, mode, batch)}
                model = {w: mp for s, w, mo, b, _, mp, _, _ in rows if (s, mo, b) == (shape, mode, batch)}
                if len(meas) > 1:
                    order_m = sorted(meas, key=meas.get)
                    order_p = sorted(model, key=model.get)
                    same = "same" if order_m == order_p else "DIFFERENT"
                    print(f"{shape} batch {batch} {mode}: fastest first, measured {order_m}; modelled {order_p} "
                          f"({same} order)")


def live() -> None:
    """Measure the 1B shape on this machine's GPUs and print each run beside the model's figure for the same plan."""
    from nbgpu import course, devices

    if devices.simulated() is not None or not len(devices.read()):
        print("--live measures on real GPUs: there are none here (simulated runs are modelled, not measured)")
        return
    fields = {k: v for k, v in SHAPES["1B"].items() if k != "model_type"}
    path = course.model(fields)
    n = min(2, len(nbgpu.visibility.current().targets))
    ways = [("1 GPU", 1, "layers", False), ("1 GPU", 1, "layers", True)]
    if n == 2:
        ways += [("layer split 2", 2, "layers", False), ("tensor parallel 2", 2, "tensor", False)]
    print(f"{'way':<18} {'mode':<8} {'batch':>5}  {'measured ms':>11} {'modelled':>9} {'diff':>6}")
    for way, gpus, parallel, compile in ways:
        plan = nbgpu.plan(path, gpus=gpus, batch=16, prompt_len=128, new_tokens=32, parallel=parallel)
        model = nbgpu.load(plan, show=False)
        try:
            for batch in (1, 16):
                measured = nbgpu.bench(model, batch=batch, prompt_len=128, new_tokens=32, repeats=3, compile=compile)
                modelled = predict(plan, batch=batch, prompt_len=128, new_tokens=32, compile=compile)
                m, p = measured.latency_p50_s * 1e3, modelled.latency_p50_s * 1e3
                mode = "compiled" if compile else "eager"
                print(f"{way:<18} {mode:<8} {batch:>5}  {m:>11.2f} {p:>9.2f} {(p - m) / m:>+6.0%}")
        finally:
            if hasattr(model, "close"):
                model.close()
            del model


if __name__ == "__main__":
    live() if "--live" in sys.argv else main()
