"""The scoring surface, written once over one backend primitive.

:class:`BaseReranker` implements ``score``, ``score_pairs``, ``score_groups``, ``rerank``,
``rank``, their async twins and the low-confidence fallback over a single primitive that a
backend provides: log-odds (and the tokens read, and the matching spans) for a list of
:class:`~qwen3_rerank_plugins.protocol.ScoreGroup` (instruction, query, documents). The local
engine (:class:`~qwen3_rerank_plugins.Reranker`) and the remote backend
(:class:`~qwen3_rerank_plugins.remote.RemoteReranker`) implement only that primitive and what is
really theirs (loading and devices; HTTP). No torch here.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from .fallback import arerank_with_fallback, rerank_with_fallback
from .protocol import GroupScores, ScoreGroup, StopCheck
from .results import ConfidenceBands, FallbackRerank, RerankResult, rank_results, sigmoid
from .settings import RerankerSettings
from .templates import InstructionTemplate, resolve_instruction
from .tracing import rerank_span
from .validation import (
    Document,
    check_bool,
    check_optional_positive_int,
    check_query,
    check_threshold,
    check_top_n,
    document_texts,
    pair_texts,
)

__all__ = ["BaseReranker"]


class BaseReranker:
    """What every reranker does, over the backend primitive :meth:`_score_groups`.

    Subclasses set ``self._settings`` (a :class:`~qwen3_rerank_plugins.settings.RerankerSettings`)
    and implement :meth:`_score_groups` (and :meth:`_ascore_groups` when they have real async
    I/O); they may check settings in :meth:`_check_settings`.
    """

    _settings: RerankerSettings
    #: Settings reported by :meth:`settings` (a backend may own fewer than all of them).
    _setting_names: tuple[str, ...] = RerankerSettings.names()

    # -- the backend primitive ------------------------------------------------------------------

    def _score_groups(
        self, groups: list[ScoreGroup], show_progress: bool, should_stop: StopCheck | None = None
    ) -> list[GroupScores]:
        """Log-odds for each group's documents (groups are validated and non-empty).

        ``should_stop``, when given, is asked between units of work (forward passes, requests);
        once it returns ``True`` the backend raises
        :class:`~qwen3_rerank_plugins.protocol.ScoringStopped`.
        """
        raise NotImplementedError

    async def _ascore_groups(
        self, groups: list[ScoreGroup], show_progress: bool, should_stop: StopCheck | None = None
    ) -> list[GroupScores]:
        """:meth:`_score_groups` without blocking the event loop (default: in a worker thread)."""
        return await asyncio.to_thread(self._score_groups, groups, show_progress, should_stop)

    def _check_settings(self, settings: RerankerSettings) -> RerankerSettings:
        """Checks of new settings that need the backend (default: none)."""
        return settings

    # -- settings -------------------------------------------------------------------------------

    @property
    def scoring_settings(self) -> RerankerSettings:
        """All scoring settings, as one frozen object."""
        return self._settings

    def settings(self) -> dict[str, Any]:
        """The scoring settings of this reranker, as keyword arguments of :meth:`with_settings`."""
        return {name: getattr(self._settings, name) for name in self._setting_names}

    def with_settings(self, **settings: Any) -> BaseReranker:
        """A reranker with other settings over the same backend (the same loaded model or pool).

        Raises:
            TypeError: An unknown setting (or, for a remote backend, one of the server's).
            ValueError: A setting out of range.
        """
        view = copy.copy(self)
        view._settings = self._check_settings(self._settings.replace(type(self).__name__, **settings))
        return view

    @property
    def bands(self) -> ConfidenceBands:
        """Cut-offs of each result's band."""
        return self._settings.bands

    @property
    def show_progress(self) -> bool:
        """Whether a progress bar is shown by default."""
        return self._settings.show_progress

    # -- scoring --------------------------------------------------------------------------------

    def score_groups(
        self,
        groups: Sequence[ScoreGroup],
        *,
        show_progress: bool | None = None,
        should_stop: StopCheck | None = None,
    ) -> list[GroupScores]:
        """Score several queries' documents at once (the backend may batch them together).

        This is what the service's batcher calls with every request it merged: one call, one
        set of forward passes, each group exact whatever it was batched with.

        Args:
            groups: :class:`~qwen3_rerank_plugins.protocol.ScoreGroup` objects; an instruction
                may be a template name or free text (``None``: this reranker's default).
            show_progress: Override the progress-bar setting for this call.
            should_stop: Asked between forward passes (the remote backend: between requests);
                once it returns ``True`` the call stops and raises
                :class:`~qwen3_rerank_plugins.protocol.ScoringStopped`. The service's batcher
                uses it to stop a batch whose every client has hung up.

        Returns:
            One :class:`~qwen3_rerank_plugins.protocol.GroupScores` per group, in order.

        Raises:
            ScoringStopped: ``should_stop`` returned ``True`` before the last pass.
        """
        checked = self._checked_groups(groups)
        busy = [i for i, g in enumerate(checked) if g.texts]
        out = [GroupScores([], 0) for _ in checked]
        if busy:
            with rerank_span(self) as span:  # OpenTelemetry ([otel]); else a no-op
                span.groups([checked[i] for i in busy])
                scored = self._score_groups(
                    [checked[i] for i in busy], self._progress(show_progress), should_stop
                )
                span.scored(scored, cache=getattr(self, "cache", None) is not None)
            for i, result in zip(busy, scored, strict=True):
                out[i] = result
        return out

    async def ascore_groups(
        self,
        groups: Sequence[ScoreGroup],
        *,
        show_progress: bool | None = None,
        should_stop: StopCheck | None = None,
    ) -> list[GroupScores]:
        """:meth:`score_groups` without blocking the event loop."""
        checked = self._checked_groups(groups)
        busy = [i for i, g in enumerate(checked) if g.texts]
        out = [GroupScores([], 0) for _ in checked]
        if busy:
            with rerank_span(self) as span:  # OpenTelemetry ([otel]); else a no-op
                span.groups([checked[i] for i in busy])
                scored = await self._ascore_groups(
                    [checked[i] for i in busy], self._progress(show_progress), should_stop
                )
                span.scored(scored, cache=getattr(self, "cache", None) is not None)
            for i, result in zip(busy, scored, strict=True):
                out[i] = result
        return out

    def score(
        self,
        query: str,
        documents: Sequence[Document],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]:
        """Relevance of each document to the query, in input order.

        Args:
            query: The user's question or the new ticket.
            documents: Texts, or mappings with a ``"text"`` key.
            instruction: Template name or free text; defaults to this reranker's instruction.
            return_logits: Return the log-odds ``z_yes - z_no`` instead of probabilities.
            show_progress: Override the progress-bar setting for this call.

        Returns:
            One float per document: ``P(yes)`` in [0, 1], or the log-odds.
        """
        group = self._group(query, documents, instruction)
        logits = self.score_groups([group], show_progress=show_progress)[0].logits
        return _finish(logits, return_logits)

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, Document]],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]:
        """Scores of ``(query, document)`` pairs that may mix queries, in input order.

        Pairs that share a query share its prefix, whatever their order in the list; pairs of
        different queries are batched together.
        """
        groups, positions = self._pair_groups(pairs, instruction)
        scored = self.score_groups(groups, show_progress=show_progress)
        return _finish(_scatter(len(pairs), positions, scored), return_logits)

    def rerank(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        threshold: float | None = None,
        instruction: str | InstructionTemplate | None = None,
        *,
        show_progress: bool | None = None,
    ) -> list[RerankResult]:
        """Documents sorted best first, with index, score, log-odds and band.

        Args:
            query: The user's question or the new ticket.
            documents: Texts, or mappings with a ``"text"`` key (e.g. ``{"id": 7, "text": ...}``);
                each result carries the original object back.
            top_n: Keep at most this many results (all when ``None`` or larger than the input).
            threshold: Drop results whose score is below this probability.
            instruction: Template name or free text; defaults to this reranker's instruction.
            show_progress: Override the progress-bar setting for this call.

        Returns:
            :class:`~qwen3_rerank_plugins.RerankResult` objects, highest score first; ties keep
            input order.
        """
        top_n, threshold = check_top_n(top_n), check_threshold(threshold)
        with rerank_span(self) as span:  # the scoring below records into this one span
            span.top_n(top_n)
            group = self._group(query, documents, instruction)
            scored = self.score_groups([group], show_progress=show_progress)[0]
        return self._ranked(scored, documents, top_n, threshold)

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: int | None = None,
        return_documents: bool = False,
        instruction: str | InstructionTemplate | None = None,
    ) -> list[dict[str, Any]]:
        """sentence-transformers ``CrossEncoder.rank`` shape: ``[{"corpus_id", "score", "text"?}]``."""
        ranked = self.rerank(query, documents, top_n=top_k, instruction=instruction)
        return [r.to_rank_dict(include_text=return_documents) for r in ranked]

    # -- async ----------------------------------------------------------------------------------

    async def ascore(
        self,
        query: str,
        documents: Sequence[Document],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]:
        """:meth:`score` without blocking the event loop."""
        group = self._group(query, documents, instruction)
        logits = (await self.ascore_groups([group], show_progress=show_progress))[0].logits
        return _finish(logits, return_logits)

    async def ascore_pairs(
        self,
        pairs: Sequence[tuple[str, Document]],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]:
        """:meth:`score_pairs` without blocking the event loop."""
        groups, positions = self._pair_groups(pairs, instruction)
        scored = await self.ascore_groups(groups, show_progress=show_progress)
        return _finish(_scatter(len(pairs), positions, scored), return_logits)

    async def arerank(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        threshold: float | None = None,
        instruction: str | InstructionTemplate | None = None,
        *,
        show_progress: bool | None = None,
    ) -> list[RerankResult]:
        """:meth:`rerank` without blocking the event loop."""
        top_n, threshold = check_top_n(top_n), check_threshold(threshold)
        with rerank_span(self) as span:  # the scoring below records into this one span
            span.top_n(top_n)
            group = self._group(query, documents, instruction)
            scored = (await self.ascore_groups([group], show_progress=show_progress))[0]
        return self._ranked(scored, documents, top_n, threshold)

    # -- low-confidence fallback ----------------------------------------------------------------

    def rerank_with_fallback(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        threshold: float | None = None,
        instruction: str | InstructionTemplate | None = None,
        *,
        generalize: Callable[[str], str] | None = None,
    ) -> FallbackRerank:
        """:meth:`rerank`; if the best score is in the low band, generalize the query and rerank again.

        See :func:`qwen3_rerank_plugins.fallback.rerank_with_fallback`; both attempts are returned.
        """
        return rerank_with_fallback(
            self,
            query,
            documents,
            generalize=generalize,
            top_n=top_n,
            threshold=threshold,
            instruction=instruction,
        )

    async def arerank_with_fallback(
        self,
        query: str,
        documents: Sequence[Document],
        top_n: int | None = None,
        threshold: float | None = None,
        instruction: str | InstructionTemplate | None = None,
        *,
        generalize: Callable[[str], str] | None = None,
    ) -> FallbackRerank:
        """:meth:`rerank_with_fallback` without blocking the event loop."""
        return await arerank_with_fallback(
            self,
            query,
            documents,
            generalize=generalize,
            top_n=top_n,
            threshold=threshold,
            instruction=instruction,
        )

    # -- internals ------------------------------------------------------------------------------

    def _progress(self, show_progress: bool | None) -> bool:
        return (
            self._settings.show_progress
            if show_progress is None
            else check_bool(show_progress, "show_progress")
        )

    def _instruction_text(self, instruction: str | InstructionTemplate | None) -> str | None:
        """The instruction text a call asks for, or ``None`` for the backend's default."""
        chosen = instruction if instruction is not None else self._settings.instruction
        return None if chosen is None else resolve_instruction(chosen)

    def _group(
        self, query: str, documents: Sequence[Document], instruction: str | InstructionTemplate | None
    ) -> ScoreGroup:
        query = check_query(query)
        texts = document_texts(documents)
        return ScoreGroup(query, texts, self._instruction_text(instruction))

    def _pair_groups(
        self, pairs: Sequence[tuple[str, Document]], instruction: str | InstructionTemplate | None
    ) -> tuple[list[ScoreGroup], list[list[int]]]:
        checked = pair_texts(pairs)
        instr = self._instruction_text(instruction)
        by_query: dict[str, tuple[list[int], list[str]]] = {}
        for i, (query, text) in enumerate(checked):
            positions, texts = by_query.setdefault(query, ([], []))
            positions.append(i)
            texts.append(text)
        groups = [ScoreGroup(query, texts, instr) for query, (_, texts) in by_query.items()]
        return groups, [positions for positions, _ in by_query.values()]

    def _checked_groups(self, groups: Sequence[ScoreGroup]) -> list[ScoreGroup]:
        if isinstance(groups, (str, bytes, ScoreGroup)) or not isinstance(groups, Sequence):
            raise TypeError(f"groups must be a list of ScoreGroup, got {type(groups).__name__}")
        out = []
        for i, group in enumerate(groups):
            if not isinstance(group, ScoreGroup):
                raise TypeError(f"groups[{i}] must be a ScoreGroup, got {type(group).__name__}")
            check_query(group.query, f"groups[{i}].query")
            texts = document_texts(group.texts)
            instruction = None if group.instruction is None else resolve_instruction(group.instruction)
            check_optional_positive_int(group.max_query_tokens, f"groups[{i}].max_query_tokens")
            check_optional_positive_int(group.max_doc_tokens, f"groups[{i}].max_doc_tokens")
            check_optional_positive_int(group.max_windows, f"groups[{i}].max_windows")
            if group.long_documents is not None:
                check_bool(group.long_documents, f"groups[{i}].long_documents")
            check_bool(group.cache, f"groups[{i}].cache")
            out.append(dataclasses.replace(group, texts=texts, instruction=instruction))
        return out

    def _ranked(
        self, scored: GroupScores, documents: Sequence[Document], top_n: int | None, threshold: float | None
    ) -> list[RerankResult]:
        return rank_results(
            scored.logits, documents, bands=self.bands, top_n=top_n, threshold=threshold, spans=scored.spans
        )


def _finish(logits: list[float], return_logits: bool) -> list[float]:
    return logits if return_logits else [sigmoid(x) for x in logits]


def _scatter(n: int, positions: list[list[int]], scored: list[GroupScores]) -> list[float]:
    out = [0.0] * n
    for where, result in zip(positions, scored, strict=True):
        for i, value in zip(where, result.logits, strict=True):
            out[i] = value
    return out
