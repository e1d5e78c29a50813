"""Long documents read in windows, through the adapters: the span of the best window is carried."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

from helpers import ServerThread
from qwen3_rerank_plugins.langchain import Qwen3RerankCompressor
from qwen3_rerank_plugins.llama_index import Qwen3Rerank

QUERY = "积分怎么兑换优惠券？"
POLICY = (
    "会员积分规则："
    + "积分有效期为一年，过期自动清零，不可转让。" * 40
    + "兑换方法：在“我的-积分商城”用积分兑换优惠券。"
)
SHORT = "[FAQ] 发票怎么开：在订单详情页点击“申请开票”。"


@pytest.fixture(scope="module")
def windowed(reranker):
    return reranker.with_settings(max_length=200, long_documents=True)


def test_langchain_documents_carry_the_matching_span(reranker, windowed):
    docs = [Document(page_content=POLICY, metadata={"id": "policy"}), Document(page_content=SHORT)]
    out = Qwen3RerankCompressor(reranker=reranker, max_length=200, long_documents=True).compress_documents(
        docs, QUERY
    )
    expected = {r.index: r for r in windowed.rerank(QUERY, [POLICY, SHORT])}
    assert "match_span" not in docs[0].metadata  # inputs untouched
    for doc in out:
        index = 0 if doc.page_content == POLICY else 1
        assert doc.metadata["relevance_score"] == pytest.approx(expected[index].score, abs=1e-6)
        if index == 0:
            span = doc.metadata["match_span"]
            assert (span["start"], span["end"]) == expected[0].span
            assert POLICY[span["start"] : span["end"]]  # a real part of the text
        else:
            assert "match_span" not in doc.metadata  # a short document is read whole


def test_llama_index_nodes_carry_the_matching_span(reranker, windowed):
    nodes = [
        NodeWithScore(node=TextNode(text=POLICY), score=0.5),
        NodeWithScore(node=TextNode(text=SHORT), score=0.4),
    ]
    post = Qwen3Rerank(reranker=reranker, max_length=200, long_documents=True, top_n=2)
    out = post.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    expected = {r.index: r for r in windowed.rerank(QUERY, [POLICY, SHORT])}
    assert "match_span" not in nodes[0].node.metadata  # inputs untouched
    for item in out:
        index = 0 if item.node.get_content() == POLICY else 1
        assert item.score == pytest.approx(expected[index].score, abs=1e-6)
        if index == 0:
            span = item.node.metadata["match_span"]
            assert (span["start"], span["end"]) == expected[0].span
            assert "match_span" in item.node.excluded_embed_metadata_keys
            assert "match_span" in item.node.excluded_llm_metadata_keys
        else:
            assert "match_span" not in item.node.metadata


def test_long_mode_off_is_the_model_card_truncation(reranker):
    on = Qwen3RerankCompressor(reranker=reranker, max_length=200, long_documents=True)
    off = Qwen3RerankCompressor(reranker=reranker, max_length=200)
    short = reranker.with_settings(max_length=200).score(QUERY, [POLICY])[0]
    [doc] = off.compress_documents([Document(page_content=POLICY)], QUERY)
    assert doc.metadata["relevance_score"] == pytest.approx(short, abs=1e-6)
    [doc] = on.compress_documents([Document(page_content=POLICY)], QUERY)
    assert doc.metadata["relevance_score"] >= short - 1e-6  # windows can only raise a score


# ------------------------------------------------------------------ over HTTP


@pytest.fixture(scope="module")
def service_url(reranker):
    from qwen3_rerank_plugins.server import create_app

    with ServerThread(create_app(reranker.with_settings(max_length=200))) as server:
        yield server.url


def test_http_max_chunks_per_doc_reads_windows_and_returns_the_span(service_url, reranker):
    import httpx

    engine = reranker.with_settings(max_length=200, long_documents=True, max_windows=8)
    body = {"query": QUERY, "documents": [POLICY, SHORT], "max_chunks_per_doc": 8}
    answer = httpx.post(f"{service_url}/v1/rerank", json=body, timeout=60).json()
    expected = {r.index: r for r in engine.rerank(QUERY, [POLICY, SHORT])}
    for item in answer["results"]:
        r = expected[item["index"]]
        assert item["relevance_score"] == pytest.approx(r.score, abs=1e-6)
        assert item.get("span") == (None if r.span is None else {"start": r.span[0], "end": r.span[1]})
    assert answer["usage"]["prompt_tokens"] == engine.count_tokens(QUERY, [POLICY, SHORT])  # every window
    ranked = httpx.post(
        f"{service_url}/rank",
        json={"query": QUERY, "documents": [{"id": "p", "text": POLICY}], "max_chunks_per_doc": 8},
        timeout=60,
    ).json()
    assert ranked["results"][0]["span"] == {"start": expected[0].span[0], "end": expected[0].span[1]}
    # Without the field: the model card's truncation, no span.
    plain = httpx.post(
        f"{service_url}/v1/rerank", json={"query": QUERY, "documents": [POLICY]}, timeout=60
    ).json()
    assert "span" not in plain["results"][0]
    short = reranker.with_settings(max_length=200).score(QUERY, [POLICY])[0]
    assert plain["results"][0]["relevance_score"] == pytest.approx(short, abs=1e-6)
    bad = httpx.post(f"{service_url}/v1/rerank", json={**body, "max_chunks_per_doc": 0}, timeout=60)
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "max_chunks_per_doc"


def test_http_query_that_leaves_no_room_is_a_422_naming_query(service_url):
    import httpx

    answer = httpx.post(
        f"{service_url}/v1/rerank", json={"query": "很长的问题" * 2000, "documents": ["a", "b"]}, timeout=60
    )
    assert answer.status_code == 422
    assert answer.json()["error"]["param"] == "query"
    assert "max_length" in answer.json()["error"]["message"]
    cut = httpx.post(
        f"{service_url}/v1/rerank",
        json={"query": "很长的问题" * 2000, "documents": ["a", "b"], "max_tokens_per_query": 20},
        timeout=60,
    )
    assert cut.status_code == 200


def test_cli_long_documents_flag_reads_windows(tmp_path, tiny_model_dir, reranker, capsys):
    import json

    from qwen3_rerank_plugins.cli import main

    docs = tmp_path / "docs.txt"
    docs.write_text(POLICY + "\n" + SHORT + "\n", encoding="utf-8")
    argv = ["rank", "--model", str(tiny_model_dir), "--device", "cpu", "--max-length", "200", "-q", QUERY]
    for flags, engine in (
        (["--long-documents"], reranker.with_settings(max_length=200, long_documents=True)),
        ([], reranker.with_settings(max_length=200)),
    ):
        assert main([*argv, "-d", str(docs), "--json", *flags]) == 0
        got = {r["index"]: r["score"] for r in json.loads(capsys.readouterr().out)["results"]}
        expected = engine.score(QUERY, [POLICY, SHORT])
        assert got == {0: pytest.approx(expected[0], abs=1e-6), 1: pytest.approx(expected[1], abs=1e-6)}
    assert reranker.with_settings(max_length=200, long_documents=True).score(
        QUERY, [POLICY]
    ) != pytest.approx(
        reranker.with_settings(max_length=200).score(QUERY, [POLICY]), abs=1e-6
    )  # the flag changed what was read
