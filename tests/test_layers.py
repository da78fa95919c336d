"""The package's layers, read from the source: no module imports a higher layer, and no cycles.

Every ``import`` statement counts, also one inside a function or under ``TYPE_CHECKING``: a
lazy import is still a dependency. Docstring examples are text, not imports.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nograd"

# layer -> the module prefixes in it; a module belongs to the layer of its longest prefix
LAYERS: dict[str, tuple[str, ...]] = {
    "core": ("nograd.core",),
    "zo": ("nograd.zo",),
    "strategies": ("nograd.strategies",),
    "optim": ("nograd.optim",),
    "models": ("nograd.models",),
    "tasks": ("nograd.tasks",),
    "workbench": ("nograd.workbench",),
    "bench": ("nograd.bench",),
    "top": ("nograd", "nograd.cli", "nograd.__main__"),
}
ALGORITHMS = {"zo", "strategies", "optim"}
# what each layer may import besides itself (the README's "How the code is laid out")
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "zo": {"core"},
    "strategies": {"core"},
    "optim": {"core"},
    "models": {"core"},
    "tasks": {"core", "models"},
    "workbench": {"core", "models", "tasks"} | ALGORITHMS,
    "bench": {"core", "models", "tasks", "workbench"} | ALGORITHMS,
    "top": set(LAYERS),
}


def module_names(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every .py file under the package folder ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> Iterator[tuple[str, int]]:
    """(imported nograd module, line) for every import statement in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub if sub in modules else target), node.lineno


def layer_of(module: str) -> str | None:
    best, best_len = None, -1
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                if prefix == "nograd" and module != "nograd":
                    continue  # the root prefix names the package's __init__ only
                best, best_len = layer, len(prefix)
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def violations(root: Path) -> list[str]:
    """Every breach of the layering under the package folder ``root``, one line each."""
    modules = module_names(root)
    problems, graph = [], {}
    for name, path in modules.items():
        layer = layer_of(name)
        if layer is None:
            problems.append(f"{name} belongs to no layer (add it to LAYERS)")
            continue
        graph[name] = set()
        for target, line in imports_of(name, path, set(modules)):
            if not (target == "nograd" or target.startswith("nograd.")):
                continue
            graph[name].add(target)
            target_layer = layer_of(target)
            if target_layer != layer and target_layer not in MAY_IMPORT[layer]:
                problems.append(f"{name}:{line} ({layer}) imports {target} ({target_layer})")
    for component in _cycles(graph):
        problems.append("import cycle: " + " <-> ".join(component))
    return problems


def test_the_package_keeps_its_layers():
    assert violations(PACKAGE) == []


def test_every_layer_has_modules():
    names = module_names(PACKAGE)
    for layer in LAYERS:
        assert any(layer_of(n) == layer for n in names), layer


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    root = tmp_path / "nograd"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_lower_layer_importing_a_higher_one_is_caught(package_copy: Path):
    (package_copy / "core" / "offending.py").write_text(
        "def f():\n"
        "    from nograd.workbench.loop import train  # lazy, still a dependency\n"
        "    return train\n"
    )
    (package_copy / "strategies" / "uses_zo.py").write_text("from ..zo import MeZO\n")
    found = violations(package_copy)
    assert any("nograd.core.offending:2 (core) imports nograd.workbench.loop" in p for p in found), found
    assert any("nograd.strategies.uses_zo:1 (strategies) imports nograd.zo" in p for p in found), found


def test_a_cycle_within_a_layer_is_caught(package_copy: Path):
    (package_copy / "workbench" / "ping.py").write_text("from nograd.workbench import pong\n")
    (package_copy / "workbench" / "pong.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from nograd.workbench.ping import x\n"
    )
    found = violations(package_copy)
    assert "import cycle: nograd.workbench.ping <-> nograd.workbench.pong" in found, found


def test_a_module_outside_every_layer_is_caught(package_copy: Path):
    (package_copy / "helpers.py").write_text("x = 1\n")
    assert "nograd.helpers belongs to no layer (add it to LAYERS)" in violations(package_copy)
