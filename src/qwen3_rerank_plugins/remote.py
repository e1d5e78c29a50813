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

Scores are the server's: the same as the local engine's for this project's service. The log-odds
of each result are recovered from the probability the server returns (exact to about 1e-9 for
``|logit| < 30``; a probability of exactly 0 or 1 gives an infinite log-odds).

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
)
from .engine import (
    Document,
    Reranker,
    _check_query,
    _check_threshold,
    _check_top_n,
    _document_texts,
    _pair_texts,
)
from .results import ConfidenceBands, RerankResult
from .templates import PROMPT_PREFIX, PROMPT_SUFFIX, InstructionTemplate, format_document, format_head
from .templates import resolve_instruction as _resolve

__all__ = ["PromptFormat", "RemoteReranker"]

logger = logging.getLogger(__name__)

#: ``"server"``: send the raw query, documents and instruction; the server applies the template
#: (this project's service). ``"vllm"``: apply the model card's template here and send the
#: formatted texts (vLLM serving the original checkpoints, which reads no instruction field).
PromptFormat = Literal["server", "vllm"]
_PROMPT_FORMATS = ("server", "vllm")
# Settings of the local engine that belong to the server's model, not to a client.
_SERVER_SETTINGS = ("max_length", "batch_tokens", "max_batch_size", "prefix_cache")


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


def _log_odds(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


class RemoteReranker:
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
        timeout: Seconds to wait for each answer.
        connect_timeout: Seconds to open a connection.
        retry: Retry policy for connection errors, 5xx and 429 (default: 3 retries with backoff).
        batch_size: Most documents per request; longer lists are split and merged in input order.
        max_concurrency: Most requests of one call in flight at once (spread over replicas).

    Raises:
        ValueError: A malformed ``base_url``, ``prompt_format`` or setting.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        instruction: str | InstructionTemplate | None = None,
        bands: ConfidenceBands | None = None,
        prompt_format: PromptFormat = "server",
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retry: RetryPolicy | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        if prompt_format not in _PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {_PROMPT_FORMATS}, got {prompt_format!r}")
        options = {
            "api_key": api_key,
            "timeout": timeout,
            "connect_timeout": connect_timeout,
            "model": model,
            "retry": retry,
            "batch_size": batch_size,
            "max_concurrency": max_concurrency,
        }
        self._init(_Connection(base_url, options), model, prompt_format, instruction, bands)

    def _init(
        self,
        connection: _Connection,
        model: str | None,
        prompt_format: PromptFormat,
        instruction: str | InstructionTemplate | None,
        bands: ConfidenceBands | None,
    ) -> None:
        if instruction is not None:
            _resolve(instruction)  # a bad instruction fails here, not at the first request
        if bands is not None and not isinstance(bands, ConfidenceBands):
            raise TypeError(f"bands must be a ConfidenceBands, got {type(bands).__name__}")
        self._conn = connection
        self._model = model
        self.prompt_format: PromptFormat = prompt_format
        self._instruction_arg = instruction
        self.bands = bands or ConfidenceBands()

    # -- settings and introspection -----------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The client-side scoring settings (``instruction``, ``bands``)."""
        return {"instruction": self._instruction_arg, "bands": self.bands}

    def with_settings(self, **settings: Any) -> RemoteReranker:
        """A view with another ``instruction`` or ``bands`` that shares this one's connection pool.

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
        unknown = sorted(set(settings) - {"instruction", "bands"})
        if unknown:
            raise TypeError(f"unknown RemoteReranker settings: {', '.join(unknown)}")
        merged = {**self.settings(), **settings}
        view = object.__new__(type(self))
        view._init(self._conn, self._model, self.prompt_format, merged["instruction"], merged["bands"])
        return view

    @property
    def base_url(self) -> str:
        """The service's URL."""
        return self._conn.base_url

    @property
    def instruction(self) -> str | None:
        """The default instruction text, or ``None`` when the server's default applies."""
        if self._instruction_arg is None and self.prompt_format == "server":
            return None
        return _resolve(self._instruction_arg)

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

    # -- scoring ------------------------------------------------------------------------------

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
            show_progress: Accepted for compatibility with the engine; the work is on the server.

        Returns:
            One float per document.

        Raises:
            TypeError, ValueError: Malformed input (before anything is sent).
            RerankServiceError: The service refused the request, failed, or could not be reached.
        """
        request = self._request(query, documents, instruction)
        if request is None:
            return []
        return self._scores(self._post(self._conn.sync, request), len(documents), return_logits)

    def score_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]:
        """Scores of ``(query, document)`` pairs that may mix queries, in input order.

        Pairs are sent as one request per query (split further when long).
        """
        out = [0.0] * len(pairs)
        for query, positions, texts in self._groups(pairs):
            values = self.score(query, texts, instruction, return_logits=return_logits)
            for i, value in zip(positions, values, strict=True):
                out[i] = value
        return out

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
            top_n: Keep at most this many results (all when ``None``).
            threshold: Drop results whose score is below this probability.
            instruction: Template name or free text; defaults to this reranker's instruction.
            show_progress: Accepted for compatibility with the engine.

        Returns:
            :class:`~qwen3_rerank_plugins.RerankResult` objects, highest score first.

        Raises:
            TypeError, ValueError: Malformed input (before anything is sent).
            RerankServiceError: The service refused the request, failed, or could not be reached.
        """
        top_n, threshold = _check_top_n(top_n), _check_threshold(threshold)
        request = self._request(query, documents, instruction, top_n=top_n)
        if request is None:
            return []
        return self._results(self._post(self._conn.sync, request), documents, threshold)

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

    # -- async --------------------------------------------------------------------------------

    async def ascore(
        self,
        query: str,
        documents: Sequence[Document],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]:
        """:meth:`score` over the pooled async client; the event loop keeps running."""
        request = self._request(query, documents, instruction)
        if request is None:
            return []
        hits = await self._apost(request)
        return self._scores(hits, len(documents), return_logits)

    async def ascore_pairs(
        self,
        pairs: Sequence[tuple[str, str]],
        instruction: str | InstructionTemplate | None = None,
        *,
        return_logits: bool = False,
        show_progress: bool | None = None,
    ) -> list[float]:
        """:meth:`score_pairs` with the queries' requests in flight together."""
        groups = self._groups(pairs)
        scored = await asyncio.gather(
            *(
                self.ascore(query, texts, instruction, return_logits=return_logits)
                for query, _, texts in groups
            )
        )
        out = [0.0] * len(pairs)
        for (_, positions, _), values in zip(groups, scored, strict=True):
            for i, value in zip(positions, values, strict=True):
                out[i] = value
        return out

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
        """:meth:`rerank` over the pooled async client; the event loop keeps running."""
        top_n, threshold = _check_top_n(top_n), _check_threshold(threshold)
        request = self._request(query, documents, instruction, top_n=top_n)
        if request is None:
            return []
        hits = await self._apost(request)
        return self._results(hits, documents, threshold)

    # -- low-confidence fallback ----------------------------------------------------------------

    # The engine's own methods: they hand ``self`` to qwen3_rerank_plugins.fallback, which needs
    # only the scoring surface (``rerank`` / ``arerank``, ``bands``, ``with_settings``).
    rerank_with_fallback = Reranker.rerank_with_fallback
    arerank_with_fallback = Reranker.arerank_with_fallback

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

    def _request(
        self,
        query: str,
        documents: Sequence[Document],
        instruction: str | InstructionTemplate | None,
        top_n: int | None = None,
    ) -> dict[str, Any] | None:
        """The client call for one query, validated as the local engine validates; None if no documents."""
        query = _check_query(query)
        texts = _document_texts(documents)
        if not texts:
            return None
        chosen = instruction if instruction is not None else self._instruction_arg
        if self.prompt_format == "vllm":
            # The model card's prompt, split where the document begins (a token boundary), so the
            # server's pair tokenisation gives the very ids of the whole prompt.
            head = PROMPT_PREFIX + format_head(_resolve(chosen), query)
            return {
                "query": head,
                "documents": [format_document(t) + PROMPT_SUFFIX for t in texts],
                "top_n": top_n,
            }
        return {
            "query": query,
            "documents": texts,
            "top_n": top_n,
            # Names are resolved here, so templates registered in this process work remotely.
            "instruction": None if chosen is None else _resolve(chosen),
        }

    def _post(self, client: RerankClient, request: dict[str, Any]) -> list[RerankHit]:
        hits = client.rerank(**request)
        self._conn.learn(client)
        return hits

    async def _apost(self, request: dict[str, Any]) -> list[RerankHit]:
        client = self._conn.async_client()
        hits = await client.rerank(**request)
        self._conn.learn(client)
        return hits

    @staticmethod
    def _groups(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, list[int], list[str]]]:
        groups: dict[str, tuple[list[int], list[str]]] = {}
        for i, (query, text) in enumerate(_pair_texts(pairs)):
            positions, texts = groups.setdefault(query, ([], []))
            positions.append(i)
            texts.append(text)
        return [(query, positions, texts) for query, (positions, texts) in groups.items()]

    def _scores(self, hits: list[RerankHit], n: int, return_logits: bool) -> list[float]:
        scores: list[float | None] = [None] * n
        for hit in hits:
            scores[hit.index] = hit.relevance_score
        missing = [i for i, s in enumerate(scores) if s is None]
        if missing or len(hits) != n:
            raise RerankServiceError(
                f"the service at {self.base_url} returned {len(hits)} scores for {n} documents "
                f"(none for documents {missing[:10]})",
                type="invalid_response",
            )
        values = [float(s) for s in scores if s is not None]
        return [_log_odds(p) for p in values] if return_logits else values

    def _results(
        self, hits: list[RerankHit], documents: Sequence[Document], threshold: float | None
    ) -> list[RerankResult]:
        results = []
        for hit in hits:
            if threshold is not None and hit.relevance_score < threshold:
                break
            results.append(
                RerankResult(
                    index=hit.index,
                    score=hit.relevance_score,
                    logit=_log_odds(hit.relevance_score),
                    document=documents[hit.index],
                    band=self.bands.classify(hit.relevance_score),
                )
            )
        return results
