"""Every runtime dependency is declared: the package's own third-party imports, and numpy,
which safetensors.torch.save_file needs for every export write."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "ipa_export"
# Imports that only run when an optional feature is used, and the extra that provides them.
OPTIONAL = {"gemmi": "structure", "flash_attn": "cuda", "pyarrow": "parquet", "tqdm": "structure", "ray": "ray"}


def declared() -> dict[str | None, set[str]]:
    """Requirement names by extra (None: the core dependencies), normalised as on PyPI."""
    found: dict[str | None, set[str]] = {}
    for requirement in requires("ipa-export") or []:
        name = re.split(r"[\s;<>=!~\[]", requirement, maxsplit=1)[0]
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)", requirement)
        found.setdefault(extra and extra.group(1), set()).add(_normalise(name))
    return found


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"ipa_export", "__future__"}


def test_every_import_is_a_declared_dependency():
    requirements = declared()
    distributions = packages_distributions()
    for module in sorted(third_party_imports()):
        extra = OPTIONAL.get(module)
        wanted = requirements.get(extra, set())
        names = {_normalise(d) for d in distributions.get(module, [module])}
        assert names & wanted, f"{module}: imported by ipa_export, not declared in {extra or 'dependencies'}"


def test_numpy_is_a_core_dependency():
    assert "numpy" in declared()[None]
