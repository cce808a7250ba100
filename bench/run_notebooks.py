"""Execute every course notebook headless on this machine's GPUs (simulated ones where there are none) and print,
per notebook, its run time, any error output, and the lines it showed about GPUs, plans and speeds.

    python bench/run_notebooks.py [--tour OUT.html]
"""

from __future__ import annotations

import glob
import sys
import time

from nbgpu import tour

KEYS = ("cuda:", "tokens/s", "simulated", "tensor_parallel", "fits", "already running", "GiB")


def shown_lines(nb, most: int = 25) -> list[str]:
    lines = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text = out.get("text") or out.get("data", {}).get("text/plain", "")
            text = "".join(text) if isinstance(text, list) else text
            lines += [line[:200] for line in text.splitlines() if any(k in line for k in KEYS)]
    return lines[:most]


def main(argv: list[str]) -> int:
    failed = 0
    for path in sorted(glob.glob("notebooks/*.ipynb")):
        start = time.perf_counter()
        try:
            nb = tour.execute(path, timeout=300)
        except Exception as err:  # a failing cell: report it and go on with the next notebook
            failed += 1
            print(f"### {path}: FAILED after {time.perf_counter() - start:.0f} s: {str(err)[-800:]}")
            continue
        errors = tour.error_outputs(nb)
        failed += bool(errors)
        print(f"### {path}: {time.perf_counter() - start:.0f} s, {len(errors)} error output(s)")
        for err in errors:
            print("   ERROR", err[-600:])
        for line in shown_lines(nb):
            print("   |", line)
    if "--tour" in argv:
        tour.tour(argv[argv.index("--tour") + 1])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
