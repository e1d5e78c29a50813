"""Defaults of the HTTP service, stated once for the plain server, Ray Serve and the CLI.

Plain Python (no FastAPI, no torch), so the command line can show them in ``--help`` without
importing the server. :class:`ServiceConfig` gathers one service's settings, checked once, and is
what :func:`~qwen3_rerank_plugins.server.create_app`, :func:`~qwen3_rerank_plugins.server.serve`,
the Ray Serve deployment and ``qwen3-rerank serve`` pass around.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .cache import DEFAULT_CACHE_TTL_S
from .results import ConfidenceBands
from .settings import DEFAULT_MODEL

__all__ = [
    "API_KEY_ENV",
    "DEFAULT_BATCH_WAIT_MS",
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_GRACEFUL_TIMEOUT_S",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BATCH_PAIRS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_DOCUMENTS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_QUEUE_WAIT_S",
    "DEFAULT_MAX_REQUEST_TOKENS",
    "DEFAULT_MODEL",
    "DEFAULT_PORT",
    "DEFAULT_UI_PORT",
    "REQUEST_TIMEOUT_HEADER",
    "ServiceConfig",
    "api_key_from_env",
]

#: Interface the service binds to unless told otherwise (loopback: exposing it is a choice).
DEFAULT_HOST = "127.0.0.1"
#: TCP port of ``qwen3-rerank serve``.
DEFAULT_PORT = 8000
#: TCP port of ``qwen3-rerank ui``.
DEFAULT_UI_PORT = 7860
#: Most documents in one request (413 beyond).
DEFAULT_MAX_DOCUMENTS = 1000
#: Largest request body in bytes (413 beyond).
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
#: How long an idle batcher waits after a first request for others to join it.
DEFAULT_BATCH_WAIT_MS = 2.0
#: Most (query, document) pairs a batcher (of the plain server or a Ray replica) merges into one engine call.
DEFAULT_MAX_BATCH_PAIRS = 256
#: Most requests waiting to be scored (503 beyond).
DEFAULT_MAX_QUEUE = 1024
#: Longest a request may wait to be scored (its estimated wait, then its actual one; 503 with
#: ``Retry-After`` beyond). Justified in docs/serving.md ("Overload").
DEFAULT_MAX_QUEUE_WAIT_S = 10.0
#: Header in which a client states its own deadline, in seconds from when its body was read.
REQUEST_TIMEOUT_HEADER = "X-Request-Timeout"
#: Seconds a stopping server gives requests in flight.
DEFAULT_GRACEFUL_TIMEOUT_S = 30.0
#: Seconds a request's body may take to arrive, from its headers on (408 beyond).
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Most prompt tokens one request may make the model read, summed over its documents (413 beyond).
DEFAULT_MAX_REQUEST_TOKENS = 1_000_000
#: Model served (and loaded by the command line) when none is named.
#: Environment variable holding the service's API key (``serve``, Ray's ``app_builder``, clients).
API_KEY_ENV = "QWEN3_RERANK_API_KEY"


def api_key_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The API key in ``$QWEN3_RERANK_API_KEY``, or ``None`` when it is unset or blank."""
    value = (os.environ if environ is None else environ).get(API_KEY_ENV, "")
    return value if value.strip() else None


def _positive_int(name: str, value: Any, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        tail = " or None" if optional else ""
        raise ValueError(f"{name} must be a positive int{tail}, got {value!r}")


#: Entries of the service's in-process score cache (about 240 bytes each: ~24 MB); 0 turns it off.
DEFAULT_CACHE_SIZE = 100_000


@dataclass(frozen=True)
class ServiceConfig:
    """The settings of one rerank service, checked when built (a bad one fails at start-up).

    The same object configures the plain server and every Ray Serve replica, so both enforce
    the same limits.

    Attributes:
        api_key: When set, every endpoint except ``/health`` and ``/metrics`` requires
            ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_documents: Most documents per request (413 beyond).
        max_body_bytes: Largest request body (413 beyond).
        body_timeout: Seconds a body may take to arrive after its headers (408 beyond;
            ``None``: no limit).
        max_request_tokens: Most prompt tokens one request may make the model read (413 beyond;
            ``None``: no limit beyond ``max_documents``).
        bands: Cut-offs of the ``/rank`` bands.
        batch_wait_ms: How long an idle batcher waits for concurrent requests to merge.
        max_batch_pairs: Most (query, document) pairs merged into one engine call.
        max_queue: Most requests waiting to be scored (503 with ``Retry-After`` beyond).
        max_queue_wait: Longest a request may wait to be scored, in seconds: refused at once
            (503 with ``Retry-After``) when its estimated wait is longer, dropped before scoring
            when it waited longer anyway (``None``: no limit).
        model_name: Name reported in responses and ``/v1/models`` (``None``: the model's).
        cache_size: Entries of the in-process score cache of each service process (each Ray
            replica); ``0``: none.
        cache_url: A Redis URL (``redis://HOST:PORT/DB``) for a score-cache tier shared by every
            process and replica (``None``: none).
        cache_ttl: Seconds a Redis entry lives (``None``: until Redis evicts it).

    Example:
        >>> ServiceConfig(max_documents=100).max_documents
        100
    """

    api_key: str | None = None
    max_documents: int = DEFAULT_MAX_DOCUMENTS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout: float | None = DEFAULT_BODY_TIMEOUT_S
    max_request_tokens: int | None = DEFAULT_MAX_REQUEST_TOKENS
    bands: ConfidenceBands = field(default_factory=ConfidenceBands)
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_batch_pairs: int = DEFAULT_MAX_BATCH_PAIRS
    max_queue: int = DEFAULT_MAX_QUEUE
    max_queue_wait: float | None = DEFAULT_MAX_QUEUE_WAIT_S
    model_name: str | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    cache_url: str | None = None
    cache_ttl: float | None = DEFAULT_CACHE_TTL_S

    def __post_init__(self) -> None:
        _positive_int("max_documents", self.max_documents)
        _positive_int("max_body_bytes", self.max_body_bytes)
        _positive_int("max_request_tokens", self.max_request_tokens, optional=True)
        _positive_int("max_batch_pairs", self.max_batch_pairs)
        _positive_int("max_queue", self.max_queue)
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must not be empty; pass None to disable authentication")
        timeout = self.body_timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
        ):
            raise ValueError(f"body_timeout must be a positive number of seconds or None, got {timeout!r}")
        limit = self.max_queue_wait
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, (int, float)) or not 0 < limit < float("inf")
        ):
            raise ValueError(f"max_queue_wait must be a positive number of seconds or None, got {limit!r}")
        wait = self.batch_wait_ms
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not wait >= 0:
            raise ValueError(f"batch_wait_ms must be a number >= 0, got {wait!r}")
        if not isinstance(self.bands, ConfidenceBands):
            raise TypeError(f"bands must be a ConfidenceBands, got {type(self.bands).__name__}")
        if self.model_name is not None and (not isinstance(self.model_name, str) or not self.model_name):
            raise ValueError(f"model_name must be a non-empty string or None, got {self.model_name!r}")
        size = self.cache_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {size!r}")
        self.score_cache()  # a bad cache_url or cache_ttl fails here, at start-up

    def score_cache(self) -> Any:
        """A new :class:`~qwen3_rerank_plugins.cache.ScoreCache` from these settings, or ``None``."""
        from .cache import ScoreCache

        if not self.cache_size and self.cache_url is None:
            return None
        return ScoreCache(self.cache_size, url=self.cache_url, ttl=self.cache_ttl)

    def with_options(self, **options: Any) -> ServiceConfig:
        """A copy with some settings changed; an unknown name is a ``TypeError`` naming it."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown service option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        if options.get("bands", self.bands) is None:
            options["bands"] = ConfidenceBands()
        return replace(self, **options)
