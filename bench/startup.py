"""Start-up: `import nbgpu; nbgpu.gpus()` against nvitop's `Device.all()` reading the same fields (name, memory,
utilisation, temperature, power, processes), each in a fresh interpreter, alternated, median of the runs.

    python bench/startup.py [--runs 15]
Prints figures only (the time inside the interpreter, from before the import to the last field read).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

NBGPU = """
import time
t = time.perf_counter()
import nbgpu
table = nbgpu.gpus()
rows = [(g.name, g.memory_used, g.memory_total, g.utilization, g.temperature, g.power_draw,
         [(p.pid, p.name, p.used_memory) for p in (g.processes or ())]) for g in table]
print(time.perf_counter() - t)
"""

NVITOP = """
import time
t = time.perf_counter()
from nvitop import Device
rows = [(d.name(), d.memory_used(), d.memory_total(), d.gpu_utilization(), d.temperature(), d.power_usage(),
         [(p.pid, p.name(), p.gpu_memory()) for p in d.processes().values()]) for d in Device.all()]
print(time.perf_counter() - t)
"""


def once(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    try:
        import nvitop  # noqa: F401
        have_nvitop = True
    except ImportError:
        have_nvitop = False
    ours, theirs = [], []
    for _ in range(args.runs):
        ours.append(once(NBGPU))
        if have_nvitop:
            theirs.append(once(NVITOP))
    ours_ms = statistics.median(ours) * 1e3
    print(f"import nbgpu; nbgpu.gpus(): median {ours_ms:.0f} ms ({min(ours) * 1e3:.0f}..{max(ours) * 1e3:.0f}) "
          f"over {args.runs} fresh interpreters")
    if have_nvitop:
        theirs_ms = statistics.median(theirs) * 1e3
        print(f"nvitop Device.all(), same fields: median {theirs_ms:.0f} ms ({min(theirs) * 1e3:.0f}.."
              f"{max(theirs) * 1e3:.0f}); ratio {ours_ms / theirs_ms:.2f}x")
    else:
        print("nvitop is not installed: no comparison (pip install nvitop)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
