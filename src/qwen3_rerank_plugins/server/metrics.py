"""Prometheus metrics of one service instance, in its own registry.

Every app gets a fresh :class:`prometheus_client.CollectorRegistry`, so several apps (tests,
one process serving two models) never collide over metric names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class ServiceMetrics:
    """The service's counters and histograms (all prefixed ``qwen3_rerank_``).

    Attributes:
        requests: ``requests_total{endpoint, status}`` HTTP requests answered. ``499``: the
            client hung up first (while uploading or queued; nothing was sent), ``408``: its
            body did not arrive within the body timeout.
        latency: ``request_duration_seconds{endpoint}`` time from request to response.
        pairs: ``pairs_scored_total`` (query, document) pairs sent to the engine (a request
            the score cache answers whole at admission never reaches it; see the cache counters).
        batch_pairs: ``batch_pairs`` pairs per engine call.
        batch_requests: ``batch_requests`` requests merged into one engine call.
        batch_seconds: ``batch_duration_seconds`` time in the engine per call.
        queue_depth: ``queue_depth`` requests waiting to be scored.
        refusals: ``refusals_total{reason}`` scoring requests refused with 503: ``queue_full``
            (``max_queue``), ``estimated_wait`` (refused at once: estimated wait past
            ``max_queue_wait``), ``waited_too_long`` (admitted, but waited past it; dropped
            unscored), ``deadline`` (the client's ``X-Request-Timeout`` passed or would have
            before scoring), ``model_loading``.
        estimated_wait: ``estimated_wait_seconds`` how long a request sent now would wait
            before its scoring starts (NaN until the first engine call is measured).
        estimate_margin: ``estimate_margin_seconds`` the headroom admission keeps under
            ``max_queue_wait``: how much later than estimated the latest requests started.
        queue_wait: ``queue_wait_seconds`` how long each scored request waited in the queue
            before its scoring started.
        answered_from_cache: ``requests_answered_from_cache_total`` scoring requests the score
            cache held whole, answered at admission without queueing or an engine call.
        throughput: ``throughput_tokens_per_second`` moving average of prompt tokens scored
            per second (what the estimate divides by; NaN until measured).
        model_loaded: ``model_loaded`` 1 once the model is ready.
        model_info: ``model_info{model, device, dtype}`` constant 1.

    With a score cache (:meth:`watch_cache`), read from it at each scrape:
    ``cache_hits_total{tier}`` (``memory``, ``redis``), ``cache_misses_total``,
    ``cache_pairs_saved_total`` and ``cache_tokens_saved_total`` (pairs and prompt tokens
    answered without the model), ``cache_errors_total{tier}`` (Redis calls that failed or timed
    out), ``cache_entries`` and ``cache_bytes`` (the in-process tier), ``cache_evictions_total``.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "qwen3_rerank_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "qwen3_rerank_request_duration_seconds",
            "Time from request to response",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.pairs = Counter("qwen3_rerank_pairs_scored", "(query, document) pairs scored", registry=r)
        self.batch_pairs = Histogram(
            "qwen3_rerank_batch_pairs", "Pairs per engine call", buckets=_SIZE_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "qwen3_rerank_batch_requests",
            "Requests merged into one engine call",
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "qwen3_rerank_batch_duration_seconds",
            "Engine time per call",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("qwen3_rerank_queue_depth", "Requests waiting to be scored", registry=r)
        self.refusals = Counter(
            "qwen3_rerank_refusals", "Scoring requests refused with 503, by reason", ["reason"], registry=r
        )
        self.estimated_wait = Gauge(
            "qwen3_rerank_estimated_wait_seconds",
            "Estimated wait before scoring of a request sent now (NaN until measured)",
            registry=r,
        )
        self.estimate_margin = Gauge(
            "qwen3_rerank_estimate_margin_seconds",
            "Headroom kept under max_queue_wait: how much later than estimated recent requests started",
            registry=r,
        )
        self.queue_wait = Histogram(
            "qwen3_rerank_queue_wait_seconds",
            "Time a scored request waited in the queue before its scoring started",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.answered_from_cache = Counter(
            "qwen3_rerank_requests_answered_from_cache",
            "Scoring requests the score cache held whole, answered at admission (never queued)",
            registry=r,
        )
        self.throughput = Gauge(
            "qwen3_rerank_throughput_tokens_per_second",
            "Moving average of prompt tokens scored per second (NaN until measured)",
            registry=r,
        )
        self.model_loaded = Gauge("qwen3_rerank_model_loaded", "1 once the model is loaded", registry=r)
        self.model_info = Gauge(
            "qwen3_rerank_model_info", "The loaded model", ["model", "device", "dtype"], registry=r
        )

    def observe_batch(self, requests: int, pairs: int, seconds: float) -> None:
        """Record one engine call (the batcher's observer)."""
        self.pairs.inc(pairs)
        self.batch_pairs.observe(pairs)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)

    def watch_cache(self, stats: Callable[[], dict[str, Any]]) -> None:
        """Expose a score cache's counters (``stats`` is its :meth:`ScoreCache.stats`)."""
        self.registry.register(_CacheCollector(stats))

    def render(self) -> bytes:
        """The Prometheus text exposition of this registry."""
        return generate_latest(self.registry)


class _CacheCollector:
    """The score cache's counters, read at scrape time (the cache counts; nothing is copied)."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        s = self._stats()
        hits = CounterMetricFamily(
            "qwen3_rerank_cache_hits", "Pairs answered by a score-cache tier", labels=["tier"]
        )
        errors = CounterMetricFamily(
            "qwen3_rerank_cache_errors", "Score-cache calls that failed or timed out", labels=["tier"]
        )
        for tier, n in s["hits"].items():
            hits.add_metric([tier], n)
        for tier, n in s["errors"].items():
            errors.add_metric([tier], n)
        yield hits
        yield errors
        yield CounterMetricFamily("qwen3_rerank_cache_misses", "Pairs no cache tier held", value=s["misses"])
        yield CounterMetricFamily(
            "qwen3_rerank_cache_pairs_saved", "Pairs answered without the model", value=s["pairs_saved"]
        )
        yield CounterMetricFamily(
            "qwen3_rerank_cache_tokens_saved",
            "Prompt tokens of pairs answered without the model",
            value=s["tokens_saved"],
        )
        if "memory_entries" in s:
            yield GaugeMetricFamily(
                "qwen3_rerank_cache_entries", "Entries in the in-process cache", value=s["memory_entries"]
            )
            yield GaugeMetricFamily(
                "qwen3_rerank_cache_bytes", "Estimated bytes of the in-process cache", value=s["memory_bytes"]
            )
            yield CounterMetricFamily(
                "qwen3_rerank_cache_evictions",
                "Entries dropped from the in-process cache (least recently used)",
                value=s["memory_evictions"],
            )
