"""What naming GPU processes by notebook costs: per monitor poll, per `%gpus` in a kernel, per panel request.

Starts a real `jupyter server` with two kernels on simulated GPUs (works with or without a GPU) and prints:
- kernels.owners for N processes that are no kernel (what every monitor poll pays once the pids are known),
- kernels.owners for a kernel's pid: first call (asks the server over REST) and cached calls,
- `nbgpu.gpus()` inside a kernel (the %gpus table, naming its own notebook),
- GET /nbgpu/api/gpus (what the panel polls), median of 20.

    python bench/panel.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import jupyter_servers  # noqa: E402

from nbgpu import kernels  # noqa: E402


def _per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    others = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(7)]
    pids = [p.pid for p in others] + [os.getpid()]
    kernels.owners(pids)
    t = _per_call(lambda: kernels.owners(pids), 2000)
    print(f"kernels.owners, {len(pids)} processes that are no kernel (cached): {t * 1e6:.0f} us per poll")

    with tempfile.TemporaryDirectory() as tmp:
        server = jupyter_servers.start(Path(tmp), {"NBGPU_SIMULATE": "4x24GiB"})
        try:
            session = server.open_notebook("a.ipynb")
            server.open_notebook("b.ipynb")
            client = server.client(session["kernel"]["id"])
            pid = int(jupyter_servers.run(client, "import os, nbgpu\nnbgpu.simulate('4x24GiB')\n"
                                                  "nbgpu.devices.simulated().allocate(0, 2**30)\nprint(os.getpid())"))
            directory = kernels.ServerDirectory(server.runtime_dir)
            start = time.perf_counter()
            kernels.owners([pid], servers_of=directory)
            print(f"kernels.owners, a kernel's pid, first call (REST to the server): "
                  f"{(time.perf_counter() - start) * 1e3:.1f} ms")
            t = _per_call(lambda: kernels.owners([pid], servers_of=directory), 500)
            print(f"kernels.owners, a kernel's pid, cached: {t * 1e6:.0f} us")
            timing = "import time\nt = time.perf_counter()\nfor _ in range(20): nbgpu.gpus()\n" \
                     "print((time.perf_counter() - t) / 20)"
            print(f"nbgpu.gpus() in the kernel (4 simulated GPUs, its notebook named): "
                  f"{float(jupyter_servers.run(client, timing)) * 1e3:.2f} ms")
            times = []
            for _ in range(20):
                start = time.perf_counter()
                status, _ = server.request("GET", "nbgpu/api/gpus")
                times.append(time.perf_counter() - start)
                assert status == 200
            print(f"GET /nbgpu/api/gpus: median {statistics.median(times) * 1e3:.1f} ms, "
                  f"max {max(times) * 1e3:.1f} ms over 20")
            client.stop_channels()
        finally:
            jupyter_servers.stop(server)
    for p in others:
        p.kill()


if __name__ == "__main__":
    main()
