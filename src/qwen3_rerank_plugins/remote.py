"""A reranker whose model runs elsewhere: any server speaking ``/v1/rerank``.

:class:`RemoteReranker` has the scoring surface of the local
:class:`~qwen3_rerank_plugins.Reranker` (``score``, ``score_pairs``, ``rerank``, ``rank``,
``rerank_with_fallback``, their ``a``-prefixed async twins, ``model_name``, ``device``, ``dtype``,
``bands``, ``instruction``, ``with_settings``), so code written for the engine, and the LlamaIndex
and LangChain adapters, work unchanged against a pool of replicas: this project's
``qwen3-rerank serve`` (plain or on Ray Serve, behind a load balancer), or vLLM serving
Qwen3-Reranker with ``prompt_format="vllm"``. What needs the tokenizer (``prompt_ids``,
``count_tokens``, ``tokenizer``) stays with the local engine. Requests go through
:class:`~qwen3_rerank_plugins.client.RerankClient`: timeouts, retries with backoff, long lists
split into several requests and merged in input order.

Scores are the server's: the same as the local engine's for this project's service, which is
asked for the log-odds themselves (``raw_scores``). Every per-request option the service accepts
is passed on: ``max_doc_tokens`` (``max_tokens_per_doc``), ``max_query_tokens``
(``max_tokens_per_query``) and long-document windows (``long_documents`` with ``max_windows``:
``max_chunks_per_doc``; the best window's span comes back in each result). With
``prompt_format="vllm"`` the log-odds are recovered from the probability vLLM returns (exact to
about 1e-9 for ``|logit| < 30``) and no cap can be sent.

Overload: ``timeout`` bounds each call, retries included; with ``on_overload="keep_order"`` a
service that is overloaded (503 / 429, or no answer in time) makes :meth:`RemoteReranker.rerank`
return the documents in input order, cut to ``top_n``, with ``reranked=False`` and NaN scores,
and log a WARNING, instead of raising.

This module, the client and :func:`~qwen3_rerank_plugins.get_reranker` with ``base_url`` import
no torch: a thin client process needs only the ``[server]`` extra's httpx.

Example:
    >>> from qwen3_rerank_plugins.remote import RemoteReranker
    >>> rr = RemoteReranker("http://rerank:8000", api_key="...")  # doctest: +SKIP
    >>> for r in rr.rerank("发票怎么开", ["【发票申请指南】...", "退货政策..."], top_n=1):  # doctest: +SKIP
    ...     print(r.index, r.score, r.band)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

from .client import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_MAX_CONCURRENCY,
    DEFAULT_TIMEOUT,
    AsyncRerankClient,
    RerankClient,
    RerankHit,
    RerankServiceError,
    RetryPolicy,
    check_on_overload,
)
from .protocol import GroupScores, ScoreGroup, ScoringStopped, StopCheck
from .results import ConfidenceBands, RerankResult, log_odds
from .scoring import BaseReranker
from .settings import DEFAULT_MAX_WINDOWS, RerankerSettings
from .templates import (
    DEFAULT_INSTRUCTION,
    PROMPT_PREFIX,
    PROMPT_SUFFIX,
    InstructionTemplate,
    format_document,
    format_head,
    resolve_instruction,
)
from .validation import Document, check_top_n, document_texts

__all__ = ["PromptFormat", "RemoteReranker"]

logger = logging.getLogger(__name__)

#: ``"server"``: send the raw query, documents and instruction; the server applies the template
#: (this project's service). ``"vllm"``: apply the model card's template here and send the
#: formatted texts (vLLM serving the original checkpoints, which reads no instruction field).
PromptFormat = Literal["server", "vllm"]
_PROMPT_FORMATS = ("server", "vllm")
# The settings a client chooses (the service takes the caps per request); every other one
# belongs to the server's model.
_CAP_SETTINGS = ("max_query_tokens", "max_doc_tokens", "long_documents", "max_windows")
_CLIENT_SETTINGS = ("instruction", "bands", *_CAP_SETTINGS)
_SERVER_SETTINGS = tuple(n for n in RerankerSettings.names() if n not in (*_CLIENT_SETTINGS, "show_progress"))


class _LoopPool:
    """The pooled async client of one event loop, closed when that loop shuts down.

    A connection pool cannot move between event loops, so each loop gets its own. To close it
    with its loop, the pool starts an async generator inside the loop: ``asyncio.run`` (and
    ``asyncio.Runner``, or any ``loop.shutdown_asyncgens()``) closes that generator before
    closing the loop, and the generator's ``finally`` closes the pool's connections.
    """

    def __init__(self, client: AsyncRerankClient, forget: Callable[[_LoopPool], None]) -> None:
        self.client = client
        self._forget = forget
        self._closing = False
        self._watcher = self._close_with_the_loop()
        # One step inside the running loop registers the generator with it (its first-iteration
        # hook); the body runs up to ``yield`` without awaiting, so this step is synchronous.
        with contextlib.suppress(StopIteration):
            self._watcher.asend(None).send(None)

    async def _close_with_the_loop(self) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if not self._closing:
                self._closing = True
                self._forget(self)
                await self.client.aclose()

    async def aclose(self) -> None:
        """Close the connections now (from the pool's own loop)."""
        self._stop_watching()
        await self.client.aclose()

    def abandon(self) -> None:
        """Let go of a pool whose loop was closed without shutting down its async generators.

        Its sockets cannot be closed through a closed loop; they close when collected.
        """
        self._stop_watching()

    def _stop_watching(self) -> None:
        # Finish the generator here, so it is never finalised later through its (maybe closed) loop.
        self._closing = True
        with contextlib.suppress(StopIteration):
            self._watcher.aclose().send(None)


class _Connection:
    """The HTTP clients shared by a :class:`RemoteReranker` and the views ``with_settings`` makes.

    One blocking client, and one pooled async client per live event loop: code that calls
    ``asyncio.run`` per request gets a pool per call, each closed when its loop shuts down.
    """

    def __init__(self, base_url: str, options: dict[str, Any]) -> None:
        self.options = {"base_url": base_url, **options}
        self.sync = RerankClient(**self.options)
        self.base_url = self.sync.base_url
        self._pools: dict[asyncio.AbstractEventLoop, _LoopPool] = {}
        self._lock = threading.Lock()
        self.served_model: str | None = None

    def async_client(self) -> AsyncRerankClient:
        """The pooled async client of the running event loop."""
        loop = asyncio.get_running_loop()
        with self._lock:
            self._drop_closed_loops()
            pool = self._pools.get(loop)
            if pool is None:
                pool = self._pools[loop] = _LoopPool(AsyncRerankClient(**self.options), self._forget)
            return pool.client

    def learn(self, client: RerankClient | AsyncRerankClient) -> None:
        """Remember the model name the service reported (for :attr:`RemoteReranker.model_name`)."""
        if client.served_model is not None:
            self.served_model = client.served_model

    def pool_count(self) -> int:
        """How many async connection pools are open (one per live event loop at most)."""
        with self._lock:
            self._drop_closed_loops()
            return len(self._pools)

    def _forget(self, pool: _LoopPool) -> None:
        with self._lock:
            for loop, held in list(self._pools.items()):
                if held is pool:
                    del self._pools[loop]

    def _drop_closed_loops(self) -> None:
        for loop in [loop for loop in self._pools if loop.is_closed()]:
            logger.debug("event loop %r closed without shutting down its async generators", loop)
            self._pools.pop(loop).abandon()

    def close(self) -> None:
        self.sync.close()
        with self._lock:
            self._drop_closed_loops()

    async def aclose(self) -> None:
        with self._lock:
            self._drop_closed_loops()
            pool = self._pools.pop(asyncio.get_running_loop(), None)
        if pool is not None:
            await pool.aclose()
        self.sync.close()


class RemoteReranker(BaseReranker):
    """Qwen3-Reranker served over HTTP, with the scoring surface of the local engine.

    Args:
        base_url: Where the service listens, e.g. ``"http://rerank:8000"`` (a load balancer in
            front of several replicas works the same).
        api_key: Sent as ``Authorization: Bearer <api_key>``.
        model: Model name sent with each request (vLLM and hosted APIs want the served name) and
            reported by :attr:`model_name`; by default the name the service gives in its answers.
        instruction: Default instruction (template name or free text). ``None``: the server's
            default (``"vllm"`` format: the model card's).
        bands: Cut-offs of the high / medium / low band of each result.
        prompt_format: ``"server"`` (this project's service) or ``"vllm"`` (vLLM serving the
            original Qwen3-Reranker checkpoints: the template is applied here).
        max_query_tokens: Cut the instruction + query to this many tokens (sent as
            ``max_tokens_per_query``; ``None``: the service's setting).
        max_doc_tokens: Cut each document to this many tokens (``max_tokens_per_doc``).
        long_documents: Read a document longer than the service's budget in up to
            ``max_windows`` windows and score it by the best (``max_chunks_per_doc``); ``False``:
            the service's setting.
        max_windows: Most windows per long document.
        timeout: Seconds one call may take, retries and their waits included.
        connect_timeout: Seconds to open a connection.
        retry: Retry policy for connection errors, 5xx and 429 (default: 3 retries with backoff;
            ``Retry-After`` honoured, never past ``timeout``).
        batch_size: Most documents per request; longer lists are split and merged in input order.
        max_concurrency: Most requests of one call in flight at once (spread over replicas).
        on_overload: ``"raise"`` (default) or ``"keep_order"``: when the service is overloaded,
            :meth:`rerank` / :meth:`arerank` return the documents in input order, cut to
            ``top_n``, unscored (``reranked=False``), and log a WARNING.

    Raises:
        ValueError: A malformed ``base_url``, ``prompt_format`` or setting.
    """

    _setting_names = _CLIENT_SETTINGS

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        instruction: str | InstructionTemplate | None = None,
        bands: ConfidenceBands | None = None,
        prompt_format: PromptFormat = "server",
        max_query_tokens: int | None = None,
        max_doc_tokens: int | None = None,
        long_documents: bool = False,
        max_windows: int = DEFAULT_MAX_WINDOWS,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retry: RetryPolicy | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        on_overload: Literal["raise", "keep_order"] = "raise",
    ) -> None:
        if prompt_format not in _PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {_PROMPT_FORMATS}, got {prompt_format!r}")
        self.prompt_format: PromptFormat = prompt_format
        self.on_overload = check_on_overload(on_overload)
        self._settings = self._check_settings(
            RerankerSettings(
                instruction=instruction,
                bands=bands,
                max_query_tokens=max_query_tokens,
                max_doc_tokens=max_doc_tokens,
                long_documents=long_documents,
                max_windows=max_windows,
            )
        )
        options = {
            "api_key": api_key,
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "model": model,
            "retry": retry,
            "batch_size": batch_size,
            "max_concurrency": max_concurrency,
        }
        self._conn = _Connection(base_url, options)
        self._model = model

    # -- settings and introspection -----------------------------------------------------------

    def _check_settings(self, settings: RerankerSettings) -> RerankerSettings:
        if self.prompt_format == "vllm" and self._caps(settings, ScoreGroup("", ())):
            raise ValueError(
                "max_query_tokens, max_doc_tokens and long_documents cannot be sent to vLLM "
                "(prompt_format='vllm'); set its --max-model-len or truncate_prompt_tokens there"
            )
        return settings

    def with_settings(self, **settings: Any) -> RemoteReranker:
        """A view with other client settings that shares this one's connection pool.

        The client settings are ``instruction``, ``bands`` and the per-request caps
        (``max_query_tokens``, ``max_doc_tokens``, ``long_documents``, ``max_windows``).

        Raises:
            TypeError: A setting of the server's model (``max_length``, ``batch_tokens``, ...):
                set those where the server is started.
        """
        server_side = sorted(set(settings) & set(_SERVER_SETTINGS))
        if server_side:
            what = "is a setting" if len(server_side) == 1 else "are settings"
            raise TypeError(
                f"{', '.join(server_side)} {what} of the server's model, not of a RemoteReranker; "
                "set it where the server is started (e.g. qwen3-rerank serve --max-length)"
            )
        settings.pop("show_progress", None)  # nothing to show: the work happens on the server
        return super().with_settings(**settings)  # type: ignore[return-value]

    @property
    def base_url(self) -> str:
        """The service's URL."""
        return self._conn.base_url

    @property
    def instruction(self) -> str | None:
        """The default instruction text, or ``None`` when the server's default applies."""
        if self._settings.instruction is None and self.prompt_format == "server":
            return None
        return resolve_instruction(self._settings.instruction)

    @property
    def model_name(self) -> str:
        """The ``model`` given, else the name the service reported in its answers, else the URL.

        Never does I/O (adapters read it inside the event loop): until the first answer, a
        reranker without ``model`` is named by its URL.
        """
        return self._model or self._conn.served_model or self.base_url

    @property
    def device(self) -> str:
        """Where the model runs: the service's URL (its device is the server's business)."""
        return self.base_url

    @property
    def dtype(self) -> str:
        """``"remote"``: the weights' precision is chosen where the server starts."""
        return "remote"

    def __repr__(self) -> str:
        model = f", model={self._model!r}" if self._model else ""
        return f"RemoteReranker({self.base_url!r}{model}, prompt_format={self.prompt_format!r})"

    # -- the backend primitive ------------------------------------------------------------------

    def _score_groups(
        self, groups: list[ScoreGroup], show_progress: bool, should_stop: StopCheck | None = None
    ) -> list[GroupScores]:
        """One request per group (split further when long); scores are the server's.

        Raises:
            RerankServiceError: The service refused a request, failed, or could not be reached.
            ScoringStopped: ``should_stop`` returned ``True`` before a group's request.
        """
        out = []
        for group in groups:
            if should_stop is not None and should_stop():
                raise ScoringStopped(f"stopped after {len(out)} of {len(groups)} requests")
            hits = self._conn.sync.rerank(**self._request(group))
            self._conn.learn(self._conn.sync)
            out.append(self._scores(hits, len(group.texts)))
        return out

    async def _ascore_groups(
        self, groups: list[ScoreGroup], show_progress: bool, should_stop: StopCheck | None = None
    ) -> list[GroupScores]:
        """The groups' requests in flight together over the loop's pooled async client
        (``should_stop`` is asked once, before they are sent)."""
        if should_stop is not None and should_stop():
            raise ScoringStopped(f"stopped before sending {len(groups)} requests")
        client = self._conn.async_client()

        async def one(group: ScoreGroup) -> GroupScores:
            hits = await client.rerank(**self._request(group))
            self._conn.learn(client)
            return self._scores(hits, len(group.texts))

        return list(await asyncio.gather(*(one(group) for group in groups)))

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (shared with the views made by :meth:`with_settings`)."""
        self._conn.close()

    async def aclose(self) -> None:
        """Close the async and sync connection pools."""
        await self._conn.aclose()

    def __enter__(self) -> RemoteReranker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> RemoteReranker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _caps(settings: RerankerSettings, group: ScoreGroup) -> dict[str, int]:
        """The service's request fields for the caps of ``group``, else of ``settings``."""

        def pick(own: Any, default: Any) -> Any:
            return own if own is not None else default

        caps = {
            "max_tokens_per_doc": pick(group.max_doc_tokens, settings.max_doc_tokens),
            "max_tokens_per_query": pick(group.max_query_tokens, settings.max_query_tokens),
        }
        if pick(group.long_documents, settings.long_documents):
            caps["max_chunks_per_doc"] = pick(group.max_windows, settings.max_windows)
        return {name: value for name, value in caps.items() if value is not None}

    def _request(self, group: ScoreGroup) -> dict[str, Any]:
        """The client call for one group."""
        caps = self._caps(self._settings, group)
        if self.prompt_format == "vllm":
            if caps:
                raise ValueError(f"{', '.join(sorted(caps))} cannot be sent to vLLM (prompt_format='vllm')")
            # The model card's prompt, split where the document begins (a token boundary), so the
            # server's pair tokenisation gives the very ids of the whole prompt.
            head = PROMPT_PREFIX + format_head(group.instruction or DEFAULT_INSTRUCTION, group.query)
            return {"query": head, "documents": [format_document(t) + PROMPT_SUFFIX for t in group.texts]}
        # Names were resolved here, so templates registered in this process work remotely.
        return {
            "query": group.query,
            "documents": list(group.texts),
            "instruction": group.instruction,
            "raw_scores": True,  # the log-odds themselves, not rebuilt from probabilities
            **caps,
        }

    def _scores(self, hits: list[RerankHit], n: int) -> GroupScores:
        scores: list[float | None] = [None] * n
        spans: list[tuple[int, int] | None] = [None] * n
        for hit in hits:
            scores[hit.index] = hit.relevance_score
            spans[hit.index] = hit.span
        missing = [i for i, s in enumerate(scores) if s is None]
        if missing or len(hits) != n:
            raise RerankServiceError(
                f"the service at {self.base_url} returned {len(hits)} scores for {n} documents "
                f"(none for documents {missing[:10]})",
                type="invalid_response",
            )
        raw = self.prompt_format == "server"
        logits = [float(s) if raw else log_odds(float(s)) for s in scores if s is not None]
        return GroupScores(logits, spans=spans if any(span is not None for span in spans) else None)

    # -- overload: keep the input order -------------------------------------------------------

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
        """As :meth:`Reranker.rerank <qwen3_rerank_plugins.Reranker.rerank>`, over the service.

        With ``on_overload="keep_order"`` an overloaded service gives the documents in input
        order, cut to ``top_n``, unscored (``reranked=False``, NaN scores), and a WARNING.
        """
        try:
            return super().rerank(
                query, documents, top_n, threshold, instruction, show_progress=show_progress
            )
        except RerankServiceError as exc:
            return self._kept_order(exc, documents, top_n)

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
        """:meth:`rerank` over the loop's pooled async client."""
        try:
            return await super().arerank(
                query, documents, top_n, threshold, instruction, show_progress=show_progress
            )
        except RerankServiceError as exc:
            return self._kept_order(exc, documents, top_n)

    def _kept_order(
        self, exc: RerankServiceError, documents: Sequence[Document], top_n: int | None
    ) -> list[RerankResult]:
        if self.on_overload != "keep_order" or not exc.overloaded:
            raise exc
        document_texts(documents)
        keep = list(documents) if top_n is None else list(documents)[: check_top_n(top_n)]
        logger.warning(
            "the rerank service at %s is overloaded (%s); keeping the input order of %d documents",
            self.base_url,
            exc,
            len(documents),
        )
        return [
            RerankResult(index=i, score=math.nan, logit=math.nan, document=doc, reranked=False)
            for i, doc in enumerate(keep)
        ]
