"""The rerank service behind the HTTP routes: model loading, admission, batching, metrics.

One :class:`RerankService` per app (and per Ray Serve replica). The routes in :mod:`.app` only
parse, authenticate and shape answers; everything that decides whether and how a request is
scored is here, each in one place:

* :meth:`RerankService.admit` admits or refuses work (model not ready, token budget, queue full,
  estimated wait past ``max_queue_wait`` or past the client's own deadline);
* :meth:`RerankService.serve_request` wraps one HTTP request (cancelled when its client hangs up);
* :meth:`RerankService.score` is the one path to the engine: a request's
  :class:`~qwen3_rerank_plugins.protocol.ScoreGroup` queued on the :class:`~.batcher.MicroBatcher`,
  whose worker makes the engine call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from ..protocol import LocalScorer, ScoreGroup, Scorer, precision_name
from ..server_defaults import REQUEST_TIMEOUT_HEADER, ServiceConfig
from ..validation import InputTooLongError
from .batcher import BatcherClosedError, MicroBatcher, QueueFullError, ScoredRequest, WaitedTooLongError
from .handlers import check_bearer
from .metrics import ServiceMetrics
from .schemas import RequestError

__all__ = ["RerankService", "ScoreFn"]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
#: How a route scores one request: ``await score(group)`` (raises :class:`RequestError`).
ScoreFn = Callable[[ScoreGroup], Awaitable[ScoredRequest]]

RETRY_AFTER_LOADING = "5"
RETRY_AFTER_BUSY = "1"
#: With a wait limit, a merged batch holds at most this share of it in estimated engine time:
#: a request waits for its whole batch, so its answer comes at most about the limit plus
#: ``max(its own scoring time, BATCH_SHARE x limit)`` after it was admitted.
BATCH_SHARE = 0.25
CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection


class Admission(NamedTuple):
    """What :meth:`RerankService.admit` decided for an admitted request: its answer, when the
    score cache held all of it, or the batcher to queue it on and the wait it was estimated."""

    batcher: MicroBatcher | None = None
    wait: float | None = None
    answer: ScoredRequest | None = None
    cost: float = 0.0  # its prompt tokens


class RerankService:
    """One service instance: its model (loaded now or in the background), batcher and metrics.

    Args:
        reranker_or_factory: A loaded :class:`~qwen3_rerank_plugins.Reranker`, or a
            zero-argument callable returning one (run in a daemon thread by :meth:`start`).
        config: The service's settings.
        on_load_error: Called with the exception if loading the model fails.

    Raises:
        TypeError: Neither a local Reranker nor a callable.
    """

    def __init__(
        self,
        reranker_or_factory: Any,
        config: ServiceConfig,
        *,
        on_load_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        loaded = reranker_or_factory if hasattr(reranker_or_factory, "score_pairs") else None
        if loaded is None and not callable(reranker_or_factory):
            raise TypeError("create_app needs a Reranker or a zero-argument callable that returns one")
        if loaded is not None:
            check_servable(loaded)
        # Checked here so that a bad setting fails at start-up, not at the first request.
        MicroBatcher(
            None,
            max_wait_ms=config.batch_wait_ms,
            max_batch_pairs=config.max_batch_pairs,
            max_queue=config.max_queue,
        )
        self.config = config
        self.metrics = ServiceMetrics()
        self.reranker: Any = None
        self.batcher: MicroBatcher | None = None
        self.model_name: str | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        #: The Ray Serve replica this instance is, reported by ``/health`` (``None``: plain server).
        self.replica: str | None = None
        self._source = reranker_or_factory
        self._loaded = loaded
        self._on_load_error = on_load_error
        self._loader: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """Whether the model is loaded and requests are scored."""
        return self.batcher is not None

    @property
    def default_instruction(self) -> str | None:
        """The instruction text a request without one is scored with (``None`` while loading)."""
        text = getattr(self.reranker, "instruction", None)
        return text if isinstance(text, str) else None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the loaded model now, or start loading it in the background."""
        if self._loaded is not None:
            await self._activate(self._loaded)
        else:
            self._loader = asyncio.create_task(self._load(), name="qwen3-rerank-load")

    async def close(self) -> None:
        """Stop loading, and score whatever is still queued (uvicorn has already waited for
        the requests in flight)."""
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
        if self.batcher is not None:
            await self.batcher.close()
            logger.info("Batcher drained; shutting down")

    async def _activate(self, reranker: Any) -> None:
        config = self.config
        cache = config.score_cache()
        if cache is not None:  # each process (each Ray replica) its own tier; one Redis for all
            reranker = reranker.with_cache(cache)
        if reranker.cache is not None:
            self.metrics.watch_cache(reranker.cache.stats)
        batcher = MicroBatcher(
            reranker,
            max_wait_ms=config.batch_wait_ms,
            max_batch_pairs=config.max_batch_pairs,
            max_queue=config.max_queue,
            observer=self.metrics.observe_batch,
            wait_observer=self.metrics.queue_wait.observe,
            max_batch_seconds=None if config.max_queue_wait is None else config.max_queue_wait * BATCH_SHARE,
        )
        await batcher.start()
        self.reranker = reranker
        self.model_name = config.model_name or reranker.model_name
        device, dtype = str(reranker.device), precision_name(reranker)
        self.metrics.model_info.labels(self.model_name, device, dtype).set(1)
        self.metrics.queue_depth.set_function(lambda: batcher.pending)
        self.metrics.estimated_wait.set_function(lambda: _or_nan(batcher.estimated_wait()))
        self.metrics.estimate_margin.set_function(batcher.estimate_margin)
        self.metrics.throughput.set_function(lambda: _or_nan(batcher.throughput))
        self.metrics.model_loaded.set(1)
        self.batcher = batcher
        logger.info("Serving %s on %s (%s)", self.model_name, device, dtype)

    async def _load(self) -> None:
        try:
            reranker = await _call_in_daemon_thread(self._source)
            check_servable(reranker)
            await self._activate(reranker)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            logger.error("Could not load the model: %s", self.load_error)
            if self._on_load_error is not None:
                self._on_load_error(exc)

    def authenticate(self, authorization: str | None) -> None:
        """Refuse a request whose ``Authorization`` header lacks ``Bearer <api_key>`` (401)."""
        check_bearer(authorization, self.config.api_key)

    # -- answers that need no scoring ---------------------------------------------------------

    def health(self) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        """``(status, body, headers)`` of ``GET /health``: 200 once serving, 503 before."""
        if self.ready:
            reranker = self.reranker
            body = {
                "status": "ok",
                "model": self.model_name,
                "device": str(reranker.device),
                "dtype": precision_name(reranker),
                "queue": self.batcher.pending if self.batcher else 0,
            }
            if self.replica is not None:
                body["replica"] = self.replica
            return 200, body, None
        down: dict[str, Any] = {"status": "error" if self.load_error else "loading"}
        if self.load_error:
            down["error"] = self.load_error
        return 503, down, None if self.load_error else {"Retry-After": RETRY_AFTER_LOADING}

    def readiness(self) -> tuple[int, dict[str, Any], dict[str, str] | None]:
        """``(status, body, headers)`` of ``GET /ready``: 200 when a request sent now would be
        admitted, 503 (with ``Retry-After``) when it would be refused: the model is loading or
        failed to, the queue is full, or the estimated wait (with its headroom) is past
        ``max_queue_wait``: the rule :meth:`admit` applies.

        Unlike ``/health`` (200 while the process serves, however busy), this is the signal for
        a load balancer to send new work elsewhere.
        """
        limit = self.config.max_queue_wait
        batcher = self.batcher
        if batcher is None:
            status, body, headers = self.health()
            return status, {"ready": False, "reason": body["status"]}, headers
        wait = batcher.estimated_wait()
        margin = 0.0 if wait is None else _planned_wait(batcher, wait, limit) - wait
        body: dict[str, Any] = {
            "ready": True,
            "queue": batcher.pending,
            "estimated_wait_s": None if wait is None else round(wait, 3),
            "estimate_margin_s": round(margin, 3),
            "max_queue_wait_s": limit,
        }
        if batcher.pending >= batcher.max_queue:
            body.update(ready=False, reason="queue_full")
            return 503, body, {"Retry-After": RETRY_AFTER_BUSY}
        if limit is not None and wait is not None and wait + margin > limit:
            body.update(ready=False, reason="overloaded")
            return 503, body, {"Retry-After": _retry_after(wait + margin - limit)}
        return 200, body, None

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the OpenAI-style list holding the served model (empty while loading)."""
        data = []
        if self.model_name is not None:
            data.append(
                {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "qwen"}
            )
        return {"object": "list", "data": data}

    # -- scoring ------------------------------------------------------------------------------

    async def serve_request(self, request: Any, answer: Callable[[ScoreFn], Awaitable[_T]]) -> _T:
        """Answer one scoring request: ``await answer(score)``, where ``score`` scores its groups.

        The one place that wraps a request: whatever ``answer`` queues is dropped as soon as
        the client disconnects (answered 499, which nobody reads).
        """

        deadline = request_deadline(request.headers.get(REQUEST_TIMEOUT_HEADER))

        async def score(group: ScoreGroup) -> ScoredRequest:
            return await _unless_disconnected(request, self.score(group, deadline=deadline))

        return await answer(score)

    async def admit(self, group: ScoreGroup, *, deadline: float | None = None) -> Admission:
        """Admit one request's work or refuse it; the one place that decides.

        Admission by time: the batcher estimates how long a request queued now would wait
        before its scoring starts (the prompt tokens queued ahead and the rest of the batch
        being scored, at the tokens/s it has measured). A request is refused at once when that
        estimate, plus the headroom of :meth:`MicroBatcher.estimate_margin` (how much later than
        estimated the latest requests started), is past ``max_queue_wait`` or past its own
        ``deadline``. Before the first
        engine call has been measured there is no estimate: the service assumes nothing about
        its speed and admits (up to ``max_queue``); the batcher's drop of a request that waited
        past its limit still keeps it from being scored late.

        Args:
            group: The request's work.
            deadline: ``time.monotonic()`` by which the client wants its scoring started
                (from ``X-Request-Timeout``), or ``None``.

        A request whose every pair the score cache already holds costs the model nothing: it is
        answered at once from the cache (after the token budget's check), neither queued behind
        other work nor refused for load.

        Returns:
            The cache's answer, or the batcher to queue it on and the estimated wait it was
            admitted on (``None`` before the first measurement).

        Raises:
            RequestError: 503 while the model loads (``Retry-After``) or after it failed to;
                413 ``too_many_tokens`` when it would make the model read more than
                ``max_request_tokens``; 503 ``overloaded`` (``Retry-After``) when the queue is
                full or the estimated wait is past ``max_queue_wait``; 503 ``deadline_exceeded``
                (``Retry-After``) when the client's deadline has passed or would before its
                scoring starts.
        """
        batcher = self.batcher
        if batcher is None:
            if self.load_error is not None:
                raise RequestError(
                    f"the model failed to load: {self.load_error}", status_code=503, type="model_unavailable"
                )
            self.metrics.refusals.labels("model_loading").inc()
            raise RequestError(
                "the model is still loading; retry shortly",
                status_code=503,
                type="model_loading",
                headers={"Retry-After": RETRY_AFTER_LOADING},
            )
        if self.config.max_request_tokens is not None:
            await _check_token_budget(self.reranker, group, self.config.max_request_tokens)
        # Counted before the estimate below, with no await between that estimate and the
        # request joining the queue: requests admitted together each count the others' work.
        tokens, cached = await asyncio.to_thread(self.reranker.lookup, group)
        if cached is not None:
            self.metrics.answered_from_cache.inc()
            return Admission(
                answer=ScoredRequest(cached.logits, cached.tokens, cached.spans, cached.cached_tokens)
            )
        if batcher.pending >= batcher.max_queue:
            self.metrics.refusals.labels("queue_full").inc()
            raise _overloaded(f"{batcher.pending} requests are already waiting to be scored")
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            raise self._refuse_deadline("its deadline (X-Request-Timeout) passed before it was admitted", 0.0)
        wait = batcher.estimated_wait()
        if wait is None:
            return Admission(batcher, cost=float(tokens))
        planned = _planned_wait(batcher, wait, self.config.max_queue_wait)
        limit = self.config.max_queue_wait
        if limit is not None and planned > limit:
            self.metrics.refusals.labels("estimated_wait").inc()
            raise _overloaded(
                f"estimated wait {_wait_text(wait, planned)} is past max_queue_wait {limit:g} s",
                retry_after=planned - limit,
            )
        if deadline is not None and now + planned > deadline:
            raise self._refuse_deadline(
                f"its estimated wait of {_wait_text(wait, planned)} ends past its deadline "
                "(X-Request-Timeout)",
                now + planned - deadline,
            )
        return Admission(batcher, wait, cost=float(tokens))

    def _refuse_deadline(self, reason: str, late: float) -> RequestError:
        self.metrics.refusals.labels("deadline").inc()
        return RequestError(
            f"the request cannot be scored in time: {reason}",
            status_code=503,
            type="deadline_exceeded",
            headers={"Retry-After": _retry_after(late)},
        )

    async def score(self, group: ScoreGroup, *, deadline: float | None = None) -> ScoredRequest:
        """Admit one group, queue it, and return its scores; engine errors become HTTP errors.

        Args:
            group: The work.
            deadline: ``time.monotonic()`` by which its scoring must start (the client's), or ``None``.

        Raises:
            RequestError: As :meth:`admit`; 503 ``overloaded`` / ``deadline_exceeded`` when it
                waited in the queue past ``max_queue_wait`` / its deadline (it is then not
                scored); 422 for input the engine refuses (naming the field when it can); 503
                while shutting down; 500 when the engine fails.
        """
        try:
            admission = await self.admit(group, deadline=deadline)
            if admission.answer is not None:
                return admission.answer
            batcher, wait = admission.batcher, admission.wait
            assert batcher is not None
            limit = self.config.max_queue_wait
            start_by, reason = deadline, "deadline"
            if limit is not None and (deadline is None or time.monotonic() + limit < deadline):
                start_by, reason = time.monotonic() + limit, "waited_too_long"
            # Every request's tokens are counted (by admit), deadline or not: they are the work
            # queued ahead of the next one, and what the throughput is measured in.
            return await batcher.submit(
                group, cost=admission.cost, start_by=start_by, reason=reason, estimate=wait
            )
        except RequestError:
            raise
        except QueueFullError as exc:
            self.metrics.refusals.labels("queue_full").inc()
            raise _overloaded(str(exc)) from exc
        except WaitedTooLongError as exc:
            self.metrics.refusals.labels(exc.reason).inc()
            wait = self.batcher.estimated_wait() if self.batcher is not None else None
            if exc.reason == "deadline":
                raise RequestError(
                    f"the request cannot be scored in time: {exc}",
                    status_code=503,
                    type="deadline_exceeded",
                    headers={"Retry-After": _retry_after(0.0)},
                ) from exc
            limit = self.config.max_queue_wait or 0.0
            raise _overloaded(str(exc), retry_after=(wait or 0.0) - limit) from exc
        except BatcherClosedError as exc:
            raise RequestError(
                "the service is shutting down",
                status_code=503,
                type="shutting_down",
                headers={"Retry-After": RETRY_AFTER_BUSY},
            ) from exc
        except InputTooLongError as exc:
            raise RequestError(str(exc), status_code=422, param=exc.param) from exc
        except (ValueError, TypeError) as exc:
            raise RequestError(str(exc), status_code=422) from exc
        except Exception as exc:
            logger.exception("scoring failed")
            raise RequestError(
                f"scoring failed: {type(exc).__name__}: {exc}", status_code=500, type="internal_error"
            ) from exc


#: Most of ``max_queue_wait`` the headroom for estimate errors may take: however wrong recent
#: estimates were, a request estimated to wait under this share of the limit is admitted.
MAX_MARGIN_SHARE = 0.5


def _planned_wait(batcher: MicroBatcher, wait: float, limit: float | None) -> float:
    """The wait admission plans with: the estimate plus the headroom of recent estimate errors
    (at most ``MAX_MARGIN_SHARE`` of the limit), except when the batcher is idle (nothing ahead
    of the request, nothing to misjudge), so a quiet service always admits."""
    if batcher.idle:
        return wait
    margin = batcher.estimate_margin()
    if limit is not None:
        margin = min(margin, MAX_MARGIN_SHARE * limit)
    return wait + margin


def _wait_text(wait: float, planned: float) -> str:
    """The estimated wait as an error message gives it, with the headroom admission adds."""
    if planned - wait < 0.05:
        return f"{wait:.1f} s"
    return f"{wait:.1f} s (+{planned - wait:.1f} s for recent estimate errors)"


def _overloaded(reason: str, *, retry_after: float = 0.0) -> RequestError:
    return RequestError(
        f"the service is overloaded ({reason}); retry shortly",
        status_code=503,
        type="overloaded",
        headers={"Retry-After": _retry_after(retry_after)},
    )


#: Longest ``Retry-After`` the service advises, in seconds.
MAX_RETRY_AFTER_S = 60


def _retry_after(seconds: float) -> str:
    """``Retry-After`` for a backlog expected to clear in ``seconds``: whole seconds, 1 to 60."""
    if not math.isfinite(seconds):
        return str(MAX_RETRY_AFTER_S)
    return str(min(MAX_RETRY_AFTER_S, max(1, math.ceil(seconds))))


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def request_deadline(header: str | None) -> float | None:
    """The ``time.monotonic()`` deadline that an ``X-Request-Timeout: <seconds>`` header sets
    (counted from now, when the service has read the request), or ``None`` without one.

    Raises:
        RequestError: 422 naming the header when it is not a positive number of seconds.
    """
    if header is None:
        return None
    try:
        seconds = float(header.strip())
    except ValueError:
        seconds = float("nan")
    if not (math.isfinite(seconds) and seconds > 0):
        raise RequestError(
            f"{REQUEST_TIMEOUT_HEADER} must be a positive number of seconds, got {header!r}",
            status_code=422,
            param=REQUEST_TIMEOUT_HEADER,
        )
    return time.monotonic() + seconds


def check_servable(reranker: Any) -> None:
    """The service scores with a local engine; a remote one already has a service behind it."""
    if not isinstance(reranker, Scorer):
        raise TypeError(f"the model factory returned {type(reranker).__name__}, not a Reranker")
    if not isinstance(reranker, LocalScorer):
        raise TypeError(
            f"create_app serves a local Reranker, not a {type(reranker).__name__}: point clients at "
            "the service that one talks to instead"
        )


async def _call_in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """``await fn()`` run in a daemon thread.

    Unlike ``asyncio.to_thread``, a process told to stop while the model is still loading exits
    at once instead of waiting for the load to finish.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def deliver(outcome: Any, failed: bool) -> None:
        if future.done():
            return
        if failed:
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    def work() -> None:
        try:
            outcome, failed = fn(), False
        except BaseException as exc:
            outcome, failed = exc, True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(deliver, outcome, failed)

    threading.Thread(target=work, name="qwen3-rerank-load", daemon=True).start()
    return await future


async def _unless_disconnected(request: Any, work: Awaitable[Any]) -> Any:
    """``await work``, cancelled as soon as the client disconnects.

    Cancelling a request that waits in the :class:`MicroBatcher` queue cancels its future, so the
    batcher drops it before scoring (and discards its scores if it is already being scored).

    Raises:
        RequestError: 499 ``client_closed_request`` when the client went away first.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        logger.info("client disconnected; its request was dropped")
        raise RequestError(
            "the client disconnected before its request was scored",
            status_code=CLIENT_CLOSED,
            type="client_closed_request",
        )
    return task.result()


async def _disconnect(request: Any) -> None:
    """Return once the client has disconnected (the body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _limits(group: ScoreGroup) -> dict[str, Any]:
    """The group's own caps, as the engine's keyword arguments (only those that are set)."""
    caps = {
        "max_query_tokens": group.max_query_tokens,
        "max_doc_tokens": group.max_doc_tokens,
        "long_documents": group.long_documents,
        "max_windows": group.max_windows,
    }
    return {name: value for name, value in caps.items() if value is not None}


async def _check_token_budget(reranker: Any, group: ScoreGroup, budget: int) -> None:
    """Refuse, before it is queued, a request that would make the model read over ``budget`` tokens.

    Unless long documents are read in several windows, every prompt is cut to ``max_length``, so
    most requests pass on ``len(texts) * max_length`` alone, without tokenising anything here.
    The group's own caps (``max_doc_tokens``, ``long_documents``, ...) are counted as the engine
    will apply them.

    Raises:
        RequestError: 413 ``too_many_tokens`` naming ``documents``.
    """
    limits = _limits(group)
    max_length = None if limits.get("long_documents") else _prompt_cap(reranker)
    if max_length is not None and len(group.texts) * max_length <= budget:
        return
    tokens = await asyncio.to_thread(_prompt_tokens, reranker, group, max_length, budget, limits)
    if tokens > budget:
        cut = f", each document cut to max_length={max_length}" if max_length is not None else ""
        raise RequestError(
            f"this request would make the model read {tokens} prompt tokens (template included{cut}); "
            f"this service reads at most {budget} per request: send fewer or shorter documents",
            status_code=413,
            param="documents",
            type="too_many_tokens",
        )


def _prompt_cap(reranker: Any) -> int | None:
    """The most tokens the engine reads per document, or ``None`` when it has no such cap
    (long documents read in windows) or does not say."""
    max_length = getattr(reranker, "max_length", None)
    if isinstance(max_length, bool) or not isinstance(max_length, int):
        return None
    try:
        windows = bool(reranker.settings().get("long_documents", False))
    except Exception:  # an engine that does not report its settings: assume it may
        windows = True
    return None if windows else max_length


def _prompt_tokens(
    reranker: Any, group: ScoreGroup, max_length: int | None, budget: int, limits: dict[str, Any]
) -> int:
    """Runs in a worker thread: a bound of the request's prompt tokens when it is within
    ``budget``, else the engine's exact count (with the request's caps)."""
    query, texts, instruction = group.query, list(group.texts), group.instruction
    if max_length is not None:
        # A token covers at least one byte of text, and each prompt is cut to max_length.
        overhead = reranker.count_tokens(query, [""], instruction, **limits)  # template, instruction, query
        doc_cap = limits.get("max_doc_tokens") or max_length
        bound = sum(
            min(max_length, overhead + min(doc_cap, len(t.encode("utf-8", "surrogatepass")))) for t in texts
        )
        if bound <= budget:
            return bound
    return int(reranker.count_tokens(query, texts, instruction, **limits))
