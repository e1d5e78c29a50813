"""``/docs`` and ``/redoc`` work with no network: the service serves Swagger UI and ReDoc itself.

The browser test drives Debian's chromium (``apt-get install chromium``; ``.ci/run`` installs it)
with every request outside 127.0.0.1 refused, and leaves a screenshot in ``test-output/``.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import CHROMIUM, CHROMIUM_FLAGS, ServerThread
from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.server import create_app
from qwen3_rerank_plugins.server.offline_docs import DOCS_STATIC_URL

ROOT = Path(__file__).resolve().parents[1]
REDOC_CREDIT_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@pytest.fixture(scope="module")
def service(reranker: Reranker) -> Iterator[ServerThread]:
    with ServerThread(create_app(reranker)) as server:
        yield server


@pytest.mark.parametrize(
    ("page", "assets"),
    [
        ("/docs", ["swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"]),
        ("/redoc", ["redoc.standalone.js", "favicon.png"]),
    ],
)
def test_the_pages_name_only_files_of_the_service(
    service: ServerThread, page: str, assets: list[str]
) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as http:
        html = http.get(page)
        assert html.status_code == 200
        urls = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html.text)
        urls += re.findall(r"""url:\s*['"]([^'"]+)['"]""", html.text)
        assert urls and all(u.startswith("/") for u in urls), urls  # nothing from another host
        assert "cdn" not in html.text.lower() and "fonts.googleapis" not in html.text
        for name in assets:
            asset = http.get(f"{DOCS_STATIC_URL}/{name}")
            assert asset.status_code == 200, name
            assert len(asset.content) > 1000, name
        assert http.get("/openapi.json").json()["paths"]["/v1/rerank"]


def test_the_docs_pages_are_not_in_the_schema(service: ServerThread) -> None:
    paths = httpx.get(f"{service.url}/openapi.json", timeout=30).json()["paths"]
    assert not {"/docs", "/redoc"} & set(paths)
    assert not [p for p in paths if p.startswith(DOCS_STATIC_URL)]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_docs_render_in_headless_chromium_with_no_network(service: ServerThread) -> None:
    from playwright.sync_api import Route, sync_playwright

    out_dir = ROOT / "test-output"
    out_dir.mkdir(exist_ok=True)
    refused: list[str] = []

    def only_the_service(route: Route) -> None:
        if route.request.url.startswith(service.url):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort("internetdisconnected")

    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            headless=True,
            offline=False,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            browser.route("**/*", only_the_service)
            page = browser.new_page()
            page.goto(f"{service.url}/docs", wait_until="networkidle", timeout=60_000)
            page.wait_for_selector(".swagger-ui .opblock", timeout=60_000)
            swagger_title = page.inner_text(".swagger-ui .info .title")
            operations = page.locator(".swagger-ui .opblock-summary-path").all_inner_texts()
            errors = page.locator(".swagger-ui .errors-wrapper").count()
            page.screenshot(path=str(out_dir / "docs.png"), full_page=False)

            page.goto(f"{service.url}/redoc", wait_until="networkidle", timeout=60_000)
            page.wait_for_selector("h1", timeout=60_000)
            redoc_title = page.inner_text("h1")
            page.screenshot(path=str(out_dir / "redoc.png"), full_page=False)
        finally:
            browser.close()

    # Nothing outside the service was needed. The one request ReDoc makes on its own is the
    # "API docs by Redocly" credit's logo, an <img> in its sidebar footer that simply stays empty.
    assert [u for u in refused if u != REDOC_CREDIT_LOGO] == []
    assert "Qwen3-Reranker service" in swagger_title
    assert "/v1/rerank" in [o.replace("\u200b", "").strip() for o in operations]
    assert errors == 0
    assert "Qwen3-Reranker service" in redoc_title
    assert (out_dir / "docs.png").stat().st_size > 10_000
