"""What the GPU monitor costs: per-poll time, the poller thread's CPU use at 1 Hz and 10 Hz, the widget's redraw
time, and how much a CPU-bound cell slows while the monitor runs. Simulated GPUs (8 by default) and, where NVML
answers, the machine's real GPUs.

    python bench/monitor_overhead.py [--simulate 8x80GiB] [--seconds 10] [--blocks 5]

Targets (from the issue): under 1% of one core at 1 Hz; a CPU-bound cell slowed by under 2%.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from nbgpu import devices
from nbgpu.devices.nvml import NVMLReader
from nbgpu.monitoring import Monitor, Sampler


def thread_cpu_seconds(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def per_poll_us(read, polls: int) -> tuple[float, float]:
    sampler = Sampler(read)
    sampler.poll()  # handles, static fields, visibility: looked up once
    times = []
    for _ in range(polls):
        t = time.perf_counter()
        sampler.poll()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6, statistics.mean(times) * 1e6


def poller_cpu_percent(read, interval: float, seconds: float, with_view: bool = False) -> tuple[float, int]:
    m = Monitor(interval=interval, history=300, read=read, start=False)
    if with_view:
        m.widget  # noqa: B018 - build the view so each sample is also drawn
    m.start()
    thread = m._thread
    time.sleep(0.05)
    cpu0, wall0, n0 = thread_cpu_seconds(thread), time.perf_counter(), len(m.samples)
    time.sleep(seconds)
    cpu1, wall1, n1 = thread_cpu_seconds(thread), time.perf_counter(), len(m.samples)
    m.close()
    if m.errors:
        print(f"    (errors during the run: {list(m.errors)[:2]})")
    return 100 * (cpu1 - cpu0) / (wall1 - wall0), n1 - n0


def redraw_ms(read, redraws: int) -> float:
    m = Monitor(interval=1.0, history=300, read=read, start=False)
    view = (m.widget, m._view)[1]
    for _ in range(299):
        m._poll_once()  # a full history: the worst case for a redraw
    t = time.perf_counter()
    for _ in range(redraws):
        view.draw(m.latest, force=True)
    elapsed = (time.perf_counter() - t) / redraws
    m.close()
    return elapsed * 1e3


def cpu_bound_cell(n: int = 5_000_000) -> float:  # about a third of a second of pure Python
    t = time.perf_counter()
    total = 0
    for i in range(n):
        total += i * i % 7
    return time.perf_counter() - t


def cell_slowdown_percent(read, interval: float, blocks: int, cells: int = 6,
                          with_view: bool = False) -> tuple[float, float]:
    """Blocks of cells with the monitor off, then on (polling all through the block), alternated so drift in the
    machine's load hits both alike. Returns the median slowdown of an on block against the off block before it,
    and the noise floor: the median change between consecutive off blocks."""
    cpu_bound_cell()  # warm up
    off, on = [], []
    for _ in range(blocks):
        off.append(sum(cpu_bound_cell() for _ in range(cells)))
        m = Monitor(interval=interval, read=read, start=False)
        if with_view:
            m.widget  # noqa: B018
        m.start()
        on.append(sum(cpu_bound_cell() for _ in range(cells)))
        m.close()
    slowdown = statistics.median(100 * (b / a - 1) for a, b in zip(off, on))
    noise = statistics.median(abs(100 * (b / a - 1)) for a, b in zip(off, off[1:]))
    return slowdown, noise


def report(label: str, read, args) -> None:
    inv = read()
    print(f"\n== {label}: {len(inv)} GPU(s), backend {inv.backend} ==")
    med, mean = per_poll_us(read, args.polls)
    print(f"per poll: median {med:.0f} us, mean {mean:.0f} us ({args.polls} polls)")
    for hz in (1, 10):
        pct, n = poller_cpu_percent(read, 1 / hz, args.seconds)
        print(f"poller at {hz:>2} Hz: {pct:.3f}% of one core ({n} polls in {args.seconds:g} s)")
    # the poller holds the GIL only while it polls, so a CPU-bound cell should lose about the poll time per second
    # plus two thread switches per poll; the direct measurement below is only as good as its noise figure
    print(f"expected CPU-bound cell slowdown from the poll time alone: {med * 1e-4:.3f}% at 1 Hz, "
          f"{med * 1e-3:.3f}% at 10 Hz")
    try:
        ms = redraw_ms(read, 20)
        pct, n = poller_cpu_percent(read, 1.0, args.seconds, with_view=True)
        print(f"widget redraw (300 samples, no front end attached): {ms:.1f} ms; "
              f"poller + redraws at 1 Hz: {pct:.3f}% of one core")
    except ImportError as err:
        print(f"widget not measured here ({err})")
    configs = [("monitor at  1 Hz", 1.0, False), ("monitor at 10 Hz", 0.1, False),
               ("monitor + widget at 1 Hz", 1.0, True)]
    for label, interval, with_view in configs:
        try:
            slow, noise = cell_slowdown_percent(read, interval, args.blocks, with_view=with_view)
        except ImportError:
            continue
        print(f"CPU-bound cell, {label}: {slow:+.2f}% slower (median of {args.blocks} block pairs; "
              f"off-vs-off noise {noise:.2f}%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulate", default="8x80GiB", help="simulated GPUs to measure (default 8x80GiB)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per CPU-use measurement")
    parser.add_argument("--blocks", type=int, default=5, help="off/on blocks of CPU-bound cells (6 cells each)")
    parser.add_argument("--polls", type=int, default=1000, help="polls timed for the per-poll cost")
    parser.add_argument("--no-simulated", action="store_true", help="measure only the real GPUs")
    args = parser.parse_args()

    if not args.no_simulated:
        sim = devices.simulate(args.simulate)
        for i in range(len(sim)):
            sim.allocate(i, (i + 1) * 1024**3)  # a process on every GPU, as when a model is spread over them
        report(f"simulated {args.simulate}", devices.read, args)
        devices.simulate(None)

    nvml = NVMLReader()
    inv = nvml.read()
    if len(inv):
        report("NVML", nvml.read, args)
    else:
        print(f"\nNVML not measured: {inv.message}")


if __name__ == "__main__":
    main()
