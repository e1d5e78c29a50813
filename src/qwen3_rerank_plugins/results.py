"""Result types: a reranked document and the confidence band of its score."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "Band",
    "ConfidenceBands",
    "FallbackRerank",
    "RerankAttempt",
    "RerankResult",
    "log_odds",
    "rank_results",
    "ranked_order",
    "sigmoid",
]

Band = Literal["high", "medium", "low"]


def sigmoid(x: float) -> float:
    """``P(yes)`` from the log-odds ``z_yes - z_no``, without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def log_odds(p: float) -> float:
    """The log-odds of a probability (inverse of :func:`sigmoid`; infinite at 0 and 1)."""
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def ranked_order(logits: list[float], top_n: int | None = None) -> list[int]:
    """Indices best first, ties in input order, cut to ``top_n``: the order of every ranking here."""
    order = sorted(range(len(logits)), key=lambda i: (-logits[i], i))
    return order if top_n is None else order[:top_n]


@dataclass(frozen=True)
class ConfidenceBands:
    """Cut-offs that turn a score into a high / medium / low band.

    ``score >= high`` is ``"high"``, ``medium <= score < high`` is ``"medium"``, anything lower
    is ``"low"``. The defaults (0.85 / 0.70) are the ones hotline teams read scores with.

    Example:
        >>> ConfidenceBands().classify(0.9), ConfidenceBands(high=0.95).classify(0.9)
        ('high', 'medium')
    """

    high: float = 0.85
    medium: float = 0.70

    def __post_init__(self) -> None:
        for name in ("high", "medium"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"ConfidenceBands.{name} must be a number in [0, 1], got {value!r}")
        if self.medium > self.high:
            raise ValueError(
                f"ConfidenceBands.medium ({self.medium}) must not exceed ConfidenceBands.high ({self.high})"
            )

    def classify(self, score: float) -> Band:
        """The band of one score."""
        if score >= self.high:
            return "high"
        if score >= self.medium:
            return "medium"
        return "low"


@dataclass(frozen=True)
class RerankResult:
    """One document after reranking.

    Attributes:
        index: Position of the document in the input list.
        score: Relevance probability in [0, 1] (``P(yes)``).
        logit: Raw log-odds ``z_yes - z_no``; keeps the order where probabilities saturate.
        document: The object that was passed in (a string or a mapping such as ``{"id", "text"}``).
        band: ``"high"``, ``"medium"`` or ``"low"`` under the reranker's :class:`ConfidenceBands`.
        span: ``(start, end)`` character offsets, in the document's text, of the part that gave the
            score: the best window of a long document read in windows, else ``None`` (the whole
            text, or what fits of it, was read as the model card reads it).
        reranked: ``False`` when the document was not scored at all: a remote service was
            overloaded and ``on_overload="keep_order"`` kept the input order (``score`` and
            ``logit`` are then NaN).
    """

    index: int
    score: float
    logit: float
    document: Any = field(repr=False)
    band: Band = "low"
    span: tuple[int, int] | None = None
    reranked: bool = True

    @property
    def text(self) -> str:
        """The document text that was scored."""
        if isinstance(self.document, Mapping):
            return self.document["text"]
        return self.document

    @property
    def id(self) -> Any:
        """The document's ``"id"`` when it was passed as a mapping with one, else its index."""
        if isinstance(self.document, Mapping) and "id" in self.document:
            return self.document["id"]
        return self.index

    def to_rank_dict(self, *, include_text: bool = False) -> dict[str, Any]:
        """sentence-transformers ``CrossEncoder.rank`` item: ``{"corpus_id", "score", "text"?}``."""
        item: dict[str, Any] = {"corpus_id": self.index, "score": self.score}
        if include_text:
            item["text"] = self.text
        return item

    def to_dict(self, *, include_document: bool = True) -> dict[str, Any]:
        """A JSON-ready dict: index, id, score, logit, band and (optionally) the document."""
        out: dict[str, Any] = {
            "index": self.index,
            "id": self.id,
            "score": self.score,
            "logit": self.logit,
            "band": self.band,
        }
        if self.span is not None:
            out["span"] = {"start": self.span[0], "end": self.span[1]}
        if include_document:
            out["document"] = self.document
        return out


@dataclass(frozen=True)
class RerankAttempt:
    """One reranking pass: the query that was used and what it gave.

    Attributes:
        query: The query text of this pass.
        results: Results best first, after ``top_n`` and ``threshold``.
        best_score: The highest score over *all* documents (before ``threshold``); ``None`` when
            there were no documents.
        best_band: The band of ``best_score``; ``None`` when there were no documents.
    """

    query: str
    results: tuple[RerankResult, ...]
    best_score: float | None
    best_band: Band | None

    def to_dict(self, *, include_document: bool = True) -> dict[str, Any]:
        """A JSON-ready dict: query, best score and band, and the results."""
        return {
            "query": self.query,
            "best_score": self.best_score,
            "best_band": self.best_band,
            "results": [r.to_dict(include_document=include_document) for r in self.results],
        }


@dataclass(frozen=True)
class FallbackRerank:
    """Both attempts of :func:`rerank_with_fallback`.

    Attributes:
        first: The pass with the original query.
        retry: The pass with the generalized query, or ``None`` when none was made (the best
            score was not low, there were no documents, or ``generalize`` left the query as it was).

    Example:
        >>> outcome = rerank_with_fallback(reranker, ticket, past_tickets, top_n=3)  # doctest: +SKIP
        >>> for r in outcome.results:  # doctest: +SKIP
        ...     print(r.id, r.score, r.band)
        >>> if outcome.needs_review:  # doctest: +SKIP
        ...     flag_for_operator(ticket, outcome.attempts)
    """

    first: RerankAttempt
    retry: RerankAttempt | None = None

    @property
    def fell_back(self) -> bool:
        """Whether the query was generalized and reranked again."""
        return self.retry is not None

    @property
    def attempts(self) -> tuple[RerankAttempt, ...]:
        """The attempts made, first one first."""
        return (self.first,) if self.retry is None else (self.first, self.retry)

    @property
    def final(self) -> RerankAttempt:
        """The attempt to show: the retry when its best score beats the first one's, else the first."""
        if self.retry is None or self.retry.best_score is None:
            return self.first
        if self.first.best_score is not None and self.retry.best_score <= self.first.best_score:
            return self.first
        return self.retry

    @property
    def results(self) -> tuple[RerankResult, ...]:
        """The results of :attr:`final`, best first."""
        return self.final.results

    @property
    def needs_review(self) -> bool:
        """Whether a person should look: the best score of :attr:`final` is still in the low band."""
        return self.final.best_band == "low"

    def to_dict(self, *, include_document: bool = True) -> dict[str, Any]:
        """A JSON-ready dict of both attempts plus ``fell_back``, ``needs_review`` and ``final``."""
        return {
            "fell_back": self.fell_back,
            "needs_review": self.needs_review,
            "final": "retry" if self.final is self.retry else "first",
            "first": self.first.to_dict(include_document=include_document),
            "retry": None if self.retry is None else self.retry.to_dict(include_document=include_document),
        }


def rank_results(
    logits: Sequence[float],
    documents: Sequence[Any],
    *,
    bands: ConfidenceBands,
    top_n: int | None = None,
    threshold: float | None = None,
    spans: Sequence[tuple[int, int] | None] | None = None,
) -> list[RerankResult]:
    """Log-odds in input order -> results best first: the one ranking step of every surface.

    Args:
        logits: ``z_yes - z_no`` of each document, in input order.
        documents: The documents as given (each result carries its own back).
        bands: Cut-offs of each result's band.
        top_n: Keep at most this many (all when ``None``).
        threshold: Drop results whose probability is below this.
        spans: The ``(start, end)`` character span that scored each document, when known.

    Returns:
        :class:`RerankResult` objects, highest score first, ties in input order.
    """
    results = []
    for i in ranked_order(list(logits), top_n):
        score = sigmoid(logits[i])
        if threshold is not None and score < threshold:
            break
        span = spans[i] if spans is not None else None
        results.append(RerankResult(i, score, logits[i], documents[i], bands.classify(score), span))
    return results
