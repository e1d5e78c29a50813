"""``/docs`` and ``/redoc`` that work on an air-gapped server: no CDN, the files come from a package.

FastAPI's default documentation pages load Swagger UI and ReDoc from a public CDN, so offline
they are blank. :func:`serve_docs_offline` replaces them with the same pages whose JavaScript,
CSS and icon the service itself serves, from the files the ``fastapi-offline`` package ships
(a dependency of the ``[server]`` extra). It follows FastAPI's recipe for self-hosted docs
(``get_swagger_ui_html`` / ``get_redoc_html`` pointed at local files).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from .._optional import require

__all__ = ["DOCS_STATIC_URL", "docs_static_dir", "serve_docs_offline"]

#: Where the Swagger UI and ReDoc files are served.
DOCS_STATIC_URL = "/docs-static"


def docs_static_dir() -> Path:
    """The folder holding ``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js``.

    Raises:
        ImportError: Naming the ``[server]`` extra, when ``fastapi-offline`` is not installed.
    """
    package = require("fastapi_offline", "server", "The service's offline /docs page")
    return Path(package.__file__).resolve().parent / "static"


def serve_docs_offline(app: FastAPI, static_url: str = DOCS_STATIC_URL) -> None:
    """Serve ``app``'s ``/docs`` and ``/redoc`` pages without any network access.

    The pages FastAPI registered at ``app.docs_url`` and ``app.redoc_url`` (if any) are replaced
    by ones that load their assets from ``static_url`` on the service itself. The OpenAPI
    document, the OAuth2 redirect page and every other route are left as they are.

    Args:
        app: The FastAPI application (call after creating it, before serving).
        static_url: Path prefix of the documentation assets.
    """
    static = docs_static_dir()
    docs_url, redoc_url, openapi_url = app.docs_url, app.redoc_url, app.openapi_url
    if openapi_url is None:
        return  # no schema, no documentation pages
    pages = {url for url in (docs_url, redoc_url) if url}
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) not in pages]
    app.mount(static_url, StaticFiles(directory=static), name="docs-static")

    def _root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    if docs_url:

        @app.get(docs_url, include_in_schema=False)
        async def swagger_ui(request: Request) -> HTMLResponse:
            root = _root(request)
            return get_swagger_ui_html(
                openapi_url=f"{root}{openapi_url}",
                title=f"{app.title} - Swagger UI",
                oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
                swagger_js_url=f"{root}{static_url}/swagger-ui-bundle.js",
                swagger_css_url=f"{root}{static_url}/swagger-ui.css",
                swagger_favicon_url=f"{root}{static_url}/favicon.png",
                swagger_ui_parameters=app.swagger_ui_parameters,
            )

    if redoc_url:

        @app.get(redoc_url, include_in_schema=False)
        async def redoc(request: Request) -> HTMLResponse:
            root = _root(request)
            return get_redoc_html(
                openapi_url=f"{root}{openapi_url}",
                title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{static_url}/redoc.standalone.js",
                redoc_favicon_url=f"{root}{static_url}/favicon.png",
                with_google_fonts=False,
            )
