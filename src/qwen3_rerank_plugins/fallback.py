"""Query fallback on low confidence: rewrite the query more generally and rerank again.

When even the best document scores in the *low* band, the specifics of the query (an address,
a time, a name) may be what keeps similar cases from matching. The helpers here rerank once,
and only when the best score is low, rewrite the query with a ``generalize`` callable (by
default the rule-based :func:`~qwen3_rerank_plugins.generalize.generalize`) and rerank again.
Both attempts are returned, so the caller can show the better one and flag the case for a
person when it is still low.

* :func:`rerank_with_fallback` / :func:`arerank_with_fallback`: rerank, maybe retry, return a
  :class:`~qwen3_rerank_plugins.results.FallbackRerank` holding both attempts.
* :func:`retry_query`: the retry decision alone, for code that scores by other means (e.g. a
  server's batcher).

Any :class:`~qwen3_rerank_plugins.protocol.Scorer` works: the local engine or a remote one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .generalize import Generalizer, generalize
from .results import ConfidenceBands, FallbackRerank, RerankAttempt, RerankResult
from .tracing import rerank_span
from .validation import check_threshold

if TYPE_CHECKING:
    from .protocol import Scorer
    from .templates import InstructionTemplate
    from .validation import Document

__all__ = [
    "FallbackRerank",
    "Generalizer",
    "RerankAttempt",
    "arerank_with_fallback",
    "generalize",
    "rerank_with_fallback",
    "retry_query",
]


def retry_query(
    query: str,
    best_score: float | None,
    bands: ConfidenceBands | None = None,
    generalize: Generalizer | None = None,
) -> str | None:
    """The generalized query to rerank with, or ``None`` when no retry is due.

    A retry is due when ``best_score`` falls in the low band of ``bands`` and ``generalize``
    changes the query. This is the decision :func:`rerank_with_fallback` makes, for code that
    scores by other means (for example an HTTP service that batches requests).

    Args:
        query: The original query.
        best_score: The highest score of the first pass (``None`` for no documents: no retry).
        bands: Confidence cut-offs (default 0.85 / 0.70).
        generalize: The rewriter; defaults to the rule-based :func:`generalize`.

    Returns:
        The rewritten query, or ``None``.

    Raises:
        TypeError: If ``generalize`` is not callable or does not return a string.
    """
    rewrite = _check_generalizer(generalize)
    bands = bands or ConfidenceBands()
    if best_score is None or bands.classify(best_score) != "low":
        return None
    rewritten = rewrite(query)
    if not isinstance(rewritten, str):
        raise TypeError(
            f"generalize must return a str, got {type(rewritten).__name__} from {_name_of(rewrite)}"
        )
    rewritten = rewritten.strip()
    if not rewritten or rewritten == query.strip():
        return None
    return rewritten


def rerank_with_fallback(
    reranker: Scorer,
    query: str,
    documents: Sequence[Document],
    *,
    generalize: Generalizer | None = None,
    top_n: int | None = None,
    threshold: float | None = None,
    instruction: str | InstructionTemplate | None = None,
    bands: ConfidenceBands | None = None,
) -> FallbackRerank:
    """Rerank; when the best score is in the low band, generalize the query and rerank again.

    Args:
        reranker: The engine (:class:`~qwen3_rerank_plugins.Reranker`) or any other :class:`Scorer`.
        query: The user's question or the new ticket.
        documents: Texts, or mappings with a ``"text"`` key (``{"id": ..., "text": ...}``).
        generalize: Query rewriter ``str -> str``; defaults to the rule-based :func:`generalize`.
        top_n: Keep at most this many results per attempt.
        threshold: Drop results scoring below this probability (the low-band test looks at the
            best score before this filter).
        instruction: Template name or free text; defaults to the reranker's instruction.
        bands: Cut-offs for the bands; defaults to the reranker's own ``bands``.

    Returns:
        A :class:`FallbackRerank` with the first attempt and, if one was made, the retry.

    Raises:
        TypeError, ValueError: On bad arguments, as :meth:`~qwen3_rerank_plugins.Reranker.rerank` raises them.

    Example:
        >>> ticket = "朝阳区建国路88号电梯昨晚又坏了"
        >>> outcome = rerank_with_fallback(rr, ticket, tickets, top_n=3)  # doctest: +SKIP
        >>> outcome.fell_back, outcome.retry.query  # doctest: +SKIP
        (True, '电梯又坏了')
    """
    engine, threshold = _prepare(reranker, generalize, threshold, bands)

    def attempt(text: str) -> RerankAttempt:
        results = engine.rerank(text, documents, top_n=top_n, instruction=instruction)
        return _attempt(engine, text, results, threshold)

    with rerank_span(engine) as span:  # both attempts in one span ([otel]; else a no-op)
        first = attempt(query)
        again = retry_query(query, first.best_score, engine.bands, generalize)
        outcome = FallbackRerank(first, None if again is None else attempt(again))
        span.fallback(outcome)
    return outcome


async def arerank_with_fallback(
    reranker: Scorer,
    query: str,
    documents: Sequence[Document],
    *,
    generalize: Generalizer | None = None,
    top_n: int | None = None,
    threshold: float | None = None,
    instruction: str | InstructionTemplate | None = None,
    bands: ConfidenceBands | None = None,
) -> FallbackRerank:
    """:func:`rerank_with_fallback` with the model in a worker thread; the event loop keeps running.

    ``generalize`` runs on the event loop's thread: keep it quick, or make it do its own
    off-loading.
    """
    engine, threshold = _prepare(reranker, generalize, threshold, bands)

    async def attempt(text: str) -> RerankAttempt:
        results = await engine.arerank(text, documents, top_n=top_n, instruction=instruction)
        return _attempt(engine, text, results, threshold)

    with rerank_span(engine) as span:  # both attempts in one span ([otel]; else a no-op)
        first = await attempt(query)
        again = retry_query(query, first.best_score, engine.bands, generalize)
        outcome = FallbackRerank(first, None if again is None else await attempt(again))
        span.fallback(outcome)
    return outcome


def _prepare(
    reranker: Scorer, generalize: Generalizer | None, threshold: Any, bands: ConfidenceBands | None
) -> tuple[Scorer, float | None]:
    _check_generalizer(generalize)
    threshold = check_threshold(threshold)
    if bands is not None and not isinstance(bands, ConfidenceBands):
        raise TypeError(f"bands must be a ConfidenceBands, got {type(bands).__name__}")
    # Other cut-offs over the same loaded weights, so every result's band uses them too.
    engine = reranker if bands is None or bands == reranker.bands else reranker.with_settings(bands=bands)
    return engine, threshold


def _attempt(
    engine: Scorer, query: str, results: list[RerankResult], threshold: float | None
) -> RerankAttempt:
    best = results[0].score if results else None
    kept = tuple(r for r in results if threshold is None or r.score >= threshold)
    return RerankAttempt(
        query=query,
        results=kept,
        best_score=best,
        best_band=None if best is None else engine.bands.classify(best),
    )


def _check_generalizer(rewrite: Any) -> Generalizer:
    if rewrite is None:
        return generalize
    if not callable(rewrite):
        raise TypeError(f"generalize must be a callable str -> str, got {type(rewrite).__name__}")
    return rewrite


def _name_of(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__
