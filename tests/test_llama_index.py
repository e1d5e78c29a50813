"""The LlamaIndex postprocessor, inside real LlamaIndex indexes and query engines."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.callbacks import CallbackManager, CBEventType, EventPayload, LlamaDebugHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode
from pydantic import Field, ValidationError

from qwen3_rerank_plugins import Reranker, get_reranker
from qwen3_rerank_plugins.langchain import Qwen3RerankCompressor
from qwen3_rerank_plugins.llama_index import Qwen3Rerank

ROOT = Path(__file__).resolve().parents[1]
QUERY = "发票怎么开"
# (id, text, title, tags): titles and tags live in metadata, as LlamaIndex readers put them.
FAQ = [
    ("faq-invoice", "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。", "发票申请", "发票"),
    (
        "faq-shipping",
        "[FAQ] 订单发货时间：付款后48小时内发货，可在“我的订单”中查看物流。",
        "发货时间",
        "物流",
    ),
    (
        "faq-refund",
        "[Policy] Refunds are issued to the original payment method within 7 business days.",
        "Refunds",
        "refund",
    ),
    ("faq-return", "退货政策：签收后7天内可无理由退货，商品需保持完好。", "退货政策", "售后"),
    (
        "faq-coupon",
        "[FAQ] My coupon doesn't work: check the minimum order amount and the expiry date.",
        "Coupons",
        "promotion",
    ),
    ("faq-vat", "[FAQ] 增值税专用发票需提供开户行和账号，开具后邮寄到收货地址。", "专票", "发票"),
    (
        "faq-password",
        "How do I reset my password? Open Settings, choose Security, then Reset password.",
        "Account",
        "account",
    ),
]


class CharBagEmbedding(BaseEmbedding):
    """Deterministic offline embedding: hashed character bigrams, L2-normalised."""

    dim: int = 64

    @classmethod
    def class_name(cls) -> str:
        return "CharBagEmbedding"

    def _vector(self, text: str) -> list[float]:
        vec = [0.0] * self.dim
        for a, b in zip(text, text[1:] + " ", strict=True):
            vec[hashlib.md5((a + b).encode()).digest()[0] % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


def _faq_nodes() -> list[TextNode]:
    return [
        TextNode(
            id_=node_id,
            text=text,
            metadata={"title": title, "tags": tags, "source_file": "faq.xlsx"},
            excluded_embed_metadata_keys=["source_file"],
            excluded_llm_metadata_keys=["source_file"],
        )
        for node_id, text, title, tags in FAQ
    ]


@pytest.fixture(scope="module")
def index() -> VectorStoreIndex:
    return VectorStoreIndex(_faq_nodes(), embed_model=CharBagEmbedding())


@pytest.fixture
def retrieved(index) -> list[NodeWithScore]:
    """All FAQ nodes as the retriever returns them, with their retrieval scores."""
    return index.as_retriever(similarity_top_k=len(FAQ)).retrieve(QUERY)


def _embed_texts(nodes: list[NodeWithScore]) -> list[str]:
    return [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]


def _expected(reranker: Reranker, nodes: list[NodeWithScore], query: str = QUERY, **kwargs: Any):
    """(ids best first, score by id), from the engine's own scores on the embed-mode text."""
    scores = reranker.score(query, _embed_texts(nodes), **kwargs)
    order = sorted(range(len(nodes)), key=lambda i: (-scores[i], i))
    by_id = {n.node.node_id: s for n, s in zip(nodes, scores, strict=True)}
    return [nodes[i].node.node_id for i in order], by_id


def _ids(nodes: list[NodeWithScore]) -> list[str]:
    return [n.node.node_id for n in nodes]


def _query_engine(index: VectorStoreIndex, postprocessor: Qwen3Rerank, **kwargs: Any):
    return index.as_query_engine(
        llm=MockLLM(), similarity_top_k=len(FAQ), node_postprocessors=[postprocessor], **kwargs
    )


class EventRecorder(BaseEventHandler):
    """Collects the rerank instrumentation events."""

    events: list[Any] = Field(default_factory=list)

    def handle(self, event: Any, **kwargs: Any) -> None:
        if isinstance(event, (ReRankStartEvent, ReRankEndEvent)):
            self.events.append(event)


@pytest.fixture
def recorder():
    handler = EventRecorder()
    root = get_dispatcher()
    root.add_event_handler(handler)
    yield handler
    root.event_handlers.remove(handler)


# ------------------------------------------------------------------ inside a query engine


def test_a_score_cache_answers_a_repeated_call(reranker, tiny_model_dir):
    rerank = Qwen3Rerank(model=tiny_model_dir, device="cpu", cache=32, top_n=2)
    assert rerank.engine is get_reranker(tiny_model_dir, device="cpu", cache=32) and reranker.cache is None
    cache = rerank.engine.cache
    nodes = [NodeWithScore(node=TextNode(text=t), score=0.0) for t in ["缓存一", "缓存二", "缓存三"]]
    first = rerank.postprocess_nodes(copy.deepcopy(nodes), query_str=QUERY)
    hits = cache.stats()["hits"]["memory"]
    again = rerank.postprocess_nodes(copy.deepcopy(nodes), query_str=QUERY)
    assert cache.stats()["hits"]["memory"] == hits + 3  # the second call: every pair from the cache
    assert [n.score for n in again] == pytest.approx([n.score for n in first], abs=1e-6)
    assert Qwen3Rerank.from_dict(rerank.to_dict()).engine is rerank.engine  # the cache is configuration


def test_query_engine_order_and_scores_match_engine(reranker, index, retrieved):
    ids, scores = _expected(reranker, retrieved)
    response = _query_engine(index, Qwen3Rerank(reranker=reranker, top_n=None)).query(QUERY)

    assert _ids(response.source_nodes) == ids
    for node in response.source_nodes:
        assert node.score == pytest.approx(scores[node.node.node_id], abs=1e-6)
    assert [n.score for n in response.source_nodes] == sorted(
        (n.score for n in response.source_nodes), reverse=True
    )
    # The answering LLM got the reranked nodes, best first (MockLLM echoes its prompt).
    positions = [str(response).index(text) for _, text, _, _ in sorted(FAQ, key=lambda f: ids.index(f[0]))]
    assert positions == sorted(positions)


def test_overload_keeps_the_retrievers_order_in_a_query_engine(reranker, index, retrieved, caplog):
    """on_overload="keep_order": the service answers 503 + Retry-After past the timeout (over real HTTP)."""
    from helpers import Front, live_server
    from qwen3_rerank_plugins.client import RerankServiceError
    from qwen3_rerank_plugins.server import create_app

    front = Front(create_app(reranker), failures=(503,) * 20, retry_after="30")
    with live_server(front) as url:
        kind = Qwen3Rerank(base_url=url, top_n=3, timeout=2.0, on_overload="keep_order")
        with caplog.at_level("WARNING", logger="qwen3_rerank_plugins"):
            response = _query_engine(index, kind).query(QUERY)
        assert _ids(response.source_nodes) == _ids(retrieved)[:3]  # the retriever's order, cut to top_n
        assert [n.score for n in response.source_nodes] == pytest.approx([n.score for n in retrieved[:3]])
        for node in response.source_nodes:
            assert node.node.metadata["reranked"] is False
            assert "reranked" in node.node.excluded_llm_metadata_keys
        assert "reranked" not in retrieved[0].node.metadata  # the index's nodes are untouched
        assert "keeping the retriever's order of 7 items, cut to top_n=3" in caplog.text
        asynced = asyncio.run(_query_engine(index, kind).aquery(QUERY))
        assert _ids(asynced.source_nodes) == _ids(retrieved)[:3]
        # The default raises, and the service was asked once per query (no wait past the timeout).
        posts = len(front.posts)
        with pytest.raises(RerankServiceError, match="past this call's timeout") as info:
            _query_engine(index, Qwen3Rerank(base_url=url, top_n=3, timeout=2.0)).query(QUERY)
        assert info.value.overloaded and len(front.posts) == posts + 1


def test_top_n_and_instruction(reranker, index, retrieved):
    postprocessor = Qwen3Rerank(reranker=reranker, top_n=3, instruction="customer_service_faq")
    response = _query_engine(index, postprocessor).query(QUERY)
    ids, _ = _expected(reranker, retrieved, instruction="customer_service_faq")
    assert _ids(response.source_nodes) == ids[:3]
    texts = _embed_texts(retrieved)
    assert reranker.score(QUERY, texts, "customer_service_faq") != reranker.score(QUERY, texts)


def test_reads_text_in_embed_metadata_mode(reranker, retrieved):
    out = Qwen3Rerank(reranker=reranker, top_n=None).postprocess_nodes(retrieved, query_str=QUERY)

    embed_texts = _embed_texts(retrieved)
    assert all("title: " in t and "tags: " in t and "faq.xlsx" not in t for t in embed_texts)
    _, scores = _expected(reranker, retrieved)
    assert {n.node.node_id: n.score for n in out} == pytest.approx(scores, abs=1e-6)
    plain = reranker.score(QUERY, [n.node.get_content(metadata_mode=MetadataMode.NONE) for n in retrieved])
    assert plain != reranker.score(QUERY, embed_texts), "metadata did not reach the reranker"


def test_default_top_n_is_five(reranker, retrieved):
    postprocessor = Qwen3Rerank(reranker=reranker)
    assert postprocessor.top_n == 5
    out = postprocessor.postprocess_nodes(retrieved, query_str=QUERY)
    assert _ids(out) == _expected(reranker, retrieved)[0][:5]


# ------------------------------------------------------------------ copies, never mutation


@pytest.mark.parametrize("keep", [False, True])
def test_caller_nodes_are_not_mutated(reranker, retrieved, keep):
    snapshot = copy.deepcopy(retrieved)
    out = Qwen3Rerank(reranker=reranker, top_n=None, keep_retrieval_score=keep).postprocess_nodes(
        retrieved, query_str=QUERY
    )

    assert [n.model_dump() for n in retrieved] == [n.model_dump() for n in snapshot]
    assert all("retrieval_score" not in n.node.metadata for n in retrieved)
    assert not any(o is n for o in out for n in retrieved)
    retrieval = {n.node.node_id: n.score for n in retrieved}
    for node in out:
        if keep:
            assert node.node.metadata["retrieval_score"] == retrieval[node.node.node_id]
            assert node.node.metadata["title"] == dict((f[0], f[2]) for f in FAQ)[node.node.node_id]
            # Bookkeeping, not content: neither the LLM nor a second reranking reads it.
            for mode in (MetadataMode.LLM, MetadataMode.EMBED):
                assert "retrieval_score" not in node.node.get_content(metadata_mode=mode)
        else:
            assert "retrieval_score" not in node.node.metadata


def test_keep_retrieval_score_in_a_query_engine_and_twice(reranker, index, retrieved):
    postprocessor = Qwen3Rerank(reranker=reranker, top_n=None, keep_retrieval_score=True)
    response = _query_engine(index, postprocessor).query(QUERY)
    retrieval = {n.node.node_id: n.score for n in retrieved}
    kept = {n.node.node_id: n.node.metadata["retrieval_score"] for n in response.source_nodes}
    assert kept == pytest.approx(retrieval)
    assert "retrieval_score" not in str(response)
    # Reranking the reranked copies again reads the same text, so gives the same order.
    again = postprocessor.postprocess_nodes(response.source_nodes, query_str=QUERY)
    assert _ids(again) == _ids(response.source_nodes)
    assert [n.node.excluded_llm_metadata_keys.count("retrieval_score") for n in again] == [1] * len(FAQ)


# ------------------------------------------------------------------ events


def test_instrumentation_and_callback_events(reranker, index, recorder):
    debug = LlamaDebugHandler(print_trace_on_end=False)
    postprocessor = Qwen3Rerank(reranker=reranker, top_n=2)
    query_engine = RetrieverQueryEngine.from_args(
        index.as_retriever(similarity_top_k=len(FAQ)),
        llm=MockLLM(),
        node_postprocessors=[postprocessor],
        callback_manager=CallbackManager([debug]),
    )
    response = query_engine.query(QUERY)

    start, end = recorder.events
    assert isinstance(start, ReRankStartEvent) and isinstance(end, ReRankEndEvent)
    assert start.query.query_str == QUERY and start.top_n == 2
    assert start.model_name == reranker.model_name
    assert len(start.nodes) == len(FAQ)
    assert _ids(end.nodes) == _ids(response.source_nodes)

    [(cb_start, cb_end)] = debug.get_event_pairs(CBEventType.RERANKING)
    assert cb_start.payload[EventPayload.QUERY_STR] == QUERY
    assert cb_start.payload[EventPayload.TOP_K] == 2
    assert cb_start.payload[EventPayload.MODEL_NAME] == reranker.model_name
    assert len(cb_start.payload[EventPayload.NODES]) == len(FAQ)
    assert _ids(cb_end.payload[EventPayload.NODES]) == _ids(response.source_nodes)


def test_events_name_the_model_argument(tiny_model_dir, reranker, retrieved, recorder):
    Qwen3Rerank(model=tiny_model_dir, device="cpu", top_n=None).postprocess_nodes(retrieved, query_str=QUERY)
    start, end = recorder.events
    assert start.model_name == str(tiny_model_dir) and start.top_n == len(retrieved)
    assert len(end.nodes) == len(retrieved)


async def test_async_path_emits_events(reranker, retrieved, recorder):
    out = await Qwen3Rerank(reranker=reranker, top_n=3).apostprocess_nodes(retrieved, query_str=QUERY)
    start, end = recorder.events
    assert isinstance(start, ReRankStartEvent) and _ids(end.nodes) == _ids(out)
    # Both events belong to the postprocessor's own span, as on the sync path.
    assert start.span_id == end.span_id and start.span_id.startswith("Qwen3Rerank._apostprocess_nodes")


def test_sync_events_belong_to_the_postprocessor_span(reranker, retrieved, recorder):
    Qwen3Rerank(reranker=reranker).postprocess_nodes(retrieved, query_str=QUERY)
    start, end = recorder.events
    assert start.span_id == end.span_id and start.span_id.startswith("Qwen3Rerank._postprocess_nodes")


# ------------------------------------------------------------------ edge cases


async def test_edge_cases(reranker, retrieved, recorder):
    postprocessor = Qwen3Rerank(reranker=reranker, top_n=100)
    out = postprocessor.postprocess_nodes(retrieved, query_str=QUERY)
    assert _ids(out) == _expected(reranker, retrieved)[0]
    recorder.events.clear()

    assert postprocessor.postprocess_nodes([], query_str=QUERY) == []
    assert await postprocessor.apostprocess_nodes([], query_str=QUERY) == []
    assert recorder.events == []  # nothing was reranked

    with pytest.raises(ValueError, match="needs the query"):
        postprocessor.postprocess_nodes(retrieved)
    with pytest.raises(ValueError, match="needs the query"):
        await postprocessor.apostprocess_nodes(retrieved)
    with pytest.raises(ValueError, match="needs the query"):
        postprocessor.postprocess_nodes([])


def test_threshold(reranker, retrieved):
    ids, scores = _expected(reranker, retrieved)
    cut = sorted(scores.values(), reverse=True)[2]

    def run(**kwargs: Any) -> list[str]:
        return _ids(Qwen3Rerank(reranker=reranker, **kwargs).postprocess_nodes(retrieved, query_str=QUERY))

    assert run(top_n=None, threshold=cut) == ids[:3]
    assert run(top_n=2, threshold=cut) == ids[:2]
    assert run(top_n=None, threshold=0.0) == ids
    assert run(threshold=1.0) == [] or max(scores.values()) == 1.0


def test_nodes_without_retrieval_score(reranker):
    nodes = [NodeWithScore(node=TextNode(id_=f, text=t)) for f, t, _, _ in FAQ[:3]]
    out = Qwen3Rerank(reranker=reranker, top_n=None, keep_retrieval_score=True).postprocess_nodes(
        nodes, query_bundle=QueryBundle(QUERY)
    )
    assert [n.node.metadata["retrieval_score"] for n in out] == [None] * 3
    assert all(isinstance(n.score, float) for n in out)


def test_fields_and_class_name():
    assert issubclass(Qwen3Rerank, BaseNodePostprocessor)
    assert Qwen3Rerank.class_name() == "Qwen3Rerank"
    expected = {"model", "reranker", "top_n", "instruction", "device", "dtype", "source", "max_length"}
    expected |= {"batch_tokens", "keep_retrieval_score", "threshold"}
    assert expected <= set(Qwen3Rerank.model_fields)
    for name in expected:
        assert Qwen3Rerank.model_fields[name].description, f"Qwen3Rerank.{name} has no description"


# ------------------------------------------------------------------ one loaded model


def test_model_is_shared(reranker, tiny_model_dir):
    first = Qwen3Rerank(model=tiny_model_dir, device="cpu")
    second = Qwen3Rerank(model=str(tiny_model_dir), device="cpu", top_n=2, instruction="customer_service_faq")
    compressor = Qwen3RerankCompressor(model=tiny_model_dir, device="cpu")
    assert first.engine is second.engine is compressor.engine is reranker
    assert first.engine is get_reranker(tiny_model_dir, device="cpu")

    shorter = Qwen3Rerank(model=tiny_model_dir, device="cpu", max_length=512)
    assert shorter.engine is not reranker and shorter.engine.shares_model_with(reranker)
    assert shorter.engine.max_length == 512

    tuned = Qwen3Rerank(reranker=reranker, batch_tokens=1024).engine
    assert tuned.shares_model_with(reranker) and tuned.batch_tokens == 1024
    assert reranker.batch_tokens != 1024  # the engine passed in keeps its own settings
    assert Qwen3Rerank(reranker=reranker).engine is reranker


# ------------------------------------------------------------------ async


async def test_aquery_equals_query(reranker, index):
    sync = _query_engine(index, Qwen3Rerank(reranker=reranker, top_n=4)).query(QUERY)
    # test_adapters.py checks that this path never goes through the sync one.
    result = await _query_engine(index, Qwen3Rerank(reranker=reranker, top_n=4)).aquery(QUERY)
    assert _ids(result.source_nodes) == _ids(sync.source_nodes)
    assert [n.score for n in result.source_nodes] == pytest.approx([n.score for n in sync.source_nodes])


# ------------------------------------------------------------------ serialisation


def test_round_trip_from_model_arguments(reranker, tiny_model_dir, retrieved):
    postprocessor = Qwen3Rerank(
        model=tiny_model_dir, device="cpu", top_n=3, instruction="customer_service_faq", threshold=0.01
    )
    data = postprocessor.to_dict()
    assert data["class_name"] == "Qwen3Rerank"
    assert "reranker" not in data and "callback_manager" not in data

    for loaded in (Qwen3Rerank.from_dict(data), Qwen3Rerank.from_json(postprocessor.to_json())):
        assert loaded.to_dict() == data
        assert loaded.engine is reranker
        assert _ids(loaded.postprocess_nodes(retrieved, query_str=QUERY)) == _ids(
            postprocessor.postprocess_nodes(retrieved, query_str=QUERY)
        )
    assert data == {**data, "model": str(tiny_model_dir), "top_n": 3, "threshold": 0.01}


def test_round_trip_from_a_shared_engine(reranker, tiny_model_dir, retrieved):
    tuned = reranker.with_settings(instruction="customer_service_faq", max_length=1024)
    postprocessor = Qwen3Rerank(reranker=tuned, top_n=None)
    data = postprocessor.to_dict()
    assert data["model"] == str(tiny_model_dir) and data["device"] == "cpu" and data["dtype"] == "float32"
    assert (data["max_length"], data["instruction"]) == (1024, tuned.instruction)

    loaded = Qwen3Rerank.from_json(postprocessor.to_json())
    assert loaded.reranker is None and loaded.engine.shares_model_with(reranker)
    before = postprocessor.postprocess_nodes(retrieved, query_str=QUERY)
    after = loaded.postprocess_nodes(retrieved, query_str=QUERY)
    assert _ids(after) == _ids(before)
    assert [n.score for n in after] == pytest.approx([n.score for n in before], abs=1e-6)


def test_round_trip_from_an_engine_built_by_hand(hf_model, retrieved):
    by_hand = Reranker(*hf_model)
    data = Qwen3Rerank(reranker=by_hand, top_n=2).to_dict()
    assert data["model"] is None

    with pytest.raises(ValidationError, match="reranker="):
        Qwen3Rerank.from_dict(data)
    loaded = Qwen3Rerank.from_dict(data, reranker=by_hand)
    assert loaded.engine.shares_model_with(by_hand) and loaded.top_n == 2
    assert len(loaded.postprocess_nodes(retrieved, query_str=QUERY)) == 2


# ------------------------------------------------------------------ packaging and docs


def test_library_does_not_print(reranker, retrieved, capsys):
    Qwen3Rerank(reranker=reranker).postprocess_nodes(retrieved, query_str=QUERY)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def _python_blocks(path: Path, after: str | None = None, before: str | None = None) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if after is not None:
        text = text.split(after, 1)[1]
    if before is not None:
        text = text.split(before, 1)[0]
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def _run_snippet(blocks: list[str], tiny_model_dir: Path, filename: str) -> dict[str, Any]:
    source = "\n".join(blocks)
    hub_id = '"Qwen/Qwen3-Reranker-0.6B"'
    assert hub_id in source
    namespace: dict[str, Any] = {"__name__": filename}
    exec(compile(source.replace(hub_id, repr(str(tiny_model_dir))), filename, "exec"), namespace)
    return namespace


def test_readme_section_runs(tiny_model_dir, capsys):
    blocks = _python_blocks(ROOT / "README.md", "<!-- section: llama-index -->", "<!-- section: ")
    assert len(blocks) == 1
    namespace = _run_snippet(blocks, tiny_model_dir, "README.md")

    printed = capsys.readouterr().out.splitlines()
    nodes = namespace["response"].source_nodes
    assert len(printed) == len(nodes) == 2
    assert [line.split()[0] for line in printed] == [f"{n.score:.3f}" for n in nodes]
    assert namespace["query_engine"]._node_postprocessors[0].engine is get_reranker(tiny_model_dir)


def test_docs_snippets_run(tiny_model_dir, capsys):
    """Every python block of docs/llama_index.md, in order, with the tiny model for the hub id."""
    blocks = _python_blocks(ROOT / "docs" / "llama_index.md")
    assert len(blocks) >= 3
    namespace = _run_snippet(blocks, tiny_model_dir, "docs/llama_index.md")

    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3
    nodes = namespace["response"].source_nodes
    assert [line.split()[0] for line in printed] == [n.node.node_id for n in nodes]
    assert all("retrieval_score" in n.node.metadata for n in nodes)
    assert _ids(namespace["async_nodes"]) == _ids(nodes)
    assert namespace["rerank"].engine is namespace["rr"] is get_reranker(tiny_model_dir)  # device="auto"
    assert namespace["restored"].engine.shares_model_with(namespace["rr"])
    assert namespace["restored"].to_dict() == namespace["confident_only"].to_dict()


@pytest.mark.parametrize(("module", "extra"), [("llama_index", "llama-index"), ("langchain", "langchain")])
def test_import_without_the_extra_names_it_even_without_pydantic(module: str, extra: str):
    # A core-only install has neither the framework nor pydantic (which the frameworks bring).
    code = textwrap.dedent(
        f"""
        import sys
        for name in ("pydantic", "llama_index", "langchain_core"):
            sys.modules[name] = None
        import qwen3_rerank_plugins
        try:
            import qwen3_rerank_plugins.{module}
        except ImportError as exc:
            print(exc)
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"pip install 'qwen3-rerank-plugins[{extra}]'" in proc.stdout


def test_fallback_setting_survives_saving_and_pickling(reranker):
    import pickle

    pp = Qwen3Rerank(reranker=reranker, top_n=2, fallback=True)
    assert pp.to_dict()["fallback"] is True
    assert Qwen3Rerank.from_dict(pp.to_dict(), reranker=reranker).fallback is True
    assert pickle.loads(pickle.dumps(pp)).fallback is True
    compressor = Qwen3RerankCompressor(reranker=reranker, fallback=True)
    assert pickle.loads(pickle.dumps(compressor)).fallback is True
    # A rewrite function is code: it is not saved, and neither is a switched-off fallback.
    assert "fallback" not in Qwen3Rerank(reranker=reranker, fallback=lambda q: q).to_dict()
    assert "fallback" not in Qwen3Rerank(reranker=reranker).to_dict()
