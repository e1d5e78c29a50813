"""Bounded latency under overload: admission by time, client deadlines, /ready and the metrics.

Everything goes over real HTTP on 127.0.0.1 to uvicorn serving the real app on the tiny random
Qwen3. To make the tiny model slow enough to overload in a second, a forward pre-hook sleeps in
each of its forward passes (the engine, its batching and its scores stay the real ones); the
expected scores always come from the engine itself. Arrivals are open-loop: each request is sent
at its scheduled time whatever the answers before it. The requests repeat one body, so the
services run without the score cache (it would answer the repeats without any work to queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import ServerThread, check_exact_answer, expected_scores, scrape_metrics, wait_for
from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.server import create_app
from qwen3_rerank_plugins.server_defaults import DEFAULT_MAX_QUEUE_WAIT_S, ServiceConfig

QUERY = "发票怎么开"
DOCS = [
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[FAQ] 订单发货时间：付款后48小时内发货，可在“我的订单”中查看物流。",
    "[Policy] Refunds are issued to the original payment method within 7 business days.",
]
PASS_SECONDS = 0.04  # sleep in each forward pass of the paced model


@contextlib.contextmanager
def paced(reranker: Reranker, seconds: float = PASS_SECONDS) -> Iterator[list[int]]:
    """Each forward pass of the real engine sleeps ``seconds`` first; yields the rows per pass."""
    passes: list[int] = []

    def pace(module: Any, args: Any, kwargs: Any) -> None:
        passes.append(kwargs["input_ids"].shape[0])
        time.sleep(seconds)

    handle = reranker._core.backbone.register_forward_pre_hook(pace, with_kwargs=True)
    try:
        yield passes
    finally:
        handle.remove()


def _refusals(metrics: dict[Any, float], reason: str) -> float:
    return metrics.get(("qwen3_rerank_refusals_total", (("reason", reason),)), 0.0)


PAIRS = "qwen3_rerank_pairs_scored_total", ()


def _check_refusal(response: httpx.Response, kind: str) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["type"] == kind
    retry_after = int(response.headers["retry-after"])
    assert 1 <= retry_after <= 60


async def _open_loop(
    url: str, bodies: list[dict[str, Any]], rate: float, headers: dict[str, str] | None = None
) -> list[tuple[httpx.Response, float]]:
    """Send ``bodies`` at ``rate`` per second on a fixed schedule; (response, seconds) each."""

    async def one(client: httpx.AsyncClient, at: float, body: dict[str, Any]) -> tuple[httpx.Response, float]:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        sent = time.monotonic()
        response = await client.post("/v1/rerank", json=body, headers=headers)
        return response, time.monotonic() - sent

    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        start = time.monotonic() + 0.05
        return await asyncio.gather(*(one(client, start + i / rate, b) for i, b in enumerate(bodies)))


def _single_request_seconds(client: httpx.Client, rounds: int = 3) -> float:
    best = math.inf
    for _ in range(rounds):
        started = time.monotonic()
        assert client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).status_code == 200
        best = min(best, time.monotonic() - started)
    return best


def test_open_loop_overload_is_refused_fast_admitted_stay_exact_and_light_load_refuses_nothing(
    reranker: Reranker,
) -> None:
    limit = 0.4
    expected = expected_scores(reranker, QUERY, DOCS)
    # One request per engine call and per forward pass: the paced model's capacity is set by its passes.
    slow = reranker.with_settings(max_batch_size=len(DOCS))
    app = create_app(slow, max_queue_wait=limit, max_batch_pairs=len(DOCS), batch_wait_ms=0, cache_size=0)
    with (
        paced(reranker),
        ServerThread(app) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        single = _single_request_seconds(client)  # also the first throughput measurement
        ready_seen: list[int] = []
        health_seen: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as watcher:
                while not stop.wait(0.05):
                    ready_seen.append(watcher.get("/ready").status_code)
                    health_seen.append(watcher.get("/health").status_code)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        overload = [{"query": QUERY, "documents": DOCS}] * 60
        try:
            answers = asyncio.run(_open_loop(server.url, overload, rate=3.0 / single))
        finally:
            stop.set()
            watcher.join(timeout=30)
        during = scrape_metrics(server.url)
        wait_for(lambda: client.get("/ready").status_code == 200, 10, "the backlog to clear")
        light = [{"query": QUERY, "documents": DOCS}] * 10
        calm = asyncio.run(_open_loop(server.url, light, rate=0.4 / single))
        after = scrape_metrics(server.url)

    admitted = [(r, s) for r, s in answers if r.status_code == 200]
    refused = [(r, s) for r, s in answers if r.status_code != 200]
    assert refused, "three times capacity refused nothing"
    assert admitted, "nothing was admitted"
    for response, _ in refused:
        _check_refusal(response, "overloaded")
    for response, _ in admitted:
        check_exact_answer(response, expected)
    # Refused at once (or dropped at the limit when the estimate was wrong), never after a long wait.
    assert max(s for _, s in refused) < limit + 1.0
    # An admitted request waited at most about the limit, then was scored.
    assert max(s for _, s in admitted) < limit + 3 * single + 1.0
    assert _refusals(during, "estimated_wait") >= 1
    assert ("qwen3_rerank_estimated_wait_seconds", ()) in during
    assert during[("qwen3_rerank_throughput_tokens_per_second", ())] > 0
    assert set(health_seen) == {200}, "/health must stay 200 under overload"
    assert 503 in ready_seen, "/ready never said that new work would be refused"
    # Light load after the overload: nothing refused, every answer exact.
    for response, _ in calm:
        check_exact_answer(response, expected)
    refused_total = sum(v for (name, _), v in after.items() if name == "qwen3_rerank_refusals_total")
    refused_during = sum(v for (name, _), v in during.items() if name == "qwen3_rerank_refusals_total")
    assert refused_total == refused_during


def _occupy(url: str, docs: int = 40) -> tuple[threading.Thread, list[httpx.Response]]:
    """A long request that keeps the worker busy (many slow passes); answered in the background."""
    out: list[httpx.Response] = []
    body = {"query": QUERY, "documents": [f"{DOCS[i % len(DOCS)]} #{i}" for i in range(docs)]}

    def send() -> None:
        out.append(httpx.post(f"{url}/v1/rerank", json=body, timeout=60))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, out


def test_a_request_that_waited_past_the_limit_is_dropped_unscored(reranker: Reranker) -> None:
    # A fresh service has measured nothing, so it admits; the worker is then busy for ~1.6 s.
    slow = reranker.with_settings(max_batch_size=1)
    app = create_app(slow, max_queue_wait=0.3, batch_wait_ms=0, cache_size=0)
    with paced(reranker) as passes, ServerThread(app) as server:
        before = scrape_metrics(server.url)
        thread, long_answer = _occupy(server.url)
        wait_for(lambda: len(passes) >= 2, 30, "the long request to start running")
        started = time.monotonic()
        response = httpx.post(
            f"{server.url}/v1/rerank", json={"query": "退货", "documents": DOCS}, timeout=30
        )
        took = time.monotonic() - started
        thread.join(timeout=60)
        after = scrape_metrics(server.url)
    _check_refusal(response, "overloaded")
    assert "max_queue_wait" in response.json()["error"]["message"]
    assert took < 0.3 + 0.5, f"answered after {took:.2f} s, not at the limit"
    assert long_answer and long_answer[0].status_code == 200
    assert after[PAIRS] - before.get(PAIRS, 0) == 40  # the dropped request's pairs were never scored
    assert _refusals(after, "waited_too_long") == 1


def test_a_passed_deadline_is_never_scored(reranker: Reranker) -> None:
    slow = reranker.with_settings(max_batch_size=1)
    app = create_app(slow, max_queue_wait=None, batch_wait_ms=0, cache_size=0)
    expected = expected_scores(reranker, "退货", DOCS)
    with paced(reranker) as passes, ServerThread(app) as server:
        url = f"{server.url}/v1/rerank"
        body = {"query": "退货", "documents": DOCS}
        before = scrape_metrics(server.url)
        # Nothing measured yet: admitted, then dropped unscored when its own deadline passes.
        thread, _ = _occupy(server.url)
        wait_for(lambda: len(passes) >= 2, 30, "the long request to start running")
        started = time.monotonic()
        dropped = httpx.post(url, json=body, headers={"X-Request-Timeout": "0.25"}, timeout=30)
        took = time.monotonic() - started
        thread.join(timeout=60)
        # Measured now: a deadline shorter than the estimated wait is refused at once.
        done = len(passes)
        thread, _ = _occupy(server.url)
        wait_for(lambda: len(passes) >= done + 2, 30, "the second long request to start running")
        started = time.monotonic()
        refused = httpx.post(url, json=body, headers={"X-Request-Timeout": "0.2"}, timeout=30)
        refused_took = time.monotonic() - started
        thread.join(timeout=60)
        after = scrape_metrics(server.url)
        # A deadline that leaves time is scored, exactly.
        kept = httpx.post(url, json=body, headers={"X-Request-Timeout": "30"}, timeout=30)
        bad = [
            httpx.post(url, json=body, headers={"X-Request-Timeout": value}, timeout=30)
            for value in ("soon", "0", "-1", "nan")
        ]
    _check_refusal(dropped, "deadline_exceeded")
    assert "waited past its own deadline" in dropped.json()["error"]["message"]
    assert took < 0.25 + 0.5
    _check_refusal(refused, "deadline_exceeded")
    assert "estimated wait" in refused.json()["error"]["message"]  # refused at admission
    assert refused_took < 1.0
    assert after[PAIRS] - before.get(PAIRS, 0) == 80  # only the two long requests were scored
    assert _refusals(after, "deadline") == 2
    check_exact_answer(kept, expected)
    for response in bad:
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == "X-Request-Timeout"


def test_ready_says_loading_then_ready_and_the_limit_is_reported(reranker: Reranker) -> None:
    release = threading.Event()

    def load() -> Reranker:
        release.wait(30)
        return reranker

    with ServerThread(create_app(load, max_queue_wait=2.5, cache_size=0)) as server:
        loading = httpx.get(f"{server.url}/ready", timeout=30)
        release.set()
        wait_for(lambda: httpx.get(f"{server.url}/health", timeout=30).status_code == 200, 30, "the model")
        ready = httpx.get(f"{server.url}/ready", timeout=30)
    assert loading.status_code == 503 and loading.json() == {"ready": False, "reason": "loading"}
    assert "retry-after" in loading.headers
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "queue": 0,
        "estimated_wait_s": None,
        "estimate_margin_s": 0.0,
        "max_queue_wait_s": 2.5,
    }


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), True, "3"])
def test_a_bad_max_queue_wait_is_refused_at_start_up(value: Any) -> None:
    with pytest.raises(ValueError, match="max_queue_wait"):
        ServiceConfig(max_queue_wait=value)


def test_the_default_limit_and_no_limit() -> None:
    assert ServiceConfig().max_queue_wait == DEFAULT_MAX_QUEUE_WAIT_S
    assert ServiceConfig(max_queue_wait=None).max_queue_wait is None


def test_the_python_client_sends_what_is_left_of_its_timeout_as_the_deadline(reranker: Reranker) -> None:
    from qwen3_rerank_plugins.client import RerankClient, RerankServiceError

    slow = reranker.with_settings(max_batch_size=1)
    app = create_app(slow, max_queue_wait=None, batch_wait_ms=0, cache_size=0)
    with paced(reranker) as passes, ServerThread(app) as server:
        # A measured speed, so that the service refuses at admission (an unmeasured one would
        # drop the request when its deadline passes: about when the client gives up itself).
        assert (
            httpx.post(f"{server.url}/v1/rerank", json={"query": "发票", "documents": DOCS}).status_code
            == 200
        )
        before = scrape_metrics(server.url)
        thread, _ = _occupy(server.url)
        wait_for(lambda: len(passes) >= 5, 30, "the long request to start running")
        client = RerankClient(server.url, timeout=0.4)
        started = time.monotonic()
        with pytest.raises(RerankServiceError) as raised:
            client.rerank("退货", DOCS)
        took = time.monotonic() - started
        kept = RerankClient(server.url, timeout=0.4, on_overload="keep_order").rerank("退货", DOCS, top_n=2)
        thread.join(timeout=60)
        after = scrape_metrics(server.url)
    # The service, not the client's read timeout, ended it: 503 deadline_exceeded, never scored.
    assert raised.value.status_code == 503 and "deadline" in str(raised.value)
    assert took < 0.4 + 0.5
    assert _refusals(after, "deadline") == 2
    assert after[PAIRS] - before.get(PAIRS, 0) == 40  # only the long request was scored
    assert [hit.index for hit in kept] == [0, 1]


async def _late_start(reranker: Reranker) -> tuple[float, float, float]:
    """A batcher whose measured speed is then wrong: a request admitted on a zero estimate
    starts late. Returns (margin after it, margin once the errors aged out, its lateness)."""
    from qwen3_rerank_plugins.protocol import ScoreGroup
    from qwen3_rerank_plugins.server import batcher as batching

    slow = reranker.with_settings(max_batch_size=1)
    batcher = batching.MicroBatcher(slow, max_wait_ms=0)
    await batcher.start()
    try:
        with paced(reranker, 0.05):
            long = asyncio.ensure_future(batcher.submit(ScoreGroup(QUERY, DOCS * 4, None), cost=10.0))
            await asyncio.sleep(0.1)  # the long request is being scored
            await batcher.submit(ScoreGroup(QUERY, DOCS[:1], None), cost=1.0, estimate=0.0)
            await long
        margin = batcher.estimate_margin()
        saved = batching.ERROR_MAX_AGE_S
        batching.ERROR_MAX_AGE_S = 0.0
        try:
            aged = batcher.estimate_margin()
        finally:
            batching.ERROR_MAX_AGE_S = saved
        return margin, aged, batcher._errors[-1][1]
    finally:
        await batcher.close()


def test_admission_keeps_headroom_for_how_late_recent_estimates_were(reranker: Reranker) -> None:
    from qwen3_rerank_plugins.server.batcher import MARGIN_FACTOR

    margin, aged, late = asyncio.run(_late_start(reranker))
    assert late > 0.3  # it waited behind ~12 slow passes while estimated to start at once
    assert margin == pytest.approx(MARGIN_FACTOR * late)
    assert aged == 0.0  # errors age out: one slow moment narrows admission for a minute at most


def test_a_fully_cached_request_is_answered_at_once_while_new_work_is_refused(reranker: Reranker) -> None:
    slow = reranker.with_settings(max_batch_size=1)
    app = create_app(slow, max_queue_wait=0.3, batch_wait_ms=0, cache_size=1000)
    body = {"query": "退货", "documents": DOCS}
    expected = expected_scores(reranker, "退货", DOCS)
    with paced(reranker) as passes, ServerThread(app) as server:
        url = f"{server.url}/v1/rerank"
        first = httpx.post(url, json=body, timeout=30)  # computed, now cached; a measured speed
        thread, _ = _occupy(server.url)
        wait_for(lambda: len(passes) >= len(DOCS) + 5, 30, "the long request to start running")
        started = time.monotonic()
        again = httpx.post(url, json=body, timeout=30)
        took = time.monotonic() - started
        new = httpx.post(url, json={"query": "退货", "documents": [*DOCS, "新的问题"]}, timeout=30)
        thread.join(timeout=60)
        answered = scrape_metrics(server.url)[("qwen3_rerank_requests_answered_from_cache_total", ())]
    check_exact_answer(first, expected)
    check_exact_answer(again, expected)
    usage = again.json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] > 0
    assert took < 0.5, f"a fully cached request waited {took:.2f} s behind other work"
    _check_refusal(new, "overloaded")  # one miss: it is work, and the queue is past the limit
    assert answered == 1


def test_a_burst_on_an_idle_service_is_estimated_as_a_whole_and_light_load_after_it_is_admitted(
    reranker: Reranker,
) -> None:
    """Requests admitted together each count the others' work (their tokens are counted before
    the estimate, and nothing awaits between the estimate and the queue), so a burst does not
    teach the headroom a limit-sized error that would then refuse light load for a minute."""
    slow = reranker.with_settings(max_batch_size=len(DOCS))
    app = create_app(slow, max_queue_wait=2.0, max_batch_pairs=len(DOCS), batch_wait_ms=0, cache_size=0)
    with paced(reranker, 0.04), ServerThread(app) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(2):  # a measured speed
                assert http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).status_code == 200
        bodies = [{"query": f"{QUERY} {i}", "documents": DOCS} for i in range(40)]
        burst = asyncio.run(_open_loop(server.url, bodies, rate=1000.0))
        after = [
            response.status_code for response, _ in asyncio.run(_open_loop(server.url, bodies[:10], rate=4.0))
        ]
        ready = httpx.get(f"{server.url}/ready", timeout=30).json()
        dropped = _refusals(scrape_metrics(server.url), "waited_too_long")
    statuses = [response.status_code for response, _ in burst]
    assert set(statuses) <= {200, 503} and 200 in statuses
    assert dropped <= 2, f"{dropped} burst requests were admitted, then dropped at the limit"
    assert after == [200] * 10, after
    assert ready["estimate_margin_s"] <= 1.0  # never more than half the limit


def test_the_headroom_never_takes_more_than_half_the_limit(reranker: Reranker) -> None:
    from qwen3_rerank_plugins.server import service as serving
    from qwen3_rerank_plugins.server.batcher import MicroBatcher

    batcher = MicroBatcher(reranker)
    batcher._errors.append((time.monotonic(), 30.0))  # one very wrong estimate
    batcher._running_since = time.monotonic()  # busy: the headroom applies
    assert batcher.estimate_margin() == pytest.approx(37.5)  # a quarter more than the worst
    assert serving._planned_wait(batcher, 1.0, 3.0) == 2.5
    assert serving._planned_wait(batcher, 1.0, None) == pytest.approx(38.5)
    batcher._running_since = None  # idle: nothing ahead to misjudge
    assert serving._planned_wait(batcher, 0.0, 3.0) == 0.0
