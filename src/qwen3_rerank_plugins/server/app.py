"""The FastAPI application: rerank endpoints, health, models, metrics.

Endpoints (see ``docs/serving.md`` for the full contract):

* ``POST /v1/rerank`` (also ``/rerank`` and ``/v2/rerank``): the rerank API that Cohere, Jina
  and vLLM clients speak. ``/rerank`` also answers text-embeddings-inference clients, which send
  ``texts`` instead of ``documents``.
* ``POST /rank``: ``{query, documents: [{id, text}]}`` -> ``{results: [{id, score, band}]}``.
* ``GET /health``: 503 while the model loads, 200 once it serves.
* ``GET /v1/models``: OpenAI-style list holding the served model.
* ``GET /metrics``: Prometheus metrics of this app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..server_defaults import ServiceConfig
from .handlers import check_bearer, rank_response, read_json, rerank_response
from .metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from .openapi import build_openapi
from .schemas import RequestError, error_body
from .service import RerankService

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")
_KNOWN_PATHS = frozenset({*_RERANK_PATHS, "/rank", "/health", "/v1/models", "/metrics"})


def create_app(
    reranker_or_factory: Any,
    config: ServiceConfig | None = None,
    *,
    on_load_error: Callable[[BaseException], None] | None = None,
    **options: Any,
) -> FastAPI:
    """Build the rerank service around a loaded reranker or a function that loads one.

    Args:
        reranker_or_factory: A loaded :class:`~qwen3_rerank_plugins.Reranker`, or a
            zero-argument callable returning one. A callable runs in a worker thread when the app
            starts, so the server answers ``/health`` (503) while the model loads.
        config: The service's settings (default: :class:`ServiceConfig`'s defaults).
        on_load_error: Called with the exception if loading the model fails (the command line
            uses it to stop the server with an error).
        **options: Settings that replace ``config``'s, by :class:`ServiceConfig` field name
            (``api_key``, ``max_documents``, ``max_body_bytes``, ``body_timeout``,
            ``max_request_tokens``, ``bands``, ``batch_wait_ms``, ``max_batch_pairs``,
            ``max_queue``, ``model_name``).

    Returns:
        The FastAPI application; its :class:`~.service.RerankService` is ``app.state.service``.

    Raises:
        ValueError, TypeError: A setting out of range, or an unknown one.

    Example:
        >>> from qwen3_rerank_plugins import get_reranker
        >>> app = create_app(lambda: get_reranker("Qwen/Qwen3-Reranker-0.6B"))  # doctest: +SKIP
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    config = (config or ServiceConfig()).with_options(**options) if options else (config or ServiceConfig())
    service = RerankService(reranker_or_factory, config, on_load_error=on_load_error)
    metrics = service.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="Qwen3-Reranker service",
        summary="Rerank documents for a query with Qwen3-Reranker (Cohere/Jina/vLLM-compatible /v1/rerank).",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = service
    if config.body_timeout is not None:
        app.add_middleware(_BodyTimeoutMiddleware, timeout=float(config.body_timeout))
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # outermost: counts the 408s too

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), status_code=exc.status_code, type="http_error"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    def check_auth(request: Request) -> None:
        check_bearer(request.headers.get("authorization"), config.api_key)

    @app.get("/health", summary="503 while the model loads, 200 once it serves")
    async def health() -> JSONResponse:
        status, body, headers = service.health()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/v1/models", summary="OpenAI-style list of the served model")
    async def models(request: Request) -> JSONResponse:
        check_auth(request)
        return JSONResponse(service.models())

    async def rerank(request: Request) -> Response:
        check_auth(request)
        body = await read_json(request, config.max_body_bytes)
        payload = await service.serve_request(
            request,
            lambda score: rerank_response(
                body,
                path=request.url.path,
                score=score,
                max_documents=config.max_documents,
                model_name=service.model_name,
                default_instruction=service.default_instruction,
            ),
        )
        return JSONResponse(payload)

    for path in _RERANK_PATHS:
        app.add_api_route(
            path,
            rerank,
            methods=["POST"],
            summary="Rerank documents (Cohere / Jina / vLLM / Infinity request and response shape)"
            + ("; with `texts`, text-embeddings-inference's" if path == "/rerank" else ""),
        )

    @app.post("/rank", summary="Rank {id, text} records; results carry ids, scores and bands")
    async def rank(request: Request) -> JSONResponse:
        check_auth(request)
        body = await read_json(request, config.max_body_bytes)
        payload = await service.serve_request(
            request,
            lambda score: rank_response(
                body,
                score=score,
                bands=config.bands,
                max_documents=config.max_documents,
                model_name=service.model_name,
                default_instruction=service.default_instruction,
            ),
        )
        return JSONResponse(payload)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """FastAPI's document completed with the request and response schemas (see :mod:`.openapi`)."""
        if app.openapi_schema is None:
            base = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            app.openapi_schema = build_openapi(
                base, api_key=config.api_key is not None, max_documents=config.max_documents
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _error_response(exc: RequestError) -> JSONResponse:
    return JSONResponse(
        error_body(exc.message, status_code=exc.status_code, param=exc.param, type=exc.type),
        status_code=exc.status_code,
        headers=exc.headers or None,
    )


def _version() -> str:
    from .. import __version__

    return __version__


class _MetricsMiddleware:
    """Counts every HTTP response by endpoint and status and times it (pure ASGI, no buffering)."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in _KNOWN_PATHS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


class _BodyTimeoutMiddleware:
    """Cut a request whose body has not fully arrived ``timeout`` seconds after its headers.

    uvicorn has no such limit: a client that sends its headers and then trickles or stops its body
    would hold its connection and its request's task for ever. Each ``receive`` of the body waits
    at most until the request's deadline; past it the request is answered 408 ``body_timeout``
    (JSON) and its connection closed. Other requests are not held up: each has its own deadline.

    A response that starts before the body has fully arrived (401, 413) first reads and drops the
    rest of the body until the deadline, as nginx's lingering close does, so a client that is
    still sending gets its answer; one that has not finished by then gets it with
    ``Connection: close``.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], timeout: float) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        headers = dict(scope.get("headers", []))
        body_done = b"transfer-encoding" not in headers and headers.get(b"content-length", b"0") == b"0"
        # A client that sent "Expect: 100-continue" waits for leave to send its body: reading it
        # just to drop it would only waste its upload.
        drain = headers.get(b"expect", b"").lower() != b"100-continue"

        async def next_message() -> dict[str, Any]:
            """The next ``receive`` message; ``asyncio.TimeoutError`` past the deadline."""
            nonlocal body_done, drain
            drain = True
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def receive_in_time() -> dict[str, Any]:
            if body_done:  # only the disconnect is left to wait for: no deadline
                return await receive()
            try:
                return await next_message()
            except asyncio.TimeoutError:
                logger.info("request body not received within %g s; answering 408", self.timeout)
                raise RequestError(
                    f"the request body did not arrive within {self.timeout:g} s",
                    status_code=408,
                    type="body_timeout",
                    headers={"Connection": "close"},
                ) from None

        async def send_after_body(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start" and not body_done:
                with contextlib.suppress(asyncio.TimeoutError):
                    while drain and not body_done:
                        await next_message()
                if not body_done:
                    kept = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                    message = {**message, "headers": [*kept, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive_in_time, send_after_body)
