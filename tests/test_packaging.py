"""What pyproject.toml promises matches the code: the Python it needs, and bounded dependency ranges."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Standard-library modules newer than Python 3.8, with the version that added them.
NEW_STDLIB = {"tomllib": (3, 11), "zoneinfo": (3, 9), "graphlib": (3, 9)}


def _imported_modules() -> set[str]:
    found = set()
    for path in (ROOT / "align_decode").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def test_requires_python_covers_the_standard_library_the_package_imports():
    minimum = tuple(int(x) for x in re.fullmatch(r">=\s*(\d+)\.(\d+)", PROJECT["requires-python"]).groups())
    needed = {name: version for name, version in NEW_STDLIB.items() if name in _imported_modules()}
    too_new = {name: version for name, version in needed.items() if version > minimum}
    assert not too_new, f"requires-python {PROJECT['requires-python']} but the package imports {too_new}"


def test_every_core_dependency_has_a_tested_range():
    """Lower and upper bounds for what the package stands on (CI tests both ends)."""
    specs = PROJECT["dependencies"] + PROJECT["optional-dependencies"]["triton"]
    for name in ("torch", "transformers", "numpy", "click", "triton"):
        spec = next(s for s in specs if re.match(rf"{name}\b", s))
        assert ">=" in spec and "<" in spec.replace("<=", "<"), f"{spec}: give a lower and an upper bound"
