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
                cycle = [*path[path.index(nxt) :], nxt]
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
        "qwen3_rerank_plugins.notices",
        "qwen3_rerank_plugins.tracing",
        "qwen3_rerank_plugins.plain_tokenizer",
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


# -- what a command imports ------------------------------------------------------------------------

#: Runs the CLI in-process for each argument list (``;``-separated on argv) and prints, as JSON, the
#: top-level packages then loaded and the transformers model families among them.
_RUN_CLI = """
import json, runpy, sys
for argv in sys.argv[1].split(";"):
    sys.argv = ["qwen3-rerank", *argv.split()]
    try:
        runpy.run_module("qwen3_rerank_plugins", run_name="__main__")
    except SystemExit:
        pass
models = [m.split(".") for m in sys.modules if m.startswith("transformers.models.")]
print(json.dumps({
    "top": sorted({m.split(".")[0] for m in sys.modules}),
    "families": sorted({parts[2] for parts in models if len(parts) >= 3}),
    "modules": sorted(m for m in sys.modules if m.startswith(("torch.", "transformers.", "scipy."))),
}))
"""

#: Nothing a model run needs; any of them in a ``rank`` run is start-up time wasted.
_SERVING_AND_OPTIONAL = {
    "fastapi", "uvicorn", "starlette", "pydantic", "prometheus_client", "gradio", "redis", "ray",
    "modelscope", "langchain_core", "langchain", "langchain_classic", "llama_index", "matplotlib",
    "pandas", "sklearn", "datasets", "torchvision", "torchaudio", "accelerate", "cohere", "django",
}  # fmt: skip


def _loaded_by(commands: list[list[str]], **env: str) -> dict:
    import json
    import os

    out = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, ";".join(" ".join(c) for c in commands)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_help_and_usage_errors_load_no_framework():
    # --help of every command, a usage error and a torch-free command answer at once: no torch,
    # transformers, numpy or server stack is imported for them.
    commands = [
        ["--help"],
        ["--version"],
        ["rank"],
        ["templates"],
        ["rank", "--demo", "--model", "m", "-q", "q"],
    ]
    commands += [
        [name, "--help"] for name in ("rank", "batch", "serve", "ui", "evaluate", "check", "templates")
    ]
    loaded = set(_loaded_by(commands)["top"])
    heavy = {
        "torch",
        "transformers",
        "numpy",
        "tokenizers",
        "huggingface_hub",
        "safetensors",
        "tqdm",
        "httpx",
    }
    assert not loaded & (heavy | _SERVING_AND_OPTIONAL), sorted(loaded & (heavy | _SERVING_AND_OPTIONAL))


#: Seconds of imports a model run does without: transformers' modelling stack (about 3.5 s on
#: 2 cores, with what it pulls in) is replaced by the package's own decoder (modeling.py).
_MODELLING_STACK = (
    "transformers.modeling_utils",
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.masking_utils",
    "torch._dynamo",
    "torch.distributed.tensor",
    "scipy.optimize",
)


def test_demo_rank_imports_only_what_scoring_needs(tiny_model_dir, tmp_path):
    # A `rank --demo` run imports torch and transformers' tokenizer, nothing of transformers'
    # modelling stack, the server, the page, the adapters or the hubs' clients, and no other
    # model family's code (an auto class that walked the model mapping would import dozens).
    import json
    import shutil

    target = tmp_path / "random-qwen3-reranker-tiny"
    shutil.copytree(tiny_model_dir, target)
    (target / ".complete").write_text(json.dumps({"size": "tiny", "random_weights": True}))
    docs = tmp_path / "docs.txt"
    docs.write_text("doc one\ndoc two\n", encoding="utf-8")
    loaded = _loaded_by(
        [["rank", "--demo", "-q", "q", "--docs", str(docs), "--quiet"]], QWEN3_RERANK_DEMO_CACHE=str(tmp_path)
    )
    assert {"torch", "transformers"} <= set(loaded["top"])
    assert not set(loaded["top"]) & _SERVING_AND_OPTIONAL, sorted(set(loaded["top"]) & _SERVING_AND_OPTIONAL)
    assert len(loaded["families"]) <= 4, loaded["families"]
    assert not set(loaded["modules"]) & set(_MODELLING_STACK), sorted(
        set(loaded["modules"]) & set(_MODELLING_STACK)
    )
