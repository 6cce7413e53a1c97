"""The package is layered without import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "ipa_export"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


MODULES = sorted(_module_name(path) for path in PACKAGE.rglob("*.py"))


def _runtime_imports(path: Path) -> set[str]:
    """Package modules that ``path`` imports when it runs (``if TYPE_CHECKING:`` blocks excluded)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        names = [f"{target}.{alias.name}" for alias in node.names]
        found |= {n for n in names if n in MODULES} or ({target} if target in MODULES else set())
    return found - {name}


def test_module_graph_has_no_cycles():
    graph = {_module_name(path): _runtime_imports(path) for path in PACKAGE.rglob("*.py")}
    # A package's __init__ may re-export its children; a child importing its parent package back is a cycle.
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node) :] + [node]))
        if node in done:
            return
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*stack, node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])


@pytest.mark.slow  # one interpreter (and torch import) per module
def test_every_module_imports_alone_in_a_fresh_interpreter():
    failures = {}
    for module in MODULES:
        result = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        if result.returncode:
            failures[module] = result.stderr.strip().splitlines()[-1]
    assert not failures, failures
