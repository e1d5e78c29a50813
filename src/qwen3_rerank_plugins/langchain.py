"""LangChain glue: a document compressor and a cross-encoder over the shared engine.

:class:`Qwen3RerankCompressor` is a ``BaseDocumentCompressor``: put it in a
``ContextualCompressionRetriever`` (package ``langchain-classic``) and the retrieved documents
come back reranked, best first, as copies carrying ``metadata["relevance_score"]`` and
``metadata["relevance_band"]``. :class:`Qwen3CrossEncoder` is a ``BaseCrossEncoder`` for code
built on LangChain's ``CrossEncoderReranker``.

Both obtain their engine from :func:`~qwen3_rerank_plugins.get_reranker`, so in one process they
share one loaded model with each other and with the LlamaIndex postprocessor, or they take an
existing :class:`~qwen3_rerank_plugins.Reranker` as ``reranker=``. All model logic lives in the
engine; this module only converts between LangChain documents and engine results.

Example:
    >>> from langchain_classic.retrievers import ContextualCompressionRetriever
    >>> from qwen3_rerank_plugins.langchain import Qwen3RerankCompressor
    >>> retriever = ContextualCompressionRetriever(  # doctest: +SKIP
    ...     base_compressor=Qwen3RerankCompressor(top_n=3, instruction="similar_ticket"),
    ...     base_retriever=bm25_retriever,
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
    from langchain_core.callbacks import Callbacks
    from langchain_core.cross_encoders import BaseCrossEncoder
    from langchain_core.documents import BaseDocumentCompressor, Document
except ImportError:
    # Names the extra to install when langchain-core is missing; otherwise re-raise as is.
    require("langchain_core", "langchain", "The LangChain integration (qwen3_rerank_plugins.langchain)")
    raise

# After the guard: without the extra, the ImportError above names it (not pydantic, which
# langchain-core brings along).
from pydantic import Field

from ._adapters import RERANKED_KEY, EngineSettings, FallbackSetting, span_metadata
from .results import FallbackRerank, RerankResult

__all__ = ["Qwen3CrossEncoder", "Qwen3RerankCompressor"]

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
