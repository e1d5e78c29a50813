"""LangChain with langchain-core only: the reranking retriever and the compressor as an LCEL step."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models.fake import FakeListLLM
from langchain_core.prompts import PromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnableLambda, RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.langchain import Qwen3RerankCompressor, Qwen3RerankRetriever

MODULE = Path(__file__).resolve().parent.parent / "src" / "qwen3_rerank_plugins" / "langchain.py"
QUERY = "朝阳区建国路电梯又坏了"
TICKETS = [
    ("T-1021", "建国路88号小区3号楼电梯故障，居民被困二十分钟"),
    ("T-0877", "朝阳区建国路某小区电梯多次停运，物业一直未维修"),
    ("T-0932", "海淀区中关村大街路灯不亮，夜间出行不便"),
    ("T-1102", "建国路施工噪音扰民，晚上十一点后仍在作业"),
    ("T-0755", "小区供暖温度不达标，室内只有16度"),
]


@pytest.fixture(scope="module")
def base_retriever() -> BaseRetriever:
    docs = [Document(text, id=i, metadata={"source": "hotline"}) for i, text in TICKETS]
    store = InMemoryVectorStore.from_documents(docs, DeterministicFakeEmbedding(size=32))
    return store.as_retriever(search_kwargs={"k": len(docs)})


def _expected(reranker: Reranker, docs: list[Document]) -> list[tuple[str, float]]:
    scores = reranker.score(QUERY, [d.page_content for d in docs])
    order = sorted(range(len(docs)), key=lambda i: (-scores[i], i))
    return [(docs[i].id, scores[i]) for i in order]


def _format(docs: list[Document]) -> str:
    return "\n".join(f"[{d.id}] {d.page_content}" for d in docs)


class Runs(BaseCallbackHandler):
    def __init__(self) -> None:
        self.retrievers: list[tuple[str, Any, Any]] = []
        self.prompts: list[str] = []

    def on_retriever_start(self, serialized, query, *, run_id, parent_run_id=None, **kwargs):
        name = kwargs.get("name") or (serialized or {}).get("name", "")
        self.retrievers.append((name, run_id, parent_run_id))

    def on_llm_start(self, serialized, prompts, **kwargs):
        self.prompts.extend(prompts)


def test_the_module_needs_no_langchain_classic() -> None:
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(ast.parse(MODULE.read_text("utf-8")))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert not [m for m in imported if m.startswith("langchain_classic")]


async def test_the_retriever_reranks_any_retriever(reranker: Reranker, base_retriever: BaseRetriever) -> None:
    retriever = Qwen3RerankRetriever(
        base_retriever=base_retriever, compressor=Qwen3RerankCompressor(reranker=reranker, top_n=3)
    )
    expected = _expected(reranker, base_retriever.invoke(QUERY))[:3]

    docs = retriever.invoke(QUERY)

    assert [d.id for d in docs] == [i for i, _ in expected]
    assert [d.metadata["relevance_score"] for d in docs] == pytest.approx([s for _, s in expected], abs=1e-6)
    assert all(d.metadata["source"] == "hotline" and "relevance_band" in d.metadata for d in docs)
    assert await retriever.ainvoke(QUERY) == docs
    assert retriever.batch([QUERY, QUERY]) == [docs, docs]


def test_a_base_retriever_with_nothing_found_gives_nothing(reranker: Reranker) -> None:
    empty = RunnableLambda(lambda query: [])
    compressor = Qwen3RerankCompressor(reranker=reranker)
    retriever = Qwen3RerankRetriever(base_retriever=empty, compressor=compressor)
    assert retriever.invoke(QUERY) == []


def test_unknown_fields_are_refused(reranker: Reranker, base_retriever: BaseRetriever) -> None:
    with pytest.raises(ValueError, match="top_n"):
        Qwen3RerankRetriever(
            base_retriever=base_retriever, compressor=Qwen3RerankCompressor(reranker=reranker), top_n=3
        )


async def test_the_retriever_in_a_real_chain(reranker: Reranker, base_retriever: BaseRetriever) -> None:
    retriever = Qwen3RerankRetriever(
        base_retriever=base_retriever, compressor=Qwen3RerankCompressor(reranker=reranker, top_n=2)
    )
    prompt = PromptTemplate.from_template("Past tickets:\n{context}\n\nNew ticket: {ticket}")
    llm = FakeListLLM(responses=["Send the lift engineer."])
    chain = {"context": retriever | _format, "ticket": RunnablePassthrough()} | prompt | llm
    top2 = [i for i, _ in _expected(reranker, base_retriever.invoke(QUERY))[:2]]

    runs = Runs()
    assert chain.invoke(QUERY, config={"callbacks": [runs]}) == "Send the lift engineer."
    assert await chain.ainvoke(QUERY, config={"callbacks": [runs]}) == "Send the lift engineer."

    assert len(runs.prompts) == 2 and runs.prompts[0] == runs.prompts[1]
    assert re.findall(r"^\[(T-\d+)\]", runs.prompts[0], flags=re.M) == top2
    # Each reranking run has the base retriever's run as its child.
    ours = {run_id for name, run_id, _ in runs.retrievers if name == "Qwen3RerankRetriever"}
    children = [parent for name, _, parent in runs.retrievers if name != "Qwen3RerankRetriever"]
    assert len(ours) == 2 and sorted(map(str, children)) == sorted(map(str, ours))


async def test_the_compressor_as_an_lcel_step(reranker: Reranker, base_retriever: BaseRetriever) -> None:
    compressor = Qwen3RerankCompressor(reranker=reranker, top_n=3)
    chain = {"query": RunnablePassthrough(), "documents": base_retriever} | compressor.as_runnable() | _format
    top3 = [i for i, _ in _expected(reranker, base_retriever.invoke(QUERY))[:3]]

    text = chain.invoke(QUERY)

    assert re.findall(r"^\[(T-\d+)\]", text, flags=re.M) == top3
    assert await chain.ainvoke(QUERY) == text
    with pytest.raises(TypeError, match="'query' and 'documents'"):
        compressor.as_runnable().invoke(QUERY)
