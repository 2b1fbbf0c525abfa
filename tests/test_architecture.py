"""The layout's promises, read from the source with ast: imports flow one way and never in a circle.

Layers, lowest first (a module may import its own layer and the ones below):

    utils/  <  model/, dataset/  <  engine/  <  uda/, reporting/  <  cli/  <  scripts  <  bench/

utils/ holds leaves (seeding, file writes, logging); dataset/ knows nothing of model/; uda/ (the
methods) and reporting/ (the main job's pipeline, tables, plots) know nothing of each other. Every
import counts, also one inside a function: a lazy import is still a dependency of the design.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_LAYERS = {"utils": 0, "model": 1, "dataset": 1, "engine": 2, "uda": 3, "reporting": 3, "cli": 4}
SCRIPT_LAYER, BENCH_LAYER = 5, 6
# Same-layer pairs that must stay apart: (importer, imported).
FORBIDDEN = {("dataset", "model"), ("uda", "reporting"), ("reporting", "uda")}
MAX_LINES = 500


def project_modules():
    """{dotted module name: path} of every Python file of the project outside tests/."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in ("tests", "data", "runs", "results") or relative.parts[0].startswith("."):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(path, modules):
    """The project modules that ``path`` imports (a package's __init__ for ``from pkg import name``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph():
    modules = project_modules()
    return {name: imported_modules(path, modules) - {name} for name, path in modules.items()}


def layer(module):
    top = module.split(".")[0]
    if top in PACKAGE_LAYERS:
        return PACKAGE_LAYERS[top]
    return BENCH_LAYER if top == "bench" else SCRIPT_LAYER


def upward_imports(graph):
    bad = []
    for module, imports in graph.items():
        for imported in imports:
            pair = (module.split(".")[0], imported.split(".")[0])
            if layer(imported) > layer(module) or pair in FORBIDDEN:
                bad.append(f"{module} imports {imported}")
    return sorted(bad)


def cycles(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in graph.get(node, ()):
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_imports_flow_from_scripts_down_to_utils():
    assert upward_imports(import_graph()) == []


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_production_file_over_500_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in project_modules().items()}
    assert {name: count for name, count in long.items() if count > MAX_LINES} == {}


# The checker itself, on hand-made graphs: it must see what it promises to see.
@pytest.mark.parametrize("graph, expected", [
    ({"engine.trainer": {"cli.options"}}, ["engine.trainer imports cli.options"]),
    ({"utils.seed": {"model"}}, ["utils.seed imports model"]),
    ({"dataset.common": {"model.bisenet"}}, ["dataset.common imports model.bisenet"]),
    ({"uda.dacs": {"reporting.report"}}, ["uda.dacs imports reporting.report"]),
    ({"bench.speed": {"eval"}, "eval": {"cli.entry"}, "cli.entry": {"engine.trainer"}}, []),
])
def test_upward_imports_are_found(graph, expected):
    assert upward_imports(graph) == expected


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_imports_are_read_from_the_source(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("import os\nfrom model import build_bisenet\n\ndef late():\n    from engine.trainer import Trainer\n")
    modules = {"model": None, "model.bisenet": None, "engine.trainer": None}
    assert imported_modules(source, modules) == {"model", "engine.trainer"}
