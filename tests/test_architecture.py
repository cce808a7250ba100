"""The layering of docs/architecture.md: every module imports only layers at or below its own (imports inside
functions count), nothing below the views imports them, and the package has no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nbgpu"
LAYERS = {  # module (dotted, without "nbgpu.") or package prefix -> layer
    "errors": 0, "units": 0, "files": 0, "checks": 0,
    "devices": 1,
    "visibility": 2, "gpu_table": 2, "kernels": 2, "occupancy": 2,
    "planning": 3,
    "running": 4,
    "monitoring": 5,
    "views": 6,
    "__init__": 7, "__main__": 7, "magics": 7, "tour": 7, "server": 7, "server_extension": 7, "course": 7,
}


def layer_of(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(f"nbgpu.{module} has no layer in docs/architecture.md (add it to the table and to LAYERS)")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """nbgpu modules that `name` imports anywhere in its file (relative and absolute imports)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "nbgpu":
                target = node.module.split(".")[1:]
            else:
                continue
            stem = ".".join(target)
            for alias in node.names:  # `from . import memory` names a module; `from .plan import Plan` does not
                sub = f"{stem}.{alias.name}" if stem else alias.name
                found.add(sub if sub in known else stem)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "nbgpu":
                    found.add(".".join(alias.name.split(".")[1:]))
    return {m for m in found if m and m in known and m != name}


GRAPH = {name: imports(name, path, set(modules())) for name, path in modules().items()}


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_a_module_imports_only_its_layer_and_those_below(name):
    mine = layer_of(name if name else "__init__")
    above = sorted(m for m in GRAPH[name] if layer_of(m) > mine)
    assert not above, f"nbgpu.{name} (layer {mine}) imports higher layers: {above}"


def test_only_the_views_and_entry_points_import_the_views():
    offenders = sorted(n for n, deps in GRAPH.items() if layer_of(n) < 6 and any(layer_of(d) == 6 for d in deps))
    assert offenders == []


def test_the_package_has_no_import_cycle():
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node, stack):
        state[node] = 1
        for dep in sorted(GRAPH[node]):
            if state.get(dep) == 1:
                cycle.extend(stack[stack.index(dep):] + [dep])
                return True
            if state.get(dep) is None and visit(dep, [*stack, dep]):
                return True
        state[node] = 2
        return False

    for name in sorted(GRAPH):
        if state.get(name) is None and visit(name, [name]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_layer_table_covers_every_module():
    for name in GRAPH:
        layer_of(name or "__init__")
