"""An exact score cache: a pair already scored under the same configuration is not scored again.

The engine (:class:`~qwen3_rerank_plugins.Reranker`) computes one key per (query, document)
pair: a hash of everything its log-odds depend on (the weights' fingerprint, dtype, the cache
format version, the scoring settings and the exact token ids the model reads, template,
instruction, query and document included, after every cap and cut). It asks a
:class:`ScoreCache` for those keys and sends only the misses to the model, still batched across
queries; what it computes it stores.

Two tiers:

* an in-process LRU (:class:`MemoryTier`), bounded in entries and/or bytes;
* an optional shared tier in Redis (:class:`RedisTier`), so replicas and restarts share work,
  with a TTL. Only keys (hashes) and packed numbers (log-odds, window span) are written: no
  query or document text ever reaches Redis. Redis down or slow never fails a call: its errors
  are counted and logged once, and for a few seconds after one it is not asked at all.

Plain Python, no torch (the Redis client is imported only when a Redis tier is made).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ._optional import require

__all__ = [
    "CACHE_FORMAT_VERSION",
    "DEFAULT_CACHE_TTL_S",
    "DEFAULT_REDIS_TIMEOUT_S",
    "CachedScore",
    "MemoryTier",
    "RedisTier",
    "ScoreCache",
]

logger = logging.getLogger(__name__)

#: Part of every key: bump it when the same token ids would give other log-odds (how the score
#: is read, how windows are combined) or the stored value's layout changes.
CACHE_FORMAT_VERSION = 1
#: How long a Redis entry lives (7 days: a hotline re-matches last week's tickets).
DEFAULT_CACHE_TTL_S = 7 * 24 * 3600
#: Connect and read/write timeout of every Redis call: a slow Redis costs at most this much.
DEFAULT_REDIS_TIMEOUT_S = 0.1
#: After a Redis error, how long the tier is skipped before it is tried again.
DEFAULT_REDIS_RETRY_AFTER_S = 5.0
#: Estimated bytes of one in-process entry (16-byte key, log-odds, OrderedDict slot), and of a
#: window span on top: measured with ``tracemalloc`` over 100,000 entries (234 and 354 bytes).
ENTRY_BYTES = 240
SPAN_BYTES = 120

# Redis value: log-odds (float64) and the span's start and end (-1, -1 for none).
_VALUE = struct.Struct("<dqq")


@dataclass(frozen=True)
class CachedScore:
    """What the cache holds for one pair.

    Attributes:
        logit: The log-odds ``z_yes - z_no``.
        span: The ``(start, end)`` characters of the window that gave the score, or ``None``.
    """

    logit: float
    span: tuple[int, int] | None = None

    def pack(self) -> bytes:
        """The value written to Redis: 24 bytes of numbers, nothing else."""
        start, end = self.span if self.span is not None else (-1, -1)
        return _VALUE.pack(self.logit, start, end)

    @classmethod
    def unpack(cls, data: bytes) -> CachedScore:
        logit, start, end = _VALUE.unpack(data)
        return cls(logit, None if start < 0 else (start, end))


class _Counters:
    """Thread-safe counters, read as one snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        if n:
            with self._lock:
                self._values[name] = self._values.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


class MemoryTier:
    """An in-process LRU of :class:`CachedScore` by key, bounded in entries and/or bytes.

    Args:
        max_entries: Most entries kept (``None``: bounded by ``max_bytes`` only).
        max_bytes: Most estimated bytes kept (``None``: bounded by ``max_entries`` only); an
            entry is counted as :data:`ENTRY_BYTES` (plus :data:`SPAN_BYTES` with a span).
    """

    name = "memory"

    def __init__(self, max_entries: int | None = None, max_bytes: int | None = None) -> None:
        for value, what in ((max_entries, "max_entries"), (max_bytes, "max_bytes")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{what} must be a positive int or None, got {value!r}")
        if max_entries is None and max_bytes is None:
            raise ValueError("a memory tier needs max_entries or max_bytes")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._entries: OrderedDict[bytes, CachedScore] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.evictions = 0

    @staticmethod
    def _size(value: CachedScore) -> int:
        return ENTRY_BYTES + (SPAN_BYTES if value.span is not None else 0)

    def get_many(self, keys: Iterable[bytes]) -> dict[bytes, CachedScore]:
        found = {}
        with self._lock:
            for key in keys:
                value = self._entries.get(key)
                if value is not None:
                    self._entries.move_to_end(key)
                    found[key] = value
        return found

    def put_many(self, items: Mapping[bytes, CachedScore]) -> None:
        with self._lock:
            for key, value in items.items():
                old = self._entries.pop(key, None)
                if old is not None:
                    self._bytes -= self._size(old)
                self._entries[key] = value
                self._bytes += self._size(value)
            while self._entries and (
                (self.max_entries is not None and len(self._entries) > self.max_entries)
                or (self.max_bytes is not None and self._bytes > self.max_bytes)
            ):
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= self._size(dropped)
                self.evictions += 1

    def clear(self) -> int:
        with self._lock:
            n = len(self._entries)
            self._entries.clear()
            self._bytes = 0
        return n

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Estimated bytes held."""
        return self._bytes


def _check_redis_url(url: str) -> str:
    if not isinstance(url, str):
        raise TypeError(f"cache_url must be a str, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(
            f"cache_url must be a Redis URL (redis://HOST:PORT/DB, rediss://... or unix://PATH), got {url!r}"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"cache_url names no host: {url!r}")
    return url


class RedisTier:
    """The shared tier: entries in Redis under ``<namespace>:<hex key>``, each with a TTL.

    Every call has short connect and socket timeouts and no retry. A failed call is counted in
    :attr:`errors`, logged (a warning when Redis becomes unreachable, once, and a line when it
    is back) and answered as "nothing found"/"not stored"; for ``retry_after`` seconds after a
    failure the tier is skipped, so a dead Redis costs one timeout, not one per request.

    Args:
        url: ``redis://HOST:PORT/DB`` (``rediss://`` for TLS, ``unix://PATH?db=N``); a password
            goes in the URL (``redis://:PASSWORD@HOST:PORT/0``).
        ttl: Seconds an entry lives (``None``: until Redis evicts it).
        timeout: Connect and read/write timeout of each call, in seconds.
        namespace: Key prefix (entries of other namespaces are never read or cleared).
        retry_after: Seconds the tier is skipped after a failure.
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        ttl: float | None = DEFAULT_CACHE_TTL_S,
        timeout: float = DEFAULT_REDIS_TIMEOUT_S,
        namespace: str = "qwen3-rerank",
        retry_after: float = DEFAULT_REDIS_RETRY_AFTER_S,
    ) -> None:
        self.url = _check_redis_url(url)
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0):
            raise ValueError(f"cache_ttl must be a positive number of seconds or None, got {ttl!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"cache_timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(namespace, str) or not namespace or any(c.isspace() for c in namespace):
            raise ValueError(f"namespace must be a non-empty string without spaces, got {namespace!r}")
        redis = require("redis", "cache", "The Redis score cache")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.ttl_ms = None if ttl is None else max(int(ttl * 1000), 1)
        self.namespace = namespace
        self.retry_after = retry_after
        self._error_types: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._down = False
        self.errors = 0

    def _key(self, key: bytes) -> str:
        return f"{self.namespace}:{key.hex()}"

    @property
    def available(self) -> bool:
        """False while the tier is skipped after a failure."""
        return time.monotonic() >= self._down_until

    def _failed(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            self._down_until = time.monotonic() + self.retry_after
            first = not self._down
            self._down = True
        if first:
            logger.warning(
                "Redis score cache at %s failed (%s: %s); scoring goes on without it, retrying every %gs",
                _safe_url(self.url),
                what,
                exc,
                self.retry_after,
            )

    def _succeeded(self) -> None:
        if self._down:
            with self._lock:
                was, self._down = self._down, False
            if was:
                logger.warning("Redis score cache at %s is reachable again", _safe_url(self.url))

    def get_many(self, keys: list[bytes]) -> dict[bytes, CachedScore]:
        """The entries found (nothing when Redis fails or is being skipped)."""
        if not keys or not self.available:
            return {}
        try:
            values = self._client.mget([self._key(k) for k in keys])
        except self._error_types as exc:
            self._failed("read", exc)
            return {}
        self._succeeded()
        found = {}
        for key, value in zip(keys, values, strict=True):
            if value is not None and len(value) == _VALUE.size:
                found[key] = CachedScore.unpack(value)
        return found

    def put_many(self, items: Mapping[bytes, CachedScore]) -> None:
        """Store entries (nothing when Redis fails or is being skipped)."""
        if not items or not self.available:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(self._key(key), value.pack(), px=self.ttl_ms)
            pipe.execute()
        except self._error_types as exc:
            self._failed("write", exc)
            return
        self._succeeded()

    def clear(self) -> int:
        """Delete every entry of this namespace; the number deleted (raises if Redis fails)."""
        n = 0
        batch: list[bytes] = []
        for key in self._client.scan_iter(match=f"{self.namespace}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                n += self._client.delete(*batch)
                batch = []
        if batch:
            n += self._client.delete(*batch)
        return n

    def close(self) -> None:
        self._client.close()


def _safe_url(url: str) -> str:
    """The URL without its password (for logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    return parts._replace(netloc=f"{parts.username or ''}:***@{netloc}").geturl()


class ScoreCache:
    """An exact score cache of (query, document) pairs: an in-process LRU and/or a shared Redis tier.

    Give one to the engine (``Reranker.from_pretrained(..., cache=ScoreCache(...))`` or
    ``reranker.with_cache(cache)``); rerankers that share it (``with_settings`` views, several
    loaded models) never share entries by mistake, since the key covers the weights and every
    setting the log-odds depend on.

    Args:
        max_entries: Most in-process entries (about :data:`ENTRY_BYTES` bytes each); ``0`` or
            ``None`` with no ``max_bytes``: no in-process tier.
        max_bytes: Most estimated bytes of the in-process tier.
        url: A Redis URL (``redis://HOST:PORT/DB``) for the shared tier; ``None``: none. Needs
            the ``[cache]`` extra.
        ttl: Seconds a Redis entry lives (default 7 days; ``None``: no expiry).
        timeout: Connect and read/write timeout of each Redis call (default 0.1 s).
        namespace: Prefix of the Redis keys.

    Example:
        >>> cache = ScoreCache(100_000)  # about 24 MB at most
        >>> shared = ScoreCache(10_000, url="redis://cache:6379/0")  # doctest: +SKIP
    """

    def __init__(
        self,
        max_entries: int | None = 100_000,
        *,
        max_bytes: int | None = None,
        url: str | None = None,
        ttl: float | None = DEFAULT_CACHE_TTL_S,
        timeout: float = DEFAULT_REDIS_TIMEOUT_S,
        namespace: str = "qwen3-rerank",
    ) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, (int, type(None))):
            raise TypeError(f"max_entries must be an int or None, got {type(max_entries).__name__}")
        if max_entries is not None and max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        entries = max_entries or None
        self.memory = MemoryTier(entries, max_bytes) if entries or max_bytes else None
        self.redis = (
            RedisTier(url, ttl=ttl, timeout=timeout, namespace=namespace) if url is not None else None
        )
        if self.memory is None and self.redis is None:
            raise ValueError("a ScoreCache needs max_entries, max_bytes or url (all are off)")
        self._counters = _Counters()

    @classmethod
    def build(cls, cache: ScoreCache | int | None, url: str | None = None) -> ScoreCache | None:
        """A cache from the library's ``cache=`` / ``cache_url=`` arguments.

        Args:
            cache: A :class:`ScoreCache` (used as is), a number of in-process entries (``0``:
                none), or ``None`` (none).
            url: A Redis URL for a shared tier (with an int or ``None`` ``cache``).

        Returns:
            The cache, or ``None`` when both are off.
        """
        if isinstance(cache, ScoreCache):
            if url is not None:
                raise ValueError("give cache_url to the ScoreCache itself (ScoreCache(..., url=...))")
            return cache
        if cache is not None and (isinstance(cache, bool) or not isinstance(cache, int)):
            raise TypeError(f"cache must be a ScoreCache, an int or None, got {type(cache).__name__}")
        if not cache and url is None:
            return None
        return cls(cache or 0, url=url)

    # -- lookups --------------------------------------------------------------------------------

    def get_many(self, keys: Iterable[bytes], *, all_or_nothing: bool = False) -> dict[bytes, CachedScore]:
        """The cached scores of ``keys`` (each key counted once as a hit or a miss).

        Redis hits are copied into the in-process tier. With ``all_or_nothing``, a lookup that
        misses any key returns nothing and counts nothing (the caller will look the keys up
        again when it scores them).
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[bytes, CachedScore] = {}
        from_memory = from_redis = 0
        if self.memory is not None:
            found = self.memory.get_many(wanted)
            from_memory = len(found)
        shared: dict[bytes, CachedScore] = {}
        if self.redis is not None and len(found) < len(wanted):
            shared = self.redis.get_many([k for k in wanted if k not in found])
            from_redis = len(shared)
            found.update(shared)
        if all_or_nothing and len(found) < len(wanted):
            return {}  # nothing counted, nothing copied: the caller's next lookup does both
        if shared and self.memory is not None:
            self.memory.put_many(shared)
        self._counters.add("hits.memory", from_memory)
        self._counters.add("hits.redis", from_redis)
        self._counters.add("misses", len(wanted) - len(found))
        return found

    def put_many(self, items: Mapping[bytes, CachedScore]) -> None:
        """Store freshly computed scores in every tier."""
        if not items:
            return
        self._counters.add("stores", len(items))
        if self.memory is not None:
            self.memory.put_many(items)
        if self.redis is not None:
            self.redis.put_many(items)

    def count_saved(self, pairs: int, tokens: int) -> None:
        """Record pairs (and their prompt tokens) answered without the model."""
        self._counters.add("pairs_saved", pairs)
        self._counters.add("tokens_saved", tokens)

    # -- management -----------------------------------------------------------------------------

    def clear(self, *, shared: bool = True) -> dict[str, int]:
        """Forget every entry: the in-process tier's and, with ``shared``, this namespace's in Redis.

        Returns:
            Entries removed per tier (``{"memory": n, "redis": m}``).

        Raises:
            redis.RedisError: Redis could not be cleared (the in-process tier is cleared anyway).
        """
        out = {}
        if self.memory is not None:
            out["memory"] = self.memory.clear()
        if shared and self.redis is not None:
            out["redis"] = self.redis.clear()
        return out

    def stats(self) -> dict[str, Any]:
        """Counters since start: hits per tier, misses, pairs and tokens saved, Redis errors, sizes."""
        c = self._counters.snapshot()
        out: dict[str, Any] = {
            "hits": {t: c.get(f"hits.{t}", 0) for t in self.tiers},
            "misses": c.get("misses", 0),
            "stores": c.get("stores", 0),
            "pairs_saved": c.get("pairs_saved", 0),
            "tokens_saved": c.get("tokens_saved", 0),
            "errors": {} if self.redis is None else {"redis": self.redis.errors},
        }
        if self.memory is not None:
            out["memory_entries"] = len(self.memory)
            out["memory_bytes"] = self.memory.bytes
            out["memory_evictions"] = self.memory.evictions
        return out

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tiers in use, nearest first (``"memory"``, ``"redis"``)."""
        return tuple(t.name for t in (self.memory, self.redis) if t is not None)

    def close(self) -> None:
        """Close the Redis connections (the cache still works in process)."""
        if self.redis is not None:
            self.redis.close()

    def __repr__(self) -> str:
        parts = []
        if self.memory is not None:
            parts.append(f"max_entries={self.memory.max_entries}, max_bytes={self.memory.max_bytes}")
        if self.redis is not None:
            parts.append(f"url={_safe_url(self.redis.url)!r}")
        return f"ScoreCache({', '.join(parts)})"
