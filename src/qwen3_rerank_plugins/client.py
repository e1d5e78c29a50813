"""Python client for rerank services, sync and async, over httpx.

Example:
    >>> from qwen3_rerank_plugins.client import AsyncRerankClient, RerankClient
    >>> with RerankClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     hits = client.rerank("发票怎么开", ["【发票申请指南】在订单页申请开票", "退货流程"], top_n=1)
    ...     hits[0].index, hits[0].relevance_score
    >>> async with AsyncRerankClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     ranked = await client.rank("路灯不亮", [{"id": "T-17", "text": "小区路灯坏了"}])

Both clients speak two endpoints: ``/v1/rerank`` (the Cohere / Jina / vLLM shape: this project's
``qwen3-rerank serve``, vLLM serving Qwen3-Reranker, or any such server) and ``/rank``
(``{id, text}`` records with bands, this project's service only).

Built for a pool of replicas behind a load balancer:

* **Timeouts**: ``timeout`` seconds for a whole call, retries and their waits included (each
  attempt gets what is left), ``connect_timeout`` to open a connection. Each attempt tells the
  service what is left in ``X-Request-Timeout``, so it never starts scoring a request after the
  client has given up on it (it answers 503 ``deadline_exceeded`` instead).
* **Retries** with exponential backoff and jitter on connection errors, 5xx answers and 429,
  honouring the server's ``Retry-After`` (see :class:`RetryPolicy`) but never past the call's
  ``timeout``: a wait that would end after it fails the call at once. Reranking is idempotent,
  so a retried request can do no harm. A read timeout is not retried: the server is busy, and
  asking again would double its work.
* **Overload**: a service that refuses work (503 or 429, as ``qwen3-rerank serve`` does past
  ``--max-queue``) or does not answer in time raises :class:`RerankServiceError` with
  ``overloaded=True``; with ``on_overload="keep_order"``, :meth:`RerankClient.rerank` instead
  logs a WARNING and returns the documents in input order, cut to ``top_n``, as hits with
  ``reranked=False`` and no score (``relevance_score`` is NaN).
* **Splitting**: a long document list is sent as several requests of at most ``batch_size``
  documents (``max_concurrency`` in flight at once, so they spread over the replicas) and the
  results are merged as one answer: indices refer to the whole input, ties keep input order.
* **Clear errors**: every failure raises :class:`RerankServiceError` carrying the status, the
  server's message and the field it named, or says the service could not be reached.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ._optional import require
from .server_defaults import REQUEST_TIMEOUT_HEADER
from .tracing import httpx_event_hooks
from .validation import check_positive_int, check_top_n, document_text

httpx = require("httpx", "server", "The rerank service client")

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_TIMEOUT",
    "OVERLOAD_CHOICES",
    "AsyncRerankClient",
    "RankHit",
    "RerankClient",
    "RerankHit",
    "RerankServiceError",
    "RetryPolicy",
]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 5.0
#: Documents per request; well under the service's default limit of 1000 per request.
DEFAULT_BATCH_SIZE = 256
DEFAULT_MAX_CONCURRENCY = 4
#: What to do when the service is overloaded: raise :class:`RerankServiceError`, or keep the
#: input order (unranked results, a WARNING logged).
OVERLOAD_CHOICES = ("raise", "keep_order")
# Answers that mean "busy, not broken": the service refuses work it cannot do in time.
_OVERLOAD_STATUSES = frozenset({429, 503})

# Failures to connect or a connection dropped mid-request; a read timeout is deliberately absent.
_RETRYABLE_ERRORS = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.ReadError,
    httpx.WriteError,
    httpx.RemoteProtocolError,
)
# 5xx that no retry can fix.
_PERMANENT_5XX = frozenset({501, 505})


class RerankServiceError(RuntimeError):
    """The service refused or failed a request, or could not be reached.

    Attributes:
        status_code: HTTP status, or ``None`` when the service could not be reached.
        message: The server's error message (or the connection error).
        param: The request field the server named, if any (e.g. ``"documents[3]"``).
        type: The server's error type (``"invalid_request_error"``, ``"overloaded"``, ...).
        attempts: How many times the request was sent.
        overloaded: The service is busy rather than broken: it answered 503 or 429, or no
            answer came within the call's ``timeout``. What ``on_overload="keep_order"`` acts on.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        param: str | None = None,
        type: str | None = None,
        attempts: int = 1,
        overloaded: bool | None = None,
    ) -> None:
        prefix = f"HTTP {status_code}: " if status_code is not None else ""
        super().__init__(prefix + message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.type = type
        self.attempts = attempts
        self.overloaded = status_code in _OVERLOAD_STATUSES if overloaded is None else overloaded


@dataclass(frozen=True)
class RerankHit:
    """One ``/v1/rerank`` result.

    Attributes:
        index: Position in the documents of the call.
        relevance_score: Relevance probability (log-odds with ``raw_scores=True``); NaN when
            ``reranked`` is ``False``.
        document: The text, when ``return_documents=True``.
        span: ``(start, end)`` of the window that gave a long document's score
            (``max_chunks_per_doc``), else ``None``.
        reranked: ``False`` for the input-order hits of ``on_overload="keep_order"``.
    """

    index: int
    relevance_score: float
    document: str | None = None
    span: tuple[int, int] | None = None
    reranked: bool = True


@dataclass(frozen=True)
class RankHit:
    """One ``/rank`` result: the document's id, its score and confidence band."""

    id: Any
    score: float
    band: str
    index: int


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before sending a failed request again.

    Connection errors, 429 and 5xx answers (but 501 and 505) are retried up to ``max_retries``
    times. The n-th retry waits ``backoff * 2**(n-1)`` seconds, at most ``max_backoff``, less a
    random part of up to a half (so that many clients do not retry in lockstep). A
    ``Retry-After`` header overrides that wait; one longer than ``max_retry_after`` ends the
    retries at once.

    Attributes:
        max_retries: Retries after the first attempt (0: never retry).
        backoff: Seconds before the first retry.
        max_backoff: Longest wait computed by backoff.
        max_retry_after: Longest ``Retry-After`` honoured, in seconds.

    Example:
        >>> RetryPolicy(max_retries=5, backoff=0.2).delay(3)  # doctest: +SKIP
        0.63
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or self.max_retries < 0
        ):
            raise ValueError(f"RetryPolicy.max_retries must be an int >= 0, got {self.max_retries!r}")
        for name in ("backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"RetryPolicy.{name} must be a number of seconds >= 0, got {value!r}")

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry_after is not None:
            return retry_after
        wait = min(self.max_backoff, self.backoff * 2 ** (retry - 1))
        return wait * (1.0 - random.random() / 2)


# -- request building and response parsing, shared by both clients -------------------------------


def _check_documents(documents: Any) -> list[str | dict[str, Any]]:
    if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence):
        raise TypeError(
            "documents must be a list of strings or of mappings with a 'text' key, "
            f"got {type(documents).__name__}"
        )
    out: list[str | dict[str, Any]] = []
    for i, doc in enumerate(documents):
        document_text(doc, f"documents[{i}]")  # the one document rule (validation.py)
        out.append(doc if isinstance(doc, str) else dict(doc))
    return out


#: The ``/v1/rerank`` options this project's service accepts besides the documents.
_RERANK_OPTIONS = ("max_tokens_per_doc", "max_tokens_per_query", "max_chunks_per_doc")


def _rerank_payload(
    query: str,
    documents: list[str | dict[str, Any]],
    top_n: int | None,
    instruction: str | None,
    return_documents: bool,
    model: str | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    payload: dict[str, Any] = {"query": query, "documents": documents, "return_documents": return_documents}
    if top_n is not None:
        payload["top_n"] = min(top_n, len(documents))
    if instruction is not None:
        payload["instruction"] = instruction
    if model is not None:
        payload["model"] = model
    payload.update(options)
    return payload


def _rerank_options(caps: dict[str, Any], raw_scores: bool) -> dict[str, Any]:
    """The token caps that are set (each a positive int) and ``raw_scores``, as request fields."""
    options = {
        name: check_positive_int(caps[name], name) for name in _RERANK_OPTIONS if caps[name] is not None
    }
    if not isinstance(raw_scores, bool):
        raise TypeError(f"raw_scores must be True or False, got {type(raw_scores).__name__}")
    if raw_scores:
        options["raw_scores"] = True
    return options


def _rank_payload(
    query: str, documents: list[dict[str, Any]], top_n: int | None, instruction: str | None
) -> dict[str, Any]:
    payload: dict[str, Any] = {"query": query, "documents": documents}
    if top_n is not None:
        payload["top_n"] = min(top_n, len(documents))
    if instruction is not None:
        payload["instruction"] = instruction
    return payload


def _rank_records(documents: list[str | dict[str, Any]]) -> list[dict[str, Any]]:
    # Ids are positions in the whole input, assigned before splitting; the server names any
    # malformed record itself.
    records = []
    for i, doc in enumerate(documents):
        record = {"id": i, "text": doc} if isinstance(doc, str) else doc
        if record.get("id") is None:
            record = {**record, "id": i}
        records.append(record)
    return records


def _malformed(what: str, body: Any, status_code: int) -> RerankServiceError:
    return RerankServiceError(
        f"the service answered 200 with an unexpected body ({what}): {str(body)[:200]!r}",
        status_code=status_code,
        type="invalid_response",
    )


def _parse_rerank(body: Any, offset: int, size: int, status_code: int = 200) -> list[RerankHit]:
    try:
        hits = []
        for r in body["results"]:
            doc = r.get("document")
            text = doc.get("text") if isinstance(doc, Mapping) else doc
            index = int(r["index"])
            if not 0 <= index < size:
                raise _malformed(f"index {index} outside a request of {size} documents", body, status_code)
            span = r.get("span")
            hits.append(
                RerankHit(
                    index=offset + index,
                    relevance_score=float(r["relevance_score"]),
                    document=text,
                    span=None if span is None else (int(span["start"]), int(span["end"])),
                )
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _malformed(f"{type(exc).__name__}: {exc}", body, status_code) from exc
    return hits


def _parse_rank(body: Any, offset: int, size: int, status_code: int = 200) -> list[RankHit]:
    try:
        hits = []
        for r in body["results"]:
            index = int(r["index"])
            if not 0 <= index < size:
                raise _malformed(f"index {index} outside a request of {size} documents", body, status_code)
            hits.append(
                RankHit(id=r["id"], score=float(r["score"]), band=str(r["band"]), index=offset + index)
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _malformed(f"{type(exc).__name__}: {exc}", body, status_code) from exc
    return hits


def check_on_overload(value: Any) -> str:
    """``value`` when it is one of :data:`OVERLOAD_CHOICES`."""
    if value not in OVERLOAD_CHOICES:
        raise ValueError(f"on_overload must be 'raise' or 'keep_order', got {value!r}")
    return value


def _chunks(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _merge(parts: list[list[Any]], score: Callable[[Any], float], top_n: int | None) -> list[Any]:
    """Hits of all parts best first; ``sorted`` is stable, so ties keep input order."""
    merged = sorted((hit for part in parts for hit in part), key=lambda hit: -score(hit))
    return merged if top_n is None else merged[:top_n]


def _error_from_response(response: Any, attempts: int, note: str = "") -> RerankServiceError:
    message, param, kind = response.text.strip() or response.reason_phrase, None, None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping):
            message, param, kind = str(err.get("message", message)), err.get("param"), err.get("type")
        elif isinstance(err, str):
            message = err
        elif "message" in body or "detail" in body:
            message = str(body.get("message", body.get("detail")))
    if attempts > 1:
        note = f"{note}; after {attempts} attempts" if note else f"after {attempts} attempts"
    if note:
        message = f"{message} ({note})"
    return RerankServiceError(
        message, status_code=response.status_code, param=param, type=kind, attempts=attempts
    )


def _json_body(response: Any) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise RerankServiceError(
            f"the service answered with invalid JSON: {response.text[:200]!r}",
            status_code=response.status_code,
            type="invalid_response",
        ) from exc


def _retry_after(response: Any) -> float | None:
    """The ``Retry-After`` header in seconds (a number or an HTTP date), or ``None``."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _is_retryable_status(status: int) -> bool:
    return status == 429 or (500 <= status < 600 and status not in _PERMANENT_5XX)


class _Attempts:
    """What to do after each attempt of one request: return, raise, or wait and retry.

    ``deadline`` (a ``time.monotonic()`` value) ends the call's time: no wait runs past it.
    """

    def __init__(
        self, base_url: str, path: str, policy: RetryPolicy, timeout: float, deadline: float
    ) -> None:
        self.base_url, self.path, self.policy, self.timeout = base_url, path, policy, timeout
        self.deadline = deadline
        self.count = 0

    def attempt_timeout(self) -> Any:
        """The httpx timeout of the next attempt: what is left of the call's time (``None``: all of it)."""
        left = self.deadline - time.monotonic()
        if self.count <= 1 or left >= self.timeout:
            return None
        return httpx.Timeout(max(left, 0.001))

    def deadline_headers(self) -> dict[str, str]:
        """``X-Request-Timeout`` with what is left of the call's time: the service never starts
        scoring a request after this client has stopped waiting for it."""
        left = max(self.deadline - time.monotonic(), 0.001)
        return {REQUEST_TIMEOUT_HEADER: f"{left:.3f}"}

    def _past_deadline(self, wait: float) -> bool:
        return time.monotonic() + wait >= self.deadline

    def after_error(self, exc: Exception) -> float:
        """Seconds to wait before retrying after a transport error; raises when giving up."""
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, _RETRYABLE_ERRORS):
            raise RerankServiceError(
                f"the rerank service at {self.base_url} did not answer {self.path} within {self.timeout} s "
                f"({type(exc).__name__}); raise timeout= for long document lists, or lower batch_size=",
                attempts=self.count,
                overloaded=True,
            ) from exc
        if not isinstance(exc, _RETRYABLE_ERRORS) or self.count > self.policy.max_retries:
            raise RerankServiceError(
                f"could not reach the rerank service at {self.base_url} ({type(exc).__name__}: {exc}; "
                f"{self.count} attempt{'s' if self.count > 1 else ''}); check that the server is running "
                "and that base_url is right",
                attempts=self.count,
            ) from exc
        wait = self.policy.delay(self.count)
        if self._past_deadline(wait):
            raise RerankServiceError(
                f"could not reach the rerank service at {self.base_url} within timeout={self.timeout} s "
                f"({type(exc).__name__}: {exc}; {self.count} attempt{'s' if self.count > 1 else ''})",
                attempts=self.count,
            ) from exc
        logger.warning(
            "POST %s%s failed (%s: %s); retry %d of %d in %.2f s",
            self.base_url,
            self.path,
            type(exc).__name__,
            exc,
            self.count,
            self.policy.max_retries,
            wait,
        )
        return wait

    def after_response(self, response: Any) -> float | None:
        """``None`` when the response is final (success or a client error); else seconds to wait."""
        if response.is_success:
            return None
        if not _is_retryable_status(response.status_code) or self.count > self.policy.max_retries:
            raise _error_from_response(response, self.count)
        retry_after = _retry_after(response)
        if retry_after is not None and retry_after > self.policy.max_retry_after:
            note = f"the service asks to retry after {retry_after:.0f} s"
            raise _error_from_response(response, self.count, note)
        wait = self.policy.delay(self.count, retry_after)
        if self._past_deadline(wait):
            why = f"asks to retry after {retry_after:g} s" if retry_after is not None else "is still refusing"
            note = f"the service {why}, past this call's timeout of {self.timeout:g} s"
            raise _error_from_response(response, self.count, note)
        logger.warning(
            "POST %s%s answered %d; retry %d of %d in %.2f s%s",
            self.base_url,
            self.path,
            response.status_code,
            self.count,
            self.policy.max_retries,
            wait,
            " (Retry-After)" if retry_after is not None else "",
        )
        return wait


class _ClientSettings:
    """Arguments, validation and request planning shared by both clients."""

    #: Name of the httpx client class each client pools its connections in.
    _http_class = "Client"

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        model: str | None = None,
        retry: RetryPolicy | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        http_client: Any = None,
        on_overload: str = "raise",
    ) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        check_positive_int(batch_size, "batch_size")
        check_positive_int(max_concurrency, "max_concurrency")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise TypeError(f"retry must be a RetryPolicy or None, got {type(retry).__name__}")
        check_on_overload(on_overload)
        self.on_overload = on_overload
        self.base_url = base_url.rstrip("/")
        self.model = model
        #: The ``model`` the service named in its latest answer (``None`` until it names one).
        self.served_model: str | None = None
        self.timeout = float(timeout)
        self.retry = retry or RetryPolicy()
        self.batch_size = batch_size
        self.max_concurrency = max_concurrency
        self._owns_client = http_client is None
        self._http = http_client or getattr(httpx, self._http_class)(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else {},
            timeout=httpx.Timeout(timeout, connect=min(connect_timeout, timeout)),
            event_hooks=httpx_event_hooks(self._http_class == "AsyncClient"),  # W3C traceparent
        )

    def _parse(self, response: Any, parse: Callable, start: int, size: int) -> list:
        body = _json_body(response)
        if isinstance(body, Mapping) and isinstance(body.get("model"), str) and body["model"]:
            self.served_model = body["model"]
        return parse(body, start, size, response.status_code)

    def _rerank_requests(
        self,
        query: str,
        documents: Any,
        top_n: int | None,
        instruction: str | None,
        return_documents: bool,
        options: dict[str, Any],
    ) -> tuple[list[tuple[int, int, dict[str, Any]]], int | None]:
        docs, top_n = _check_documents(documents), check_top_n(top_n)
        requests = []
        for start, end in _chunks(len(docs), self.batch_size):
            payload = _rerank_payload(
                query, docs[start:end], top_n, instruction, return_documents, self.model, options
            )
            requests.append((start, end - start, payload))
        return requests, top_n

    def _attempts(self, path: str, retry: bool, deadline: float | None) -> _Attempts:
        policy = self.retry if retry else RetryPolicy(max_retries=0)
        end = time.monotonic() + self.timeout if deadline is None else deadline
        return _Attempts(self.base_url, path, policy, self.timeout, end)

    def _kept_order(
        self, exc: RerankServiceError, documents: Sequence[Any], top_n: int | None, return_documents: bool
    ) -> list[RerankHit]:
        """Input-order hits for ``on_overload="keep_order"``; re-raises any other failure."""
        if self.on_overload != "keep_order" or not exc.overloaded:
            raise exc
        logger.warning(
            "the rerank service at %s is overloaded (%s); keeping the input order of %d documents",
            self.base_url,
            exc,
            len(documents),
        )
        keep = documents if top_n is None else documents[:top_n]
        return [
            RerankHit(
                index=i,
                relevance_score=math.nan,
                document=document_text(doc, f"documents[{i}]") if return_documents else None,
                reranked=False,
            )
            for i, doc in enumerate(keep)
        ]

    def _rank_requests(
        self, query: str, documents: Any, top_n: int | None, instruction: str | None
    ) -> tuple[list[tuple[int, int, dict[str, Any]]], int | None]:
        records, top_n = _rank_records(_check_documents(documents)), check_top_n(top_n)
        return [
            (start, end - start, _rank_payload(query, records[start:end], top_n, instruction))
            for start, end in _chunks(len(records), self.batch_size)
        ], top_n


class RerankClient(_ClientSettings):
    """Blocking client for a rerank service, with retries and splitting of long lists.

    Safe to share between threads (one connection pool).

    Args:
        base_url: Where the service listens, e.g. ``"http://rerank:8000"``.
        api_key: Sent as ``Authorization: Bearer <api_key>`` when the service requires one.
        timeout: Seconds a call may take in all, retries and their waits included (reranking many
            long documents on CPU takes a while); a ``Retry-After`` that ends past it fails the call.
        connect_timeout: Seconds to open a connection (an unreachable host fails this fast).
        model: Sent as ``model`` in ``/v1/rerank`` requests (ignored by this project's service,
            required by vLLM and most hosted APIs).
        retry: When to retry; defaults to :class:`RetryPolicy` ``()`` (3 retries, 0.5 s first wait).
        batch_size: Most documents per request; longer lists are split and merged.
        max_concurrency: Most requests of one call in flight at once.
        http_client: An ``httpx.Client`` to use instead of creating one (its base URL, headers
            and timeouts are then yours to set).
        on_overload: ``"raise"`` (default): an overloaded service (503, 429, or no answer within
            ``timeout``) raises :class:`RerankServiceError`; ``"keep_order"``: :meth:`rerank`
            returns the documents in input order, cut to ``top_n``, with ``reranked=False``, and
            logs a WARNING (a chatbot keeps answering with the retriever's order).

    Attributes:
        served_model: The ``model`` the service named in its latest answer (``None`` until then).

    Raises:
        ValueError: A malformed ``base_url`` or a setting out of range.
    """

    def _send(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        retry: bool = True,
        deadline: float | None = None,
    ) -> Any:
        attempts = self._attempts(path, retry, deadline)
        while True:
            attempts.count += 1
            try:
                timeout = attempts.attempt_timeout()
                extra = {} if timeout is None else {"timeout": timeout}
                response = self._http.request(
                    method, path, json=payload, headers=attempts.deadline_headers(), **extra
                )
            except httpx.HTTPError as exc:
                wait = attempts.after_error(exc)
            else:
                wait = attempts.after_response(response)
                if wait is None:
                    return response
            time.sleep(wait)

    def _post_all(self, path: str, requests: list[tuple[int, int, dict[str, Any]]], parse: Callable) -> list:
        deadline = time.monotonic() + self.timeout  # one budget for the whole call

        def post(request: tuple[int, int, dict[str, Any]]) -> list:
            start, size, payload = request
            return self._parse(self._send("POST", path, payload, deadline=deadline), parse, start, size)

        if len(requests) == 1:
            return [post(requests[0])]
        with ThreadPoolExecutor(min(self.max_concurrency, len(requests)), "qwen3-rerank-client") as pool:
            return list(pool.map(post, requests))

    def rerank(
        self,
        query: str,
        documents: Sequence[str | Mapping[str, Any]],
        top_n: int | None = None,
        instruction: str | None = None,
        return_documents: bool = False,
        *,
        max_tokens_per_doc: int | None = None,
        max_tokens_per_query: int | None = None,
        max_chunks_per_doc: int | None = None,
        raw_scores: bool = False,
    ) -> list[RerankHit]:
        """``POST /v1/rerank``: documents best first.

        Args:
            query: The question.
            documents: Texts, or mappings with a ``"text"`` key (the rule of
                :func:`~qwen3_rerank_plugins.validation.document_text`; empty text is accepted).
            top_n: Keep the best ``top_n`` (all when ``None``).
            instruction: Template name (see ``qwen3-rerank templates``) or free text (this
                project's service; other servers ignore it).
            return_documents: Have the server echo each document's text in the hits.
            max_tokens_per_doc: Cut each document to this many tokens (``None``: the service's setting).
            max_tokens_per_query: Cut the instruction + query to this many tokens.
            max_chunks_per_doc: Read a long document in up to this many windows and score it by
                the best (its span comes back in :attr:`RerankHit.span`).
            raw_scores: Have the service report log-odds instead of probabilities.

        Returns:
            :class:`RerankHit` objects, highest ``relevance_score`` first; ``index`` is the
            position in ``documents`` however the list was split. With
            ``on_overload="keep_order"`` and an overloaded service: the documents in input
            order, cut to ``top_n``, with ``reranked=False`` (a WARNING is logged).

        Raises:
            RerankServiceError: The service refused the request or could not be reached
                (``overloaded=True``: it was busy or did not answer within ``timeout``).
            TypeError, ValueError: ``documents``, ``top_n`` or a cap is malformed (before
                anything is sent).
        """
        caps = {
            "max_tokens_per_doc": max_tokens_per_doc,
            "max_tokens_per_query": max_tokens_per_query,
            "max_chunks_per_doc": max_chunks_per_doc,
        }
        options = _rerank_options(caps, raw_scores)
        requests, top_n = self._rerank_requests(
            query, documents, top_n, instruction, return_documents, options
        )
        if not requests:
            return []
        try:
            parts = self._post_all("/v1/rerank", requests, _parse_rerank)
        except RerankServiceError as exc:
            return self._kept_order(exc, documents, top_n, return_documents)
        return _merge(parts, lambda hit: hit.relevance_score, top_n)

    def rank(
        self,
        query: str,
        documents: Sequence[str | Mapping[str, Any]],
        top_n: int | None = None,
        instruction: str | None = None,
    ) -> list[RankHit]:
        """``POST /rank``: ``{id, text}`` records (or plain texts, ids = positions) best first, with bands."""
        requests, top_n = self._rank_requests(query, documents, top_n, instruction)
        if not requests:
            return []
        return _merge(self._post_all("/rank", requests, _parse_rank), lambda hit: hit.score, top_n)

    def health(self) -> dict[str, Any]:
        """``GET /health``; raises :class:`RerankServiceError` (503) while the model loads."""
        return _json_body(self._send("GET", "/health", retry=False))

    def models(self) -> list[str]:
        """Ids of the served models (``GET /v1/models``)."""
        body = _json_body(self._send("GET", "/v1/models"))
        try:
            return [m["id"] for m in body["data"]]
        except (KeyError, TypeError) as exc:
            raise _malformed(f"{type(exc).__name__}: {exc}", body, 200) from exc

    def close(self) -> None:
        """Close the connection pool (when this client created it)."""
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRerankClient(_ClientSettings):
    """The asyncio twin of :class:`RerankClient`: same arguments, ``await``-able methods.

    One pooled ``httpx.AsyncClient`` serves every call (keep-alive connections are reused);
    use the client from one event loop and close it with :meth:`aclose` or ``async with``.
    """

    _http_class = "AsyncClient"

    async def _send(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | None = None,
        *,
        retry: bool = True,
        deadline: float | None = None,
    ) -> Any:
        attempts = self._attempts(path, retry, deadline)
        while True:
            attempts.count += 1
            try:
                timeout = attempts.attempt_timeout()
                extra = {} if timeout is None else {"timeout": timeout}
                response = await self._http.request(
                    method, path, json=payload, headers=attempts.deadline_headers(), **extra
                )
            except httpx.HTTPError as exc:
                wait = attempts.after_error(exc)
            else:
                wait = attempts.after_response(response)
                if wait is None:
                    return response
            await asyncio.sleep(wait)

    async def _post_all(
        self, path: str, requests: list[tuple[int, int, dict[str, Any]]], parse: Callable
    ) -> list:
        limit = asyncio.Semaphore(self.max_concurrency)
        deadline = time.monotonic() + self.timeout  # one budget for the whole call

        async def post(request: tuple[int, int, dict[str, Any]]) -> list:
            start, size, payload = request
            async with limit:
                response = await self._send("POST", path, payload, deadline=deadline)
            return self._parse(response, parse, start, size)

        tasks: list[Awaitable[list]] = [post(r) for r in requests]
        return list(await asyncio.gather(*tasks))

    async def rerank(
        self,
        query: str,
        documents: Sequence[str | Mapping[str, Any]],
        top_n: int | None = None,
        instruction: str | None = None,
        return_documents: bool = False,
        *,
        max_tokens_per_doc: int | None = None,
        max_tokens_per_query: int | None = None,
        max_chunks_per_doc: int | None = None,
        raw_scores: bool = False,
    ) -> list[RerankHit]:
        """See :meth:`RerankClient.rerank`."""
        caps = {
            "max_tokens_per_doc": max_tokens_per_doc,
            "max_tokens_per_query": max_tokens_per_query,
            "max_chunks_per_doc": max_chunks_per_doc,
        }
        options = _rerank_options(caps, raw_scores)
        requests, top_n = self._rerank_requests(
            query, documents, top_n, instruction, return_documents, options
        )
        if not requests:
            return []
        try:
            parts = await self._post_all("/v1/rerank", requests, _parse_rerank)
        except RerankServiceError as exc:
            return self._kept_order(exc, documents, top_n, return_documents)
        return _merge(parts, lambda hit: hit.relevance_score, top_n)

    async def rank(
        self,
        query: str,
        documents: Sequence[str | Mapping[str, Any]],
        top_n: int | None = None,
        instruction: str | None = None,
    ) -> list[RankHit]:
        """See :meth:`RerankClient.rank`."""
        requests, top_n = self._rank_requests(query, documents, top_n, instruction)
        if not requests:
            return []
        return _merge(await self._post_all("/rank", requests, _parse_rank), lambda hit: hit.score, top_n)

    async def health(self) -> dict[str, Any]:
        """See :meth:`RerankClient.health`."""
        return _json_body(await self._send("GET", "/health", retry=False))

    async def models(self) -> list[str]:
        """See :meth:`RerankClient.models`."""
        body = _json_body(await self._send("GET", "/v1/models"))
        try:
            return [m["id"] for m in body["data"]]
        except (KeyError, TypeError) as exc:
            raise _malformed(f"{type(exc).__name__}: {exc}", body, 200) from exc

    async def aclose(self) -> None:
        """Close the connection pool (when this client created it)."""
        if self._owns_client:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
