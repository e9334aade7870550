"""The library's imports: no circles, and nothing from server/, pipelines/ or notebooks/."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

ABOVE = ("server", "pipelines", "notebooks")  # they call workbench; workbench never calls them


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Module -> the workbench modules it imports (inside functions too, not TYPE_CHECKING
    blocks), and every import of a folder above the library."""
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges, upward = {m: set() for m in modules}, []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                if name.split(".")[0] in ABOVE:
                    upward.append(f"{module} imports {name}")
                target = resolve(name)
                if target and target != module and not module.startswith(target + "."):
                    edges[module].add(target)
    return edges, upward


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_library_imports_form_no_circles_and_never_reach_up():
    edges, upward = import_graph(REPO / "workbench")
    assert len(edges) > 40  # the walk found the library
    assert circles(edges) == []
    assert upward == []


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
    ],
)
def test_the_circle_finder_finds_a_circle(graph, expected):
    assert circles(graph) == expected


def test_the_refresh_and_the_scheduler_sit_above_what_they_call():
    edges, _ = import_graph(REPO / "workbench")
    assert {"workbench.status", "workbench.alerts"} <= edges["workbench.refresh"]
    assert "workbench.scheduler" in edges["workbench.pipelines"]
    assert "workbench.scheduler" in edges["workbench.sync.engine"]
    assert not {"workbench.pipelines", "workbench.sync"} & edges["workbench.scheduler"]
