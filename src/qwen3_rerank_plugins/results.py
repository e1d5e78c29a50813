"""Result types: a reranked document and the confidence band of its score."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Band", "ConfidenceBands", "RerankResult", "ranked_order", "sigmoid"]

Band = Literal["high", "medium", "low"]


def sigmoid(x: float) -> float:
    """``P(yes)`` from the log-odds ``z_yes - z_no``, without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


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
    """

    index: int
    score: float
    logit: float
    document: Any = field(repr=False)
    band: Band = "low"

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
        if include_document:
            out["document"] = self.document
        return out
