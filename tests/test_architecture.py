"""The package's shape: modules import only downward, and the torch-free layers stay torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "qwen3_rerank_plugins"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every package module that ``path`` imports, at the top or lazily inside a function."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("qwen3_rerank_plugins"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qwen3_rerank_plugins"))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # A parent package's __init__ runs before a submodule; it is not an edge of its own.
        graph[name] = {
            m for m in _imports(path) if m in modules and m != name and not name.startswith(m + ".")
        }
    return graph


def test_no_import_cycles_lazy_imports_included():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt):], nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize(
    "module",
    [
        "qwen3_rerank_plugins",
        "qwen3_rerank_plugins.client",
        "qwen3_rerank_plugins.remote",
        "qwen3_rerank_plugins.fallback",
        "qwen3_rerank_plugins.templates",
        "qwen3_rerank_plugins.scoring",
        "qwen3_rerank_plugins.server_defaults",
        "qwen3_rerank_plugins.settings",
        "qwen3_rerank_plugins.registry",
        "qwen3_rerank_plugins._adapters",
        "qwen3_rerank_plugins.batch",
    ],
)
def test_torch_free_layers_do_not_load_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lower_layers_never_import_upper_ones():
    graph = _graph()
    lower = ["validation", "results", "templates", "settings", "protocol", "generalize", "fallback", "client"]
    upper = {"engine", "backend", "registry", "remote", "server", "ray_serve", "ui", "evaluate", "cli"}
    for name in lower:
        imported = {m.split(".")[1] for m in graph[f"qwen3_rerank_plugins.{name}"] if m.count(".") >= 1}
        assert not imported & upper, f"{name} imports {imported & upper}"
