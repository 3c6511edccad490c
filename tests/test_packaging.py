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


def _unit_imports() -> dict[tuple[str, str], list[str]]:
    """{(unit, unit it imports): [where]} over every import statement of the package, module level or not.
    A unit is a top-level module or subpackage of align_decode (decoding, kernels, rewards, ...)."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in (ROOT / "align_decode").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        package = parts[:-1]  # the package a relative import starts from
        if parts[-1] == "__init__":
            parts = parts[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
            elif isinstance(node, ast.Import):
                target = node.names[0].name
            else:
                continue
            if not target or not target.startswith("align_decode.") or len(parts) < 2:
                continue
            a, b = parts[1], target.split(".")[1]
            if a != b:
                edges.setdefault((a, b), []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return edges


def test_no_import_cycle_between_units():
    edges = _unit_imports()
    assert ("decoding", "kernels") in edges  # the scan sees imports
    cycles = [(a, b, edges[(a, b)][0], edges[(b, a)][0]) for a, b in edges if (b, a) in edges and a < b]
    assert not cycles, cycles
