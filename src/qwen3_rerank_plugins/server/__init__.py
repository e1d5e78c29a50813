"""The HTTP rerank service (extra ``[server]``: FastAPI, uvicorn, prometheus-client).

Build the app with :func:`create_app` and run it with any ASGI server, or call :func:`serve`
(what ``qwen3-rerank serve`` does).

Example:
    >>> from qwen3_rerank_plugins import get_reranker
    >>> from qwen3_rerank_plugins.server import serve
    >>> serve(lambda: get_reranker("Qwen/Qwen3-Reranker-0.6B"), host="127.0.0.1", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import socket
from typing import Any

from .._optional import require

require("fastapi", "server", "The HTTP rerank service")
require("prometheus_client", "server", "The HTTP rerank service")

from ..server_defaults import (  # noqa: E402
    DEFAULT_GRACEFUL_TIMEOUT_S,
    DEFAULT_HOST,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PORT,
    ServiceConfig,
)
from .app import create_app  # noqa: E402
from .batcher import BatcherClosedError, MicroBatcher, QueueFullError, ScoredRequest  # noqa: E402
from .metrics import ServiceMetrics  # noqa: E402
from .schemas import RequestError  # noqa: E402
from .service import RerankService  # noqa: E402

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "BatcherClosedError",
    "MicroBatcher",
    "QueueFullError",
    "RequestError",
    "RerankService",
    "ScoredRequest",
    "ServiceConfig",
    "ServiceMetrics",
    "create_app",
    "serve",
]


def serve(
    reranker_or_factory: Any,
    config: ServiceConfig | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    graceful_timeout: float | None = DEFAULT_GRACEFUL_TIMEOUT_S,
    access_log: bool = True,
    **app_options: Any,
) -> None:
    """Run the service with uvicorn until SIGINT or SIGTERM, then shut down gracefully.

    In-flight requests finish (up to ``graceful_timeout`` seconds) and queued ones are scored
    before the process exits. Logging is left as the caller configured it.

    Args:
        reranker_or_factory: A loaded Reranker or a zero-argument callable that loads one (the
            server starts answering ``/health`` with 503 while it loads).
        host: Interface to bind; ``0.0.0.0`` to accept connections from other machines.
        port: TCP port.
        graceful_timeout: Seconds to wait for in-flight requests on shutdown (``None``: no limit).
        access_log: Log one line per request.
        config: The service's settings (:class:`ServiceConfig`; default: its defaults).
        **app_options: Settings that replace ``config``'s, as for :func:`create_app`
            (``api_key``, ``max_documents``, ``body_timeout``, ``max_request_tokens``, ...).
            uvicorn itself has no limit on how long a body may take; the app's
            ``body_timeout`` is that limit.

    Raises:
        OSError: The address cannot be listened on (in use, not this machine's, ...); raised
            before the model starts loading.
        Exception: Whatever loading the model raised, after the server has stopped.
    """
    uvicorn = require("uvicorn", "server", "The HTTP rerank service")
    sock = _listen(host, port)
    failures: list[BaseException] = []
    server: Any = None

    def stop_on_load_error(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(reranker_or_factory, config, on_load_error=stop_on_load_error, **app_options)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=access_log,
        timeout_graceful_shutdown=graceful_timeout,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failures:
        raise failures[0]


def _listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket up front, so a taken port fails at once, not after the model loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return sock
