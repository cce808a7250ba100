"""Mutation testing of nbgpu's core modules with mutmut 3: how many planted changes to the code the tests catch.

mutmut copies the code to mutants/, plants one change at a time (an operator, a number, a string, a call argument,
...) and runs the tests that reach the changed function; a mutant the tests do not notice "survives". This script
runs mutmut in a scratch copy of the working tree (so mutants/ and its config never touch the tree), then prints
the score per core module: killed / mutants tried.

    python bench/mutation.py                         # every mutant of every core module (hours on two cores)
    python bench/mutation.py --sample 150 --seed 1   # a fixed random sample of 150 mutants per module
    python bench/mutation.py --modules running,views --survivors survivors.txt
    python bench/mutation.py --ci                    # the CI-sized sample (.ci/run): a few minutes

Mutants are counted as killed when a test failed or ran past mutmut's time limit (an infinite loop is caught too);
"no tests" (no test reaches the function) and survivors are not killed. The notebook and browser tests are left
out of mutation runs: they run the code in another process, where mutmut cannot tell which test reached which
function, and they take minutes.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# core module -> the files it holds (the layers of docs/architecture.md)
MODULES = {
    "devices": ["nbgpu/devices/*"],
    "visibility": ["nbgpu/visibility.py", "nbgpu/gpu_table.py", "nbgpu/kernels.py"],
    "planning": ["nbgpu/planning/*"],
    "running": ["nbgpu/running/*"],
    "monitoring": ["nbgpu/monitoring.py", "nbgpu/monitoring/*"],
    "views": ["nbgpu/views/*"],
    "magics": ["nbgpu/magics.py"],
}
# run in another process (a kernel, a browser, a fresh environment): mutmut cannot follow them, and they take minutes
LEFT_OUT_FILES = ["tests/test_notebooks.py", "tests/test_browser.py", "tests/test_panel_browser.py",
                  "tests/test_wheel.py"]
LEFT_OUT_TESTS = [
    "tests/test_monitor.py::test_in_a_kernel_the_widget_shows_and_other_cells_get_no_output_from_the_poller",
    # these tell a library's error from nbgpu's by the first stack frame below nbgpu's own: under mutmut that frame
    # is mutmut's trampoline, so they fail before any mutant is planted
    "tests/test_boundaries.py::test_errors_of_from_pretrained_become_usage_errors_with_the_cause",
    "tests/test_properties_api.py::test_load",
]

# The CI sample: a fixed random sample of the mutants of files whose tests take seconds, with only the test files
# that exercise them (mutmut first runs every selected test once to learn which test reaches which function).
CI_FILES = ["nbgpu/running/timeline.py", "nbgpu/running/roofline.py", "nbgpu/planning/tp_sizes.py",
            "nbgpu/views/memory_bars.py", "nbgpu/views/gpu_table_view.py", "nbgpu/gpu_table.py", "nbgpu/magics.py"]
CI_TESTS = ["tests/test_bench_figures.py", "tests/test_plan_oracles.py", "tests/test_views.py", "tests/test_magics.py"]
CI_SAMPLE = 12  # mutants per module, drawn with the fixed seed

KILLED = {1, 3, 36, 24, -24, 152, 255}  # a test failed (or errored), or the mutant ran out of time
NO_TESTS = {5, 33}
STATUS = {0: "survived", None: "not run", **{c: "killed" for c in KILLED}, **{c: "no tests" for c in NO_TESTS}}


def module_of(path: str) -> str | None:
    from fnmatch import fnmatch

    return next((m for m, globs in MODULES.items() if any(fnmatch(path, g) for g in globs)), None)


def copy_tree(workdir: Path, ref: str | None) -> None:
    """The working tree as git sees it (tracked and new files, not ignored ones), or a commit, into `workdir`."""
    if workdir.exists():
        shutil.rmtree(workdir)
    if ref is not None:
        workdir.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", ref], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(workdir)], input=archive, check=True)
        return
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\n")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file() and not name.startswith(("docs/images/", "bench/")):
            dst = workdir / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def configure(workdir: Path, only_mutate: list[str], tests: list[str], deselect: list[str]) -> None:
    """mutmut's settings, in the copy's pyproject.toml (mutmut reads them there)."""
    def toml_list(items):
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    args = ["-p", "no:cacheprovider", "-m", "not gpu and not browser"]
    for node in deselect:
        args += ["--deselect", node]
    with open(workdir / "pyproject.toml", "a") as fh:
        fh.write("\n[tool.mutmut]\n"
                 'source_paths = ["nbgpu"]\n'
                 'also_copy = ["docs"]\n'
                 f"only_mutate = {toml_list(only_mutate)}\n"
                 f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
                 f"pytest_add_cli_args = {toml_list(args)}\n"
                 'process_isolation = "forkserver"\n'
                 "use_git_change_detection = false\n")


def mutmut(workdir: Path, args: list[str], log: Path, timeout: float | None) -> int:
    exe = Path(sys.executable).with_name("mutmut")
    command = [str(exe) if exe.exists() else "mutmut", *args]
    with open(log, "a") as out:
        out.write(f"\n$ {' '.join(command[:4])}{' ...' if len(command) > 4 else ''}\n")
        out.flush()
        try:
            done = subprocess.run(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
            return done.returncode
        except subprocess.TimeoutExpired:
            out.write("\n(stopped: time limit)\n")
            return 124


def generate(workdir: Path) -> None:
    """Write the mutants (mutmut's own first step) without running any test, to know their names."""
    code = ("from mutmut.utils.file_utils import copy_src_dir, copy_also_copy_files, setup_source_paths\n"
            "import mutmut.__main__ as m\n"
            "import os\n"
            "os.makedirs('mutants', exist_ok=True)\n"
            "copy_src_dir(); copy_also_copy_files(); setup_source_paths(); m.create_mutants(2)\n")
    subprocess.run([sys.executable, "-c", code], cwd=workdir, check=True, capture_output=True)


def results(workdir: Path) -> dict[str, dict[str, int | None]]:
    """path -> mutant name -> mutmut's exit code (None: not run)."""
    out = {}
    for meta in sorted((workdir / "mutants").rglob("*.py.meta")):
        path = str(meta.relative_to(workdir / "mutants"))[: -len(".meta")]
        out[path] = json.loads(meta.read_text())["exit_code_by_key"]
    return out


_DIFFS = """
import json, sys
from mutmut.mutation.diff_apply import get_diff_for_mutant
out = {}
for name in json.load(sys.stdin):
    try:
        out[name] = get_diff_for_mutant(name)
    except Exception as err:  # a mutant mutmut cannot show: counted as not text-only
        out[name] = f"(no diff: {err})"
print(json.dumps(out))
"""
_STRING = re.compile(r"""([rRbBfFuU]{0,2})("|')(?:\\.|(?!\2).)*\2""")


def diffs(workdir: Path, names: list[str]) -> dict[str, str]:
    """Each mutant's diff, from mutmut in one process."""
    done = subprocess.run([sys.executable, "-c", _DIFFS], cwd=workdir, input=json.dumps(names), text=True,
                          capture_output=True, check=True)
    return json.loads(done.stdout)


def text_only(diff: str) -> bool:
    """True when the mutant changes nothing but the text inside string literals (a message, a label, a help)."""
    minus = [_STRING.sub('""', x[1:]) for x in diff.splitlines() if x.startswith("-") and not x.startswith("---")]
    plus = [_STRING.sub('""', x[1:]) for x in diff.splitlines() if x.startswith("+") and not x.startswith("+++")]
    return bool(minus) and minus == plus


def table(found: dict, chosen: set[str] | None, text: set[str]) -> tuple[str, dict[str, float]]:
    per_module: dict[str, Counter] = defaultdict(Counter)
    per_file: dict[str, Counter] = defaultdict(Counter)
    for path, codes in found.items():
        module = module_of(path)
        for name, code in codes.items():
            if module is None or (chosen is not None and name not in chosen):
                continue
            status = STATUS.get(code, "suspicious")
            for tally in (per_module[module], per_file[path]):
                tally[status] += 1
                if status != "not run" and name not in text:
                    tally["code " + status] += 1
    lines = [f"{'module':<12} {'tried':>6} {'killed':>7} {'survived':>9} {'no tests':>9} {'other':>6} {'score':>7}"
             f"   {'score, text-only mutants apart':>30}"]
    scores = {}
    for module in MODULES:
        c = per_module.get(module)
        if not c:
            continue
        tried = sum(c[s] for s in ("killed", "survived", "no tests", "suspicious"))
        code = sum(c["code " + s] for s in ("killed", "survived", "no tests", "suspicious"))
        scores[module] = 100 * c["killed"] / tried if tried else 0.0
        apart = f"{100 * c['code killed'] / code:.1f}% of {code}" if code else "n/a"
        lines.append(f"{module:<12} {tried:>6} {c['killed']:>7} {c['survived']:>9} {c['no tests']:>9} "
                     f"{c['suspicious']:>6} {scores[module]:>6.1f}%   {apart:>30}")
        for path in sorted(p for p in per_file if module_of(p) == module):
            f = per_file[path]
            n = sum(f[s] for s in ("killed", "survived", "no tests", "suspicious"))
            lines.append(f"  {path:<40} {n:>5} {100 * f['killed'] / n if n else 0:>6.1f}%")
    return "\n".join(lines), scores


def write_survivors(workdir: Path, found: dict, chosen: set[str] | None, target: Path, log: Path) -> None:
    names = [n for codes in found.values() for n, c in codes.items()
             if STATUS.get(c) in ("survived", "no tests") and (chosen is None or n in chosen)]
    with open(target, "w") as out:
        for name in sorted(names):
            diff = subprocess.run([str(Path(sys.executable).with_name("mutmut")), "show", name], cwd=workdir,
                                  capture_output=True, text=True).stdout
            out.write(f"## {name}\n{diff}\n")
    print(f"{len(names)} survivors written to {target}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modules", default=",".join(MODULES), help="core modules to mutate (comma-separated)")
    p.add_argument("--sample", type=int, help="a random sample of this many mutants per module (default: all)")
    p.add_argument("--seed", type=int, default=1, help="the sample's seed (the same seed, the same mutants)")
    p.add_argument("--mutants-from", type=Path, help="run only the mutants named in this file (one per line), e.g. "
                                                     "the survivors of an earlier run")
    p.add_argument("--ci", action="store_true", help="the CI sample: %s" % ", ".join(CI_FILES))
    p.add_argument("--ref", help="mutate this commit instead of the working tree (e.g. main, to compare)")
    p.add_argument("--workdir", type=Path, default=ROOT / ".mutation", help="scratch copy (default .mutation/)")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    p.add_argument("--timeout", type=float, help="stop mutmut after this many seconds (the score counts what ran)")
    p.add_argument("--fail-under", type=float, help="exit 1 when a module's score is below this percentage")
    p.add_argument("--survivors", type=Path, help="write each surviving mutant's diff to this file")
    args = p.parse_args(argv)

    modules = [m.strip() for m in args.modules.split(",") if m.strip()]
    unknown = [m for m in modules if m not in MODULES]
    if unknown:
        p.error(f"unknown module(s) {unknown}: choose from {', '.join(MODULES)}")
    if args.ci:
        only, tests, deselect = CI_FILES, CI_TESTS, []
        args.sample = args.sample or CI_SAMPLE
    else:
        only = [g for m in modules for g in MODULES[m]]
        deselect = LEFT_OUT_TESTS
    workdir = args.workdir.resolve()
    started = time.monotonic()
    copy_tree(workdir, args.ref)
    if not args.ci:
        tests = sorted(str(t.relative_to(workdir)) for t in (workdir / "tests").glob("test_*.py")
                       if str(t.relative_to(workdir)) not in LEFT_OUT_FILES)
    configure(workdir, only, tests, deselect)
    log = workdir / "mutmut.log"
    print(f"mutating {', '.join(only)} in {workdir} (log: {log})", flush=True)

    chosen = None
    names: list[str] = []
    if args.mutants_from:
        names = [n.strip() for n in args.mutants_from.read_text().splitlines() if n.strip()]
        chosen = set(names)
    elif args.sample:
        generate(workdir)
        rng = random.Random(args.seed)
        by_module = defaultdict(list)
        for path, codes in results(workdir).items():
            if (module := module_of(path)) is not None:
                by_module[module] += sorted(codes)
        for module in sorted(by_module):
            pool = by_module[module]
            names += rng.sample(pool, min(args.sample, len(pool)))
        chosen = set(names)
        print(f"sample of {len(names)} mutants (seed {args.seed})", flush=True)
    code = mutmut(workdir, ["run", "--max-children", str(args.jobs), *names], log, args.timeout)
    if code not in (0, 124):
        print(f"mutmut exited with {code}: see {log}")
        print(log.read_text()[-3000:])
        return 2
    found = results(workdir)
    tried = [n for codes in found.values() for n, c in codes.items()
             if c is not None and (chosen is None or n in chosen)]
    text = {n for n, d in diffs(workdir, tried).items() if text_only(d)}
    report, scores = table(found, chosen, text)
    print(report)
    print(f"{len(text)} of the {len(tried)} mutants tried change only the text of a string (a message, a label)")
    print(f"({time.monotonic() - started:.0f} s{', stopped at the time limit' if code == 124 else ''})")
    if args.survivors:
        write_survivors(workdir, found, chosen, args.survivors, log)
    low = {m: s for m, s in scores.items() if args.fail_under is not None and s < args.fail_under}
    if low:
        print(f"below {args.fail_under}%: " + ", ".join(f"{m} {s:.1f}%" for m, s in low.items()))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
