"""The package's layers: core below the roles, the roles below one CLI, no cycle anywhere.

Every import is read from the source (function-level ones included), so a lazy import cannot
hide a cycle or an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import REPO

PACKAGE = REPO / "p2p_mirror"
# What each layer may import from the package, besides itself and ``p2p_mirror`` (the version).
ALLOWED = {
    "core": {"core"},
    "agent": {"core", "agent"},
    "seeder": {"core", "seeder"},
    "tracker": {"core", "tracker"},
    "installer": {"core", "installer"},
    "status": {"core", "status"},
    "cli": {"core", "agent", "seeder", "tracker", "installer", "status", "cli"},
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every absolute module this file imports, at any depth of the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {imp for imp in imports_of(path) if imp in modules and imp != name}
        for name, path in modules.items()
    }


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle() -> None:
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()) or [])}"


def test_no_upward_import() -> None:
    bad = []
    for module, deps in graph().items():
        own = layer(module)
        if own == "":
            continue
        allowed = ALLOWED[own] | {own}
        for dep in deps:
            if dep != "p2p_mirror" and layer(dep) not in allowed:
                bad.append(f"{module} imports {dep}")
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("forbidden", ["lab", "tests", "support", "bench"])
def test_product_never_imports_the_lab_or_tests(forbidden: str) -> None:
    users = [
        module_name(p)
        for p in PACKAGE.rglob("*.py")
        if any(i == forbidden or i.startswith(f"{forbidden}.") for i in imports_of(p))
    ]
    assert users == []


def test_the_checker_finds_a_cycle_and_an_upward_import() -> None:
    """The checks above can fail: a planted cycle and a planted core->agent edge are seen."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("p2p_mirror.core.config") == "core"
    assert "agent" not in ALLOWED["core"]
