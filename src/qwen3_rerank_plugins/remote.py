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
import threading
from collections.abc import AsyncIterator, Callable
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
from .protocol import GroupScores, ScoreGroup, ScoringStopped, StopCheck
from .results import ConfidenceBands, log_odds
from .scoring import BaseReranker
from .settings import RerankerSettings
from .templates import (
    DEFAULT_INSTRUCTION,
    PROMPT_PREFIX,
    PROMPT_SUFFIX,
    InstructionTemplate,
    format_document,
    format_head,
    resolve_instruction,
)

__all__ = ["PromptFormat", "RemoteReranker"]

logger = logging.getLogger(__name__)

#: ``"server"``: send the raw query, documents and instruction; the server applies the template
#: (this project's service). ``"vllm"``: apply the model card's template here and send the
#: formatted texts (vLLM serving the original checkpoints, which reads no instruction field).
PromptFormat = Literal["server", "vllm"]
_PROMPT_FORMATS = ("server", "vllm")
# The settings a client chooses; every other one belongs to the server's model.
_CLIENT_SETTINGS = ("instruction", "bands")
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
        timeout: Seconds to wait for each answer.
        connect_timeout: Seconds to open a connection.
        retry: Retry policy for connection errors, 5xx and 429 (default: 3 retries with backoff).
        batch_size: Most documents per request; longer lists are split and merged in input order.
        max_concurrency: Most requests of one call in flight at once (spread over replicas).

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
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        retry: RetryPolicy | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
    ) -> None:
        if prompt_format not in _PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {_PROMPT_FORMATS}, got {prompt_format!r}")
        self._settings = RerankerSettings(instruction=instruction, bands=bands)
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
        self.prompt_format: PromptFormat = prompt_format

    # -- settings and introspection -----------------------------------------------------------

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

    def _request(self, group: ScoreGroup) -> dict[str, Any]:
        """The client call for one group."""
        if self.prompt_format == "vllm":
            # The model card's prompt, split where the document begins (a token boundary), so the
            # server's pair tokenisation gives the very ids of the whole prompt.
            head = PROMPT_PREFIX + format_head(group.instruction or DEFAULT_INSTRUCTION, group.query)
            return {"query": head, "documents": [format_document(t) + PROMPT_SUFFIX for t in group.texts]}
        # Names were resolved here, so templates registered in this process work remotely.
        return {"query": group.query, "documents": list(group.texts), "instruction": group.instruction}

    def _scores(self, hits: list[RerankHit], n: int) -> GroupScores:
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
        return GroupScores([log_odds(float(s)) for s in scores if s is not None])
