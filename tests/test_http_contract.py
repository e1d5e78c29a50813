"""The HTTP contract that rerank clients rely on, over real sockets on 127.0.0.1.

Real clients where they install into the test extra (Infinity's ``infinity_client``, LangChain's
``InfinityRerank`` and ``JinaRerank``, the Cohere SDK); expected scores always come from the engine.
Also: bodies that cannot be decoded (400 JSON) and text that is not valid Unicode (422 naming
the field), string booleans, ``rank_fields``, token caps, TEI's ``top_n`` and ``meta.instruction``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import cohere
import httpx
import pytest

from helpers import ServerThread, approx_ranking
from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.server import create_app

QUERY = "发票怎么开"
DOCS = [
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[FAQ] 订单发货时间：付款后48小时内发货，可在“我的订单”中查看物流。",
    "退货政策：签收后7天内可无理由退货，商品需保持完好。",
]
API_KEY = "contract-key"


@pytest.fixture(scope="module")
def service(reranker: Reranker) -> Iterator[ServerThread]:
    with ServerThread(create_app(reranker)) as server:
        yield server


@pytest.fixture(scope="module")
def keyed(reranker: Reranker) -> Iterator[ServerThread]:
    with ServerThread(create_app(reranker, api_key=API_KEY)) as server:
        yield server


@pytest.fixture(scope="module")
def http(service: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        yield client


def _ranked(reranker: Reranker, query: str, texts: list[str], **settings: Any) -> list[tuple[int, float]]:
    engine = reranker.with_settings(**settings) if settings else reranker
    return [(r.index, r.score) for r in engine.rerank(query, texts)]


def _assert_error(response: httpx.Response, status: int, param: str | None, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"]["param"] == param
    assert body["error"]["code"] == status
    assert body["detail"] == body["error"]["message"]  # Jina's clients raise resp["detail"]
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


def _still_serves(http: httpx.Client, reranker: Reranker) -> None:
    response = http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})
    assert response.status_code == 200, response.text
    got = [(r["index"], r["relevance_score"]) for r in response.json()["results"]]
    assert got == approx_ranking(_ranked(reranker, QUERY, DOCS))


# -- issue 16.1: Infinity's client reads usage.prompt_tokens ----------------------------------------


def test_infinity_client_and_langchain_infinity_rerank_work_unchanged(
    service: ServerThread, reranker: Reranker
) -> None:
    from infinity_client import Client
    from infinity_client.api.default import rerank
    from infinity_client.models import RerankInput
    from langchain_community.document_compressors.infinity_rerank import InfinityRerank
    from langchain_core.documents import Document

    expected = _ranked(reranker, QUERY, DOCS)
    client = Client(base_url=service.url)
    answer = rerank.sync(client=client, body=RerankInput(query=QUERY, documents=DOCS, return_documents=True))
    assert [(r.index, r.relevance_score) for r in answer.results] == approx_ranking(expected)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == reranker.count_tokens(QUERY, DOCS)
    # The documented choice: document is {"text": ...} (Jina / vLLM / Cohere), not Infinity's plain string.
    assert answer.results[0].document == {"text": DOCS[expected[0][0]]}

    compressor = InfinityRerank(client=Client(base_url=service.url), model="qwen3-reranker", top_n=2)
    docs = [Document(page_content=text, metadata={"n": i}) for i, text in enumerate(DOCS)]
    out = compressor.compress_documents(docs, QUERY)
    assert [(d.metadata["n"], d.metadata["relevance_score"]) for d in out] == approx_ranking(expected[:2])


def test_infinity_raw_scores_are_log_odds(http: httpx.Client, reranker: Reranker) -> None:
    logits = reranker.score(QUERY, DOCS, return_logits=True)
    response = http.post("/rerank", json={"query": QUERY, "documents": DOCS, "raw_scores": True})
    assert response.status_code == 200, response.text
    assert {r["index"]: r["relevance_score"] for r in response.json()["results"]} == pytest.approx(
        dict(enumerate(logits))
    )


# -- issue 16.2: string booleans ---------------------------------------------------------------------


@pytest.mark.parametrize("value", ["true", "True", "TRUE", "false", "False", "fAlSe"])
def test_boolean_fields_take_true_and_false_strings(http: httpx.Client, value: str) -> None:
    response = http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "return_documents": value})
    assert response.status_code == 200, response.text
    assert all(("document" in r) is (value.lower() == "true") for r in response.json()["results"])
    tei = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": value})
    assert tei.status_code == 200, tei.text
    assert all(("text" in r) is (value.lower() == "true") for r in tei.json())


@pytest.mark.parametrize("value", ["yes", "1", " true", "", 1, 0])
def test_other_strings_and_numbers_are_not_booleans(
    http: httpx.Client, reranker: Reranker, value: Any
) -> None:
    response = http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "return_documents": value})
    _assert_error(response, 422, "return_documents", "return_documents must be true or false")
    response = http.post("/rank", json={"query": QUERY, "documents": DOCS, "fallback": value})
    _assert_error(response, 422, "fallback")
    _still_serves(http, reranker)


# -- issue 16.3: Jina's clients read "detail" --------------------------------------------------------


def test_langchain_jina_rerank_works_and_raises_the_services_message(
    keyed: ServerThread, reranker: Reranker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_community.document_compressors import jina_rerank
    from langchain_core.documents import Document

    # JinaRerank posts to a module constant; point it at this service (the client code is unchanged).
    monkeypatch.setattr(jina_rerank, "JINA_API_URL", f"{keyed.url}/v1/rerank")
    docs = [Document(page_content=text) for text in DOCS]
    good = jina_rerank.JinaRerank(jina_api_key=API_KEY, top_n=2)
    out = good.compress_documents(docs, QUERY)
    expected = _ranked(reranker, QUERY, DOCS)[:2]
    assert [(DOCS.index(d.page_content), d.metadata["relevance_score"]) for d in out] == approx_ranking(
        expected
    )

    with pytest.raises(RuntimeError, match="missing or invalid API key"):
        jina_rerank.JinaRerank(jina_api_key="wrong").compress_documents(docs, QUERY)
    with pytest.raises(RuntimeError, match="query must not be empty"):
        good.compress_documents(docs, "   ")


# -- issue 16.4: Cohere's rank_fields ----------------------------------------------------------------


def test_cohere_rank_fields_read_the_named_fields_in_order_and_return_the_object(
    service: ServerThread, reranker: Reranker
) -> None:
    records = [
        {"title": "发票", "body": "在订单详情页点击“申请开票”", "id": 7},
        {"title": "发货", "body": "付款后48小时内发货", "id": 8},
        {"title": "退货", "body": "7天无理由退货", "id": 9},
    ]
    read = [f"title: {r['title']}\nbody: {r['body']}" for r in records]
    expected = _ranked(reranker, QUERY, read)
    co = cohere.Client(api_key="unused", base_url=service.url)
    answer = co.rerank(
        model="qwen3-reranker",
        query=QUERY,
        documents=records,
        rank_fields=["title", "body"],
        return_documents=True,
    )
    assert [(r.index, r.relevance_score) for r in answer.results] == approx_ranking(expected)

    with httpx.Client(base_url=service.url, timeout=30) as http:
        body = {"query": QUERY, "documents": records, "rank_fields": ["title", "body"]}
        results = http.post("/v1/rerank", json=body).json()["results"]
        assert [r["document"] for r in results] == [records[i] for i, _ in expected]  # every field back
        # One field: its value alone, as a plain string document would be read.
        one = http.post("/v1/rerank", json={**body, "rank_fields": ["body"]}).json()["results"]
        assert [(r["index"], r["relevance_score"]) for r in one] == approx_ranking(
            _ranked(reranker, QUERY, [r["body"] for r in records])
        )
        # The order of rank_fields is the order the model reads them in.
        swapped = http.post("/v1/rerank", json={**body, "rank_fields": ["body", "title"]}).json()["results"]
        assert [(r["index"], r["relevance_score"]) for r in swapped] == approx_ranking(
            _ranked(reranker, QUERY, [f"body: {r['body']}\ntitle: {r['title']}" for r in records])
        )
        missing = http.post("/v1/rerank", json={**body, "rank_fields": ["title", "text"]})
        _assert_error(missing, 422, "documents[0].text", "no field 'text'", "rank_fields")
        no_text = http.post("/v1/rerank", json={"query": QUERY, "documents": records})
        _assert_error(no_text, 422, "documents[0].text", "without a 'text' field")
        bad = http.post("/v1/rerank", json={**body, "rank_fields": "title"})
        _assert_error(bad, 422, "rank_fields", "list of field names")


# -- issue 16.5: token caps --------------------------------------------------------------------------


def test_max_tokens_per_doc_and_query_cut_as_the_engine_does(http: httpx.Client, reranker: Reranker) -> None:
    long_docs = [text * 8 for text in DOCS]
    for field, setting, value in (
        ("max_tokens_per_doc", "max_doc_tokens", 5),
        ("max_tokens_per_query", "max_query_tokens", 3),
    ):
        capped = _ranked(reranker, QUERY * 4, long_docs, **{setting: value})
        assert capped != approx_ranking(_ranked(reranker, QUERY * 4, long_docs))  # the cap changes the scores
        for path, key in (("/v1/rerank", "documents"), ("/v2/rerank", "documents")):
            response = http.post(path, json={"query": QUERY * 4, key: long_docs, field: value})
            assert response.status_code == 200, response.text
            got = [(r["index"], r["relevance_score"]) for r in response.json()["results"]]
            assert got == approx_ranking(capped)
        tei = http.post("/rerank", json={"query": QUERY * 4, "texts": long_docs, field: value})
        assert [(r["index"], r["score"]) for r in tei.json()] == approx_ranking(capped)
        rank = http.post("/rank", json={"query": QUERY * 4, "documents": long_docs, field: value})
        assert [(r["index"], r["score"]) for r in rank.json()["results"]] == approx_ranking(capped)
        for bad in (0, -3, "5", 2.5, True):
            _assert_error(
                http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, field: bad}),
                422,
                field,
                field,
            )
    for bad in (0, -2, "x"):
        response = http.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCS, "truncate_prompt_tokens": bad}
        )
        _assert_error(response, 422, "truncate_prompt_tokens")
    ok = http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "truncate_prompt_tokens": -1})
    assert ok.status_code == 200, ok.text


# -- issue 16.6: TEI's shape and top_n ---------------------------------------------------------------


def test_tei_shape_keeps_the_best_top_n_as_litellm_asks(http: httpx.Client, reranker: Reranker) -> None:
    expected = _ranked(reranker, QUERY, DOCS)
    # LiteLLM's huggingface provider sends this body (top_n, raw_scores, truncation_direction).
    body = {"query": QUERY, "texts": DOCS, "top_n": 2, "raw_scores": False, "truncation_direction": "Right"}
    response = http.post("/rerank", json=body)
    assert response.status_code == 200, response.text
    assert [(r["index"], r["score"]) for r in response.json()] == approx_ranking(expected[:2])
    everything = http.post("/rerank", json={**body, "top_n": 0}).json()
    assert [(r["index"], r["score"]) for r in everything] == approx_ranking(expected)


# -- issue 16.12 (HTTP half): meta.instruction -------------------------------------------------------


def test_meta_says_how_the_instruction_was_read(http: httpx.Client, reranker: Reranker) -> None:
    def meta(path: str, **extra: Any) -> dict[str, Any]:
        response = http.post(path, json={"query": QUERY, "documents": DOCS, **extra})
        assert response.status_code == 200, response.text
        return response.json()["meta"]["instruction"]

    for path in ("/v1/rerank", "/rank"):
        default = meta(path)
        assert default == {"source": "default", "template": "web_search", "text": reranker.instruction}
        named = meta(path, instruction="customer_service_faq")
        assert named["source"] == "template" and named["template"] == "customer_service_faq"
        folded = meta(path, instruction="Customer_Service_FAQ")  # wrong case: the same template
        assert folded == named
        typo = meta(path, instruction="customer_servic_faq")
        assert typo == {
            "source": "free_text",
            "template": None,
            "text": "customer_servic_faq",
            "did_you_mean": "customer_service_faq",
        }
        sentence = meta(path, instruction="Find the ticket that reports the same fault")
        assert sentence == {
            "source": "free_text",
            "template": None,
            "text": "Find the ticket that reports the same fault",
        }


# -- issue 14.1-2: bodies that cannot be decoded, text that is not Unicode ---------------------------


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"query": "q", "documents": ["a"], "n": ' + b"7" * 5000 + b"}", "4300 digits"),
        (b'{"query": "q", "documents": ["a"], "top_n": NaN}', "NaN is not a JSON value"),
        (b'{"query": "q", "documents": ["a"], "x": -Infinity}', "-Infinity is not a JSON value"),
        (b'{"query": "q", "documents": ["a"', "not valid JSON"),
        (b'{"query": "\xff"}', "not UTF-8"),
    ],
)
def test_bodies_that_cannot_be_decoded_get_400_json(
    http: httpx.Client, reranker: Reranker, raw: bytes, words: str
) -> None:
    for path in ("/v1/rerank", "/rerank", "/rank"):
        response = http.post(path, content=raw, headers={"content-type": "application/json"})
        body = _assert_error(response, 400, None, words)
        assert body["error"]["type"] == "invalid_json"
    _still_serves(http, reranker)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/rank", {"query": "q", "documents": [{"id": "T-\ud800", "text": "a"}]}, "documents[0].id"),
        ("/rank", {"query": "q\udfff", "documents": ["a"]}, "query"),
        ("/v1/rerank", {"query": "q", "documents": ["a", "b\ud800c"]}, "documents[1]"),
        ("/v1/rerank", {"query": "q", "documents": [{"text": "\ud800"}]}, "documents[0].text"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "instruction": "x\ud800"}, "instruction"),
        (
            "/v1/rerank",
            {"query": "q", "documents": [{"text": "a", "meta": {"k": ["\ud800"]}}]},
            "documents[0].meta.k[0]",
        ),
        ("/rerank", {"query": "q", "texts": ["\udbff"]}, "texts[0]"),
    ],
)
def test_lone_surrogates_are_refused_naming_the_field(
    http: httpx.Client, reranker: Reranker, path: str, body: dict[str, Any], param: str
) -> None:
    raw = json.dumps(body).encode()  # ensure_ascii: the surrogate travels as a \\ud800 escape
    response = http.post(path, content=raw, headers={"content-type": "application/json"})
    _assert_error(response, 422, param, param, "lone surrogate", "not valid Unicode")
    _still_serves(http, reranker)


def test_a_surrogate_pair_is_one_character_and_is_accepted(http: httpx.Client) -> None:
    raw = json.dumps({"query": "表情 😀", "documents": ["😀 smile"]}).encode()  # \\ud83d\\ude00
    response = http.post("/v1/rerank", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["document"] == {"text": "😀 smile"}
