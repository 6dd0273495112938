"""The code's shape: small modules, a one-way import graph, no reaching into private names."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fedad"
MAX_LINES = 450
CONTRACTS = REPO / "tests" / "test_flower_contracts.py"
MARKER = re.compile(r"#\s*flower-internal:\s*(test_\w+)")
MODULES = sorted(PACKAGE.rglob("*.py"))
# Documented public functions that Python spells with an underscore.
PUBLIC = {"os._exit"}


def _name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


NAMES = {_name(p): p for p in MODULES}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_is_a_big_room(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(REPO)} has {lines} lines (> {MAX_LINES})"


def _imports(path: Path) -> set[str]:
    """The fedad modules ``path`` imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in NAMES}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in NAMES else node.module)
    return {m for m in found if m in NAMES and m != _name(path)}


def test_the_import_graph_has_no_cycle():
    graph = {name: _imports(path) for name, path in NAMES.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            cycle = " -> ".join([*stack[stack.index(name) :], name])
            pytest.fail(f"import cycle: {cycle}")
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*stack, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def _private_uses(path: Path) -> list[tuple[int, str]]:
    """``(line, text)`` of each private name of another module that ``path`` uses.

    Imports of ``_name`` from another module, and attribute access ``x._name`` on
    anything but ``self`` or ``cls`` (``super()._name`` included: an override of a
    private method relies on it).
    """
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _private(a.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if ast.unparse(node) in PUBLIC:
                continue
            found.append((node.lineno, ast.unparse(node)))
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


@pytest.mark.parametrize(
    "path",
    [*MODULES, *sorted((REPO / "scripts").glob("*.py"))],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_no_private_name_of_another_module_is_used(path):
    """A Flower internal is allowed with a comment naming its contract test, nothing else."""
    lines = path.read_text().splitlines()
    contracts = set(re.findall(r"^def (test_\w+)", CONTRACTS.read_text(), re.M))
    for number, text in _private_uses(path):
        near = " ".join(lines[max(0, number - 2) : number])
        marker = MARKER.search(near)
        where = f"{path.relative_to(REPO)}:{number}"
        assert marker, f"{where} uses a private name ({text}) with no contract test named"
        assert marker.group(1) in contracts, (
            f"{where} names {marker.group(1)}, which tests/test_flower_contracts.py lacks"
        )
