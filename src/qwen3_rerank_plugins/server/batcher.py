"""Micro-batching: concurrent requests merged into few engine calls.

Each request's (query, document) pairs wait in a bounded queue. A single worker takes whole
requests from the queue, up to ``max_batch_pairs`` pairs, and scores them with one
:meth:`~qwen3_rerank_plugins.scoring.BaseReranker.score_groups` call in a worker thread, so the
event loop never blocks (the engine batches the documents of every merged request together,
across queries and instructions). While one batch runs, the next requests pile up and are
taken together as soon as it finishes: the busier the service, the larger the batches and the
higher the throughput. When the worker is idle, it waits ``max_wait_ms`` after the first request
so that requests arriving together are merged too.

Merging is exact: each row continues its own query's prefix cache, so a request's scores do not
depend on what it was batched with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from ..protocol import ScoreGroup, Scorer, ScoringStopped, StopCheck
from ..tracing import batch_span, capture_context

__all__ = [
    "BatcherClosedError",
    "MicroBatcher",
    "QueueFullError",
    "ScoreRequest",
    "ScoredRequest",
    "WaitedTooLongError",
    "score_requests",
]

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The queue holds ``max_queue`` requests already; the caller should retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


@dataclass(frozen=True)
class ScoredRequest:
    """What one request gets back: log-odds in input order, its prompt tokens when asked for,
    the matching spans of documents read in windows, and (with its tokens) how many of those
    tokens were answered from the score cache instead of the model."""

    logits: list[float]
    total_tokens: int | None = None
    spans: list[tuple[int, int] | None] | None = None
    cached_tokens: int | None = None


class WaitedTooLongError(RuntimeError):
    """A queued request reached its deadline before its scoring started; it was not scored.

    Attributes:
        reason: What set the deadline: ``"waited_too_long"`` (the service's ``max_queue_wait``)
            or ``"deadline"`` (the client's own).
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)
class _Queued:
    """One request waiting in the queue: its work, the future its scores go to, its estimated
    cost (prompt tokens), and the deadline by which its scoring must have started."""

    group: ScoreGroup
    future: asyncio.Future[ScoredRequest]
    cost: float = 0.0
    reason: str = "waited_too_long"
    start_by: float | None = None
    timer: asyncio.TimerHandle | None = None
    queued_at: float = 0.0
    estimate: float | None = None  # the wait it was admitted on
    context: Any = None  # the request's OpenTelemetry context, linked from its batch's span


#: Weight of the newest engine call in the moving average of the throughput.
THROUGHPUT_SMOOTHING = 0.5

#: How many of the latest admitted requests' estimate errors :meth:`MicroBatcher.estimate_margin`
#: reads, and how old (seconds) the oldest of them may be.
ERROR_WINDOW = 64
ERROR_MAX_AGE_S = 60.0
#: The headroom is this much more than the worst recent shortfall: the next request's may be
#: worse than the worst of the last few dozen (about one in ``ERROR_WINDOW`` would be, were the
#: errors alike), and a request admitted past it waits the whole limit before it is dropped.
MARGIN_FACTOR = 1.25


#: Called after each engine call with (requests merged, pairs scored, seconds in the engine).
BatchObserver = Callable[[int, int, float], None]

#: Called with the seconds each request waited in the queue before its scoring started.
WaitObserver = Callable[[float], None]


class MicroBatcher:
    """Merge concurrent scoring requests into batched engine calls.

    Args:
        reranker: What scores: a loaded :class:`~qwen3_rerank_plugins.Reranker` (any
            :class:`~qwen3_rerank_plugins.protocol.Scorer`).
        max_wait_ms: How long an idle worker waits after the first request for others to join.
        max_batch_pairs: Most pairs merged into one batch; a larger single request still runs
            whole (the engine splits it by its token budget).
        max_queue: Most requests waiting; beyond it :meth:`submit` raises :class:`QueueFullError`.
        observer: Optional callback ``(requests, pairs, seconds)`` after every engine call.
        wait_observer: Optional callback with each request's wait in the queue, in seconds,
            when its scoring starts.
        max_batch_seconds: Once a throughput has been measured, most estimated engine seconds
            merged into one batch (at least one request): every request in a batch waits for
            the whole batch, so this bounds what merging adds to a request's answer time
            (``None``: merge by ``max_batch_pairs`` only).

    Example:
        >>> batcher = MicroBatcher(reranker)  # doctest: +SKIP
        >>> await batcher.start()  # doctest: +SKIP
        >>> (await batcher.submit("发票怎么开", ["开票指南", "退货政策"])).logits  # doctest: +SKIP
    """

    def __init__(
        self,
        reranker: Scorer | None,
        *,
        max_wait_ms: float = 2.0,
        max_batch_pairs: int = 256,
        max_queue: int = 1024,
        observer: BatchObserver | None = None,
        max_batch_seconds: float | None = None,
        wait_observer: WaitObserver | None = None,
    ) -> None:
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_batch_pairs < 1:
            raise ValueError(f"max_batch_pairs must be >= 1, got {max_batch_pairs}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.reranker = reranker
        self.max_wait = max_wait_ms / 1000.0
        self.max_batch_pairs = max_batch_pairs
        self.max_queue = max_queue
        self.observer = observer
        self.wait_observer = wait_observer
        self.max_batch_seconds = max_batch_seconds
        self._items: deque[_Queued] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._queued_cost = 0.0
        self._running_cost = 0.0
        self._running_since: float | None = None
        self._throughput: float | None = None
        self._errors: deque[tuple[float, float]] = deque(maxlen=ERROR_WINDOW)  # (when, seconds late)

    @property
    def pending(self) -> int:
        """Requests waiting in the queue (not counting the batch being scored)."""
        return len(self._items)

    @property
    def throughput(self) -> float | None:
        """Moving average of the prompt tokens scored per second by the engine calls so far
        (``None`` until a call with a known cost has been measured)."""
        return self._throughput

    def estimated_wait(self) -> float | None:
        """Seconds a request queued now would wait before its scoring starts: the rest of the
        batch being scored plus the work queued ahead, at the measured :attr:`throughput`.

        ``None`` until the first engine call has been measured: the batcher assumes no speed.
        """
        speed = self._throughput
        if speed is None:
            return None
        remaining = 0.0
        if self._running_since is not None:
            elapsed = time.monotonic() - self._running_since
            expected = self._running_cost / speed
            remaining = expected - elapsed
            if self._running_cost > 0 and elapsed > expected:
                # The batch being scored is already late: the engine is slower now than its
                # average (a busy machine). It is assumed to need as long again as it is late,
                # and the queued work is counted at its speed so far.
                remaining = elapsed - expected
                speed = self._running_cost / elapsed
        return remaining + self._queued_cost / speed

    def estimate_margin(self) -> float:
        """Headroom for how much later than estimated requests start, in seconds:
        ``MARGIN_FACTOR`` times the largest shortfall of :meth:`estimated_wait` over the last
        ``ERROR_WINDOW`` requests admitted on an estimate within the last ``ERROR_MAX_AGE_S``
        seconds (0 when none was late).

        Admission keeps this much headroom under its limit, so that a request admitted on an
        estimate near the limit is seldom dropped at the limit after waiting for it: an
        estimate is a moving average, and the engine's speed moves with the machine's load.
        A request dropped at its limit counts with the shortfall it had reached then. Errors
        age out, so one slow moment does not narrow admission for longer than a minute.
        """
        oldest = time.monotonic() - ERROR_MAX_AGE_S
        worst = max((late for when, late in self._errors if when >= oldest and late > 0), default=0.0)
        return MARGIN_FACTOR * worst

    @property
    def idle(self) -> bool:
        """Nothing is queued or being scored: a request sent now starts at once."""
        return not self._items and self._running_since is None

    async def start(self) -> None:
        """Start the worker on the running event loop."""
        if self._worker is not None:
            return
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qwen3-rerank-batch")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="qwen3-rerank-batcher")

    async def submit(
        self,
        group: ScoreGroup,
        *,
        cost: float = 0.0,
        start_by: float | None = None,
        reason: str = "waited_too_long",
        estimate: float | None = None,
    ) -> ScoredRequest:
        """Queue one request's :class:`~qwen3_rerank_plugins.protocol.ScoreGroup` and wait for its scores.

        The group's own caps (``max_query_tokens``, ``max_doc_tokens``, ``long_documents``,
        ``max_windows``) override the engine's settings for this request. Cancelling the wait
        drops the request from the queue (or discards its scores if it is being scored).

        Args:
            group: The request's work.
            cost: Its prompt tokens (what :meth:`estimated_wait` and :attr:`throughput` count).
            start_by: ``time.monotonic()`` by which its scoring must have started; past it the
                request leaves the queue unscored (:class:`WaitedTooLongError`).
            reason: The :attr:`WaitedTooLongError.reason` it then gets.
            estimate: The :meth:`estimated_wait` it was admitted on; how much later it actually
                starts feeds :meth:`estimate_margin`.

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting.
            BatcherClosedError: The batcher is closing or was never started.
            WaitedTooLongError: ``start_by`` passed while it waited.
        """
        if self._closing or self._worker is None or self._wakeup is None:
            raise BatcherClosedError("the service is shutting down")
        if len(self._items) >= self.max_queue:
            raise QueueFullError(f"{len(self._items)} requests are already waiting to be scored")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ScoredRequest] = loop.create_future()
        now = time.monotonic()
        context = capture_context()  # linked from the span of the engine call that scores it
        item = _Queued(
            group, future, float(cost), reason, start_by, queued_at=now, estimate=estimate, context=context
        )
        if start_by is not None:
            item.timer = loop.call_at(loop.time() + (start_by - now), self._expire, item)
        self._items.append(item)
        self._queued_cost += item.cost
        self._wakeup.set()
        try:
            return await future
        finally:
            if item.timer is not None:
                item.timer.cancel()

    def _expire(self, item: _Queued) -> None:
        """An item's deadline passed before its scoring started: answer it now, unscored (the
        worker skips it since its future is done)."""
        item.timer = None
        if item.future.done() or item not in self._items:
            return
        self._items.remove(item)
        self._queued_cost = max(0.0, self._queued_cost - item.cost)
        self._waited(item, scored=False)
        what = "its own deadline" if item.reason == "deadline" else "the service's max_queue_wait"
        item.future.set_exception(
            WaitedTooLongError(f"the request waited past {what} before it could be scored", item.reason)
        )

    async def close(self) -> None:
        """Stop taking requests, finish every queued one, then stop the worker."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._worker is not None:
            await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- worker -------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            was_idle = not self._items
            while not self._items:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            if was_idle and self.max_wait > 0 and not self._closing:
                # Requests that arrive together are merged even when the service is quiet.
                await asyncio.sleep(self.max_wait)
            batch = self._take()
            if not batch:
                continue
            cost = sum(item.cost for item in batch)
            self._running_cost, self._running_since = cost, time.monotonic()
            try:
                outcomes = await loop.run_in_executor(self._executor, self._score_batch, batch)
            except asyncio.CancelledError:
                for item in batch:
                    item.future.cancel()
                raise
            except Exception as exc:  # the worker must never leave a request waiting
                outcomes = [exc] * len(batch)
            finally:
                elapsed = time.monotonic() - self._running_since
                self._running_cost, self._running_since = 0.0, None
            if cost > 0 and elapsed > 0 and any(not isinstance(o, Exception) for o in outcomes):
                self._measure(cost / elapsed)
            self._settle(batch, outcomes)

    def _measure(self, tokens_per_second: float) -> None:
        """Fold one engine call's speed into the moving average of the throughput."""
        old = self._throughput
        a = THROUGHPUT_SMOOTHING
        self._throughput = tokens_per_second if old is None else a * tokens_per_second + (1 - a) * old

    def _take(self) -> list[_Queued]:
        """Whole requests from the front of the queue, up to ``max_batch_pairs`` pairs (at least one)."""
        batch: list[_Queued] = []
        pairs = 0
        cost = 0.0
        speed = self._throughput
        budget = None if speed is None or self.max_batch_seconds is None else self.max_batch_seconds * speed
        while self._items:
            item = self._items[0]
            if item.future.done():  # its client went away while it waited: nothing to score
                self._items.popleft()
                self._queued_cost = max(0.0, self._queued_cost - item.cost)
                continue
            if item.start_by is not None and time.monotonic() > item.start_by:
                self._expire(item)  # its timer has not fired yet: never score it late
                continue
            if batch and pairs + len(item.group.texts) > self.max_batch_pairs:
                break
            if batch and budget is not None and cost + item.cost > budget:
                break
            batch.append(self._items.popleft())
            self._queued_cost = max(0.0, self._queued_cost - item.cost)
            self._waited(item, scored=True)
            if item.timer is not None:  # its scoring starts now: no longer droppable
                item.timer.cancel()
                item.timer = None
            pairs += len(item.group.texts)
            cost += item.cost
        if not self._items:
            self._queued_cost = 0.0  # no drift from float sums
        return batch

    def _waited(self, item: _Queued, *, scored: bool) -> None:
        """An item leaves the queue (its scoring starts, or it is dropped at its deadline):
        note how far off its estimate was, and report the wait of one that is scored."""
        now = time.monotonic()
        waited = now - item.queued_at
        if item.estimate is not None:
            self._errors.append((now, waited - item.estimate))
        if scored and self.wait_observer is not None:
            with contextlib.suppress(Exception):
                self.wait_observer(waited)

    @staticmethod
    def _settle(batch: list[_Queued], outcomes: list[ScoredRequest | Exception]) -> None:
        for item, outcome in zip(batch, outcomes, strict=True):
            if item.future.done():  # the client went away
                continue
            if isinstance(outcome, Exception):
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    def _score_batch(self, batch: list[_Queued]) -> list[ScoredRequest | Exception]:
        """Runs in the worker thread: one engine call for the whole batch, stopped between
        forward passes once every one of its clients has hung up (nobody waits for it)."""

        def abandoned() -> bool:
            return all(item.future.done() for item in batch)

        groups = [item.group for item in batch]
        contexts = [item.context for item in batch]
        return score_requests(
            self.reranker, groups, observer=self.observer, should_stop=abandoned, contexts=contexts
        )


class ScoreRequest(NamedTuple):
    """One request to score: its query, documents, instruction and whether to count its tokens."""

    query: str
    texts: list[str]
    instruction: str | None
    count_tokens: bool = True
    max_query_tokens: int | None = None
    max_doc_tokens: int | None = None
    long_documents: bool | None = None
    max_windows: int | None = None


def score_requests(
    reranker: Scorer,
    requests: Sequence[Any],
    *,
    observer: BatchObserver | None = None,
    should_stop: StopCheck | None = None,
    contexts: Sequence[Any] | None = None,
) -> list[ScoredRequest | Exception]:
    """Score several requests with one engine call, each failure kept to its request.

    The engine batches the documents of all the requests together (across queries and
    instructions), exactly. When the merged call fails, it is halved and retried until the
    failing requests are alone, so one bad request fails only itself. Both the plain service's
    batcher and the Ray Serve replicas call this.

    Args:
        reranker: What scores (a :class:`~qwen3_rerank_plugins.protocol.Scorer`).
        requests: :class:`~qwen3_rerank_plugins.protocol.ScoreGroup` objects (what the batcher
            queues), or objects with the same attributes plus ``count_tokens`` (such as
            :class:`ScoreRequest`).
        observer: Called after each engine call with (requests merged, pairs, seconds).
        should_stop: Asked by the engine between forward passes; once it returns ``True`` the
            work stops and every request gets :class:`~qwen3_rerank_plugins.protocol.ScoringStopped`.
        contexts: Each request's OpenTelemetry context (from
            :func:`~qwen3_rerank_plugins.tracing.capture_context`), in order: each engine call's
            ``rerank batch`` span links to them ([otel]; else ignored).

    Returns:
        For each request, in order, its :class:`ScoredRequest` or the exception it raised.
    """
    items = list(requests)
    try:
        return list(_score_together(reranker, items, observer, should_stop, contexts))
    except ScoringStopped as exc:
        logger.info("stopped a batch of %d requests whose clients had all gone (%s)", len(items), exc)
        return [exc] * len(items)
    except Exception as exc:
        if len(items) == 1:
            return [exc]
        logger.warning("a merged batch of %d requests failed (%s); finding the failing ones", len(items), exc)
    # Halve and retry: the failing requests are isolated in about log2(n) merged calls each, and
    # the others stay batched together (a one-by-one retry would let one bad request turn a
    # merged batch into n single ones).
    half = len(items) // 2
    first, second = (None, None) if contexts is None else (list(contexts)[:half], list(contexts)[half:])
    return score_requests(
        reranker, items[:half], observer=observer, should_stop=should_stop, contexts=first
    ) + score_requests(reranker, items[half:], observer=observer, should_stop=should_stop, contexts=second)


def _score_together(
    reranker: Scorer,
    items: list[Any],
    observer: BatchObserver | None,
    should_stop: StopCheck | None,
    contexts: Sequence[Any] | None = None,
) -> list[ScoredRequest]:
    groups = [
        item
        if isinstance(item, ScoreGroup)
        else ScoreGroup(
            item.query,
            item.texts,
            item.instruction,
            max_query_tokens=getattr(item, "max_query_tokens", None),
            max_doc_tokens=getattr(item, "max_doc_tokens", None),
            long_documents=getattr(item, "long_documents", None),
            max_windows=getattr(item, "max_windows", None),
        )
        for item in items
    ]
    pairs = sum(len(item.texts) for item in items)
    start = time.perf_counter()
    with batch_span(len(items), pairs, contexts):  # [otel]; else a no-op
        scored = reranker.score_groups(groups, should_stop=should_stop)
    elapsed = time.perf_counter() - start
    if observer is not None:
        with contextlib.suppress(Exception):
            observer(len(items), pairs, elapsed)
    return [
        _scored_request(result, getattr(item, "count_tokens", True))
        for item, result in zip(items, scored, strict=True)
    ]


def _scored_request(result: Any, count_tokens: bool) -> ScoredRequest:
    """A request's answer from its engine result; its token counts only when it asked for them."""
    if not count_tokens:
        return ScoredRequest(result.logits, None, result.spans)
    return ScoredRequest(result.logits, result.tokens, result.spans, getattr(result, "cached_tokens", 0))
