"""OpenTelemetry spans for reranking (extra ``[otel]``); a no-op when ``opentelemetry-api`` is absent.

Names follow the GenAI semantic conventions' proposed ``rerank`` operation
(``gen_ai.operation.name = "rerank"``, span name ``rerank {model}``,
``gen_ai.rerank.candidate.count``, ``gen_ai.rerank.top_n``, ``gen_ai.usage.input_tokens``, of
which ``gen_ai.usage.cache_read.input_tokens`` answered from the score cache);
what those conventions do not name yet carries this package's own prefix ``qwen3_rerank.``.

- :func:`rerank_span`: one span per rerank call of the library (``rerank``, ``score``,
  ``score_pairs``, ``score_groups`` and their async twins; a call inside another reuses its span).
- :func:`batch_span`: one ``rerank batch`` span per engine call of the service's batcher, linked
  to the span of every request merged into it (their contexts taken by :func:`capture_context`
  when they were queued).
- :func:`inject_trace_headers`: puts the current W3C ``traceparent`` on an outgoing request (the
  remote backend's HTTP client calls it for every request).
- :class:`qwen3_rerank_plugins.server.tracing.TraceMiddleware`: one span per HTTP request of
  the service, continuing the caller's ``traceparent``.

Nothing is exported anywhere unless the application installs the OpenTelemetry SDK and sets a
tracer provider; without it the API's spans are non-recording and cost next to nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, MutableMapping, Sequence
from contextvars import ContextVar
from typing import Any

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # the [otel] extra is not installed: every helper here does nothing
    otel_context = propagate = trace = None  # type: ignore[assignment]

__all__ = [
    "BATCH_SPAN",
    "OPERATION",
    "RerankSpan",
    "batch_span",
    "capture_context",
    "enabled",
    "inject_trace_headers",
    "rerank_span",
    "tracer",
]

#: ``gen_ai.operation.name`` of every rerank span.
OPERATION = "rerank"
#: Name of the span of one engine call of the service's batcher (linked to every merged request).
BATCH_SPAN = "rerank batch"
_SCOPE = "qwen3_rerank_plugins"
_current: ContextVar[RerankSpan | None] = ContextVar("qwen3_rerank_span", default=None)


def enabled() -> bool:
    """Whether ``opentelemetry-api`` is installed (spans are created; exported only with an SDK)."""
    return trace is not None


def tracer() -> Any:
    """This package's tracer from the global tracer provider (``None`` without the extra)."""
    if trace is None:
        return None
    from . import __version__

    return trace.get_tracer(_SCOPE, __version__)


class RerankSpan:
    """Records a rerank call's facts on its span (every method is a no-op without a span)."""

    def __init__(self, span: Any = None) -> None:
        self.span = span
        self._input_tokens: int | None = None
        self._cached_tokens = 0

    def set(self, key: str, value: Any) -> None:
        """Set one attribute (``None`` values are skipped)."""
        if self.span is not None and value is not None:
            self.span.set_attribute(key, value)

    def groups(self, groups: Sequence[Any]) -> None:
        """The scored groups: queries in the call (its batch size) and documents in all."""
        self.set("qwen3_rerank.batch.queries", len(groups))
        self.set("gen_ai.rerank.candidate.count", sum(len(g.texts) for g in groups))

    def scored(self, results: Sequence[Any], *, cache: bool = False) -> None:
        """The backend's results: prompt tokens read, when the backend counts them, and (with a
        score cache, ``cache=True``) how many of them were answered from it
        (``gen_ai.usage.cache_read.input_tokens``, included in ``gen_ai.usage.input_tokens``).

        Several calls in one span (a fallback's first attempt and its retry) add up."""
        tokens = [r.tokens for r in results if getattr(r, "tokens", None) is not None]
        if tokens:
            self._input_tokens = (self._input_tokens or 0) + int(sum(tokens))
            self.set("gen_ai.usage.input_tokens", self._input_tokens)
        cached = sum(int(getattr(r, "cached_tokens", 0) or 0) for r in results)
        self._cached_tokens += cached
        if cache or self._cached_tokens:
            self.set("gen_ai.usage.cache_read.input_tokens", self._cached_tokens)

    def fallback(self, outcome: Any) -> None:
        """A low-confidence fallback's outcome (a :class:`~qwen3_rerank_plugins.fallback.FallbackRerank`):
        whether the query was retried and whether the answer still needs a person's review."""
        self.set("qwen3_rerank.fallback.requested", True)
        self.set("qwen3_rerank.fallback.retried", getattr(outcome, "retry", None) is not None)
        needs_review = getattr(outcome, "needs_review", None)
        if isinstance(needs_review, bool):
            self.set("qwen3_rerank.fallback.needs_review", needs_review)

    def top_n(self, top_n: int | None) -> None:
        """The ``top_n`` the caller asked for."""
        self.set("gen_ai.rerank.top_n", top_n)


@contextlib.contextmanager
def rerank_span(scorer: Any, **attributes: Any) -> Iterator[RerankSpan]:
    """A ``rerank {model}`` span around one library call (reused by calls nested inside it).

    Args:
        scorer: The engine or remote backend; its ``model_name`` names the model.
        **attributes: Extra span attributes (``None`` values are skipped).

    Yields:
        A :class:`RerankSpan` to record the call's facts on.
    """
    outer = _current.get()
    if outer is not None:  # rerank() -> score_groups(): one span for the user's call
        for key, value in attributes.items():
            outer.set(key, value)
        yield outer
        return
    active = tracer()
    if active is None:
        yield RerankSpan()
        return
    model = str(getattr(scorer, "model_name", None) or type(scorer).__name__)
    with active.start_as_current_span(f"{OPERATION} {model}", kind=trace.SpanKind.INTERNAL) as span:
        record = RerankSpan(span)
        record.set("gen_ai.operation.name", OPERATION)
        record.set("gen_ai.request.model", model)
        record.set("gen_ai.provider.name", _SCOPE)
        for key, value in attributes.items():
            record.set(key, value)
        token = _current.set(record)
        try:
            yield record
        except BaseException as exc:
            record.set("error.type", type(exc).__qualname__)
            raise
        finally:
            _current.reset(token)


def capture_context() -> Any:
    """The current OpenTelemetry context (``None`` without the extra): taken where a request is
    queued, so that the engine call that scores it later, in another thread, can link to it."""
    return None if otel_context is None else otel_context.get_current()


@contextlib.contextmanager
def batch_span(requests: int, pairs: int, contexts: Sequence[Any] | None) -> Iterator[None]:
    """A ``rerank batch`` span around one engine call that scores several merged requests.

    The call serves many requests (of many traces) at once, so its span starts a trace of its
    own, with an OpenTelemetry link to the span of each merged request (``contexts``, from
    :func:`capture_context` at queueing time); the library's ``rerank {model}`` span of the call
    is its child. Nothing happens without the extra.
    """
    active = tracer()
    if active is None:
        yield
        return
    links = []
    for ctx in contexts or ():
        if ctx is None:
            continue
        linked = trace.get_current_span(ctx).get_span_context()
        if linked.is_valid:
            links.append(trace.Link(linked))
    with active.start_as_current_span(
        BATCH_SPAN, context=otel_context.Context(), kind=trace.SpanKind.INTERNAL, links=links
    ) as span:
        span.set_attribute("qwen3_rerank.batch.requests", requests)
        span.set_attribute("qwen3_rerank.batch.pairs", pairs)
        yield


def inject_trace_headers(headers: MutableMapping[str, str]) -> None:
    """Put the current context's W3C ``traceparent`` (and ``tracestate``) into ``headers``."""
    if propagate is not None:
        propagate.inject(headers)


def httpx_event_hooks(asynchronous: bool) -> dict[str, list[Any]]:
    """``event_hooks`` for an httpx client that pass the current trace on with every request."""
    if propagate is None:
        return {}

    def add_traceparent(request: Any) -> None:
        inject_trace_headers(request.headers)

    async def aadd_traceparent(request: Any) -> None:
        inject_trace_headers(request.headers)

    return {"request": [aadd_traceparent if asynchronous else add_traceparent]}
