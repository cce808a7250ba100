"""Execute every course notebook headless on this machine's GPUs (simulated ones where there are none) and print,
per notebook: its run time, any error output, every benchmark it ran with how busy each GPU was in one decode step
(a notebook that splits a model must show every GPU of the split busy), whether its kernel and its processes are
gone afterwards, and the lines it showed about GPUs, plans and speeds.

    python bench/run_notebooks.py [--tour OUT.html] [NOTEBOOK ...]
"""

from __future__ import annotations

import glob
import json
import sys
import time

import psutil

from nbgpu import tour

KEYS = ("cuda:", "tokens/s", "simulated", "modelled", "tensor_parallel", "fits", "already running", "GiB")
TIMEOUT_S = 900  # per cell: notebook 07 builds and loads an 8B checkpoint on real GPUs

# run after each notebook in its kernel: every BenchResult it holds (in variables, lists, dicts, sweeps), with the
# share of one decode step each GPU was busy
BUSY_PROBE = """
import json as _json
from nbgpu.running.bench import BenchResult as _BenchResult

def _nbgpu_results(value, seen):
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, _BenchResult):
        yield value
    elif isinstance(value, dict):
        for item in list(value.values()):
            yield from _nbgpu_results(item, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _nbgpu_results(item, seen)

print("NBGPU_BUSY " + _json.dumps({r.label: {"busy": r.timeline.busy() if r.timeline else None,
                                            "modelled": bool(r.modelled), "tok_s": r.decode_tokens_per_s}
                                   for r in _nbgpu_results([v for k, v in list(globals().items())
                                                            if not k.startswith("_")], set())}))
"""


def shown_lines(nb, most: int = 25) -> list[str]:
    lines = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            lines += [line[:200] for line in text.splitlines() if any(k in line for k in KEYS)]
    return lines[:most]


def benchmarks(nb) -> dict:
    """The probe's answer: label -> {busy: {cuda index: share}, modelled, tok_s}."""
    for out in nb.cells[-1].get("outputs", []):
        if out.get("text", "").startswith("NBGPU_BUSY "):
            return json.loads(out["text"].split("NBGPU_BUSY ", 1)[1])
    return {}


def split_report(found: dict) -> tuple[bool, list[str]]:
    """(every multi-GPU run had every GPU busy, one line per run)."""
    ok, lines = True, []
    for label, r in found.items():
        busy = r["busy"] or {}
        shares = ", ".join(f"cuda:{k} {v:.0%}" for k, v in busy.items()) or "no timeline"
        if len(busy) > 1:
            every = all(v > 0 for v in busy.values())
            ok &= every
            shares += "  -> every GPU busy" if every else "  -> A GPU OF THE SPLIT WAS IDLE"
        kind = "modelled" if r["modelled"] else "measured"
        lines.append(f"{label}: {r['tok_s']:,.1f} tokens/s ({kind}); busy in one decode step: {shares}")
    return ok, lines


def _kernels() -> set[int]:
    """This process's descendants that are Jupyter kernels, or processes they started."""
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()}


def main(argv: list[str]) -> int:
    failed = 0
    names = [a for a in argv if a.endswith(".ipynb")]
    paths = names or sorted(glob.glob("notebooks/*.ipynb"))
    for path in paths:
        start = time.perf_counter()
        before = _kernels()
        try:
            nb = tour.execute(path, timeout=TIMEOUT_S, then=[BUSY_PROBE])
        except Exception as err:  # a failing cell: report it and go on with the next notebook
            failed += 1
            print(f"### {path}: FAILED after {time.perf_counter() - start:.0f} s: {str(err)[-800:]}")
            continue
        time.sleep(1)
        left = _kernels() - before
        errors = tour.error_outputs(nb)
        splits = "split" in "".join(c.source for c in nb.cells).lower()
        ok, lines = split_report(benchmarks(nb))
        multi = any(len(r["busy"] or {}) > 1 for r in benchmarks(nb).values())
        failed += bool(errors) + bool(left) + (splits and multi and not ok)
        print(f"### {path}: {time.perf_counter() - start:.0f} s, {len(errors)} error output(s), "
              f"processes left: {sorted(left) or 'none'}")
        if splits:
            verdict = ("every GPU of every split busy" if ok else "A SPLIT LEFT A GPU IDLE") if multi else \
                "no run on more than one GPU (one GPU here?)"
            print(f"   split: {verdict}")
        for line in lines:
            print("   bench", line)
        for err in errors:
            print("   ERROR", err[-600:])
        for line in shown_lines(nb):
            print("   |", line)
    if "--tour" in argv:
        tour.tour(argv[argv.index("--tour") + 1])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
