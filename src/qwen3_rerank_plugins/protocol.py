"""What "something that scores" is: the :class:`Scorer` protocol and the backend primitive's types.

The server, the web page, the batcher, evaluate and the adapters depend on :class:`Scorer`, not
on a concrete class; the local engine and the remote backend both satisfy it through
:class:`~qwen3_rerank_plugins.scoring.BaseReranker`. Plain Python, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .results import ConfidenceBands, FallbackRerank, RerankResult
from .templates import InstructionTemplate
from .validation import Document

__all__ = [
    "GroupScores",
    "LocalScorer",
    "ScoreGroup",
    "Scorer",
    "ScoringStopped",
    "StopCheck",
    "precision_name",
]

#: Asked between forward passes (or requests); once it returns ``True`` the backend stops and
#: raises :class:`ScoringStopped`. The service's batcher passes one that is true when every
#: client of a merged batch has hung up.
StopCheck = Callable[[], bool]


class ScoringStopped(RuntimeError):
    """Scoring was stopped part-way because its ``should_stop`` check said so; nothing is returned."""


@dataclass(frozen=True)
class ScoreGroup:
    """Documents to score against one query: the unit of work of every backend.

    A backend receives many groups at once and may batch their documents together (several
    queries in one forward pass); each group's scores are exact whatever it was batched with.

    Attributes:
        query: The query text.
        texts: The documents' texts.
        instruction: Instruction text (already resolved from a template name), or ``None`` for
            the backend's default.
        max_query_tokens: Cut the instruction + query to this many tokens (``None``: the
            backend's setting).
        max_doc_tokens: Cut each document to this many tokens (``None``: the backend's setting).
        long_documents: Read long documents in windows (``None``: the backend's setting).
        max_windows: Most windows read per long document (``None``: the backend's setting);
            Cohere's ``max_chunks_per_doc``.
        cache: Read and write the backend's score cache, if it has one; ``False``: score these
            pairs afresh and store nothing (a request's ``"cache": false``).
    """

    query: str
    texts: Sequence[str]
    instruction: str | None = None
    max_query_tokens: int | None = None
    max_doc_tokens: int | None = None
    long_documents: bool | None = None
    max_windows: int | None = None
    cache: bool = True


@dataclass(frozen=True)
class GroupScores:
    """What a backend returns for one :class:`ScoreGroup`.

    Attributes:
        logits: ``z_yes - z_no`` of each document, in input order.
        tokens: Prompt tokens the model read for the group (template included, every window of a
            long document counted), or ``None`` when the backend cannot tell.
        spans: For each document, the ``(start, end)`` character span of the window that gave
            its score, or ``None`` where the document was read whole (or cut as the model card
            does); ``None`` for the whole list when no window was used.
        cached_tokens: Of ``tokens``, those of pairs answered from a score cache instead of
            the model (``0`` without a cache).
    """

    logits: list[float]
    tokens: int | None = None
    spans: list[tuple[int, int] | None] | None = field(default=None)
    cached_tokens: int = 0


@runtime_checkable
class Scorer(Protocol):
    """The scoring surface shared by the local :class:`~qwen3_rerank_plugins.Reranker` and
    :class:`~qwen3_rerank_plugins.remote.RemoteReranker`."""

    bands: ConfidenceBands

    @property
    def model_name(self) -> str: ...

    @property
    def device(self) -> Any: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def instruction(self) -> str | None: ...

    def settings(self) -> dict[str, Any]: ...

    def with_settings(self, **settings: Any) -> Scorer: ...

    def score_groups(
        self,
        groups: Sequence[ScoreGroup],
        *,
        show_progress: bool | None = None,
        should_stop: StopCheck | None = None,
    ) -> list[GroupScores]: ...

    async def ascore_groups(
        self,
        groups: Sequence[ScoreGroup],
        *,
        show_progress: bool | None = None,
        should_stop: StopCheck | None = None,
    ) -> list[GroupScores]: ...

    def score(
        self,
        query: str,
        documents: Sequence[Document],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]: ...

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, Document]],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]: ...

    def rerank(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        threshold: float | None = None,
        instruction: str | InstructionTemplate | None = None,
        *,
        show_progress: bool | None = None,
    ) -> list[RerankResult]: ...

    async def arerank(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        threshold: float | None = None,
        instruction: str | InstructionTemplate | None = None,
        *,
        show_progress: bool | None = None,
    ) -> list[RerankResult]: ...

    def rerank_with_fallback(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        threshold: float | None = None,
        instruction: str | InstructionTemplate | None = None,
        *,
        generalize: Callable[[str], str] | None = None,
    ) -> FallbackRerank: ...


@runtime_checkable
class LocalScorer(Scorer, Protocol):
    """A :class:`Scorer` whose model runs in this process and can count the tokens it reads
    (what the HTTP service needs to enforce its token budget) and keep an exact score cache."""

    @property
    def max_length(self) -> int: ...

    @property
    def cache(self) -> Any: ...

    def with_cache(self, cache: Any, *, cache_url: str | None = None) -> LocalScorer: ...

    def lookup(self, group: ScoreGroup) -> tuple[int, GroupScores | None]: ...

    def count_tokens(
        self,
        query: str,
        documents: Sequence[Document],
        instruction: str | InstructionTemplate | None = None,
        **limits: Any,
    ) -> int: ...


def precision_name(scorer: Any) -> str:
    """How a local scorer's weights compute, for logs, ``/health`` and metrics: ``"int8"`` for an
    int8-quantized model, else its dtype without the ``torch.`` prefix (``"bfloat16"``)."""
    quantization = getattr(scorer, "quantization", None)
    return str(quantization) if quantization else str(scorer.dtype).removeprefix("torch.")
