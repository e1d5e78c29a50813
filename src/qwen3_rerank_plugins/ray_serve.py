"""Serving on Ray Serve (extra ``[ray]``): replicas of the engine behind one HTTP endpoint.

Each replica loads the model once and answers the service's HTTP schema (``POST /v1/rerank``,
also ``/rerank`` with text-embeddings-inference's ``texts`` and ``/v2/rerank``; ``POST /rank``
with its ``fallback`` flag; ``GET /health``; ``GET /v1/models``), with requests read, checked and
answered by the same code as ``qwen3-rerank serve`` (:mod:`qwen3_rerank_plugins.server.handlers`),
so every client of the plain service works unchanged. Ray routes requests to the replicas;
within a replica, concurrent requests are merged by ``@serve.batch`` into one engine call per
instruction (merging is exact: the engine groups pairs by query and reuses each query's prefix
cache).

Replicas: one per GPU (``num_gpus_per_replica=1``, the default when CUDA is present), or N CPU
replicas; fixed (``replicas=N``) or autoscaled between ``replicas`` and ``max_replicas`` on
ongoing requests per replica.

Three ways to start it:

* ``qwen3-rerank serve --ray --replicas 2`` (the command line calls :func:`serve_ray`);
* ``serve run qwen3_rerank_plugins.ray_serve:app_builder model=Qwen/Qwen3-Reranker-0.6B replicas=2``
  (Ray's own command, or ``import_path`` of a RayService manifest; see :func:`app_builder`);
* from Python: ``serve.run(build_app("Qwen/Qwen3-Reranker-0.6B", replicas=2))``.

Example:
    >>> from qwen3_rerank_plugins.ray_serve import serve_ray
    >>> serve_ray("Qwen/Qwen3-Reranker-0.6B", replicas=4, host="0.0.0.0", port=8000)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

from ._optional import require

ray = require("ray", "ray", "Serving on Ray Serve")
serve = require("ray.serve", "ray", "Serving on Ray Serve")
require("starlette", "ray", "Serving on Ray Serve")

from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse  # noqa: E402

from .cache import DEFAULT_CACHE_TTL_S  # noqa: E402
from .results import ConfidenceBands  # noqa: E402
from .server.batcher import ScoredRequest, ScoreRequest, score_requests  # noqa: E402
from .server.handlers import check_bearer, rank_response, read_json, rerank_response  # noqa: E402
from .server.schemas import RequestError, error_body  # noqa: E402
from .server_defaults import (  # noqa: E402
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_CACHE_SIZE,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_DOCUMENTS,
    DEFAULT_RAY_MAX_BATCH_SIZE,
)
from .settings import DEFAULT_MAX_LENGTH  # noqa: E402
from .validation import check_positive_int  # noqa: E402

__all__ = ["RerankDeployment", "app_builder", "build_app", "serve_ray"]

logger = logging.getLogger(__name__)

DEFAULT_APP_NAME = "qwen3-rerank"
_RERANK_PATHS = frozenset({"/v1/rerank", "/rerank", "/v2/rerank"})


class RerankDeployment:
    """One replica: a loaded engine answering the service's HTTP schema.

    Wrapped by ``serve.deployment`` in :func:`build_app`; not meant to be created directly.

    Args:
        model: Hub id or local directory (loaded with :func:`~qwen3_rerank_plugins.get_reranker`).
        device, dtype, source, max_length, instruction: As for the engine.
        bands: ``(high, medium)`` cut-offs of the ``/rank`` bands.
        api_key: Require ``Authorization: Bearer <api_key>`` on scoring endpoints.
        max_documents: Most documents per request (413 beyond).
        max_body_bytes: Largest request body (413 beyond).
        max_batch_size: Most requests ``@serve.batch`` merges into one engine call.
        batch_wait_ms: How long a batch waits for more requests.
        model_name: Name reported by the API (default: the model's).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        source: str = "auto",
        max_length: int = DEFAULT_MAX_LENGTH,
        instruction: str | None = None,
        bands: tuple[float, float] = (ConfidenceBands.high, ConfidenceBands.medium),
        api_key: str | None = None,
        max_documents: int = DEFAULT_MAX_DOCUMENTS,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_batch_size: int = DEFAULT_RAY_MAX_BATCH_SIZE,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        model_name: str | None = None,
        cache_size: int = DEFAULT_CACHE_SIZE,
        cache_url: str | None = None,
        cache_ttl: float | None = DEFAULT_CACHE_TTL_S,
    ) -> None:
        from .cache import ScoreCache
        from .registry import get_reranker

        settings = {"instruction": instruction} if instruction is not None else {}
        self.reranker = get_reranker(
            model, device=device, dtype=dtype, source=source, max_length=max_length, **settings
        )
        if cache_size or cache_url is not None:
            # Each replica its own in-process tier; a cache_url is shared by all of them.
            self.reranker = self.reranker.with_cache(ScoreCache(cache_size, url=cache_url, ttl=cache_ttl))
        self.bands = ConfidenceBands(*bands)
        self.api_key = api_key
        self.max_documents = max_documents
        self.max_body_bytes = max_body_bytes
        self.model_name = model_name or self.reranker.model_name
        self.created = int(time.time())
        self._score.set_max_batch_size(max_batch_size)
        self._score.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)
        self.replica = _replica_id()
        logger.info(
            "Replica %s serving %s on %s (%s)",
            self.replica,
            self.model_name,
            self.reranker.device,
            str(self.reranker.dtype).removeprefix("torch."),
        )

    # -- HTTP -----------------------------------------------------------------------------------

    async def __call__(self, request: Request) -> JSONResponse:
        """Route one HTTP request; every refusal is a JSON error with a 4xx/5xx status."""
        try:
            path, method = request.url.path.rstrip("/") or "/", request.method
            if method == "GET" and path == "/health":
                return JSONResponse(self._health())
            if method == "GET" and path == "/v1/models":
                self._check_auth(request)
                return JSONResponse(self._models())
            if method == "POST" and path in _RERANK_PATHS:
                self._check_auth(request)
                body = await read_json(request, self.max_body_bytes)
                payload = await rerank_response(
                    body,
                    path=path,
                    score=self._scored,
                    max_documents=self.max_documents,
                    model_name=self.model_name,
                    default_instruction=self.reranker.instruction,
                )
                return JSONResponse(payload)
            if method == "POST" and path == "/rank":
                self._check_auth(request)
                body = await read_json(request, self.max_body_bytes)
                payload = await rank_response(
                    body,
                    score=self._scored,
                    bands=self.bands,
                    max_documents=self.max_documents,
                    model_name=self.model_name,
                    default_instruction=self.reranker.instruction,
                )
                return JSONResponse(payload)
            raise RequestError(f"no endpoint {method} {path}", status_code=404, type="not_found")
        except RequestError as exc:
            body = error_body(exc.message, status_code=exc.status_code, param=exc.param, type=exc.type)
            return JSONResponse(body, status_code=exc.status_code, headers=exc.headers or None)

    def _health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.model_name,
            "device": str(self.reranker.device),
            "dtype": str(self.reranker.dtype).removeprefix("torch."),
            "replica": self.replica,
        }

    def _models(self) -> dict[str, Any]:
        model = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "qwen"}
        return {"object": "list", "data": [model]}

    def _check_auth(self, request: Request) -> None:
        check_bearer(request.headers.get("authorization"), self.api_key)

    async def _scored(
        self, query: str, texts: list[str], instruction: str | None, count_tokens: bool, /, **limits: Any
    ) -> tuple[list[float], int | None, list[tuple[int, int] | None] | None]:
        outcome = await self._score(ScoreRequest(query, texts, instruction, count_tokens, **limits))
        if isinstance(outcome, (ValueError, TypeError)):
            raise RequestError(str(outcome), status_code=422, param=getattr(outcome, "param", None))
        if isinstance(outcome, Exception):
            logger.error("scoring failed: %s: %s", type(outcome).__name__, outcome)
            raise RequestError(
                f"scoring failed: {type(outcome).__name__}: {outcome}", status_code=500, type="internal_error"
            )
        return outcome.logits, outcome.total_tokens, outcome.spans

    # -- batching -------------------------------------------------------------------------------

    @serve.batch(max_batch_size=DEFAULT_RAY_MAX_BATCH_SIZE, batch_wait_timeout_s=DEFAULT_BATCH_WAIT_MS / 1000)
    async def _score(self, requests: list[ScoreRequest]) -> list[ScoredRequest | Exception]:
        """Concurrent requests of this replica, merged into one engine call (across queries)."""
        return await asyncio.to_thread(score_requests, self.reranker, requests)


def _replica_id() -> str:
    """This replica's id in Ray Serve, or ``"local"`` outside a replica (e.g. in a unit test)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # Ray raises RayServeException outside a replica
        return "local"


def _resources(device: str, num_cpus: float | None, num_gpus: float | None) -> dict[str, float]:
    if num_gpus is None:
        import torch

        num_gpus = 1.0 if device != "cpu" and torch.cuda.is_available() else 0.0
    if num_cpus is None:
        num_cpus = 1.0
    if num_gpus < 0 or num_cpus < 0:
        raise ValueError(f"num_cpus and num_gpus per replica must be >= 0, got {num_cpus} and {num_gpus}")
    return {"num_cpus": num_cpus, "num_gpus": num_gpus}


def build_app(
    model: str,
    *,
    replicas: int | None = None,
    max_replicas: int | None = None,
    target_ongoing_requests: float = 8.0,
    num_cpus_per_replica: float | None = None,
    num_gpus_per_replica: float | None = None,
    max_ongoing_requests: int = 64,
    max_queued_requests: int | None = None,
    graceful_shutdown_timeout_s: float | None = None,
    access_log: bool = True,
    **options: Any,
) -> Any:
    """The Ray Serve application: the deployment with its replicas, resources and autoscaling.

    Args:
        model: Hub id or local directory; every replica loads it.
        replicas: Replicas to run (the minimum when autoscaling). Default: one per GPU of the
            cluster when replicas take a GPU, else 1.
        max_replicas: Autoscale between ``replicas`` and ``max_replicas`` on ongoing requests.
        target_ongoing_requests: Ongoing requests per replica the autoscaler aims at.
        num_cpus_per_replica: CPUs reserved per replica (default 1).
        num_gpus_per_replica: GPUs per replica; default 1 when CUDA is present and the device
            is not ``"cpu"``, else 0. Fractions pack several replicas on one GPU.
        max_ongoing_requests: Requests a replica accepts at once before Ray queues them.
        max_queued_requests: Most requests Ray queues for the replicas before it answers 503
            (default: no limit).
        graceful_shutdown_timeout_s: Seconds a stopping replica lets in-flight requests finish
            (default: Ray Serve's).
        access_log: Whether replicas log one line per request.
        **options: :class:`RerankDeployment` arguments (``device``, ``dtype``, ``api_key``,
            ``max_batch_size``, ``batch_wait_ms``, ``bands``, ...).

    Returns:
        A ``ray.serve.Application`` for ``serve.run``.

    Raises:
        ValueError: A replica count or resource out of range.
    """
    resources = _resources(options.get("device", "auto"), num_cpus_per_replica, num_gpus_per_replica)
    if replicas is None:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
        replicas = max(1, int(gpus / resources["num_gpus"])) if resources["num_gpus"] and gpus else 1
    check_positive_int(replicas, "replicas")
    config: dict[str, Any] = {"ray_actor_options": resources, "max_ongoing_requests": max_ongoing_requests}
    if max_queued_requests is not None:
        config["max_queued_requests"] = max_queued_requests
    if graceful_shutdown_timeout_s is not None:
        config["graceful_shutdown_timeout_s"] = graceful_shutdown_timeout_s
    if not access_log:
        config["logging_config"] = {"enable_access_log": False}
    if max_replicas is not None:
        if not isinstance(max_replicas, int) or max_replicas < replicas:
            raise ValueError(f"max_replicas must be an int >= replicas ({replicas}), got {max_replicas!r}")
        config["autoscaling_config"] = {
            "min_replicas": replicas,
            "initial_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
        }
    else:
        config["num_replicas"] = replicas
    deployment = serve.deployment(RerankDeployment, name="Qwen3Reranker", **config)
    return deployment.bind(model, **options)


def app_builder(args: Mapping[str, str]) -> Any:
    """Build the application from ``key=value`` strings, for ``serve run`` and RayService.

    Keys: ``model`` (required), ``replicas``, ``max_replicas``, ``num_cpus_per_replica``,
    ``num_gpus_per_replica``, ``device``, ``dtype``, ``source``, ``max_length``, ``instruction``,
    ``api_key`` (default: ``$QWEN3_RERANK_API_KEY``), ``max_documents``, ``max_batch_size``,
    ``batch_wait_ms``, ``max_queued_requests``, ``graceful_shutdown_timeout_s``.

    Example:
        ``serve run qwen3_rerank_plugins.ray_serve:app_builder model=Qwen/Qwen3-Reranker-0.6B replicas=2``
    """
    args = dict(args)
    if "model" not in args:
        raise ValueError("app_builder needs model=<hub id or directory>")
    ints = (
        "replicas",
        "max_replicas",
        "max_length",
        "max_documents",
        "max_batch_size",
        "max_queued_requests",
    )
    floats = (
        "num_cpus_per_replica",
        "num_gpus_per_replica",
        "batch_wait_ms",
        "target_ongoing_requests",
        "graceful_shutdown_timeout_s",
    )
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        try:
            kwargs[key] = int(value) if key in ints else float(value) if key in floats else value
        except ValueError:
            kind = "an integer" if key in ints else "a number"
            raise ValueError(f"{key} must be {kind}, got {value!r}") from None
    kwargs.setdefault("api_key", os.environ.get("QWEN3_RERANK_API_KEY") or None)
    return build_app(kwargs.pop("model"), **kwargs)


def serve_ray(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | None = None,
    num_cpus: int | None = None,
    app_name: str = DEFAULT_APP_NAME,
    **app_options: Any,
) -> None:
    """Start (or join) a Ray cluster, serve the application over HTTP, and block until stopped.

    SIGINT or SIGTERM stops the application and, when this call started Ray, Ray itself.

    Args:
        model: Hub id or local directory.
        host: Interface Ray Serve's HTTP proxy binds (``0.0.0.0`` for other machines).
        port: TCP port of the proxy.
        address: Ray cluster to join (``"auto"``: the local one); ``None`` starts a local cluster.
        num_cpus: CPUs of a local cluster started here (default: all).
        app_name: Name of the Serve application.
        **app_options: Passed to :func:`build_app` (``replicas``, ``max_replicas``,
            ``num_gpus_per_replica``, ``device``, ``api_key``, ...).
    """
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(model, **app_options), name=app_name, route_prefix="/")
        logger.info("Serving %s on Ray Serve at http://%s:%d", model, host, port)
        stop.wait()
        logger.info("Stopping the Ray Serve application")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        serve.shutdown()
        if started_ray:
            ray.shutdown()
