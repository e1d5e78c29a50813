"""Long documents read in windows, through the adapters: the span of the best window is carried."""

from __future__ import annotations

import pytest
from langchain_core.documents import Document
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

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
