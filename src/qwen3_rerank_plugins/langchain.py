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
import os
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ._optional import require
from .engine import Reranker, get_reranker
from .results import RerankResult
from .templates import InstructionTemplate, resolve_instruction

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.cross_encoders import BaseCrossEncoder
    from langchain_core.documents import BaseDocumentCompressor, Document
except ImportError:
    # Names the extra to install when langchain-core is missing; otherwise re-raise as is.
    require("langchain_core", "langchain", "The LangChain integration (qwen3_rerank_plugins.langchain)")
    raise

__all__ = ["Qwen3CrossEncoder", "Qwen3RerankCompressor"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"
# Fields that choose which weights are loaded; they cannot apply to a reranker passed in.
_LOAD_FIELDS = ("model", "device", "dtype", "source")


class _Qwen3EngineSettings(BaseModel):
    """Fields shared by the compressor and the cross-encoder: which engine, with what settings."""

    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    model: str = DEFAULT_MODEL
    """Hub id (``"Qwen/Qwen3-Reranker-4B"``) or local directory of a Qwen3-Reranker."""
    reranker: Reranker | None = None
    """An existing engine to use instead of loading one from ``model``. Cannot be combined with
    ``model``, ``device``, ``dtype`` or ``source``."""
    instruction: str | InstructionTemplate | None = None
    """Instruction template name (e.g. ``"similar_ticket"``), free English text, or ``None`` for
    the engine's default (the model card's instruction unless the engine was given another)."""
    device: str = "auto"
    """``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``."""
    dtype: str = "auto"
    """``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
    source: str = "auto"
    """Where to get the weights: ``"auto"``, ``"local"``, ``"huggingface"`` or ``"modelscope"``."""
    max_length: int | None = Field(default=None, gt=0)
    """Maximum prompt tokens per (query, document) pair; ``None`` keeps the engine's (8192 for a
    new one). Only the document is truncated, never the template."""
    batch_tokens: int | None = Field(default=None, gt=0)
    """Token budget of one forward pass; ``None`` keeps the engine's device default."""

    _engine: Reranker = PrivateAttr()

    @field_validator("model", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("device", "dtype", mode="before")
    @classmethod
    def _torch_to_str(cls, value: Any) -> Any:
        if isinstance(value, torch.device):
            return str(value)
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        return value

    @field_validator("instruction")
    @classmethod
    def _check_instruction(cls, value: str | InstructionTemplate | None) -> str | InstructionTemplate | None:
        resolve_instruction(value)  # raises on an empty instruction, before any document is scored
        return value

    @model_validator(mode="after")
    def _attach_engine(self) -> _Qwen3EngineSettings:
        overrides = {
            name: getattr(self, name)
            for name in ("max_length", "batch_tokens")
            if getattr(self, name) is not None
        }
        if self.reranker is not None:
            clashing = sorted(set(_LOAD_FIELDS) & self.model_fields_set)
            if clashing:
                raise ValueError(
                    f"pass either reranker= or {', '.join(clashing)}=, not both: "
                    "the reranker's model is already loaded"
                )
            # Other settings over the same loaded weights.
            self._engine = self.reranker.with_settings(**overrides) if overrides else self.reranker
        else:
            self._engine = get_reranker(
                self.model, device=self.device, dtype=self.dtype, source=self.source, **overrides
            )
        logger.debug("%s uses %r", type(self).__name__, self._engine)
        return self

    @property
    def engine(self) -> Reranker:
        """The :class:`~qwen3_rerank_plugins.Reranker` that does the scoring."""
        return self._engine


def _reranked_copy(doc: Document, result: RerankResult) -> Document:
    """A copy of ``doc`` (same class, id and page content) with the score in its metadata."""
    try:
        metadata = copy.deepcopy(doc.metadata)
    except Exception:  # metadata holding e.g. a client or a lock: copy the dict, share the values
        logger.debug("metadata of document %r cannot be deep-copied; copying it shallowly", doc.id)
        metadata = dict(doc.metadata)
    metadata["relevance_score"] = result.score
    metadata["relevance_band"] = result.band
    return doc.model_copy(update={"metadata": metadata})


class Qwen3RerankCompressor(_Qwen3EngineSettings, BaseDocumentCompressor):
    """Rerank retrieved documents with Qwen3-Reranker, for ``ContextualCompressionRetriever``.

    Documents are scored on their ``page_content``. The result is new ``Document`` objects,
    highest score first, each a copy of its input (same class, ``id`` and metadata) with
    ``metadata["relevance_score"]`` (probability in [0, 1]) and ``metadata["relevance_band"]``
    (``"high"``, ``"medium"`` or ``"low"``); the input documents are never modified.

    The engine comes from :func:`~qwen3_rerank_plugins.get_reranker`, so compressors, the
    cross-encoder and the LlamaIndex postprocessor built with the same model arguments share one
    loaded model; pass ``reranker=`` to use an engine you already have.
    :meth:`acompress_documents` runs the model in a worker thread and never blocks the event loop.

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
        results = self._engine.rerank(query, [d.page_content for d in documents], **self._rerank_kwargs())
        return [_reranked_copy(documents[r.index], r) for r in results]

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
        results = await self._engine.arerank(
            query, [d.page_content for d in documents], **self._rerank_kwargs()
        )
        return [_reranked_copy(documents[r.index], r) for r in results]


class Qwen3CrossEncoder(_Qwen3EngineSettings, BaseCrossEncoder):
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
