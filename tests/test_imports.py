"""The import graph of orchestra/ is one-way (docs/architecture.md, "Import rules").

Computed from the source with ``ast``, function-level imports included (a lazy import is still a
dependency, and a cycle hidden behind one breaks the same way at run time). Only imports under
``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package name it installs as.
SOURCES = {ROOT / "orchestra": "orchestra"}

# Layer rules: a module under the key may not import anything under the listed prefixes.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "orchestra.kernels": ("orchestra.",),  # torch + triton only (its own submodules excepted below)
    "orchestra.model": (
        "orchestra.train",
        "orchestra.data",
        "orchestra.cli",
        "orchestra.report",
        "lightning",
        "hydra",
        "omegaconf",
        "wandb",
    ),
    "orchestra.data": ("orchestra.train", "orchestra.cli", "orchestra.report", "orchestra.model"),
    # register_configs imports Hydra inside the function: importing the schema never does.
    "orchestra.config": ("orchestra.train", "orchestra.data", "orchestra.cli", "orchestra.report"),
    "orchestra.io": ("orchestra.",),
    "orchestra.train": ("orchestra.cli",),
    # Evaluation sits below training (the in-training evaluation callback uses it): it reads
    # models through orchestra.model and data through orchestra.data, never the training loop.
    "orchestra.eval": ("orchestra.train", "orchestra.cli", "orchestra.report", "lightning", "hydra"),
    "orchestra.report": ("orchestra.train", "orchestra.cli", "orchestra.eval"),
    # Serving takes a loaded model (the CLI loads it through train's checkpoint reader) and the
    # tokenizer framing of eval's EvalModel; it never runs training, Lightning or Hydra.
    "orchestra.serve": ("orchestra.train", "orchestra.cli", "orchestra.report", "lightning", "hydra"),
    # The sweep runs trials as orchestra-train processes: it reads the training schema and the
    # pruning callback's storage helpers, never the training loop or the commands.
    "orchestra.sweep": (
        "orchestra.cli",
        "orchestra.eval",
        "orchestra.serve",
        "orchestra.report",
        "lightning",
    ),
}


def _module_name(path: Path) -> str:
    for folder, package in SOURCES.items():
        if path.is_relative_to(folder):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join([package, *parts])
    raise ValueError(path)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in SOURCES for p in folder.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    """ast.walk, but not into ``if TYPE_CHECKING:`` bodies (their ``else`` still runs)."""
    yield node
    if isinstance(node, ast.If) and _is_type_checking(node):
        children: list[ast.AST] = [node.test, *node.orelse]
    else:
        children = list(ast.iter_child_nodes(node))
    for child in children:
        yield from _walk(child)


def _imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every module name an AST imports (``from a import b`` yields ``a.b`` when that is a module)."""
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            yield base
            for alias in node.names:
                yield f"{base}.{alias.name}"


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = {t for t in _imports(tree, name, path.name == "__init__.py")}
        # Keep third-party names (for the layer rules) and orchestra names that are real modules.
        graph[name] = {t for t in targets if not t.startswith("orchestra") or t in modules} - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), among orchestra modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_there_are_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def _prefixed(name: str, prefix: str) -> bool:
    return name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer: str) -> None:
    graph = import_graph()
    bad = []
    for module, targets in graph.items():
        if not _prefixed(module, layer):
            continue
        for target in targets:
            if layer == "orchestra.kernels" and _prefixed(target, "orchestra.kernels"):
                continue
            if any(_prefixed(target, p) for p in FORBIDDEN[layer]):
                bad.append(f"{module} -> {target}")
    assert bad == [], f"{layer} imports what it must not: {bad}"


def test_the_checker_sees_cycles_and_lazy_imports(tmp_path: Path) -> None:
    """The checker itself: a lazy import closing a loop is a cycle; a TYPE_CHECKING one is not."""
    lazy = ast.parse("def f():\n    import orchestra.b\n")
    typed = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import orchestra.b\n")
    assert "orchestra.b" in set(_imports(lazy, "orchestra.a", False))
    assert "orchestra.b" not in set(_imports(typed, "orchestra.a", False))
    assert _cycles({"orchestra.a": {"orchestra.b"}, "orchestra.b": {"orchestra.a"}}) == [
        ["orchestra.a", "orchestra.b"]
    ]
    assert _cycles({"orchestra.a": {"orchestra.b"}, "orchestra.b": set()}) == []


def test_data_never_builds_a_train_config() -> None:
    """data/ takes the sections it needs (DataConfig, TaskConfig), never the root of a training job."""
    users = [
        name
        for name, path in _modules().items()
        if _prefixed(name, "orchestra.data")
        and any(
            isinstance(n, ast.Name) and n.id == "TrainConfig" for n in ast.walk(ast.parse(path.read_text()))
        )
    ]
    assert users == []
