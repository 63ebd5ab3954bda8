"""The import graph of pipeline/: no circles between modules, and no import back up the stage order.

Drawn from the source with ast (every import: at module level and inside functions, which run as surely, only
later), so that nothing needs importing torch or Ray.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"

# A module may import modules of its own layer and of the layers before it, never of a later one. The order is
# what each stage needs of the others, the charter's data flow (config -> plan -> scheduler -> worker -> store ->
# readers) read as dependencies: first what everything shares (the errors, the command lines printed for users);
# the config layer, whose typed values every stage receives and which itself imports no stage; the store and the
# models, formats and architectures that know nothing of how they are used; the engine, which optimizes images
# of a model (and encodes them as the store does); execution, which plans the engine's work, runs it and records
# it in the store; analysis and the views, which read what the store holds (and may ask the engine to measure);
# and on top the commands, which wire the stages together. A name is a module and, for a package, the modules
# in it; ``pipeline`` is only the package's own __init__.
LAYERS = (
    ("pipeline", "pipeline.errors", "pipeline.shell", "pipeline._torchvision_compat"),
    ("pipeline.config",),
    ("pipeline.store", "pipeline.models"),
    ("pipeline.engine",),
    ("pipeline.execution",),
    ("pipeline.analysis", "pipeline.views"),
    ("pipeline.cli", "pipeline.commands", "pipeline.__main__"),
)



def modules(package: Path) -> dict[str, Path]:
    root = package.parent
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:``, which only a type checker runs."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (a package's own ``__init__`` counts as the package)."""
    found = modules(package)
    graph: dict[str, set[str]] = {name: set() for name in found}
    for name, path in found.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in found:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    # ``from pipeline.engine import spectra`` names the package and the module: keep the module only.
    for name, targets in graph.items():
        graph[name] = {t for t in targets if not any(other.startswith(f"{t}.") for other in targets)} or targets
    return graph


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, layer in enumerate(LAYERS) for prefix in layer
               if module == prefix or (prefix != "pipeline" and module.startswith(f"{prefix}."))]
    if not matches:
        raise AssertionError(f"{module} is in no layer of tests/test_imports.py's LAYERS: place it there")
    return max(matches)[1]


def back_imports(graph: dict[str, set[str]]) -> list[str]:
    layers = {module: layer_of(module) for module in graph}  # every module has its place
    return sorted(f"{module} -> {target}" for module, targets in graph.items() for target in targets
                  if layers[target] > layers[module])


def circles(graph: dict[str, set[str]]) -> set[frozenset[str]]:
    """The modules of each strongly connected component of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()
    counter = itertools.count()

    def visit(module: str) -> None:
        index[module] = low[module] = next(counter)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.add(frozenset(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return found


def test_no_module_imports_back_up_the_stage_order():
    assert back_imports(import_graph(PACKAGE)) == []


def test_no_modules_import_each_other_in_a_circle():
    found = circles(import_graph(PACKAGE))
    assert not found, sorted(sorted(circle) for circle in found)


def test_the_checks_find_a_planted_back_import_and_circle(tmp_path):
    package = tmp_path / "pipeline"
    files = {
        "__init__.py": "",
        "errors.py": "",
        "config.py": "from pipeline.errors import *\n",
        "engine/__init__.py": "",
        "engine/optimize.py": "from pipeline.config import *\nfrom . import parameterizations\n",
        "engine/parameterizations.py": "def create():\n    from pipeline.engine.optimize import visualize\n",
        "store/__init__.py": "",
        "store/store.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipeline.engine import optimize\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    graph = import_graph(package)
    assert back_imports(graph) == []  # the TYPE_CHECKING import runs never
    assert circles(graph) == {frozenset({"pipeline.engine.optimize", "pipeline.engine.parameterizations"})}
    (package / "config.py").write_text("def paper():\n    import pipeline.engine.optimize\n")  # a function's too
    graph = import_graph(package)
    assert back_imports(graph) == ["pipeline.config -> pipeline.engine.optimize"]
    assert any({"pipeline.config", "pipeline.engine.optimize"} <= circle for circle in circles(graph))
    (package / "unplaced.py").write_text("")
    with pytest.raises(AssertionError, match="pipeline.unplaced is in no layer"):
        back_imports(import_graph(package))
