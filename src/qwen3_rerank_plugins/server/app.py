"""The FastAPI application: rerank endpoints, health, models, metrics.

Endpoints (see ``docs/serving.md`` for the full contract):

* ``POST /v1/rerank`` (also ``/rerank`` and ``/v2/rerank``): the rerank API that Cohere, Jina
  and vLLM clients speak. ``/rerank`` also answers text-embeddings-inference clients, which send
  ``texts`` instead of ``documents``.
* ``POST /rank``: ``{query, documents: [{id, text}]}`` -> ``{results: [{id, score, band}]}``.
* ``GET /health``: 503 while the model loads, 200 once it serves (however busy).
* ``GET /ready``: 200 when a request sent now would be admitted, 503 when it would be refused.
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
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute, APIRouter
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Discriminator, Tag
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..server_defaults import ServiceConfig
from .handlers import rank_response, rerank_response, too_large
from .metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from .offline_docs import serve_docs_offline
from .responses import (
    ERROR_DESCRIPTIONS,
    ErrorResponse,
    HealthDown,
    HealthOk,
    ModelList,
    RankResponse,
    Readiness,
    RerankResponse,
    TeiRerankResult,
)
from .schemas import (
    INVALID_REQUEST,
    RankRequest,
    RequestError,
    RerankRequest,
    TeiRerankRequest,
    check_document_count,
    error_body,
    parse_json_body,
)
from .service import CLIENT_CLOSED, RerankService
from .tracing import TraceMiddleware

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

_RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")
_KNOWN_PATHS = frozenset(
    {*_RERANK_PATHS, "/rank", "/health", "/ready", "/v1/models", "/metrics", "/v1/cache/clear"}
)


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
            ``max_queue``, ``max_queue_wait``, ``model_name``).

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
    serve_docs_offline(app)  # /docs and /redoc without a CDN (air-gapped servers)
    app.add_middleware(_BodyLimitMiddleware, limit=config.max_body_bytes)
    if config.body_timeout is not None:
        app.add_middleware(_BodyTimeoutMiddleware, timeout=float(config.body_timeout))
    app.add_middleware(_MetricsMiddleware, metrics=metrics)  # outermost: counts the 408s too
    app.add_middleware(TraceMiddleware)  # OpenTelemetry span per request ([otel]; else a no-op)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), status_code=exc.status_code, type="http_error"),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    def check_auth(
        request: Request, _: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
    ) -> None:
        service.authenticate(request.headers.get("authorization"))

    guarded = [Depends(check_auth)] if config.api_key is not None else []
    scoring_errors = (400, 408, 413, 422, 503, *((401,) if config.api_key is not None else ()))
    errors: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in sorted(scoring_errors)
    }
    scoring = {
        "dependencies": guarded,
        "responses": errors,
        "response_model_exclude_unset": True,
    }

    @app.get(
        "/health",
        summary="503 while the model loads, 200 once it serves",
        response_model=HealthOk,
        response_model_exclude_unset=True,
        responses={503: {"model": HealthDown, "description": "The model is loading or failed to load"}},
    )
    async def health() -> Response:
        status, body, headers = service.health()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get(
        "/ready",
        summary="200 when new work would be admitted, 503 when it would be refused (for load balancers)",
        response_model=Readiness,
        response_model_exclude_unset=True,
        responses={503: {"model": Readiness, "description": "New work would be refused now"}},
    )
    async def ready() -> Response:
        status, body, headers = service.readiness()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get(
        "/v1/models",
        summary="OpenAI-style list of the served model",
        response_model=ModelList,
        dependencies=guarded,
        responses={401: errors[401]} if 401 in errors else None,
    )
    async def models() -> dict[str, Any]:
        return service.models()

    async def score_rerank(request: Request, req: RerankRequest | TeiRerankRequest) -> Any:
        field = "texts" if isinstance(req, TeiRerankRequest) else "documents"
        check_document_count(len(req.texts), field, config.max_documents)
        return await service.serve_request(
            request,
            lambda score: rerank_response(
                req,
                score=score,
                model_name=service.model_name,
                default_instruction=service.default_instruction,
            ),
        )

    rerank_summary = "Rerank documents (Cohere / Jina / vLLM / Infinity request and response shape)"

    scorers = APIRouter(route_class=_JsonBodyRoute)

    @scorers.post("/v1/rerank", summary=rerank_summary, response_model=RerankResponse, **scoring)
    async def rerank_v1(request: Request, req: Annotated[RerankRequest, Body()]) -> Any:
        return await score_rerank(request, req)

    @scorers.post("/v2/rerank", summary=rerank_summary, response_model=RerankResponse, **scoring)
    async def rerank_v2(request: Request, req: Annotated[RerankRequest, Body()]) -> Any:
        return await score_rerank(request, req)

    @scorers.post(
        "/rerank",
        summary=rerank_summary + "; with `texts`, text-embeddings-inference's",
        response_model=RerankResponse | list[TeiRerankResult],
        **scoring,
    )
    async def rerank(request: Request, req: Annotated[_RerankOrTei, Body()]) -> Any:
        return await score_rerank(request, req)

    @scorers.post(
        "/rank",
        summary="Rank {id, text} records; results carry ids, scores and bands",
        response_model=RankResponse,
        **scoring,
    )
    async def rank(request: Request, req: Annotated[RankRequest, Body()]) -> Any:
        check_document_count(len(req.documents), "documents", config.max_documents)
        return await service.serve_request(
            request,
            lambda score: rank_response(
                req,
                score=score,
                bands=config.bands,
                model_name=service.model_name,
                default_instruction=service.default_instruction,
            ),
        )

    app.include_router(scorers)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "OK"}},
    )
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # An operator's endpoint, outside the published rerank contract (docs/serving.md, "Score cache").
    @app.post(
        "/v1/cache/clear",
        summary="Empty the score cache (this process's tier and the shared Redis)",
        dependencies=guarded,
        include_in_schema=False,
    )
    async def clear_cache() -> JSONResponse:
        cache = getattr(service.reranker, "cache", None)
        if cache is None:
            return JSONResponse({"cleared": {}})
        try:
            cleared = await asyncio.to_thread(cache.clear)
        except Exception as exc:  # Redis unreachable: the in-process tier is cleared all the same
            raise RequestError(
                f"the shared score cache could not be cleared: {type(exc).__name__}: {exc}",
                status_code=503,
                type="cache_unavailable",
            ) from exc
        logger.info("Score cache cleared: %s", cleared)
        return JSONResponse({"cleared": cleared})

    def openapi() -> dict[str, Any]:
        """FastAPI's document, with this service's ``max_documents`` as ``maxItems``."""
        if app.openapi_schema is None:
            spec = FastAPI.openapi(app)
            schemas = spec.get("components", {}).get("schemas", {})
            for name, field in (
                ("RerankRequest", "documents"),
                ("TeiRerankRequest", "texts"),
                ("RankRequest", "documents"),
            ):
                prop = schemas.get(name, {}).get("properties", {}).get(field)
                if prop is not None:
                    prop["maxItems"] = config.max_documents
                    prop["description"] = (
                        f"{prop.get('description', '')} (at most {config.max_documents};"
                        " more is answered 413)"
                    ).lstrip()
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


#: Declares ``Authorization: Bearer <key>`` in the OpenAPI document; :func:`.handlers.check_bearer` checks it.
_BEARER = HTTPBearer(scheme_name="bearerAuth", auto_error=False, description="serve --api-key")


def _rerank_or_tei(body: Any) -> str:
    """``/rerank`` reads a body with ``texts`` and no ``documents`` as text-embeddings-inference's."""
    if isinstance(body, dict) and "texts" in body and "documents" not in body:
        return "tei"
    return "rerank"


_RerankOrTei = Annotated[
    Annotated[RerankRequest, Tag("rerank")] | Annotated[TeiRerankRequest, Tag("tei")],
    Discriminator(_rerank_or_tei),
]


class _JsonBody(Request):
    """A request whose body is read as the service reads every body: JSON, whatever its
    ``Content-Type`` (``curl -d`` sends form-urlencoded), with a one-sentence 400 when it is
    not, and 499 when the client hangs up before it has arrived."""

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            try:
                body = await super().body()
            except ClientDisconnect:
                logger.info("client disconnected before its request body arrived; nothing was scored")
                raise RequestError(
                    "the client disconnected before its request body arrived",
                    status_code=CLIENT_CLOSED,
                    type="client_closed_request",
                ) from None
            if not body.strip():
                raise RequestError(
                    "request body is empty; send a JSON object", status_code=400, type="invalid_json"
                )
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class _JsonBodyRoute(APIRoute):
    """A scoring route: the client is authenticated before its body is read (a 401 needs no
    upload, nor a ``100 Continue``), then its body is read by :class:`_JsonBody`."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def read_as_json(request: Request) -> Response:
            request.app.state.service.authenticate(request.headers.get("authorization"))
            headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
            scope = {**request.scope, "headers": [*headers, (b"content-type", b"application/json")]}
            return await handler(_JsonBody(scope, request.receive))

        return read_as_json


def _validation_error(exc: RequestValidationError) -> RequestError:
    """The first problem pydantic found, as the service's one-sentence error naming its field."""
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ("body",), "type": ""}
    context = first.get("ctx") or {}
    if first.get("type") == INVALID_REQUEST:
        return RequestError(
            first["msg"], status_code=context["status"], param=context["param"], type=context["kind"]
        )
    param = _param(first.get("loc", ()))
    where = param or "request body"
    return RequestError(f"{where}: {first.get('msg', 'invalid')}", param=param)


def _param(loc: Any) -> str | None:
    """``("body", "documents", 3, "text")`` as ``documents[3].text`` (the union's tag left out)."""
    parts = [p for p in loc if p not in ("body", "rerank", "tei")]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


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


class _BodyLimitMiddleware:
    """Refuse a body over ``limit`` bytes with 413, before it is held in memory.

    The declared ``Content-Length`` is checked at the first read, and a streamed body is cut off
    as soon as it passes the limit.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        size = 0

        async def receive_within_limit() -> dict[str, Any]:
            nonlocal size
            if declared.isdigit() and int(declared) > self.limit:
                raise too_large(int(declared), self.limit)
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > self.limit:
                    raise too_large(size, self.limit)
            return message

        await self.app(scope, receive_within_limit, send)
