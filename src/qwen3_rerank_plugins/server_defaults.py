"""Defaults of the HTTP service, stated once for the plain server, Ray Serve and the CLI.

Plain Python (no FastAPI), so the command line can show them in ``--help`` without importing
the server.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BATCH_WAIT_MS",
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_GRACEFUL_TIMEOUT_S",
    "DEFAULT_HOST",
    "DEFAULT_MAX_BATCH_PAIRS",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_DOCUMENTS",
    "DEFAULT_MAX_QUEUE",
    "DEFAULT_MAX_REQUEST_TOKENS",
    "DEFAULT_PORT",
    "DEFAULT_RAY_MAX_BATCH_SIZE",
    "DEFAULT_UI_PORT",
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
#: Most (query, document) pairs the plain server's batcher merges into one engine call.
DEFAULT_MAX_BATCH_PAIRS = 256
#: Most requests waiting to be scored (503 beyond).
DEFAULT_MAX_QUEUE = 1024
#: Most requests one Ray Serve replica merges with ``@serve.batch``.
DEFAULT_RAY_MAX_BATCH_SIZE = 16
#: Seconds a stopping server gives requests in flight.
DEFAULT_GRACEFUL_TIMEOUT_S = 30.0
#: Seconds a request's body may take to arrive, from its headers on (408 beyond).
DEFAULT_BODY_TIMEOUT_S = 30.0
#: Most prompt tokens one request may make the model read, summed over its documents (413 beyond).
DEFAULT_MAX_REQUEST_TOKENS = 1_000_000
#: Entries of the service's in-process score cache (about 240 bytes each: ~24 MB); 0 turns it off.
DEFAULT_CACHE_SIZE = 100_000
