"""The package's modules import one another one way only: no module reaches itself through
its imports, counting the imports made inside functions (which hide a circle, not remove it)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "diffbox"


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            # `from .pkg import module` names a module; `from .module import name` does not.
            for candidate in [*(f"{target}.{alias.name}" for alias in node.names), target]:
                if candidate in modules and candidate != name:
                    found.add(candidate)
                    break
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
    return found


def _graph() -> dict[str, set[str]]:
    paths = {_module(path): path for path in PACKAGE.rglob("*.py")}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = 1
        path.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        state[name] = 2
        path.pop()
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_no_module_imports_itself_through_others() -> None:
    circle = _circle(_graph())
    assert circle is None, " -> ".join(circle or [])


def test_the_check_sees_an_import_inside_a_function() -> None:
    graph = _graph()
    # transports imports local inside connect(); local no longer imports transports.
    assert "diffbox.client.local" in graph["diffbox.client.transports"]
    assert "diffbox.client.display" in graph["diffbox.client.cli"]
    assert _circle({**graph, "diffbox.client.local": {"diffbox.client.transports"}}) is not None
