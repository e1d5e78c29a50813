"""The published contract: ``/openapi.json`` declares every endpoint, and schemathesis agrees.

The schemathesis runs use its command line against the service served by uvicorn on 127.0.0.1,
with all of its checks, bounded in examples and time, once without and once with an API key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import ServerThread
from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.server import create_app

API_KEY = "openapi-key"
MAX_DOCUMENTS = 16
PATHS = {
    "/v1/rerank": "post",
    "/v2/rerank": "post",
    "/rerank": "post",
    "/rank": "post",
    "/health": "get",
    "/ready": "get",
    "/v1/models": "get",
    "/metrics": "get",
}
# The fuzzer's negative cases include too many documents; the service answers those 413, which the
# published schema declares (negative_data_rejection's default list lacks it).
SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "413", "422"]
"""


@pytest.fixture(scope="module", params=[None, API_KEY], ids=["open", "api-key"])
def served(request: pytest.FixtureRequest, reranker: Reranker) -> Iterator[tuple[ServerThread, str | None]]:
    app = create_app(reranker, api_key=request.param, max_documents=MAX_DOCUMENTS)
    with ServerThread(app) as server:
        yield server, request.param


def test_openapi_declares_bodies_responses_errors_and_auth(served: tuple[ServerThread, str | None]) -> None:
    server, key = served
    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    assert {path: next(iter(ops)) for path, ops in spec["paths"].items()} == PATHS
    schemas = spec["components"]["schemas"]
    for path, method in PATHS.items():
        operation = spec["paths"][path][method]
        statuses = set(operation["responses"])
        if method == "post":
            assert operation["requestBody"]["required"] is True
            assert {"200", "400", "408", "413", "422", "503"} <= statuses
            error = operation["responses"]["422"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorResponse"}
        protected = path not in ("/health", "/ready", "/metrics")
        assert ("401" in statuses) is (key is not None and protected)
        assert ("security" in operation) is (key is not None and protected)
    assert "503" in spec["paths"]["/health"]["get"]["responses"]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    rerank = schemas["RerankRequest"]
    assert set(rerank["required"]) == {"query", "documents"}
    assert rerank["properties"]["documents"]["maxItems"] == MAX_DOCUMENTS
    for field in (
        "rank_fields",
        "max_tokens_per_doc",
        "max_tokens_per_query",
        "return_documents",
        "instruction",
    ):
        assert field in rerank["properties"]
    assert set(schemas["TeiRerankRequest"]["required"]) == {"query", "texts"}
    assert set(schemas["RerankResponse"]["properties"]["usage"]["$ref"].split("/")[-1:]) == {"Usage"}
    assert set(schemas["Usage"]["required"]) == {"prompt_tokens", "total_tokens"}
    assert set(schemas["ErrorResponse"]["required"]) == {"error", "detail"}
    if key is None:
        assert "securitySchemes" not in spec["components"]
    else:
        assert spec["components"]["securitySchemes"]["bearerAuth"] == {
            "type": "http",
            "scheme": "bearer",
            "description": "serve --api-key",
        }


def _schemathesis() -> list[str]:
    st = shutil.which("st") or str(Path(sys.executable).with_name("st"))
    if not Path(st).exists():
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return [st]


def test_schemathesis_finds_nothing(served: tuple[ServerThread, str | None], tmp_path: Path) -> None:
    server, key = served
    config = tmp_path / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    command = [
        *_schemathesis(),
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "10",
        "--max-time",
        "20",
        "--seed",
        "16",
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    if key is not None:
        command += ["--header", f"Authorization: Bearer {key}"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])
        ),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "Selected: 8/8" in output and "Tested: 8" in output, output[-3000:]
    assert " passed" in output and "failures" not in output.split("SUMMARY")[-1].lower(), output[-3000:]


def test_each_model_is_defined_once_under_server() -> None:
    """One contract: no request or response shape is described twice (say, a dataclass beside
    a pydantic model of the same name)."""
    import ast
    from collections import Counter

    import qwen3_rerank_plugins.server as server

    names: Counter[str] = Counter()
    for path in Path(server.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names.update(node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef))
    assert names, "no classes found under server/"
    assert [name for name, count in names.items() if count > 1] == []
