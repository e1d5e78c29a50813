"""The HTTP rerank service over real sockets on 127.0.0.1, against the tiny random Qwen3.

Servers run in uvicorn on a thread (pre-bound socket, so no port race); the graceful-shutdown
test runs ``qwen3-rerank serve`` in a subprocess and sends it a real SIGTERM. Expected scores
and orders always come from the engine itself.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cohere
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import TICKETS, ServerThread, free_port, wait_for
from qwen3_rerank_plugins import ConfidenceBands, Reranker
from qwen3_rerank_plugins.server import create_app

QUERY = "发票怎么开"
DOCS = [
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[FAQ] 订单发货时间：付款后48小时内发货，可在“我的订单”中查看物流。",
    "[Policy] Refunds are issued to the original payment method within 7 business days.",
    "退货政策：签收后7天内可无理由退货，商品需保持完好。",
    "How do I reset my password? Open Settings, choose Security, then Reset password.",
    "",
]
MAX_DOCUMENTS = 32
MAX_BODY_BYTES = 64 * 1024
API_KEY = "s3cret-key"


@pytest.fixture(scope="module")
def service(reranker: Reranker) -> Iterator[ServerThread]:
    """The service with default bands and small limits, so the limits are cheap to hit."""
    app = create_app(reranker, max_documents=MAX_DOCUMENTS, max_body_bytes=MAX_BODY_BYTES)
    with ServerThread(app) as server:
        yield server


@pytest.fixture(scope="module")
def http(service: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


def _expected(reranker: Reranker, query: str, docs: list[Any], **kwargs: Any) -> list[tuple[int, float]]:
    """(index, score) best first, from the engine."""
    return [(r.index, r.score) for r in reranker.rerank(query, docs, **kwargs)]


def _metrics(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _good_request_still_works(client: httpx.Client, reranker: Reranker) -> None:
    response = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:3]})
    assert response.status_code == 200, response.text
    got = [(r["index"], r["relevance_score"]) for r in response.json()["results"]]
    assert [i for i, _ in got] == [i for i, _ in _expected(reranker, QUERY, DOCS[:3])]


# -- /v1/rerank -------------------------------------------------------------------------------------


def test_v1_rerank_schema_and_order_equal_the_engine(http: httpx.Client, reranker: Reranker) -> None:
    docs = [DOCS[0], {"text": DOCS[1]}, *DOCS[2:]]
    response = http.post("/v1/rerank", json={"model": "anything", "query": QUERY, "documents": docs})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("rerank-")
    assert body["model"] == reranker.model_name
    tokens = reranker.count_tokens(QUERY, DOCS)
    usage = body["usage"]
    assert (usage["prompt_tokens"], usage["total_tokens"]) == (tokens, tokens)  # Infinity's client reads both
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] <= tokens  # of those, answered from cache
    expected = _expected(reranker, QUERY, DOCS)
    assert [r["index"] for r in body["results"]] == [i for i, _ in expected]
    for result, (index, score) in zip(body["results"], expected, strict=True):
        assert set(result) == {"index", "relevance_score", "document"}
        assert result["relevance_score"] == pytest.approx(score, abs=1e-6)
        assert result["document"] == {"text": DOCS[index]}  # "" is kept, never dropped
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("path", ["/rerank", "/v2/rerank"])
def test_rerank_aliases_answer_the_same(http: httpx.Client, reranker: Reranker, path: str) -> None:
    response = http.post(
        path, json={"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": False}
    )

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["index"], pytest.approx(r["relevance_score"], abs=1e-6)) for r in results] == [
        (i, pytest.approx(s, abs=1e-6)) for i, s in _expected(reranker, QUERY, DOCS, top_n=2)
    ]
    assert all("document" not in r for r in results)


def test_instruction_template_and_free_text_change_scores(http: httpx.Client, reranker: Reranker) -> None:
    for instruction in ("customer_service_faq", "Prioritize documents with step-by-step instructions"):
        response = http.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCS, "instruction": instruction}
        )
        assert response.status_code == 200, response.text
        got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
        expected = reranker.score(QUERY, DOCS, instruction=instruction)
        assert [got[i] for i in range(len(DOCS))] == pytest.approx(expected, abs=1e-6)
        assert expected != pytest.approx(reranker.score(QUERY, DOCS), abs=1e-6)


def test_vllm_top_n_zero_means_all(http: httpx.Client) -> None:
    # vLLM's RerankRequest sends top_n=0 by default, meaning every document.
    response = http.post("/v1/rerank", json={"model": "m", "query": QUERY, "documents": DOCS, "top_n": 0})
    assert response.status_code == 200, response.text
    assert sorted(r["index"] for r in response.json()["results"]) == list(range(len(DOCS)))


def test_text_embeddings_inference_shape_on_rerank(http: httpx.Client, reranker: Reranker) -> None:
    response = http.post(
        "/rerank", json={"query": QUERY, "texts": DOCS[:4], "raw_scores": True, "return_text": True}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    logits = reranker.score(QUERY, DOCS[:4], return_logits=True)
    assert [r["index"] for r in body] == sorted(range(4), key=lambda i: -logits[i])
    for r in body:
        assert r["score"] == pytest.approx(logits[r["index"]], abs=1e-5)
        assert r["text"] == DOCS[r["index"]]


def test_unchanged_cohere_sdk_clients_work(service: ServerThread, reranker: Reranker) -> None:
    expected = _expected(reranker, QUERY, DOCS, top_n=3)

    v2 = cohere.ClientV2(api_key="unused", base_url=service.url, timeout=30)
    got_v2 = v2.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3)
    v1 = cohere.Client(api_key="unused", base_url=service.url, timeout=30)
    got_v1 = v1.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=3, return_documents=True)

    for got in (got_v2, got_v1):
        assert [(r.index, pytest.approx(r.relevance_score, abs=1e-6)) for r in got.results] == [
            (i, pytest.approx(s, abs=1e-6)) for i, s in expected
        ]
    assert [r.document.text for r in got_v1.results] == [DOCS[i] for i, _ in expected]


# What the Jina and vLLM rerank clients send, as their API documentation and examples write it,
# and the response fields those clients read.
THIRD_PARTY_REQUESTS = [
    (
        "jina",
        "/v1/rerank",
        {"model": "jina-reranker-v2-base-multilingual", "query": QUERY, "top_n": 3, "documents": DOCS},
    ),
    (
        "jina-objects",
        "/v1/rerank",
        {"model": "jina-reranker-m0", "query": QUERY, "documents": [{"text": d} for d in DOCS]},
    ),
    ("vllm", "/rerank", {"model": "Qwen/Qwen3-Reranker-0.6B", "query": QUERY, "documents": DOCS}),
    (
        "vllm-v1",
        "/v1/rerank",
        {"model": "Qwen/Qwen3-Reranker-0.6B", "query": QUERY, "documents": DOCS, "top_n": 0},
    ),
]


@pytest.mark.parametrize(
    ("path", "body"), [c[1:] for c in THIRD_PARTY_REQUESTS], ids=[c[0] for c in THIRD_PARTY_REQUESTS]
)
def test_jina_and_vllm_requests_get_what_their_clients_read(
    http: httpx.Client, reranker: Reranker, path: str, body: dict
) -> None:
    response = http.post(path, json=body, headers={"Authorization": "Bearer ignored-when-no-key-is-set"})

    assert response.status_code == 200, response.text
    payload = response.json()
    assert isinstance(payload["usage"]["total_tokens"], int) and payload["model"] and payload["id"]
    expected = _expected(reranker, QUERY, DOCS, top_n=body.get("top_n") or None)
    assert [(r["index"], r["document"]["text"]) for r in payload["results"]] == [
        (i, DOCS[i]) for i, _ in expected
    ]
    assert [r["relevance_score"] for r in payload["results"]] == pytest.approx(
        [s for _, s in expected], abs=1e-6
    )


# -- /rank ------------------------------------------------------------------------------------------


def test_rank_returns_ids_scores_and_default_bands(http: httpx.Client, reranker: Reranker) -> None:
    query = "朝阳区建国路电梯又坏了"
    response = http.post("/rank", json={"query": query, "documents": TICKETS, "top_n": 3})

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = reranker.rerank(query, TICKETS, top_n=3)
    assert [r["id"] for r in results] == [e.document["id"] for e in expected]
    assert results[0]["id"] in {"T-1021", 877, "T-0932", "T-1102"}  # ids keep their JSON type
    for got, want in zip(results, expected, strict=True):
        assert got["score"] == pytest.approx(want.score, abs=1e-6)
        assert got["band"] == ConfidenceBands(high=0.85, medium=0.70).classify(got["score"])


def test_rank_bands_use_the_configured_cut_offs(reranker: Reranker) -> None:
    query = "朝阳区建国路电梯又坏了"
    scores = sorted(reranker.score(query, TICKETS))
    # Cut-offs between the observed scores, so that every band shows up.
    bands = ConfidenceBands(high=(scores[2] + scores[3]) / 2, medium=(scores[0] + scores[1]) / 2)
    with ServerThread(create_app(reranker, bands=bands)) as server:
        response = httpx.post(f"{server.url}/rank", json={"query": query, "documents": TICKETS}, timeout=30)

    assert response.status_code == 200, response.text
    assert [r["band"] for r in response.json()["results"]] == ["high", "medium", "medium", "low"]


def test_rank_fallback_retries_a_low_confidence_query(http: httpx.Client, reranker: Reranker) -> None:
    from qwen3_rerank_plugins.fallback import generalize

    query = "朝阳区建国路88号3号楼电梯昨晚十一点又坏了"
    body = {"query": query, "documents": TICKETS, "fallback": True}
    response = http.post("/rank", json=body)

    assert response.status_code == 200, response.text
    payload = response.json()
    retried = generalize(query)
    assert retried != query
    # Random tiny-model scores are all in the default low band: the retry always runs.
    first, second = reranker.rerank(query, TICKETS), reranker.rerank(retried, TICKETS)
    better = second if second[0].score > first[0].score else first
    assert payload["fallback"] == {
        "retried_query": retried,
        "used_query": retried if better is second else query,
        "needs_review": True,
    }
    assert [r["id"] for r in payload["results"]] == [r.document["id"] for r in better]
    assert [r["score"] for r in payload["results"]] == pytest.approx([r.score for r in better], abs=1e-6)

    plain = http.post("/rank", json={"query": query, "documents": TICKETS}).json()
    assert "fallback" not in plain


# -- health, models, metrics ------------------------------------------------------------------------


def test_health_is_503_until_the_model_loaded_then_200(reranker: Reranker) -> None:
    release = threading.Event()

    def slow_factory() -> Reranker:
        release.wait(timeout=30)
        return reranker

    with ServerThread(create_app(slow_factory)) as server, httpx.Client(base_url=server.url) as client:
        loading = client.get("/health")
        refused = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
        no_models = client.get("/v1/models").json()
        release.set()
        deadline = time.monotonic() + 30
        while (ready := client.get("/health")).status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        served = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})

    assert loading.status_code == 503
    assert loading.json()["status"] == "loading"
    assert "retry-after" in loading.headers
    assert refused.status_code == 503
    assert refused.json()["error"]["type"] == "model_loading"
    assert no_models["data"] == []
    assert ready.status_code == 200
    assert ready.json() | {"queue": 0} == {
        "status": "ok",
        "model": reranker.model_name,
        "device": "cpu",
        "dtype": "float32",
        "queue": 0,
    }
    assert served.status_code == 200


def test_health_reports_a_failed_load(reranker: Reranker) -> None:
    errors: list[BaseException] = []

    def broken() -> Reranker:
        raise OSError("no model at /nowhere")

    with ServerThread(create_app(broken, on_load_error=errors.append)) as server:
        deadline = time.monotonic() + 30
        while not errors and time.monotonic() < deadline:
            time.sleep(0.02)
        health = httpx.get(f"{server.url}/health")
        scored = httpx.post(f"{server.url}/v1/rerank", json={"query": QUERY, "documents": DOCS})

    assert [type(e) for e in errors] == [OSError]
    assert health.status_code == 503
    assert health.json() == {"status": "error", "error": "OSError: no model at /nowhere"}
    assert scored.status_code == 503
    assert "no model at /nowhere" in scored.json()["error"]["message"]


def test_models_lists_the_served_model(http: httpx.Client, reranker: Reranker) -> None:
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"]) for m in body["data"]] == [(reranker.model_name, "model")]


def test_metrics_count_requests_pairs_and_batches(http: httpx.Client) -> None:
    before = _metrics(http)
    # Not from the score cache (earlier tests scored these pairs): a request the cache answers
    # whole never reaches the engine, so it adds no pairs or batches.
    body = {"query": QUERY, "documents": DOCS, "cache": False}
    assert http.post("/v1/rerank", json=body).status_code == 200
    assert http.post("/rank", json={"query": QUERY, "documents": TICKETS, "cache": False}).status_code == 200
    assert http.post("/v1/rerank", json={"query": QUERY}).status_code == 422
    after = _metrics(http)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("qwen3_rerank_requests_total", endpoint="/v1/rerank", status="200") == 1
    assert delta("qwen3_rerank_requests_total", endpoint="/rank", status="200") == 1
    assert delta("qwen3_rerank_requests_total", endpoint="/v1/rerank", status="422") == 1
    assert delta("qwen3_rerank_pairs_scored_total") == len(DOCS) + len(TICKETS)
    assert delta("qwen3_rerank_batch_pairs_count") == 2
    assert delta("qwen3_rerank_batch_pairs_sum") == len(DOCS) + len(TICKETS)
    assert delta("qwen3_rerank_batch_requests_count") == 2
    assert delta("qwen3_rerank_request_duration_seconds_count", endpoint="/rank") == 1
    assert after[("qwen3_rerank_model_loaded", ())] == 1
    assert after[("qwen3_rerank_queue_depth", ())] == 0
    info = [key for key in after if key[0] == "qwen3_rerank_model_info"]
    assert [dict(labels)["device"] for _, labels in info] == ["cpu"]


# -- bad input --------------------------------------------------------------------------------------

BAD_REQUESTS = [
    # (case, path, raw body, status, error param, words in the message)
    (
        "fallback not a boolean",
        "/rank",
        b'{"query": "q", "documents": ["d"], "fallback": "yes"}',
        422,
        "fallback",
        "true or false",
    ),
    ("malformed JSON", "/v1/rerank", b'{"query": "q", "documents": [', 400, None, "not valid JSON"),
    ("empty body", "/v1/rerank", b"", 400, None, "empty"),
    ("JSON nested too deeply", "/v1/rerank", b"[" * 50_000, 400, None, "nested too deeply"),
    ("not UTF-8", "/v1/rerank", b'{"query": "\xff"}', 400, None, "UTF-8"),
    ("body is a list", "/v1/rerank", b'["q", "d"]', 422, None, "JSON object"),
    ("missing query", "/v1/rerank", b'{"documents": ["d"]}', 422, "query", "query is required"),
    ("empty query", "/v1/rerank", b'{"query": "  ", "documents": ["d"]}', 422, "query", "empty"),
    ("query not a string", "/rank", b'{"query": 5, "documents": ["d"]}', 422, "query", "string"),
    ("missing documents", "/v1/rerank", b'{"query": "q"}', 422, "documents", "required"),
    ("empty documents", "/v1/rerank", b'{"query": "q", "documents": []}', 422, "documents", "empty"),
    ("documents not a list", "/v1/rerank", b'{"query": "q", "documents": "d"}', 422, "documents", "list"),
    ("documents an object", "/rank", b'{"query": "q", "documents": {"id": 1}}', 422, "documents", "list"),
    (
        "number document",
        "/v1/rerank",
        b'{"query": "q", "documents": ["d", 7]}',
        422,
        "documents[1]",
        "got number",
    ),
    ("null document", "/v1/rerank", b'{"query": "q", "documents": [null]}', 422, "documents[0]", "got null"),
    (
        "object without text",
        "/rank",
        b'{"query": "q", "documents": [{"id": 1}]}',
        422,
        "documents[0].text",
        "text",
    ),
    (
        "text not a string",
        "/rank",
        b'{"query": "q", "documents": [{"text": 1}]}',
        422,
        "documents[0].text",
        "string",
    ),
    (
        "bad id",
        "/rank",
        b'{"query": "q", "documents": [{"id": [1], "text": "d"}]}',
        422,
        "documents[0].id",
        "id",
    ),
    ("TEI text not a string", "/rerank", b'{"query": "q", "texts": ["d", 1]}', 422, "texts[1]", "string"),
    (
        "top_n a string",
        "/v1/rerank",
        b'{"query": "q", "documents": ["d"], "top_n": "2"}',
        422,
        "top_n",
        "integer",
    ),
    (
        "negative top_n",
        "/rank",
        b'{"query": "q", "documents": ["d"], "top_n": -1}',
        422,
        "top_n",
        "non-negative",
    ),
    (
        "return_documents",
        "/v1/rerank",
        b'{"query": "q", "documents": ["d"], "return_documents": "no"}',
        422,
        "return_documents",
        "true or false",
    ),
    (
        "empty instruction",
        "/v1/rerank",
        b'{"query": "q", "documents": ["d"], "instruction": ""}',
        422,
        "instruction",
        "empty",
    ),
    (
        "too many documents",
        "/v1/rerank",
        json.dumps({"query": "q", "documents": ["d"] * (MAX_DOCUMENTS + 1)}).encode(),
        413,
        "documents",
        "at most 32",
    ),
    (
        "oversized body",
        "/v1/rerank",
        json.dumps({"query": "q", "documents": ["x" * MAX_BODY_BYTES]}).encode(),
        413,
        None,
        "at most 65536 bytes",
    ),
]


@pytest.mark.parametrize(
    ("path", "raw", "status", "param", "words"),
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_input_gets_a_4xx_naming_the_field_and_the_service_goes_on(
    http: httpx.Client, reranker: Reranker, path: str, raw: bytes, status: int, param: str | None, words: str
) -> None:
    response = http.post(path, content=raw, headers={"content-type": "application/json"})

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["code"] == status
    assert words in error["message"]
    _good_request_still_works(http, reranker)


def test_oversized_chunked_body_is_refused_without_content_length(
    http: httpx.Client, reranker: Reranker
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"query": "q", "documents": ["'
        for _ in range(MAX_BODY_BYTES // 4096 + 2):
            yield b"x" * 4096
        yield b'"]}'

    response = http.post("/v1/rerank", content=chunks(), headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.json()["error"]["type"] == "body_too_large"
    _good_request_still_works(http, reranker)


def test_unknown_path_and_wrong_method_answer_json(http: httpx.Client) -> None:
    missing = http.get("/v1/nothing")
    wrong = http.get("/v1/rerank")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, 404)
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, 405)


# -- API key ----------------------------------------------------------------------------------------


def test_api_key_is_required_when_set(reranker: Reranker) -> None:
    body = {"query": QUERY, "documents": DOCS}
    with (
        ServerThread(create_app(reranker, api_key=API_KEY)) as server,
        httpx.Client(base_url=server.url) as c,
    ):
        missing = c.post("/v1/rerank", json=body)
        wrong = c.post("/rank", json=body, headers={"Authorization": "Bearer nope"})
        wrong_scheme = c.get("/v1/models", headers={"Authorization": f"Basic {API_KEY}"})
        good = c.post("/v1/rerank", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        models = c.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        health = c.get("/health")
        metrics = c.get("/metrics")
        cohere_sdk = cohere.ClientV2(api_key=API_KEY, base_url=server.url).rerank(
            model="m", query=QUERY, documents=DOCS, top_n=1
        )

    for refused in (missing, wrong, wrong_scheme):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert refused.json()["error"]["type"] == "authentication_error"
    assert good.status_code == 200
    assert models.status_code == 200
    assert health.status_code == 200 and metrics.status_code == 200  # probes need no key
    assert len(cohere_sdk.results) == 1


# -- concurrency ------------------------------------------------------------------------------------


def test_fifty_concurrent_clients_all_get_their_own_correct_answer(reranker: Reranker) -> None:
    clients = 50
    queries = [f"订单{i}还没发货，能查一下吗？ order {i}" for i in range(clients)]
    doc_sets = [[*DOCS[i % 3 :], f"[FAQ] 第{i}号问题的答案"] for i in range(clients)]
    app = create_app(reranker, batch_wait_ms=20)

    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        path = "/rank" if i % 2 else "/v1/rerank"
        return await client.post(path, json={"query": queries[i], "documents": doc_sets[i]})

    async def run_all(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(clients))), 120)

    with ServerThread(app) as server, httpx.Client(base_url=server.url) as sync_client:
        before = _metrics(sync_client)
        responses = asyncio.run(run_all(server.url))
        after = _metrics(sync_client)

    assert [r.status_code for r in responses] == [200] * clients
    for i, response in enumerate(responses):
        expected = reranker.score(queries[i], doc_sets[i])
        key = "score" if i % 2 else "relevance_score"
        got = {r.get("id", r.get("index")): r[key] for r in response.json()["results"]}
        assert sorted(got) == list(range(len(doc_sets[i])))  # nothing lost, nothing mixed up
        assert [got[j] for j in range(len(expected))] == pytest.approx(expected, abs=1e-5)
    total_pairs = sum(len(d) for d in doc_sets)
    pairs = "qwen3_rerank_pairs_scored_total", ()
    calls = "qwen3_rerank_batch_requests_count", ()
    merged = "qwen3_rerank_batch_requests_sum", ()
    assert after[pairs] - before.get(pairs, 0) == total_pairs
    assert after[merged] - before.get(merged, 0) == clients
    assert after[calls] - before.get(calls, 0) < clients  # requests were merged into fewer engine calls


def test_a_full_queue_answers_503_with_retry_after(reranker: Reranker) -> None:
    # The worker waits 1.5 s after the first request, so the first two stay queued meanwhile.
    app = create_app(reranker, max_queue=2, batch_wait_ms=1500)
    body = {"query": QUERY, "documents": DOCS}
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        queued: list[httpx.Response] = []
        threads = [
            threading.Thread(
                target=lambda: queued.append(httpx.post(f"{server.url}/v1/rerank", json=body, timeout=60))
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while _metrics(client)[("qwen3_rerank_queue_depth", ())] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        refused = client.post("/v1/rerank", json=body)
        for t in threads:
            t.join(timeout=60)
        after = client.post("/v1/rerank", json=body)

    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "overloaded"
    assert [r.status_code for r in queued] == [200, 200]
    assert after.status_code == 200


def test_a_request_whose_client_disconnected_is_dropped_before_scoring(reranker: Reranker) -> None:
    # The worker waits 1.5 s after the first request: the client hangs up meanwhile.
    app = create_app(reranker, batch_wait_ms=1500)
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    head = "POST /v1/rerank HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        before = _metrics(client)
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(head.encode() + body)
            wait_for(
                lambda: _metrics(client)[("qwen3_rerank_queue_depth", ())] == 1, 30, "the request to queue"
            )
        dropped = "qwen3_rerank_requests_total", (("endpoint", "/v1/rerank"), ("status", "499"))
        wait_for(lambda: _metrics(client).get(dropped, 0) == 1, 30, "the server to notice the hang-up")
        # Answered after the worker woke: everything queued before it has been handled by then.
        answer = client.post("/v1/rerank", json={"query": QUERY, "documents": DOCS[:2]})
        after = _metrics(client)

    assert answer.status_code == 200, answer.text
    pairs, merged = ("qwen3_rerank_pairs_scored_total", ()), ("qwen3_rerank_batch_requests_sum", ())
    assert after[pairs] - before.get(pairs, 0) == 2  # only the second request's documents were scored
    assert after[merged] - before.get(merged, 0) == 1
    assert after[("qwen3_rerank_queue_depth", ())] == 0


# -- graceful shutdown ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_lets_in_flight_requests_finish(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    # A long merge window keeps the requests queued (in flight) until the signal has been sent.
    command = [sys.executable, "-m", "qwen3_rerank_plugins", "serve", "--model", str(tiny_model_dir),
               "--device", "cpu", "--port", str(port), "--batch-wait-ms", "1500"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                return False

        wait_for(ready, 120, "the server to load the model", interval=0.1)
        in_flight = 8
        responses: list[httpx.Response | BaseException] = []

        def call(i: int) -> None:
            try:
                responses.append(
                    httpx.post(f"{url}/v1/rerank", json={"query": f"q{i}", "documents": DOCS}, timeout=60)
                )
            except BaseException as exc:
                responses.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(in_flight)]
        for t in threads:
            t.start()

        def all_queued() -> bool:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            return f"qwen3_rerank_queue_depth {float(in_flight)}" in text

        wait_for(all_queued, 30, "the requests to be queued")
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=60)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()

    output = (tmp_path / "serve.log").read_text()
    # uvicorn re-raises the signal once it has drained, so the process ends "killed by SIGTERM",
    # which systemd, supervisor and docker all read as a clean stop.
    assert code in (0, -signal.SIGTERM), output
    assert len(responses) == in_flight
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses), responses
    assert all(len(r.json()["results"]) == len(DOCS) for r in responses)
    assert "Batcher drained" in output
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


# -- the README's example ---------------------------------------------------------------------------


def _readme_serving_snippet() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- section: serving -->", 1)[1].split("<!-- section:", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the serving section of README.md has one python example"
    return blocks[0]


def test_readme_example_runs_against_the_service(reranker: Reranker, capsys: pytest.CaptureFixture) -> None:
    snippet = _readme_serving_snippet()
    assert "http://127.0.0.1:8000" in snippet
    with ServerThread(create_app(reranker, api_key="change-me")) as server:
        exec(compile(snippet.replace("http://127.0.0.1:8000", server.url), "README.md", "exec"), {})

    first, ranked = capsys.readouterr().out.splitlines()
    docs = ["【发票申请指南】在订单详情页点击“申请开票”", "[Policy] 退货政策：7天无理由"]
    best = reranker.rerank("发票怎么开", docs, top_n=1)[0]
    index, score = first.split()
    assert int(index) == best.index
    assert float(score) == pytest.approx(best.score, abs=1e-6)
    tickets = [{"id": "T-1021", "text": "建国路88号小区电梯故障"}, {"id": "T-0932", "text": "海淀区路灯不亮"}]
    expected = reranker.rerank("朝阳区建国路电梯又坏了", tickets, instruction="similar_ticket")
    assert [r["id"] for r in ast.literal_eval(ranked)] == [r.document["id"] for r in expected]


def test_a_remote_reranker_is_refused_with_a_clear_error() -> None:
    from qwen3_rerank_plugins.remote import RemoteReranker

    refused = pytest.raises(TypeError, match="serves a local Reranker")
    with RemoteReranker("http://127.0.0.1:9") as remote, refused:
        create_app(remote)
