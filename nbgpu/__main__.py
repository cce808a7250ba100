"""`python -m nbgpu tour --html tour.html`: run the quick start headless and write it as an HTML page."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbgpu")
    commands = parser.add_subparsers(dest="command", required=True)
    tour = commands.add_parser("tour", help="run the quick start notebook headless and write an HTML page with its "
                                            "figures (simulated GPUs where there are none)")
    tour.add_argument("--html", required=True, metavar="OUT.html", help="where to write the page")
    tour.add_argument("--notebook", default=None, help="another notebook to run (default: the quick start)")
    tour.add_argument("--simulate", metavar="SPEC", default=None,
                      help="use simulated GPUs even where real ones exist, e.g. 4x24GiB")
    tour.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    args = parser.parse_args(argv)

    from .devices import parse_simulate_spec
    from .errors import UsageError
    from .tour import QUICKSTART
    from .tour import tour as run_tour

    missing = [m for m in ("nbclient", "nbformat", "mistune", "ipykernel") if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"the tour needs {', '.join(missing)}, which come with the tour extra: "
                     "pip install 'nbgpu[tour]'")

    notebook = Path(args.notebook) if args.notebook else QUICKSTART
    if not notebook.is_file():
        parser.error(f"no notebook at {notebook}: run from a checkout of nbgpu, or pass --notebook PATH")
    folder = Path(args.html).resolve().parent
    if not folder.is_dir() or Path(args.html).is_dir():
        parser.error(f"cannot write {args.html}: give a file in an existing folder")
    if not 1 <= args.timeout <= 86400:
        parser.error(f"--timeout {args.timeout}: give seconds per cell, from 1 to 86400")
    try:
        if args.simulate is not None:
            parse_simulate_spec(args.simulate)
        print(f"running {notebook.name} headless ...", file=sys.stderr)
        errors = run_tour(args.html, notebook, simulate=args.simulate, timeout=args.timeout)
    except UsageError as err:
        parser.error(str(err))
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"wrote {args.html}" + (f" ({len(errors)} error(s))" if errors else ""), file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
