"""OpenTelemetry: a span per rerank call and per service request, with the caller's trace continued.

Spans go to the SDK's in-memory exporter; the service and the remote backend talk real HTTP on
127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from helpers import ServerThread
from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.remote import RemoteReranker
from qwen3_rerank_plugins.server import create_app

SRC = Path(__file__).resolve().parent.parent / "src"
QUERY = "发票怎么开"
DOCS = [
    "【发票申请指南】在订单详情页点击“申请开票”即可。",
    "退货政策：签收后7天内可无理由退货。",
    "订单付款后48小时内发货。",
]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture(scope="module")
def exporter() -> InMemorySpanExporter:
    """The in-memory exporter on the global tracer provider (set once per process)."""
    memory = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return memory


@pytest.fixture
def spans(exporter: InMemorySpanExporter) -> Iterator[InMemorySpanExporter]:
    exporter.clear()
    yield exporter
    exporter.clear()


@pytest.fixture(scope="module")
def service(reranker: Reranker) -> Iterator[ServerThread]:
    with ServerThread(create_app(reranker)) as server:
        yield server


def _rerank_spans(exporter: InMemorySpanExporter) -> list:
    return [s for s in exporter.get_finished_spans() if s.attributes.get("gen_ai.operation.name") == "rerank"]


def test_one_span_per_library_call_with_the_genai_rerank_attributes(
    reranker: Reranker, spans: InMemorySpanExporter
) -> None:
    results = reranker.rerank(QUERY, DOCS, top_n=2)

    (span,) = _rerank_spans(spans)  # rerank -> score_groups: one span, not two
    assert span.name == f"rerank {reranker.model_name}"
    assert span.kind == trace.SpanKind.INTERNAL
    attrs = span.attributes
    assert attrs["gen_ai.request.model"] == reranker.model_name
    assert attrs["gen_ai.rerank.candidate.count"] == len(DOCS)
    assert attrs["gen_ai.rerank.top_n"] == 2
    assert attrs["qwen3_rerank.batch.queries"] == 1
    expected_tokens = sum(len(ids) for ids in reranker.prompt_ids(QUERY, DOCS))
    assert attrs["gen_ai.usage.input_tokens"] == expected_tokens
    assert len(results) == 2


async def test_async_calls_and_cross_query_batches_get_their_span(
    reranker: Reranker, spans: InMemorySpanExporter
) -> None:
    await reranker.arerank(QUERY, DOCS)
    reranker.score_pairs([(QUERY, DOCS[0]), ("退货", DOCS[1]), ("发货", DOCS[2])])

    first, second = _rerank_spans(spans)
    assert first.attributes["gen_ai.rerank.candidate.count"] == len(DOCS)
    assert "gen_ai.rerank.top_n" not in first.attributes  # None: not recorded
    assert second.attributes["qwen3_rerank.batch.queries"] == 3
    assert second.attributes["gen_ai.rerank.candidate.count"] == 3


def test_the_service_continues_the_callers_traceparent(
    service: ServerThread, spans: InMemorySpanExporter
) -> None:
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    body = {"model": "qwen3-reranker", "query": QUERY, "documents": DOCS, "top_n": 2}
    answer = httpx.post(f"{service.url}/v1/rerank", json=body, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text

    server = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    (span,) = [s for s in server if s.attributes.get("url.path") == "/v1/rerank"]
    assert span.name == "POST /v1/rerank"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID and span.parent.is_remote
    assert span.attributes["http.response.status_code"] == 200
    assert span.attributes["gen_ai.operation.name"] == "rerank"
    assert span.attributes["gen_ai.rerank.candidate.count"] == len(DOCS)
    assert span.attributes["gen_ai.rerank.top_n"] == 2
    assert span.attributes["gen_ai.request.model"] == "qwen3-reranker"


def test_the_rank_endpoint_records_the_fallback_outcome(
    service: ServerThread, spans: InMemorySpanExporter
) -> None:
    body = {"query": QUERY, "documents": [{"id": i, "text": t} for i, t in enumerate(DOCS)], "fallback": True}
    answer = httpx.post(f"{service.url}/rank", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    outcome = answer.json()["fallback"]

    (span,) = [s for s in spans.get_finished_spans() if s.attributes.get("url.path") == "/rank"]
    assert span.attributes["qwen3_rerank.fallback.requested"] is True
    assert span.attributes["qwen3_rerank.fallback.retried"] is (outcome["retried_query"] is not None)
    assert span.attributes["qwen3_rerank.fallback.needs_review"] is outcome["needs_review"]


def test_the_remote_backend_passes_the_trace_on(service: ServerThread, spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    remote = RemoteReranker(service.url)
    try:
        with tracer.start_as_current_span("caller") as caller:
            remote.rerank(QUERY, DOCS, top_n=1)
    finally:
        remote.close()

    finished = spans.get_finished_spans()
    trace_id = caller.get_span_context().trace_id
    # The backend's own span is the caller's child; the service's span continues it over HTTP.
    (client_span,) = [
        s for s in _rerank_spans(spans) if s.parent is not None and s.parent.span_id == caller.context.span_id
    ]
    assert client_span.context.trace_id == trace_id
    assert client_span.attributes["gen_ai.rerank.top_n"] == 1
    (server_span,) = [s for s in finished if s.kind == trace.SpanKind.SERVER]
    assert server_span.context.trace_id == trace_id
    assert server_span.parent.is_remote and server_span.parent.span_id == client_span.context.span_id


def test_the_span_says_how_many_tokens_the_score_cache_answered(
    reranker: Reranker, spans: InMemorySpanExporter
) -> None:
    cached = reranker.with_cache(100)
    cached.rerank(QUERY, DOCS)
    cached.rerank(QUERY, DOCS)
    reranker.rerank(QUERY, DOCS)

    first, again, plain = _rerank_spans(spans)
    tokens = first.attributes["gen_ai.usage.input_tokens"]
    assert first.attributes["gen_ai.usage.cache_read.input_tokens"] == 0
    assert again.attributes["gen_ai.usage.input_tokens"] == tokens  # the same tokens, ...
    assert again.attributes["gen_ai.usage.cache_read.input_tokens"] == tokens  # ... all from the cache
    assert "gen_ai.usage.cache_read.input_tokens" not in plain.attributes  # no cache: not recorded


def test_the_librarys_fallback_is_one_span_with_its_outcome(
    reranker: Reranker, spans: InMemorySpanExporter
) -> None:
    outcome = reranker.rerank_with_fallback("朝阳区建国路88号电梯昨晚又坏了，怎么报修", DOCS)

    (span,) = _rerank_spans(spans)  # both attempts in the user's one call
    assert span.attributes["qwen3_rerank.fallback.requested"] is True
    assert span.attributes["qwen3_rerank.fallback.retried"] is (outcome.retry is not None)
    assert span.attributes["qwen3_rerank.fallback.needs_review"] is outcome.needs_review


def test_a_retried_fallback_span_counts_the_tokens_of_both_attempts(
    reranker: Reranker, spans: InMemorySpanExporter
) -> None:
    from qwen3_rerank_plugins.results import ConfidenceBands

    unsure = reranker.with_settings(bands=ConfidenceBands(high=1.0, medium=1.0))  # every score is low
    query = "朝阳区建国路88号电梯昨晚又坏了，怎么报修"
    outcome = unsure.rerank_with_fallback(query, DOCS)
    assert outcome.retry is not None
    (span,) = _rerank_spans(spans)
    both = unsure.count_tokens(query, DOCS) + unsure.count_tokens(outcome.retry.query, DOCS)
    assert span.attributes["gen_ai.usage.input_tokens"] == both


def test_a_merged_engine_call_links_to_every_request_in_it(
    reranker: Reranker, spans: InMemorySpanExporter
) -> None:
    """Requests merged by the batcher: one ``rerank batch`` span per engine call, linked to each
    request's span (the engine's ``rerank`` span is its child)."""
    trace_ids = [f"{i:032x}" for i in (0xA1, 0xB2, 0xC3)]
    app = create_app(reranker, batch_wait_ms=500, cache_size=0)  # an idle worker waits 0.5 s to merge
    with ServerThread(app) as server:

        def send(trace_id: str) -> int:
            headers = {"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
            body = {"query": f"{QUERY} {trace_id[-2:]}", "documents": DOCS}
            return httpx.post(f"{server.url}/v1/rerank", json=body, headers=headers, timeout=60).status_code

        with ThreadPoolExecutor(len(trace_ids)) as pool:
            assert list(pool.map(send, trace_ids)) == [200] * len(trace_ids)

    finished = spans.get_finished_spans()
    batches = [s for s in finished if s.name == "rerank batch"]
    assert batches and sum(b.attributes["qwen3_rerank.batch.requests"] for b in batches) == len(trace_ids)
    assert any(b.attributes["qwen3_rerank.batch.requests"] > 1 for b in batches)  # they were merged
    by_id = {s.context.span_id: s for s in finished}
    linked = [by_id.get(link.context.span_id) for b in batches for link in b.links]
    assert sorted(format(s.context.trace_id, "032x") for s in linked if s is not None) == trace_ids
    for span in linked:  # the request's span, or one inside it, current when it was queued
        while span.kind != trace.SpanKind.SERVER:
            span = by_id[span.parent.span_id]
        assert span.attributes["url.path"] == "/v1/rerank"
    for batch in batches:
        assert batch.parent is None and batch.context.trace_id not in {int(t, 16) for t in trace_ids}
        (engine,) = [
            s for s in _rerank_spans(spans) if s.parent and s.parent.span_id == batch.context.span_id
        ]
        assert (
            engine.attributes["qwen3_rerank.batch.queries"] == batch.attributes["qwen3_rerank.batch.requests"]
        )


def test_without_opentelemetry_everything_still_works() -> None:
    code = """
import sys
sys.modules["opentelemetry"] = None  # as if the [otel] extra were not installed
from qwen3_rerank_plugins import tracing
from qwen3_rerank_plugins.client import RerankClient
assert not tracing.enabled() and tracing.tracer() is None
with tracing.rerank_span(object()) as span:
    span.top_n(3)
assert tracing.capture_context() is None
with tracing.batch_span(2, 6, [None, None]):
    pass
headers = {}
tracing.inject_trace_headers(headers)
assert headers == {} and tracing.httpx_event_hooks(False) == {}
print("no-op")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no-op"


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[" * 100_000 + b"]" * 100_000, b'{"query": "\xff\xfe"}', b"[1, 2]", b""],
    ids=["malformed", "nested too deeply", "not UTF-8", "a list", "empty"],
)
def test_bodies_the_service_refuses_are_refused_as_without_tracing(
    service: ServerThread, spans: InMemorySpanExporter, body: bytes
) -> None:
    answer = httpx.post(
        f"{service.url}/v1/rerank", content=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert 400 <= answer.status_code < 500, answer.text
    (span,) = [s for s in spans.get_finished_spans() if s.attributes.get("url.path") == "/v1/rerank"]
    assert span.attributes["http.response.status_code"] == answer.status_code
    assert "gen_ai.rerank.candidate.count" not in span.attributes
