"""One OpenTelemetry span per HTTP request of the service, continuing the caller's ``traceparent``.

:class:`TraceMiddleware` is a plain ASGI middleware (extra ``[otel]``; without
``opentelemetry-api`` it passes requests straight through). For each HTTP request it starts a
server span in the context of the request's W3C ``traceparent`` header, so the rerank step shows
up inside the caller's trace. On the rerank endpoints it records the GenAI ``rerank`` attributes
read from the request body (model, documents, ``top_n``), the response status and, on
``/rank`` with ``"fallback": true``, the fallback's outcome read from the response body.
"""

from __future__ import annotations

import json
from typing import Any

from ..tracing import OPERATION, tracer

try:
    from opentelemetry import propagate, trace
except ImportError:
    propagate = trace = None  # type: ignore[assignment]

__all__ = ["TraceMiddleware"]

_RERANK_PATHS = ("/v1/rerank", "/rerank", "/v2/rerank", "/rank")
_NAMED_PATHS = ("/health", "/v1/models", "/metrics")
_MAX_BODY = 4 * 1024 * 1024  # bodies read for attributes; the app's own limits apply regardless


class TraceMiddleware:
    """ASGI middleware: the request's span, with the GenAI ``rerank`` attributes on rerank paths.

    Where FastAPI's own OpenTelemetry support (FastAPI 0.16x, active once a tracer provider is
    set) already made the request's ``SERVER`` span, this adds its attributes to that span;
    otherwise it starts the ``SERVER`` span itself, in the context of the ``traceparent`` header.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        active = tracer()
        if active is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope.get("method", "GET"), scope.get("path", "")
        rerank = path in _RERANK_PATHS
        native = getattr(scope.get("fastapi.telemetry"), "span", None)
        if native is not None:
            if rerank:
                await self._annotated(native, path, scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        parent = propagate.extract(carrier)
        name = f"{method} {path}" if rerank or path in _NAMED_PATHS else method
        with active.start_as_current_span(name, context=parent, kind=trace.SpanKind.SERVER) as span:
            span.set_attribute("http.request.method", method)
            span.set_attribute("url.path", path)
            status: list[int] = []

            async def send_and_note(message: dict[str, Any]) -> None:
                if message.get("type") == "http.response.start":
                    status.append(int(message["status"]))
                await send(message)

            try:
                if rerank:
                    await self._annotated(span, path, scope, receive, send_and_note)
                else:
                    await self.app(scope, receive, send_and_note)
            finally:
                if status:
                    span.set_attribute("http.response.status_code", status[0])
                    if status[0] >= 500:
                        span.set_status(trace.StatusCode.ERROR)
                        span.set_attribute("error.type", str(status[0]))

    async def _annotated(self, span: Any, path: str, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Run the app, recording the request's and (``/rank``) the answer's facts on ``span``."""
        span.set_attribute("gen_ai.operation.name", OPERATION)
        body, answer = bytearray(), bytearray()

        async def receive_and_keep() -> dict[str, Any]:
            message = await receive()
            if message.get("type") == "http.request" and len(body) <= _MAX_BODY:
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    _request_attributes(span, bytes(body))
            return message

        async def send_and_keep(message: dict[str, Any]) -> None:
            if path == "/rank" and message.get("type") == "http.response.body" and len(answer) <= _MAX_BODY:
                answer.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    _fallback_attributes(span, bytes(answer))  # before the span may end with the answer
            await send(message)

        await self.app(scope, receive_and_keep, send_and_keep)


def _request_attributes(span: Any, body: bytes) -> None:
    try:  # best effort: a body the app refuses (bad JSON, nested too deep, not UTF-8) just has none
        request = json.loads(body)
    except (ValueError, RecursionError):
        return
    if not isinstance(request, dict):
        return
    if isinstance(request.get("model"), str):
        span.set_attribute("gen_ai.request.model", request["model"])
    documents = request.get("documents", request.get("texts"))
    if isinstance(documents, list):
        span.set_attribute("gen_ai.rerank.candidate.count", len(documents))
    top_n = request.get("top_n", request.get("top_k"))
    if isinstance(top_n, int) and not isinstance(top_n, bool):
        span.set_attribute("gen_ai.rerank.top_n", top_n)
    if isinstance(request.get("fallback"), bool):
        span.set_attribute("qwen3_rerank.fallback.requested", request["fallback"])


def _fallback_attributes(span: Any, body: bytes) -> None:
    try:
        outcome = json.loads(body).get("fallback")
    except (ValueError, RecursionError, AttributeError):
        return
    if isinstance(outcome, dict):
        span.set_attribute("qwen3_rerank.fallback.retried", outcome.get("retried_query") is not None)
        if isinstance(outcome.get("needs_review"), bool):
            span.set_attribute("qwen3_rerank.fallback.needs_review", outcome["needs_review"])
