"""LangChain glue: a reranking retriever, a document compressor and a cross-encoder over the shared engine.

:class:`Qwen3RerankRetriever` wraps any retriever and returns its documents reranked, best
first, as copies carrying ``metadata["relevance_score"]`` and ``metadata["relevance_band"]``; it
needs only ``langchain-core``. The reranking itself is :class:`Qwen3RerankCompressor`, a
``BaseDocumentCompressor``: use it in that retriever, as an LCEL step
(:meth:`Qwen3RerankCompressor.as_runnable`), or in ``langchain-classic``'s
``ContextualCompressionRetriever``. :class:`Qwen3CrossEncoder` is a ``BaseCrossEncoder`` for
code built on LangChain's ``CrossEncoderReranker``.

All of them obtain their engine from :func:`~qwen3_rerank_plugins.get_reranker`, so in one process they
share one loaded model with each other and with the LlamaIndex postprocessor, or they take an
existing :class:`~qwen3_rerank_plugins.Reranker` as ``reranker=``. All model logic lives in the
engine; this module only converts between LangChain documents and engine results.

Example:
    >>> from qwen3_rerank_plugins.langchain import Qwen3RerankCompressor, Qwen3RerankRetriever
    >>> retriever = Qwen3RerankRetriever(  # doctest: +SKIP
    ...     base_retriever=bm25_retriever,
    ...     compressor=Qwen3RerankCompressor(top_n=3, instruction="similar_ticket"),
    ... )
    >>> retriever.invoke("朝阳区建国路电梯又坏了")[0].metadata["relevance_score"]  # doctest: +SKIP
    0.93
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

from ._optional import require

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForRetrieverRun,
        CallbackManagerForRetrieverRun,
        Callbacks,
    )
    from langchain_core.cross_encoders import BaseCrossEncoder
    from langchain_core.documents import BaseDocumentCompressor, Document
    from langchain_core.retrievers import BaseRetriever, RetrieverLike
    from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
except ImportError:
    # Names the extra to install when langchain-core is missing; otherwise re-raise as is.
    require("langchain_core", "langchain", "The LangChain integration (qwen3_rerank_plugins.langchain)")
    raise

# After the guard: without the extra, the ImportError above names it (not pydantic, which
# langchain-core brings along).
from pydantic import ConfigDict, Field

from ._adapters import RERANKED_KEY, EngineSettings, FallbackSetting, span_metadata
from .results import FallbackRerank, RerankResult

__all__ = ["Qwen3CrossEncoder", "Qwen3RerankCompressor", "Qwen3RerankRetriever"]

logger = logging.getLogger(__name__)


def _reranked_copy(doc: Document, result: RerankResult, outcome: FallbackRerank | None = None) -> Document:
    """A copy of ``doc`` (same class, id and page content) with the score in its metadata."""
    try:
        metadata = copy.deepcopy(doc.metadata)
    except Exception:  # metadata holding e.g. a client or a lock: copy the dict, share the values
        logger.debug("metadata of document %r cannot be deep-copied; copying it shallowly", doc.id)
        metadata = dict(doc.metadata)
    if not result.reranked:  # an overloaded service, on_overload="keep_order": no score to give
        metadata[RERANKED_KEY] = False
        return doc.model_copy(update={"metadata": metadata})
    metadata["relevance_score"] = result.score
    metadata["relevance_band"] = result.band
    metadata.update(span_metadata(result))
    if outcome is not None:
        metadata["needs_review"] = outcome.needs_review
        metadata["reranked_query"] = outcome.final.query
    return doc.model_copy(update={"metadata": metadata})


def _as_runnable(compressor: BaseDocumentCompressor) -> Runnable[dict[str, Any], list[Document]]:
    """``{"query": str, "documents": [Document, ...]}`` -> the reranked documents, as an LCEL step."""

    def _inputs(value: Any) -> tuple[str, Sequence[Document]]:
        if not isinstance(value, dict) or "query" not in value or "documents" not in value:
            raise TypeError(
                "the rerank step takes a mapping with 'query' and 'documents', e.g. "
                '{"query": RunnablePassthrough(), "documents": retriever} | compressor.as_runnable()'
            )
        return value["query"], value["documents"]

    def rerank(value: dict[str, Any], config: RunnableConfig) -> list[Document]:
        query, documents = _inputs(value)
        return list(compressor.compress_documents(documents, query, callbacks=config.get("callbacks")))

    async def arerank(value: dict[str, Any], config: RunnableConfig) -> list[Document]:
        query, documents = _inputs(value)
        found = await compressor.acompress_documents(documents, query, callbacks=config.get("callbacks"))
        return list(found)

    return RunnableLambda(rerank, afunc=arerank, name="Qwen3Rerank")


class Qwen3RerankCompressor(FallbackSetting, BaseDocumentCompressor):
    """Rerank retrieved documents with Qwen3-Reranker, for ``ContextualCompressionRetriever``.

    Documents are scored on their ``page_content``. The result is new ``Document`` objects,
    highest score first, each a copy of its input (same class, ``id`` and metadata) with
    ``metadata["relevance_score"]`` (probability in [0, 1]) and ``metadata["relevance_band"]``
    (``"high"``, ``"medium"`` or ``"low"``); the input documents are never modified.

    The engine comes from :func:`~qwen3_rerank_plugins.get_reranker`, so compressors, the
    cross-encoder and the LlamaIndex postprocessor built with the same model arguments share one
    loaded model; pass ``reranker=`` to use an engine you already have.
    :meth:`acompress_documents` runs the model in a worker thread and never blocks the event loop.

    With ``base_url=`` the scoring runs on a rerank service and no torch is loaded in this
    process; ``timeout`` bounds each call, and ``on_overload="keep_order"`` turns an overloaded
    service into the retrieved documents in their input order, cut to ``top_n``, as copies with
    ``metadata["reranked"] = False`` (and no ``relevance_score``), plus a WARNING in the log.

    Example:
        >>> from langchain_classic.retrievers import ContextualCompressionRetriever
        >>> compressor = Qwen3RerankCompressor(top_n=3, instruction="similar_ticket")  # doctest: +SKIP
        >>> retriever = ContextualCompressionRetriever(  # doctest: +SKIP
        ...     base_compressor=compressor, base_retriever=bm25_retriever
        ... )
        >>> docs = retriever.invoke("朝阳区建国路电梯又坏了")  # doctest: +SKIP
        >>> [d.metadata["relevance_score"] for d in docs]  # doctest: +SKIP
        [0.93, 0.71, 0.12]
    """

    top_n: int | None = Field(default=3, gt=0)
    """Return at most this many documents (LangChain rerankers' default is 3); ``None`` returns all."""
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Drop documents whose relevance score is below this probability; ``None`` keeps all."""

    def _rerank_kwargs(self) -> dict[str, Any]:
        return {"top_n": self.top_n, "threshold": self.threshold, "instruction": self.instruction}

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Rerank ``documents`` against ``query``.

        Args:
            documents: The retrieved documents.
            query: The query they were retrieved for.
            callbacks: Callbacks of the calling run (unused: scoring emits no events of its own).

        Returns:
            Copies of the best documents, highest score first, with ``relevance_score`` and
            ``relevance_band`` in their metadata.
        """
        if not documents:
            return []
        results, outcome = self._rerank(query, [d.page_content for d in documents], **self._rerank_kwargs())
        return [_reranked_copy(documents[r.index], r, outcome) for r in results]

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents`: the model runs in a worker thread.

        Args:
            documents: The retrieved documents.
            query: The query they were retrieved for.
            callbacks: Callbacks of the calling run (unused).

        Returns:
            As :meth:`compress_documents`.
        """
        if not documents:
            return []
        results, outcome = await self._arerank(
            query, [d.page_content for d in documents], **self._rerank_kwargs()
        )
        return [_reranked_copy(documents[r.index], r, outcome) for r in results]

    def as_runnable(self) -> Runnable[dict[str, Any], list[Document]]:
        """This compressor as an LCEL step: ``{"query", "documents"}`` in, reranked documents out.

        Returns:
            A runnable (sync and async) named ``Qwen3Rerank``.

        Example:
            >>> from langchain_core.runnables import RunnablePassthrough
            >>> step = {"query": RunnablePassthrough(), "documents": retriever} | compressor.as_runnable()
            >>> step.invoke("发票怎么开")  # doctest: +SKIP
        """
        return _as_runnable(self)


class Qwen3CrossEncoder(EngineSettings, BaseCrossEncoder):
    """Qwen3-Reranker as a LangChain ``BaseCrossEncoder`` (for ``CrossEncoderReranker``).

    Example:
        >>> from langchain_classic.retrievers.document_compressors import CrossEncoderReranker
        >>> compressor = CrossEncoderReranker(model=Qwen3CrossEncoder(), top_n=3)  # doctest: +SKIP
    """

    def score(self, text_pairs: list[tuple[str, str]]) -> list[float]:
        """Relevance of each ``(query, document)`` pair.

        Args:
            text_pairs: ``(query, document)`` pairs; they may mix queries.

        Returns:
            One probability in [0, 1] per pair, in input order.
        """
        return self._engine.score_pairs(list(text_pairs), instruction=self.instruction)


class Qwen3RerankRetriever(BaseRetriever):
    """Any retriever, reranked: needs only ``langchain-core`` (no ``langchain-classic``).

    The base retriever's documents for the query go through ``compressor`` (normally a
    :class:`Qwen3RerankCompressor`) and come back best first, as copies with
    ``metadata["relevance_score"]`` and ``metadata["relevance_band"]``. It is an ordinary
    LangChain retriever: ``invoke``, ``ainvoke`` (the model runs in a worker thread), ``batch``,
    callbacks and LCEL composition all work, and the base retriever's run is its child.

    Example:
        >>> retriever = Qwen3RerankRetriever(  # doctest: +SKIP
        ...     base_retriever=store.as_retriever(search_kwargs={"k": 20}),
        ...     compressor=Qwen3RerankCompressor(top_n=3),
        ... )
        >>> retriever.invoke("发票怎么开")  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", use_attribute_docstrings=True)

    base_retriever: RetrieverLike
    """The first-stage retriever (BM25, a vector store's ``as_retriever()``, any runnable from a
    query string to a list of documents)."""
    compressor: BaseDocumentCompressor
    """What reranks its documents: a :class:`Qwen3RerankCompressor` (its ``top_n`` and
    ``threshold`` decide how many come back)."""

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        docs = self.base_retriever.invoke(query, config={"callbacks": run_manager.get_child()}, **kwargs)
        if not docs:
            return []
        return list(self.compressor.compress_documents(docs, query, callbacks=run_manager.get_child()))

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        docs = await self.base_retriever.ainvoke(
            query, config={"callbacks": run_manager.get_child()}, **kwargs
        )
        if not docs:
            return []
        found = await self.compressor.acompress_documents(docs, query, callbacks=run_manager.get_child())
        return list(found)
