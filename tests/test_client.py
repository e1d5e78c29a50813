"""The rerank client over real HTTP on 127.0.0.1, against the service on the tiny random Qwen3.

Failures are real too: a small ASGI front of our own answers the first requests with 500 / 503 /
429 (or answers slowly) before handing requests to the real service, and an unreachable server
is a port nobody listens on.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import FAST, Front, live_server
from helpers import closed_port_url as _closed_port_url
from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.client import (
    AsyncRerankClient,
    RerankClient,
    RerankServiceError,
    RetryPolicy,
    _retry_after,
)
from qwen3_rerank_plugins.server import create_app

QUERY = "发票怎么开"
DOCS = [
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[FAQ] 订单发货时间：付款后48小时内发货。",
    "[Policy] Refunds are issued to the original payment method within 7 business days.",
    "",
    "退货政策：签收后7天内可无理由退货。",
]
TOL = 1e-6


@pytest.fixture
def app(reranker: Reranker) -> Any:
    """A fresh service app (an app's batcher stops with the server that ran it)."""
    return create_app(reranker)


@pytest.fixture(scope="module")
def url(reranker: Reranker) -> Iterator[str]:
    with live_server(create_app(reranker)) as base_url:
        yield base_url


def _engine_ranking(
    reranker: Reranker, query: str, docs: list[Any], **kwargs: Any
) -> list[tuple[int, float]]:
    return [(r.index, r.score) for r in reranker.rerank(query, docs, **kwargs)]


def _assert_same(hits: list[tuple[int, float]], expected: list[tuple[int, float]]) -> None:
    assert [i for i, _ in hits] == [i for i, _ in expected]
    assert [s for _, s in hits] == pytest.approx([s for _, s in expected], abs=TOL)


# -- the happy path -----------------------------------------------------------------------------


def test_rerank_and_rank_match_the_engine(url: str, reranker: Reranker) -> None:
    with RerankClient(url) as client:
        assert client.served_model is None
        hits = client.rerank(QUERY, DOCS)
        assert client.served_model == reranker.model_name  # the "model" field of the answer
        _assert_same([(h.index, h.relevance_score) for h in hits], _engine_ranking(reranker, QUERY, DOCS))
        top = client.rerank(QUERY, DOCS, top_n=2, return_documents=True, instruction="customer_service_faq")
        expected = _engine_ranking(reranker, QUERY, DOCS, top_n=2, instruction="customer_service_faq")
        _assert_same([(h.index, h.relevance_score) for h in top], expected)
        assert [h.document for h in top] == [DOCS[i] for i, _ in expected]

        records = [{"id": f"T-{i}", "text": t} for i, t in enumerate(DOCS)]
        ranked = client.rank(QUERY, records, top_n=3)
        results = reranker.rerank(QUERY, records, top_n=3)
        assert [h.id for h in ranked] == [r.id for r in results]
        assert [h.band for h in ranked] == [r.band for r in results]
        assert client.models() == [reranker.model_name]
        assert client.health()["status"] == "ok"


def test_a_long_list_is_split_and_merged_in_input_order(app: Any, reranker: Reranker) -> None:
    docs = [f"{DOCS[i % len(DOCS)]} #{i}" for i in range(23)]
    front = Front(app)
    with live_server(front) as base_url, RerankClient(base_url, batch_size=5, max_concurrency=3) as client:
        hits = client.rerank(QUERY, docs)
        assert sorted(n for _, _, n in front.posts) == [3, 5, 5, 5, 5]
        _assert_same([(h.index, h.relevance_score) for h in hits], _engine_ranking(reranker, QUERY, docs))

        top = client.rerank(QUERY, docs, top_n=4)
        _assert_same(
            [(h.index, h.relevance_score) for h in top], _engine_ranking(reranker, QUERY, docs, top_n=4)
        )

        # /rank: ids are positions in the whole list, not in each request.
        ranked = client.rank(QUERY, docs, top_n=6)
        expected = reranker.rerank(QUERY, docs, top_n=6)
        assert [(h.id, h.index) for h in ranked] == [(r.index, r.index) for r in expected]


def test_identical_documents_keep_input_order_across_requests(url: str) -> None:
    # Equal-sized parts sent one at a time (so the service cannot merge some of them), so the
    # engine scores each the same way and the scores tie exactly.
    with RerankClient(url, batch_size=2, max_concurrency=1) as client:
        hits = client.rerank(QUERY, ["同一段文字"] * 8)
    assert len({h.relevance_score for h in hits}) == 1
    assert [h.index for h in hits] == list(range(8))


def test_without_splitting_the_service_names_the_limit(url: str) -> None:
    with RerankClient(url, batch_size=5000, retry=FAST) as client, pytest.raises(RerankServiceError) as info:
        client.rerank(QUERY, ["x"] * 1001)
    assert info.value.status_code == 413
    assert info.value.param == "documents"
    assert info.value.attempts == 1


def test_the_connection_pool_is_reused(app: Any) -> None:
    front = Front(app)
    with live_server(front) as base_url, RerankClient(base_url) as client:
        for _ in range(4):
            client.rerank(QUERY, DOCS[:2])
    assert len(front.posts) == 4
    assert len(front.client_ports) == 1


# -- retries ------------------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [(500,), (502, 503, 500)])
def test_5xx_is_retried_until_the_service_recovers(
    app: Any, reranker: Reranker, failures: tuple[int, ...], caplog: pytest.LogCaptureFixture
) -> None:
    front = Front(app, failures=failures)
    with (
        caplog.at_level(logging.WARNING, logger="qwen3_rerank_plugins.client"),
        live_server(front) as base_url,
        RerankClient(base_url, retry=FAST) as client,
    ):
        hits = client.rerank(QUERY, DOCS)
    assert len(front.posts) == len(failures) + 1
    _assert_same([(h.index, h.relevance_score) for h in hits], _engine_ranking(reranker, QUERY, DOCS))
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == len(failures)
    assert f"answered {failures[0]}; retry 1 of 3" in retries[0]


def test_429_waits_as_long_as_retry_after_says(app: Any, reranker: Reranker) -> None:
    front = Front(app, failures=(429,), retry_after="1")
    with live_server(front) as base_url, RerankClient(base_url, retry=FAST) as client:
        hits = client.rerank(QUERY, DOCS)
    (first, _, _), (second, _, _) = front.posts
    # Backoff alone would wait at most 0.05 s; only the header explains a longer gap.
    assert second - first >= 0.9
    _assert_same([(h.index, h.relevance_score) for h in hits], _engine_ranking(reranker, QUERY, DOCS))


def test_a_retry_after_beyond_the_cap_fails_at_once(app: Any) -> None:
    front = Front(app, failures=(429,), retry_after="120")
    with (
        live_server(front) as base_url,
        RerankClient(base_url, retry=FAST) as client,
        pytest.raises(RerankServiceError, match="asks to retry after 120 s") as info,
    ):
        client.rerank(QUERY, DOCS)
    assert info.value.status_code == 429
    assert len(front.posts) == 1


def test_retries_end_with_the_servers_message(app: Any) -> None:
    front = Front(app, failures=(500,) * 10)
    policy = RetryPolicy(max_retries=2, backoff=0.01)
    with (
        live_server(front) as base_url,
        RerankClient(base_url, retry=policy) as client,
        pytest.raises(RerankServiceError, match=r"HTTP 500: injected 500 \(after 3 attempts\)") as info,
    ):
        client.rerank(QUERY, DOCS)
    assert info.value.attempts == 3
    assert info.value.type == "injected"
    assert len(front.posts) == 3


def test_a_bad_request_is_not_retried(app: Any) -> None:
    front = Front(app)
    with live_server(front) as base_url, RerankClient(base_url, retry=FAST) as client:
        with pytest.raises(RerankServiceError) as info:
            client.rerank("   ", DOCS)
        assert info.value.status_code == 422
        assert info.value.param == "query"
        assert len(front.posts) == 1
        assert client.rerank(QUERY, DOCS[:1])[0].index == 0  # and the service keeps serving


def test_an_unreachable_server_gives_a_clear_error(caplog: pytest.LogCaptureFixture) -> None:
    base_url = _closed_port_url()
    with (
        caplog.at_level(logging.WARNING, logger="qwen3_rerank_plugins.client"),
        RerankClient(base_url, retry=FAST) as client,
        pytest.raises(RerankServiceError) as info,
    ):
        client.rerank(QUERY, DOCS)
    error = info.value
    assert error.status_code is None
    assert error.attempts == 4
    assert f"could not reach the rerank service at {base_url}" in str(error)
    assert "ConnectError" in str(error)
    assert "check that the server is running" in str(error)
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 3


def test_a_slow_answer_times_out_without_a_retry(app: Any) -> None:
    front = Front(app, delay=1.0)
    with (
        live_server(front) as base_url,
        RerankClient(base_url, timeout=0.2, retry=FAST) as client,
        pytest.raises(RerankServiceError, match=r"did not answer /v1/rerank within 0.2 s") as info,
    ):
        client.rerank(QUERY, DOCS)
    assert info.value.attempts == 1
    assert len(front.posts) == 1


def test_health_is_not_retried(app: Any) -> None:
    with RerankClient(_closed_port_url(), retry=FAST) as client, pytest.raises(RerankServiceError) as info:
        client.health()
    assert info.value.attempts == 1


# -- async --------------------------------------------------------------------------------------


async def test_async_client_splits_retries_and_pools(app: Any, reranker: Reranker) -> None:
    docs = [f"{DOCS[i % len(DOCS)]} #{i}" for i in range(12)]
    front = Front(app, failures=(503, 500))
    with live_server(front) as base_url:
        async with AsyncRerankClient(base_url, batch_size=4, max_concurrency=2, retry=FAST) as client:
            hits = await client.rerank(QUERY, docs)
            _assert_same([(h.index, h.relevance_score) for h in hits], _engine_ranking(reranker, QUERY, docs))
            assert len(front.posts) == 3 + 2  # three parts, two of the attempts failed

            # Many callers at once over one pool; each gets its own answer.
            queries = [QUERY, "my coupon doesn't work", "路灯不亮"]
            answers = await asyncio.gather(*(client.rerank(q, DOCS) for q in queries * 3))
            for q, got in zip(queries * 3, answers, strict=True):
                _assert_same([(h.index, h.relevance_score) for h in got], _engine_ranking(reranker, q, DOCS))
            # Later calls reuse the pooled keep-alive connections: no new client port.
            ports = set(front.client_ports)
            for _ in range(3):
                ranked = await client.rank(
                    QUERY, [{"id": "A", "text": DOCS[0]}, {"id": "B", "text": DOCS[1]}]
                )
                assert {h.id for h in ranked} == {"A", "B"}
            assert front.client_ports == ports


async def test_async_unreachable_server() -> None:
    async with AsyncRerankClient(_closed_port_url(), retry=FAST) as client:
        with pytest.raises(RerankServiceError, match="could not reach the rerank service") as info:
            await client.rerank(QUERY, DOCS)
    assert info.value.attempts == 4


# -- arguments ----------------------------------------------------------------------------------


def test_bad_arguments_fail_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="base_url must be an http"):
        RerankClient("rerank:8000")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        RerankClient(batch_size=0)
    with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
        RerankClient(timeout=0)
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with RerankClient(_closed_port_url(), retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(TypeError, match=r"documents\[1\] must be a str or a mapping"):
            client.rerank(QUERY, ["ok", 3])
        with pytest.raises(TypeError, match="documents must be a list"):
            client.rerank(QUERY, "one string")
        with pytest.raises(ValueError, match="top_n must be a positive int"):
            client.rerank(QUERY, DOCS, top_n=0)
        assert client.rerank(QUERY, []) == []


@pytest.mark.parametrize("top_n", [0, -2, "3", 2.0, True])
def test_top_n_is_refused_as_the_engine_refuses_it(reranker: Reranker, top_n: Any) -> None:
    with pytest.raises((TypeError, ValueError)) as local:
        reranker.rerank(QUERY, DOCS, top_n=top_n)
    with RerankClient(_closed_port_url(), retry=RetryPolicy(max_retries=0)) as client:
        with pytest.raises(local.type) as remote:
            client.rerank(QUERY, DOCS, top_n=top_n)
        assert str(remote.value) == str(local.value)
        with pytest.raises(local.type, match="top_n"):
            client.rank(QUERY, DOCS, top_n=top_n)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    def header(value: str) -> float | None:
        return _retry_after(httpx.Response(429, headers={"Retry-After": value}))

    assert header("3") == 3.0
    assert header("garbage") is None
    assert 5 <= header(email.utils.formatdate(time.time() + 10, usegmt=True)) <= 11
    assert header(email.utils.formatdate(time.time() - 100, usegmt=True)) == 0.0


# -- overload: the call's timeout, Retry-After and on_overload ----------------------------------


def _queue_depth(base_url: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith("qwen3_rerank_queue_depth"):
            return float(line.split()[-1])
    return 0.0


def test_the_real_services_full_queue_keeps_order_or_raises_or_is_waited_out(
    reranker: Reranker, caplog: pytest.LogCaptureFixture
) -> None:
    """The service's --max-queue overflow (503 + Retry-After: 1) over real HTTP, no stand-in."""
    import threading

    from helpers import wait_for

    # The batcher waits 2.5 s after the first request: it holds the queue's only place meanwhile.
    app = create_app(reranker, max_queue=1, batch_wait_ms=2500)
    with live_server(app) as base_url:
        blocker = threading.Thread(target=lambda: httpx.post(
            f"{base_url}/v1/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60
        ))  # fmt: skip
        blocker.start()
        wait_for(lambda: _queue_depth(base_url) >= 1, 30, "the first request to queue")

        # Retry-After (1 s) ends past this call's 0.5 s: no wait, at once.
        with RerankClient(base_url, timeout=0.5, retry=FAST) as strict:
            start = time.monotonic()
            with pytest.raises(RerankServiceError, match=r"past this call's timeout of 0\.5 s") as info:
                strict.rerank(QUERY, DOCS)
            assert time.monotonic() - start < 0.5
        assert info.value.status_code == 503 and info.value.overloaded and info.value.type == "overloaded"

        with (
            RerankClient(base_url, timeout=0.5, retry=FAST, on_overload="keep_order") as kind,
            caplog.at_level(logging.WARNING, logger="qwen3_rerank_plugins.client"),
        ):
            hits = kind.rerank(QUERY, DOCS, top_n=2, return_documents=True)
        assert [(h.index, h.document, h.reranked) for h in hits] == [(0, DOCS[0], False), (1, DOCS[1], False)]
        assert all(h.relevance_score != h.relevance_score for h in hits)  # NaN: no score
        assert "overloaded" in caplog.text
        assert f"keeping the input order of {len(DOCS)} documents" in caplog.text

        # With time to spare the client waits as Retry-After says until the queue has room.
        with RerankClient(base_url, timeout=30, retry=RetryPolicy(max_retries=10, backoff=0.01)) as patient:
            start = time.monotonic()
            hits = patient.rerank(QUERY, DOCS)
            assert time.monotonic() - start >= 0.9
        blocker.join(timeout=60)
    _assert_same([(h.index, h.relevance_score) for h in hits], _engine_ranking(reranker, QUERY, DOCS))
    assert all(h.reranked for h in hits)


async def test_async_client_keeps_order_on_overload(app: Any) -> None:
    front = Front(app, failures=(503,) * 5, retry_after="10")
    with live_server(front) as base_url:
        async with AsyncRerankClient(base_url, timeout=2, retry=FAST, on_overload="keep_order") as client:
            hits = await client.rerank(QUERY, DOCS, top_n=3)
    assert [(h.index, h.reranked) for h in hits] == [(0, False), (1, False), (2, False)]
    assert len(front.posts) == 1
    with pytest.raises(ValueError, match="on_overload must be 'raise' or 'keep_order'"):
        RerankClient(on_overload="skip")
    with pytest.raises(ValueError, match="max_tokens_per_doc must be a positive int"):
        RerankClient(_closed_port_url()).rerank(QUERY, DOCS, max_tokens_per_doc=0)
