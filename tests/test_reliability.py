"""The service against stalled, hung-up and runaway clients, and a worker that fails mid-batch.

Everything goes over real sockets on 127.0.0.1 to uvicorn serving the real app on the tiny
random Qwen3; raw sockets play the clients that a library would not (a stalled or abandoned
upload). Expected scores always come from the engine itself.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from helpers import ServerThread, check_exact_answer, expected_scores, scrape_metrics, wait_for
from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.server import create_app

QUERY = "发票怎么开"
DOCS = [
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[FAQ] 订单发货时间：付款后48小时内发货，可在“我的订单”中查看物流。",
    "[Policy] Refunds are issued to the original payment method within 7 business days.",
]


def _answered(endpoint: str, status: int) -> tuple[str, tuple[tuple[str, str], ...]]:
    return "qwen3_rerank_requests_total", (("endpoint", endpoint), ("status", str(status)))


PAIRS = "qwen3_rerank_pairs_scored_total", ()


def _head(path: str, *extra: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """Read one response: (status, headers, body, whether the server then closed the connection)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    return int(status_line.split()[1]), headers, body[:length], closed


# -- stalled uploads --------------------------------------------------------------------------------


def test_thirty_stalled_uploads_are_cut_with_408_while_others_are_served(reranker: Reranker) -> None:
    timeout = 2.0
    # Without the score cache: the served requests repeat one body, and a request the cache
    # answers whole never reaches the engine, whose pairs this test counts.
    app = create_app(reranker, body_timeout=timeout, cache_size=0)
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    expected = expected_scores(reranker, QUERY, DOCS)
    with ServerThread(app) as server:
        before = scrape_metrics(server.url)
        socks: list[socket.socket] = []
        trickling: list[socket.socket] = []
        started = time.monotonic()
        for i in range(30):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=timeout + 10)
            kind = i % 3
            if kind == 0:  # headers, then nothing
                sock.sendall(_head("/v1/rerank", f"Content-Length: {len(body)}"))
            elif kind == 1:  # headers and a part of the body, then a byte now and then
                sock.sendall(_head("/v1/rerank", f"Content-Length: {len(body)}") + body[:10])
                trickling.append(sock)
            else:  # a chunked body that stops after its first chunk
                first = body[:10]
                sock.sendall(
                    _head("/rank", "Transfer-Encoding: chunked") + b"%x\r\n%s\r\n" % (len(first), first)
                )
            socks.append(sock)
        stop = threading.Event()

        def trickle() -> None:
            sent = 10
            while not stop.wait(0.2) and sent < len(body) - 1:
                for sock in trickling:
                    with contextlib.suppress(OSError):  # already cut
                        sock.sendall(body[sent : sent + 1])
                sent += 1

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        # Meanwhile the service answers others at once.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(3):
                answer = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
                check_exact_answer(answer, expected)
        served_while_stalled = time.monotonic() - started
        answers: list[tuple[Any, ...]] = []
        resets = 0
        try:
            for sock in socks:
                try:
                    answers.append((*_read_response(sock), time.monotonic() - started))
                except ConnectionResetError:
                    # A byte that reaches the socket after the server closed it makes the kernel
                    # reset the connection, dropping the 408 before it is read: still cut in time.
                    assert sock in trickling
                    resets += 1
                    answers.append((None, {}, b"", True, time.monotonic() - started))
        finally:
            stop.set()
            trickler.join(timeout=10)
            for sock in socks:
                sock.close()
        after = scrape_metrics(server.url)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            check_exact_answer(client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}), expected)

    assert served_while_stalled < timeout, "other requests waited for the stalled uploads"
    assert len(answers) == 30
    assert resets < len(trickling)
    for status, headers, raw, closed, elapsed in answers:
        assert timeout - 0.1 <= elapsed <= timeout + 5
        if status is None:
            continue
        assert status == 408, raw
        assert headers["content-type"] == "application/json"
        assert json.loads(raw)["error"] == {
            "message": f"the request body did not arrive within {timeout:g} s",
            "type": "body_timeout",
            "param": None,
            "code": 408,
        }
        assert headers["connection"] == "close"
        assert closed, "the connection of a cut upload stayed open"
    cut = after.get(_answered("/v1/rerank", 408), 0) + after.get(_answered("/rank", 408), 0)
    cut -= before.get(_answered("/v1/rerank", 408), 0) + before.get(_answered("/rank", 408), 0)
    assert cut == 30
    assert after[PAIRS] - before.get(PAIRS, 0) == 3 * len(DOCS)  # only the served requests' documents


def test_a_slow_but_steady_upload_within_the_timeout_is_served(reranker: Reranker) -> None:
    app = create_app(reranker, body_timeout=3.0)
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    with (
        ServerThread(app) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock,
    ):
        sock.sendall(_head("/v1/rerank", f"Content-Length: {len(body)}"))
        for i in range(0, len(body), len(body) // 5 + 1):
            time.sleep(0.2)
            sock.sendall(body[i : i + len(body) // 5 + 1])
        status, headers, raw, _ = _read_response(sock)

    assert status == 200, raw
    assert "connection" not in headers  # kept alive as usual
    got = {r["index"]: r["relevance_score"] for r in json.loads(raw)["results"]}
    assert got == pytest.approx(expected_scores(reranker, QUERY, DOCS), abs=1e-5)


def test_an_early_answer_still_reaches_a_client_that_is_sending_its_body(reranker: Reranker) -> None:
    # 401 and a 413 on Content-Length are decided before the body is read; the client, still
    # sending, must get them rather than a reset connection.
    app = create_app(reranker, api_key="k", max_body_bytes=64 * 1024, body_timeout=5.0)
    big = json.dumps({"query": QUERY, "documents": ["x" * 1000] * 200}).encode()
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        unauthorised = client.post("/v1/rerank", content=big, headers={"content-type": "application/json"})
        too_big = client.post(
            "/v1/rerank",
            content=big,
            headers={"content-type": "application/json", "authorization": "Bearer k"},
        )
        fine = client.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCS}, headers={"authorization": "Bearer k"}
        )
        health = client.get("/health")

    assert unauthorised.status_code == 401, unauthorised.text
    assert too_big.status_code == 413, too_big.text
    assert too_big.json()["error"]["type"] == "body_too_large"
    assert fine.status_code == 200
    assert "connection" not in fine.headers and "connection" not in health.headers


def test_an_early_answer_to_expect_100_continue_does_not_ask_for_the_body(reranker: Reranker) -> None:
    app = create_app(reranker, api_key="k", body_timeout=5.0)
    with (
        ServerThread(app) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        started = time.monotonic()
        sock.sendall(_head("/v1/rerank", "Content-Length: 100000", "Expect: 100-continue"))
        status, headers, raw, closed = _read_response(sock)
        elapsed = time.monotonic() - started

    assert status == 401, raw  # not "100 Continue": the body is not wanted
    assert json.loads(raw)["error"]["type"] == "authentication_error"
    assert headers["connection"] == "close" and closed
    assert elapsed < 4.0  # answered at once, not after the body deadline


@pytest.mark.parametrize("body_timeout", [0, -1.0, True, "30"])
def test_a_bad_body_timeout_is_refused_at_start_up(reranker: Reranker, body_timeout: Any) -> None:
    with pytest.raises(ValueError, match="body_timeout"):
        create_app(reranker, body_timeout=body_timeout)


# -- clients that hang up ---------------------------------------------------------------------------


def _wait_for_hang_up(url: str, path: str, before: dict[Any, float]) -> None:
    """Until ``/metrics`` counts one more 499 answer on ``path`` than ``before`` did."""
    key = _answered(path, 499)
    wait_for(
        lambda: scrape_metrics(url).get(key, 0) > before.get(key, 0), 30, f"a hang-up on {path} to be counted"
    )


def test_a_client_hanging_up_mid_upload_is_counted_499_and_logged_quietly(
    reranker: Reranker, caplog: pytest.LogCaptureFixture
) -> None:
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    with ServerThread(create_app(reranker)) as server:
        before = scrape_metrics(server.url)
        with caplog.at_level(logging.DEBUG):
            for path in ("/v1/rerank", "/rank"):
                with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                    sock.sendall(_head(path, f"Content-Length: {len(body)}") + body[: len(body) // 2])
                    time.sleep(0.1)  # the server has read the first half
            _wait_for_hang_up(server.url, "/rank", before)
        after = scrape_metrics(server.url)
        with httpx.Client(base_url=server.url, timeout=30) as client:
            check_exact_answer(
                client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}),
                expected_scores(reranker, QUERY, DOCS),
            )

    for path in ("/v1/rerank", "/rank"):
        assert after.get(_answered(path, 499), 0) - before.get(_answered(path, 499), 0) == 1
        assert after.get(_answered(path, 500), 0) == before.get(_answered(path, 500), 0)
    assert after[PAIRS] == before.get(PAIRS, 0)  # nothing of theirs was scored
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert any("disconnected" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_a_running_request_whose_client_hangs_up_stops_between_forward_passes(reranker: Reranker) -> None:
    # Two rows per pass and a pause in each make one request of 60 documents run ~30 slow passes.
    slow = reranker.with_settings(max_batch_size=2)
    passes: list[int] = []

    def pace(module: Any, args: Any, kwargs: Any) -> None:
        passes.append(kwargs["input_ids"].shape[0])
        time.sleep(0.05)

    docs = [f"{DOCS[i % len(DOCS)]} #{i}" for i in range(60)]
    body = json.dumps({"query": QUERY, "documents": docs}).encode()
    handle = reranker._core.backbone.register_forward_pre_hook(pace, with_kwargs=True)
    try:
        with ServerThread(create_app(slow, batch_wait_ms=0)) as server:
            before = scrape_metrics(server.url)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
                sock.sendall(_head("/v1/rerank", f"Content-Length: {len(body)}") + body)
                wait_for(lambda: len(passes) >= 2, 30, "the request to start running")
            _wait_for_hang_up(server.url, "/v1/rerank", before)
            time.sleep(0.3)  # what would still run if the batch were not stopped
            stopped_at = len(passes)
            with httpx.Client(base_url=server.url, timeout=30) as client:
                answer = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
            after = scrape_metrics(server.url)
    finally:
        handle.remove()

    assert stopped_at < 12, f"{stopped_at} passes ran for an abandoned request of ~30"
    check_exact_answer(answer, expected_scores(reranker, QUERY, DOCS))  # the service goes on serving
    assert after[PAIRS] - before.get(PAIRS, 0) == len(DOCS)  # the abandoned pairs are not counted
    assert after.get(_answered("/v1/rerank", 500), 0) == before.get(_answered("/v1/rerank", 500), 0)


# -- the per-request token budget -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/rerank", "/rank"])
def test_a_request_over_the_token_budget_is_refused_with_413_before_scoring(
    reranker: Reranker, path: str
) -> None:
    tokens = reranker.count_tokens(QUERY, DOCS)
    records = [{"id": i, "text": t} for i, t in enumerate(DOCS)]
    documents: list[Any] = DOCS if path == "/v1/rerank" else records
    body = {"query": QUERY, "documents": documents}
    with (
        ServerThread(create_app(reranker, max_request_tokens=tokens - 1)) as tight,
        ServerThread(create_app(reranker, max_request_tokens=tokens)) as exact,
    ):
        before = scrape_metrics(tight.url)
        refused = httpx.post(f"{tight.url}{path}", json=body, timeout=30)
        small = httpx.post(f"{tight.url}{path}", json={**body, "documents": documents[:1]}, timeout=30)
        after = scrape_metrics(tight.url)
        fits = httpx.post(f"{exact.url}{path}", json=body, timeout=30)

    assert refused.status_code == 413, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("too_many_tokens", "documents", 413)
    assert f"read {tokens} prompt tokens" in error["message"]
    assert f"at most {tokens - 1} per request" in error["message"]
    assert small.status_code == 200, small.text
    assert after[PAIRS] - before.get(PAIRS, 0) == 1  # the refused request was never scored
    assert fits.status_code == 200, fits.text  # the budget is exact: a request of exactly it passes


def test_the_token_budget_cuts_each_document_at_max_length(tiny_model_dir: Any) -> None:
    from qwen3_rerank_plugins import get_reranker

    short = get_reranker(tiny_model_dir, device="cpu", max_length=256)
    long_docs = ["很长的文档。" * 2000] * 3
    read = short.count_tokens(QUERY, long_docs)
    assert read <= 3 * 256
    with ServerThread(create_app(short, max_request_tokens=3 * 256)) as server:
        body = {"query": QUERY, "documents": long_docs}
        answer = httpx.post(f"{server.url}/v1/rerank", json=body, timeout=30)

    # 36,000 characters, but the model reads at most 256 tokens of each prompt: within the budget.
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["total_tokens"] == read


@pytest.mark.parametrize("max_request_tokens", [0, -5, 1.5, True])
def test_a_bad_token_budget_is_refused_at_start_up(reranker: Reranker, max_request_tokens: Any) -> None:
    with pytest.raises(ValueError, match="max_request_tokens"):
        create_app(reranker, max_request_tokens=max_request_tokens)


# -- a worker that fails mid-batch ------------------------------------------------------------------

POISON = "\u2620 this document makes the engine raise"


class FailsOnPoison:
    """The real engine, except that a call holding the poison document raises.

    Every other call is the engine's own, so the neighbours' scores are real.
    """

    def __init__(self, engine: Reranker) -> None:
        self._engine = engine
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def score_groups(self, groups: Any, *args: Any, **kwargs: Any) -> Any:
        """The batcher's one engine call for all the requests it merged."""
        self.calls.append(sum(len(group.texts) for group in groups))
        if any(POISON in group.texts for group in groups):
            raise RuntimeError("the device fell over")
        return self._engine.score_groups(groups, *args, **kwargs)


def test_a_request_that_makes_the_worker_raise_fails_alone(reranker: Reranker) -> None:
    faulty = FailsOnPoison(reranker)
    # A long merge window puts all the requests in one engine call.
    # No score cache: the failure must reach the engine call the test double intercepts.
    app = create_app(faulty, batch_wait_ms=1000, max_request_tokens=None, cache_size=0)
    bodies = [{"query": f"{QUERY} {i}", "documents": DOCS[: 1 + i % 3]} for i in range(8)]
    bodies.insert(3, {"query": QUERY, "documents": [DOCS[0], POISON]})
    responses: dict[int, httpx.Response] = {}
    with ServerThread(app) as server:

        def call(i: int) -> None:
            responses[i] = httpx.post(f"{server.url}/v1/rerank", json=bodies[i], timeout=60)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        later = httpx.post(f"{server.url}/v1/rerank", json=bodies[0], timeout=60)
        metrics = scrape_metrics(server.url)

    assert len(responses) == len(bodies)
    poisoned = responses[3]
    assert poisoned.status_code == 500
    error = poisoned.json()["error"]
    assert error["type"] == "internal_error"
    assert "RuntimeError: the device fell over" in error["message"]
    for i, body in enumerate(bodies):
        if i != 3:
            check_exact_answer(responses[i], expected_scores(reranker, body["query"], body["documents"]))
    check_exact_answer(later, expected_scores(reranker, bodies[0]["query"], bodies[0]["documents"]))
    assert max(faulty.calls) == sum(len(b["documents"]) for b in bodies)  # they were merged
    assert metrics[_answered("/v1/rerank", 500)] == 1
