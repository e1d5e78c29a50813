"""The LangChain compressor and cross-encoder, inside real LangChain retrievers and chains."""

from __future__ import annotations

import asyncio
import copy
import re
from pathlib import Path
from typing import Any

import pytest
from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from qwen3_rerank_plugins import INSTRUCTION_TEMPLATES, Reranker, get_reranker
from qwen3_rerank_plugins.langchain import Qwen3CrossEncoder, Qwen3RerankCompressor

ROOT = Path(__file__).resolve().parents[1]
QUERY = "朝阳区建国路电梯又坏了"
TICKETS = [
    ("T-1021", "建国路88号小区3号楼电梯故障，居民被困二十分钟", "朝阳区"),
    ("T-0877", "朝阳区建国路某小区电梯多次停运，物业一直未维修", "朝阳区"),
    ("T-0932", "海淀区中关村大街路灯不亮，夜间出行不便", "海淀区"),
    ("T-1102", "建国路施工噪音扰民，晚上十一点后仍在作业", "朝阳区"),
    ("T-0755", "小区供暖温度不达标，室内只有16度", "丰台区"),
    ("T-0612", "[FAQ] Elevator outages: report to the property manager, then call 12345.", "朝阳区"),
]


def _tickets() -> list[Document]:
    return [
        Document(text, id=ticket_id, metadata={"district": district, "tags": ["hotline"]})
        for ticket_id, text, district in TICKETS
    ]


def _texts(docs: list[Document]) -> list[str]:
    return [d.page_content for d in docs]


def _expected_order(reranker: Reranker, docs: list[Document], **kwargs: Any) -> list[str]:
    """Ids best first, from the engine's own scores (ties keep input order)."""
    scores = reranker.score(QUERY, _texts(docs), **kwargs)
    order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))
    return [docs[i].id for i in order]


@pytest.fixture(scope="module")
def base_retriever():
    store = InMemoryVectorStore.from_documents(_tickets(), DeterministicFakeEmbedding(size=32))
    return store.as_retriever(search_kwargs={"k": len(TICKETS)})


@pytest.fixture
def compressor(reranker: Reranker) -> Qwen3RerankCompressor:
    return Qwen3RerankCompressor(reranker=reranker, top_n=None)


class RetrieverRecorder(BaseCallbackHandler):
    """Records retriever and LLM runs as LangChain reports them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any, Any, Any]] = []
        self.prompts: list[str] = []

    def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kwargs):
        self.events.append(("start", run_id, parent_run_id, query))

    def on_retriever_end(self, documents, *, run_id, parent_run_id=None, **kwargs):
        self.events.append(("end", run_id, parent_run_id, documents))

    def on_llm_start(self, serialized, prompts, **kwargs):
        self.prompts.extend(prompts)


# ------------------------------------------------------------------ inside the retriever


def test_retriever_order_and_scores_match_engine(reranker, base_retriever, compressor):
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base_retriever)
    retrieved = base_retriever.invoke(QUERY)
    expected_scores = dict(zip(_texts(retrieved), reranker.score(QUERY, _texts(retrieved)), strict=True))

    docs = retriever.invoke(QUERY)

    assert [d.id for d in docs] == _expected_order(reranker, retrieved)
    for doc in docs:
        score = doc.metadata["relevance_score"]
        assert score == pytest.approx(expected_scores[doc.page_content], abs=1e-6)
        assert doc.metadata["relevance_band"] == reranker.bands.classify(score)
        assert doc.metadata["district"] == dict((t[0], t[2]) for t in TICKETS)[doc.id]
    assert [d.metadata["relevance_score"] for d in docs] == sorted(
        (d.metadata["relevance_score"] for d in docs), reverse=True
    )


async def test_async_retriever_equals_sync(base_retriever, compressor):
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base_retriever)
    assert await retriever.ainvoke(QUERY) == retriever.invoke(QUERY)


def test_an_overloaded_service_keeps_the_retrievers_order(reranker, base_retriever, caplog):
    """on_overload="keep_order" in a real retriever: a service too slow for the timeout, over real HTTP."""
    from helpers import Front, live_server
    from qwen3_rerank_plugins.client import RerankServiceError
    from qwen3_rerank_plugins.server import create_app

    retrieved = base_retriever.invoke(QUERY)
    with live_server(Front(create_app(reranker), delay=2.0)) as url:
        kind = Qwen3RerankCompressor(base_url=url, top_n=3, timeout=0.5, on_overload="keep_order")
        retriever = ContextualCompressionRetriever(base_compressor=kind, base_retriever=base_retriever)
        with caplog.at_level("WARNING", logger="qwen3_rerank_plugins"):
            docs = retriever.invoke(QUERY)
        assert [d.id for d in docs] == [d.id for d in retrieved[:3]]
        for doc, original in zip(docs, retrieved, strict=False):
            assert doc.metadata == {**original.metadata, "reranked": False}
            assert "reranked" not in original.metadata  # copies, inputs untouched
        assert "keeping the retriever's order of 6 items, cut to top_n=3" in caplog.text
        assert [d.id for d in asyncio.run(retriever.ainvoke(QUERY))] == [d.id for d in retrieved[:3]]
        strict = Qwen3RerankCompressor(base_url=url, top_n=3, timeout=0.5)
        with pytest.raises(RerankServiceError, match="did not answer") as info:
            retriever.model_copy(update={"base_compressor": strict}).invoke(QUERY)
        assert info.value.overloaded


def test_default_top_n_is_three(reranker, base_retriever):
    compressor = Qwen3RerankCompressor(reranker=reranker)
    assert compressor.top_n == 3
    retriever = ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base_retriever)
    expected = _expected_order(reranker, base_retriever.invoke(QUERY))[:3]
    assert [d.id for d in retriever.invoke(QUERY)] == expected


def test_instruction_is_used(reranker):
    docs = _tickets()
    template = INSTRUCTION_TEMPLATES["similar_ticket"]
    for instruction in ("similar_ticket", template, "Find tickets about the same broken equipment"):
        compressor = Qwen3RerankCompressor(reranker=reranker, top_n=None, instruction=instruction)
        assert compressor.instruction == instruction
        out = compressor.compress_documents(docs, QUERY)
        assert [d.id for d in out] == _expected_order(reranker, docs, instruction=instruction)
        expected = dict(zip(_texts(docs), reranker.score(QUERY, _texts(docs), instruction), strict=True))
        assert all(d.metadata["relevance_score"] == pytest.approx(expected[d.page_content]) for d in out)
    assert reranker.score(QUERY, _texts(docs), "similar_ticket") != reranker.score(QUERY, _texts(docs))


# ------------------------------------------------------------------ copies, never mutation


def test_returns_copies_and_leaves_input_alone(compressor):
    docs = _tickets()
    snapshot = copy.deepcopy(docs)

    out = compressor.compress_documents(docs, QUERY)

    assert docs == snapshot
    assert all("relevance_score" not in d.metadata for d in docs)
    by_id = {d.id: d for d in docs}
    assert sorted(d.id for d in out) == sorted(by_id)
    for doc in out:
        original = by_id[doc.id]
        assert doc is not original and doc.metadata is not original.metadata
        assert doc.metadata["tags"] == original.metadata["tags"]
        assert doc.metadata["tags"] is not original.metadata["tags"]
        assert doc.page_content == original.page_content and type(doc) is Document
    # Reranking the reranked copies again overwrites the score instead of failing.
    again = compressor.compress_documents(out, QUERY)
    assert [d.id for d in again] == [d.id for d in out]


def test_metadata_that_cannot_be_deep_copied(compressor):
    import threading

    lock = threading.Lock()
    docs = [Document("电梯故障", id="a", metadata={"lock": lock}), Document("路灯不亮", id="b")]
    out = compressor.compress_documents(docs, QUERY)
    assert {d.id for d in out} == {"a", "b"}
    assert next(d for d in out if d.id == "a").metadata["lock"] is lock
    assert "relevance_score" not in docs[0].metadata


async def test_empty_input(compressor):
    assert compressor.compress_documents([], QUERY) == []
    assert await compressor.acompress_documents([], QUERY) == []


# ------------------------------------------------------------------ top_n, threshold, validation


def test_top_n_and_threshold(reranker):
    docs = _tickets()
    ranked = _expected_order(reranker, docs)
    scores = sorted(reranker.score(QUERY, _texts(docs)), reverse=True)

    def ids(**kwargs: Any) -> list[str]:
        compressor = Qwen3RerankCompressor(reranker=reranker, **kwargs)
        return [d.id for d in compressor.compress_documents(docs, QUERY)]

    assert ids(top_n=2) == ranked[:2]
    assert ids(top_n=100) == ranked
    assert ids(top_n=None) == ranked
    assert ids(top_n=None, threshold=scores[3]) == ranked[:4]
    assert ids(top_n=2, threshold=scores[3]) == ranked[:2]
    assert ids(threshold=1.0) == [] or scores[0] == 1.0


def test_fields_are_documented():
    for cls in (Qwen3RerankCompressor, Qwen3CrossEncoder):
        assert cls.model_config["extra"] == "forbid"
        for name, field in cls.model_fields.items():
            assert field.description, f"{cls.__name__}.{name} has no docstring"


# ------------------------------------------------------------------ one loaded model


def test_engine_is_shared(reranker, tiny_model_dir):
    first = Qwen3RerankCompressor(model=tiny_model_dir, device="cpu")
    second = Qwen3RerankCompressor(
        model=str(tiny_model_dir), device="cpu", instruction="similar_ticket", top_n=5
    )
    encoder = Qwen3CrossEncoder(model=tiny_model_dir, device="cpu")
    assert first.engine is second.engine is encoder.engine is get_reranker(tiny_model_dir, device="cpu")
    assert first.engine is reranker
    assert first.reranker is None and first.model == str(tiny_model_dir)

    longer = Qwen3RerankCompressor(model=tiny_model_dir, device="cpu", max_length=512)
    assert longer.engine is not reranker and longer.engine.shares_model_with(reranker)
    assert longer.engine.max_length == 512


def test_the_adapters_take_a_score_cache(reranker, tiny_model_dir):
    compressor = Qwen3RerankCompressor(model=tiny_model_dir, device="cpu", cache=64)
    encoder = Qwen3CrossEncoder(model=tiny_model_dir, device="cpu", cache=64)
    assert compressor.engine is encoder.engine is get_reranker(tiny_model_dir, device="cpu", cache=64)
    cache = compressor.engine.cache
    assert cache is not None and cache.memory.max_entries == 64 and reranker.cache is None
    texts = [text for _, text, _ in TICKETS[:3]]
    docs = [Document(page_content=t) for t in texts]
    first = compressor.compress_documents(docs, QUERY)
    hits = cache.stats()["hits"]["memory"]
    again = compressor.compress_documents(docs, QUERY)
    assert cache.stats()["hits"]["memory"] == hits + 3  # the second call: every pair from the cache
    assert [d.metadata["relevance_score"] for d in again] == pytest.approx(
        [d.metadata["relevance_score"] for d in first], abs=1e-6
    )
    assert encoder.score([(QUERY, texts[0])]) == pytest.approx([first_score(first, texts[0])], abs=1e-6)
    with pytest.raises(ValueError, match="with_cache"):
        Qwen3RerankCompressor(reranker=reranker, cache=64)
    with pytest.raises(ValueError, match="cache"):
        Qwen3RerankCompressor(base_url="http://127.0.0.1:9", cache=64)


def first_score(documents: list[Document], text: str) -> float:
    return next(d.metadata["relevance_score"] for d in documents if d.page_content == text)


def test_existing_engine(reranker):
    assert Qwen3RerankCompressor(reranker=reranker).engine is reranker
    assert Qwen3CrossEncoder(reranker=reranker).engine is reranker
    tuned = Qwen3RerankCompressor(reranker=reranker, max_length=256, batch_tokens=1024).engine
    assert tuned is not reranker and tuned.shares_model_with(reranker)
    assert (tuned.max_length, tuned.batch_tokens) == (256, 1024)
    assert reranker.max_length == 8192  # the engine passed in keeps its own settings


# ------------------------------------------------------------------ BaseCrossEncoder shape


def test_cross_encoder_scores(reranker):
    pairs = [(QUERY, text) for _, text, _ in TICKETS] + [("建国路噪音扰民", TICKETS[3][1])]
    encoder = Qwen3CrossEncoder(reranker=reranker)
    scores = encoder.score(pairs)
    assert scores == reranker.score_pairs(pairs)
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    assert encoder.score([]) == []
    templated = Qwen3CrossEncoder(reranker=reranker, instruction="similar_ticket")
    assert templated.score(pairs) == reranker.score_pairs(pairs, "similar_ticket")


def test_cross_encoder_reranker(reranker, base_retriever):
    reranking = CrossEncoderReranker(model=Qwen3CrossEncoder(reranker=reranker), top_n=3)
    retriever = ContextualCompressionRetriever(base_compressor=reranking, base_retriever=base_retriever)
    expected = _expected_order(reranker, base_retriever.invoke(QUERY))[:3]
    assert [d.id for d in retriever.invoke(QUERY)] == expected


# ------------------------------------------------------------------ chains and callbacks


def _format_docs(docs: list[Document]) -> str:
    return "\n".join(f"[{d.id}] {d.page_content}" for d in docs)


async def test_lcel_chain(reranker, base_retriever):
    retriever = ContextualCompressionRetriever(
        base_compressor=Qwen3RerankCompressor(reranker=reranker, top_n=3), base_retriever=base_retriever
    )
    prompt = PromptTemplate.from_template("Past tickets:\n{context}\n\nNew ticket: {ticket}")
    llm = FakeListLLM(responses=["T-0877 was fixed by the property manager."])
    chain = {"context": retriever | _format_docs, "ticket": RunnablePassthrough()} | prompt | llm
    top3 = _expected_order(reranker, base_retriever.invoke(QUERY))[:3]

    recorder = RetrieverRecorder()
    config = {"callbacks": [recorder]}
    assert chain.invoke(QUERY, config=config) == "T-0877 was fixed by the property manager."
    assert await chain.ainvoke(QUERY, config=config) == "T-0877 was fixed by the property manager."

    assert len(recorder.prompts) == 2 and recorder.prompts[0] == recorder.prompts[1]
    assert re.findall(r"^\[(T-\d+)\]", recorder.prompts[0], flags=re.M) == top3
    assert recorder.prompts[0].endswith(f"New ticket: {QUERY}")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_callbacks_see_reranked_docs(reranker, base_retriever, mode):
    retriever = ContextualCompressionRetriever(
        base_compressor=Qwen3RerankCompressor(reranker=reranker, top_n=2), base_retriever=base_retriever
    )
    recorder = RetrieverRecorder()
    config = {"callbacks": [recorder], "run_name": "similar-tickets"}
    if mode == "sync":
        docs = retriever.invoke(QUERY, config=config)
    else:
        docs = asyncio.run(retriever.ainvoke(QUERY, config=config))

    kinds = [e[0] for e in recorder.events]
    assert kinds == ["start", "start", "end", "end"]
    (_, outer, outer_parent, query), (_, inner, inner_parent, _) = recorder.events[:2]
    assert query == QUERY and outer_parent is None and inner_parent == outer
    inner_end, outer_end = recorder.events[2], recorder.events[3]
    assert inner_end[1] == inner and outer_end[1] == outer
    # The base retriever's run saw the raw candidates; the compression retriever's run ends with
    # the reranked copies, scores included.
    assert len(inner_end[3]) == len(TICKETS)
    assert all("relevance_score" not in d.metadata for d in inner_end[3])
    assert outer_end[3] == docs and len(docs) == 2
    assert [d.id for d in docs] == _expected_order(reranker, base_retriever.invoke(QUERY))[:2]


def test_library_does_not_print(compressor, capsys):
    compressor.compress_documents(_tickets(), QUERY)
    Qwen3CrossEncoder(reranker=compressor.engine).score([(QUERY, "电梯")])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_is_a_document_compressor():
    assert issubclass(Qwen3RerankCompressor, BaseDocumentCompressor)
    assert Qwen3RerankCompressor.acompress_documents is not BaseDocumentCompressor.acompress_documents


# ------------------------------------------------------------------ packaging and docs


def test_docs_snippet_runs(tiny_model_dir, capsys):
    """Every python block of docs/langchain.md, in order, with the tiny model in place of the hub id."""
    text = (ROOT / "docs" / "langchain.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) >= 3
    source = "\n".join(blocks)
    hub_id = '"Qwen/Qwen3-Reranker-0.6B"'
    assert source.count(hub_id) >= 2
    source = source.replace(hub_id, repr(str(tiny_model_dir)))

    namespace: dict[str, Any] = {
        "__name__": "docs_langchain",
        "llm": FakeListLLM(responses=["T-0877: the property manager repaired the lift."]),
    }
    exec(compile(source, "docs/langchain.md", "exec"), namespace)

    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3
    assert [line.split()[0] for line in printed] == [d.id for d in namespace["retriever"].invoke(QUERY)]
    assert namespace["answer"] == "T-0877: the property manager repaired the lift."
    assert len(namespace["docs"]) == 3
    assert all("relevance_score" in d.metadata for d in namespace["docs"])
    # The snippet's compressor and get_reranker share the engine.
    auto = get_reranker(tiny_model_dir)  # device="auto", as in the snippet
    assert namespace["rr"] is namespace["retriever"].compressor.engine is auto
    assert namespace["confident_only"].engine is auto
    assert [d.id for d in namespace["best"]] == [line.split()[0] for line in printed]
    assert isinstance(namespace["classic_retriever"], ContextualCompressionRetriever)
    assert namespace["classic_retriever"].invoke(QUERY) == namespace["confident_only"].compress_documents(
        namespace["base_retriever"].invoke(QUERY), QUERY
    )


def test_readme_section_runs(tiny_model_dir, capsys):
    """The python block under README's LangChain anchor, with the tiny model for the hub id."""
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("<!-- section: langchain -->", 1)[1]
    blocks = re.findall(r"^```python\n(.*?)^```", section.split("<!-- section: ", 1)[0], flags=re.S | re.M)
    assert len(blocks) == 1
    hub_id = '"Qwen/Qwen3-Reranker-0.6B"'
    assert hub_id in blocks[0]
    namespace: dict[str, Any] = {"__name__": "readme_langchain"}
    exec(compile(blocks[0].replace(hub_id, repr(str(tiny_model_dir))), "README.md", "exec"), namespace)

    printed = [line.split() for line in capsys.readouterr().out.splitlines()]
    docs = namespace["retriever"].invoke("朝阳区建国路电梯又坏了")
    assert [p[0] for p in printed] == [d.id for d in docs] and len(docs) == 2
    assert [float(p[1]) for p in printed] == pytest.approx(
        [d.metadata["relevance_score"] for d in docs], abs=1e-3
    )
    assert namespace["retriever"].compressor.engine is get_reranker(tiny_model_dir)  # device="auto"
