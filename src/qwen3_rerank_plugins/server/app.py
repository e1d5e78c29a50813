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
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..protocol import LocalScorer, Scorer
from ..results import ConfidenceBands
from ..server_defaults import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_TOKENS
from ..validation import InputTooLongError
from .batcher import BatcherClosedError, MicroBatcher, QueueFullError
from .handlers import ScoreFn, check_bearer, rank_response, read_json, rerank_response
from .metrics import CONTENT_TYPE_LATEST, ServiceMetrics
from .openapi import build_openapi
from .schemas import RequestError, error_body

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ServiceState", "create_app"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
_RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank")
_KNOWN_PATHS = frozenset({*_RERANK_PATHS, "/rank", "/health", "/v1/models", "/metrics", "/v1/cache/clear"})
_RETRY_AFTER_LOADING = "5"
_RETRY_AFTER_BUSY = "1"
_CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection


class ServiceState:
    """What one app knows at run time: the model (once loaded), the batcher and the metrics."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.reranker: Any = None
        self.batcher: MicroBatcher | None = None
        self.model_name: str | None = None
        self.load_error: str | None = None
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        return self.batcher is not None


def create_app(
    reranker_or_factory: Any,
    *,
    api_key: str | None = None,
    max_documents: int = 1000,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    bands: ConfidenceBands | None = None,
    batch_wait_ms: float = 2.0,
    max_batch_pairs: int = 256,
    max_queue: int = 1024,
    model_name: str | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT_S,
    max_request_tokens: int | None = DEFAULT_MAX_REQUEST_TOKENS,
) -> FastAPI:
    """Build the rerank service around a loaded reranker or a function that loads one.

    Args:
        reranker_or_factory: A loaded :class:`~qwen3_rerank_plugins.Reranker`, or a
            zero-argument callable returning one. A callable runs in a worker thread when the app
            starts, so the server answers ``/health`` (503) while the model loads.
        api_key: When set, every endpoint except ``/health`` and ``/metrics`` requires
            ``Authorization: Bearer <api_key>`` and answers 401 otherwise.
        max_documents: Most documents per request; more is answered with 413.
        max_body_bytes: Largest request body; larger is answered with 413.
        bands: Score cut-offs for the ``band`` of ``/rank`` results (default 0.85 / 0.70).
        batch_wait_ms: How long an idle batcher waits for concurrent requests to merge.
        max_batch_pairs: Most (query, document) pairs merged into one engine call.
        max_queue: Most requests waiting to be scored; beyond it the service answers 503 with
            ``Retry-After``.
        model_name: Name reported in responses and ``/v1/models`` (default: the model's name).
        on_load_error: Called with the exception if loading the model fails (the command line
            uses it to stop the server with an error).
        body_timeout: Seconds a request's body may take to arrive once its headers have; a
            slower or stalled upload is answered 408 and its connection closed (``None``: wait
            for ever).
        max_request_tokens: Most prompt tokens one request may make the model read (template
            included, after truncation, summed over its documents); more is answered with 413
            before anything is queued (``None``: no limit beyond ``max_documents``).

    Returns:
        The FastAPI application; its :class:`ServiceState` is ``app.state.service``.

    Example:
        >>> from qwen3_rerank_plugins import get_reranker
        >>> app = create_app(lambda: get_reranker("Qwen/Qwen3-Reranker-0.6B"))  # doctest: +SKIP
        >>> # uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    if isinstance(max_documents, bool) or not isinstance(max_documents, int) or max_documents < 1:
        raise ValueError(f"max_documents must be a positive int, got {max_documents!r}")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be a positive int, got {max_body_bytes!r}")
    if api_key is not None and not api_key.strip():
        raise ValueError("api_key must not be empty; pass None to disable authentication")
    if body_timeout is not None and (
        isinstance(body_timeout, bool) or not isinstance(body_timeout, (int, float)) or not body_timeout > 0
    ):
        raise ValueError(f"body_timeout must be a positive number of seconds or None, got {body_timeout!r}")
    tokens_cap = max_request_tokens
    if tokens_cap is not None and (
        isinstance(tokens_cap, bool) or not isinstance(tokens_cap, int) or tokens_cap < 1
    ):
        raise ValueError(f"max_request_tokens must be a positive int or None, got {max_request_tokens!r}")
    bands = bands or ConfidenceBands()
    if not isinstance(bands, ConfidenceBands):
        raise TypeError(f"bands must be a ConfidenceBands, got {type(bands).__name__}")
    # Validated here so that a bad setting fails at start-up, not at the first request.
    MicroBatcher(None, max_wait_ms=batch_wait_ms, max_batch_pairs=max_batch_pairs, max_queue=max_queue)

    metrics = ServiceMetrics()
    state = ServiceState(metrics)
    loaded = reranker_or_factory if hasattr(reranker_or_factory, "score_pairs") else None
    if loaded is None and not callable(reranker_or_factory):
        raise TypeError("create_app needs a Reranker or a zero-argument callable that returns one")
    if loaded is not None:
        _check_servable(loaded)

    async def activate(reranker: Any) -> None:
        batcher = MicroBatcher(
            reranker,
            max_wait_ms=batch_wait_ms,
            max_batch_pairs=max_batch_pairs,
            max_queue=max_queue,
            observer=metrics.observe_batch,
        )
        await batcher.start()
        state.reranker = reranker
        state.model_name = model_name or reranker.model_name
        device, dtype = str(reranker.device), str(reranker.dtype).removeprefix("torch.")
        metrics.model_info.labels(state.model_name, device, dtype).set(1)
        metrics.queue_depth.set_function(lambda: batcher.pending)
        metrics.model_loaded.set(1)
        if reranker.cache is not None:
            metrics.watch_cache(reranker.cache.stats)
        state.batcher = batcher
        logger.info("Serving %s on %s (%s)", state.model_name, device, dtype)

    async def load_in_background() -> None:
        try:
            reranker = await _call_in_daemon_thread(reranker_or_factory)
            _check_servable(reranker)
            await activate(reranker)
        except Exception as exc:
            state.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("Could not load the model: %s", state.load_error)
            if on_load_error is not None:
                on_load_error(exc)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader: asyncio.Task[None] | None = None
        if loaded is not None:
            await activate(loaded)
        else:
            loader = asyncio.create_task(load_in_background(), name="qwen3-rerank-load")
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            if state.batcher is not None:
                # uvicorn has already waited for in-flight requests; finish whatever is queued.
                await state.batcher.close()
                logger.info("Batcher drained; shutting down")

    app = FastAPI(
        title="Qwen3-Reranker service",
        summary="Rerank documents for a query with Qwen3-Reranker (Cohere/Jina/vLLM-compatible /v1/rerank).",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.service = state
    if body_timeout is not None:
        app.add_middleware(_BodyTimeoutMiddleware, timeout=float(body_timeout))
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
        check_bearer(request.headers.get("authorization"), api_key)

    def scorer(request: Request) -> ScoreFn:
        """Scoring through the batcher for one request; dropped if its client disconnects first."""

        async def score(
            query: str, texts: list[str], instruction: str | None, count_tokens: bool, /, **limits: int
        ) -> tuple[list[float], int | None]:
            return await _unless_disconnected(
                request, submit(query, texts, instruction, count_tokens, **limits)
            )

        return score

    async def submit(
        query: str, texts: list[str], instruction: str | None, count_tokens: bool, /, **limits: int
    ) -> tuple[list[float], int | None]:
        """Score one request; ``limits`` are its token caps (``max_doc_tokens``, ``max_query_tokens``)."""
        batcher = state.batcher
        if batcher is None:
            if state.load_error is not None:
                raise RequestError(
                    f"the model failed to load: {state.load_error}", status_code=503, type="model_unavailable"
                )
            raise RequestError(
                "the model is still loading; retry shortly",
                status_code=503,
                type="model_loading",
                headers={"Retry-After": _RETRY_AFTER_LOADING},
            )
        try:
            if max_request_tokens is not None:
                await _check_token_budget(
                    state.reranker,
                    query,
                    texts,
                    instruction,
                    max_request_tokens,
                    **limits,
                )
            scored = await batcher.submit(query, texts, instruction, count_tokens=count_tokens, **limits)
        except RequestError:
            raise
        except QueueFullError as exc:
            raise RequestError(
                f"the service is overloaded ({exc}); retry shortly",
                status_code=503,
                type="overloaded",
                headers={"Retry-After": _RETRY_AFTER_BUSY},
            ) from exc
        except BatcherClosedError as exc:
            raise RequestError(
                "the service is shutting down",
                status_code=503,
                type="shutting_down",
                headers={"Retry-After": _RETRY_AFTER_BUSY},
            ) from exc
        except InputTooLongError as exc:
            raise RequestError(str(exc), status_code=422, param=exc.param) from exc
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc), status_code=422) from exc
        except Exception as exc:
            logger.exception("scoring failed")
            raise RequestError(
                f"scoring failed: {type(exc).__name__}: {exc}", status_code=500, type="internal_error"
            ) from exc
        return scored.logits, scored.total_tokens, scored.spans

    # -- endpoints ------------------------------------------------------------------------------

    @app.get("/health", summary="503 while the model loads, 200 once it serves")
    async def health() -> JSONResponse:
        if state.ready:
            reranker = state.reranker
            return JSONResponse(
                {
                    "status": "ok",
                    "model": state.model_name,
                    "device": str(reranker.device),
                    "dtype": str(reranker.dtype).removeprefix("torch."),
                    "queue": state.batcher.pending if state.batcher else 0,
                }
            )
        status = "error" if state.load_error else "loading"
        body: dict[str, Any] = {"status": status}
        if state.load_error:
            body["error"] = state.load_error
        headers = None if state.load_error else {"Retry-After": _RETRY_AFTER_LOADING}
        return JSONResponse(body, status_code=503, headers=headers)

    @app.get("/v1/models", summary="OpenAI-style list of the served model")
    async def models(request: Request) -> JSONResponse:
        check_auth(request)
        data = []
        if state.model_name is not None:
            data.append(
                {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "qwen"}
            )
        return JSONResponse({"object": "list", "data": data})

    async def rerank(request: Request) -> Response:
        check_auth(request)
        body = await read_json(request, max_body_bytes)
        payload = await rerank_response(
            body,
            path=request.url.path,
            score=scorer(request),
            max_documents=max_documents,
            model_name=state.model_name,
            default_instruction=_default_instruction(state.reranker),
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
        body = await read_json(request, max_body_bytes)
        payload = await rank_response(
            body,
            score=scorer(request),
            bands=bands,
            max_documents=max_documents,
            model_name=state.model_name,
            default_instruction=_default_instruction(state.reranker),
        )
        return JSONResponse(payload)

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    # An operator's endpoint, outside the published rerank contract (docs/serving.md, "Score cache").
    @app.post(
        "/v1/cache/clear",
        summary="Empty the score cache (this process's tier and the shared Redis)",
        include_in_schema=False,
    )
    async def clear_cache(request: Request) -> JSONResponse:
        check_auth(request)
        cache = getattr(state.reranker, "cache", None)
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
        """FastAPI's document completed with the request and response schemas (see :mod:`.openapi`)."""
        if app.openapi_schema is None:
            base = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            app.openapi_schema = build_openapi(base, api_key=api_key is not None, max_documents=max_documents)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _default_instruction(reranker: Any) -> str | None:
    """The instruction text a request without one is scored with (``None`` while loading)."""
    text = getattr(reranker, "instruction", None)
    return text if isinstance(text, str) else None


async def _call_in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """``await fn()`` run in a daemon thread.

    Unlike ``asyncio.to_thread``, a process told to stop while the model is still loading exits
    at once instead of waiting for the load to finish.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def deliver(outcome: Any, failed: bool) -> None:
        if future.done():
            return
        if failed:
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        try:
            outcome, failed = fn(), False
        except BaseException as exc:
            outcome, failed = exc, True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver, outcome, failed)

    threading.Thread(target=work, name="qwen3-rerank-load", daemon=True).start()
    return await future


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """``await work``, cancelled as soon as the client disconnects.

    Cancelling a request that waits in the :class:`MicroBatcher` queue cancels its future, so the
    batcher drops it before scoring (and discards its scores if it is already being scored).

    Raises:
        RequestError: 499 ``client_closed_request`` when the client went away first.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        logger.info("client disconnected; its request was dropped")
        raise RequestError(
            "the client disconnected before its request was scored",
            status_code=_CLIENT_CLOSED,
            type="client_closed_request",
        )
    return task.result()


async def _disconnect(request: Request) -> None:
    """Return once the client has disconnected (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _check_servable(reranker: Any) -> None:
    """The service scores with a local engine; a remote one already has a service behind it."""
    if not isinstance(reranker, Scorer):
        raise TypeError(f"the model factory returned {type(reranker).__name__}, not a Reranker")
    if not isinstance(reranker, LocalScorer):
        raise TypeError(
            f"create_app serves a local Reranker, not a {type(reranker).__name__}: point clients at "
            "the service that one talks to instead"
        )


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


async def _check_token_budget(
    reranker: Any, query: str, texts: list[str], instruction: str | None, budget: int, **limits: Any
) -> None:
    """Refuse, before it is queued, a request that would make the model read over ``budget`` tokens.

    Unless long documents are read in several windows, every prompt is cut to ``max_length``, so
    most requests pass on ``len(texts) * max_length`` alone, without tokenising anything here.
    ``limits`` are the request's own caps (``max_doc_tokens``, ``long_documents``, ...), counted
    as the engine will apply them.

    Raises:
        RequestError: 413 ``too_many_tokens`` naming ``documents``.
    """
    max_length = None if limits.get("long_documents") else _prompt_cap(reranker)
    if max_length is not None and len(texts) * max_length <= budget:
        return
    tokens = await asyncio.to_thread(
        _prompt_tokens, reranker, query, texts, instruction, max_length, budget, limits
    )
    if tokens > budget:
        cut = f", each document cut to max_length={max_length}" if max_length is not None else ""
        raise RequestError(
            f"this request would make the model read {tokens} prompt tokens (template included{cut}); "
            f"this service reads at most {budget} per request: send fewer or shorter documents",
            status_code=413,
            param="documents",
            type="too_many_tokens",
        )


def _prompt_cap(reranker: Any) -> int | None:
    """The most tokens the engine reads per document, or ``None`` when it has no such cap
    (long documents read in windows) or does not say."""
    max_length = getattr(reranker, "max_length", None)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        return None
    try:
        windows = bool(reranker.settings().get("long_documents", False))
    except Exception:  # an engine that does not report its settings: assume it may
        windows = True
    return None if windows else max_length


def _prompt_tokens(
    reranker: Any,
    query: str,
    texts: list[str],
    instruction: str | None,
    max_length: int | None,
    budget: int,
    limits: dict[str, Any],
) -> int:
    """Runs in a worker thread: a bound of the request's prompt tokens when it is within
    ``budget``, else the engine's exact count (with the request's caps)."""
    if max_length is not None:
        # A token covers at least one byte of text, and each prompt is cut to max_length.
        overhead = reranker.count_tokens(query, [""], instruction, **limits)  # template, instruction, query
        doc_cap = limits.get("max_doc_tokens") or max_length
        bound = sum(
            min(max_length, overhead + min(doc_cap, len(t.encode("utf-8", "surrogatepass")))) for t in texts
        )
        if bound <= budget:
            return bound
    return int(reranker.count_tokens(query, texts, instruction, **limits))


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
