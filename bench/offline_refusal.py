"""How long nbgpu takes to refuse a hub id it cannot reach, and to load a saved plan (which never needs the network).

    python bench/offline_refusal.py

Prints seconds per case (the median of 3): HF_HUB_OFFLINE=1; a hub address that does not resolve; a hub address
whose packets are dropped (a non-routable IP: the request waits for its timeout, where the network does not answer
at once that it is unreachable); a resolver that hangs (the probe thread is abandoned after 1.4 s); and Plan.load of
a saved plan. The refusals are timed from the call, in a fresh process (they come before torch is imported).
Target: every refusal under 2 s (before: 23-26 s of retries).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    "HF_HUB_OFFLINE=1": {"HF_HUB_OFFLINE": "1"},
    "hub address that does not resolve": {"HF_ENDPOINT": "http://nbgpu-bench.invalid"},
    "hub address that drops packets": {"HF_ENDPOINT": "http://10.255.255.1"},
    "name resolution that hangs for 30 s": {"HANG": "1"},
}
HANGING_RESOLVER = """
import socket, time
socket.getaddrinfo = lambda *args, **kwargs: time.sleep(30)
"""
REFUSE = """
import time, nbgpu
start = time.perf_counter()
try:
    nbgpu.plan("no-such-org/no-such-model-xyz", gpus="1x24GiB")
except nbgpu.UsageError as err:
    print(time.perf_counter() - start, "|", str(err)[:140])
"""
LOAD = """
import time, nbgpu
start = time.perf_counter()
nbgpu.Plan.load({path!r})
print(time.perf_counter() - start)
"""


def run(code: str, env: dict) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    if out.returncode:
        raise SystemExit(out.stderr)
    return out.stdout.strip()


def main() -> None:
    import nbgpu

    for label, env in CASES.items():
        code = (HANGING_RESOLVER if env.get("HANG") else "") + REFUSE
        runs = [run(code, env) for _ in range(3)]
        seconds = statistics.median(float(r.split("|")[0]) for r in runs)
        print(f"{label:40s} refused in {seconds:.2f} s: {runs[0].split('|', 1)[1].strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "plan.json")
        nbgpu.plan({"model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "vocab_size": 1000}, gpus="2x24GiB").save(path)
        runs = [float(run(LOAD.format(path=path), {"HF_ENDPOINT": "http://10.255.255.1"})) for _ in range(3)]
        seconds = statistics.median(runs)
        print(f"{'Plan.load, hub unreachable':40s} loaded in {seconds:.2f} s (torch and transformers imported)")


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"({time.perf_counter() - start:.0f} s in all)")
