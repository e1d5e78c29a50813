"""Serving on Ray Serve (extra ``[ray]``): replicas of the service behind one HTTP endpoint.

Each replica runs the same FastAPI app as ``qwen3-rerank serve`` (:func:`~qwen3_rerank_plugins.
server.create_app`, mounted with ``serve.ingress``): every endpoint, limit, metric and error of the
plain service, with its own :class:`~qwen3_rerank_plugins.server.MicroBatcher` merging that
replica's concurrent requests into few engine calls (merging is exact). ``GET /health`` also names
the replica that answered; ``GET /metrics`` is the answering replica's. Ray routes requests to
the replicas.

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

import logging
import signal
import threading
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from ._optional import require

ray = require("ray", "ray", "Serving on Ray Serve")
serve = require("ray.serve", "ray", "Serving on Ray Serve")
require("fastapi", "ray", "Serving on Ray Serve")

from .protocol import precision_name  # noqa: E402
from .results import ConfidenceBands  # noqa: E402
from .server import create_app  # noqa: E402
from .server_defaults import ServiceConfig, api_key_from_env  # noqa: E402
from .settings import DEFAULT_MAX_LENGTH  # noqa: E402
from .validation import check_positive_int  # noqa: E402

__all__ = ["RerankDeployment", "app_builder", "build_app", "serve_ray"]

logger = logging.getLogger(__name__)

DEFAULT_APP_NAME = "qwen3-rerank"
_SERVICE_OPTIONS = frozenset(f.name for f in fields(ServiceConfig))


class RerankDeployment:
    """One replica: the model loaded once, served by the plain service's FastAPI app.

    Wrapped by ``serve.ingress`` and ``serve.deployment`` in :func:`build_app`; not meant to be
    created directly.

    Args:
        model: Hub id or local directory (loaded with :func:`~qwen3_rerank_plugins.get_reranker`).
        config: The service's settings (the same for every replica).
        **engine: Engine settings for :func:`~qwen3_rerank_plugins.get_reranker` (``device``,
            ``dtype``, ``source``, ``max_length``, ``instruction``, ``long_documents``, ...).
    """

    def __init__(self, model: str, *, config: ServiceConfig | None = None, **engine: Any) -> None:
        from .registry import get_reranker

        engine.setdefault("max_length", DEFAULT_MAX_LENGTH)
        self.reranker = get_reranker(model, **engine)
        self.config = config or ServiceConfig()
        self.replica = _replica_id()
        logger.info(
            "Replica %s serving %s on %s (%s)",
            self.replica,
            self.config.model_name or self.reranker.model_name,
            self.reranker.device,
            precision_name(self.reranker),
        )

    def __serve_build_asgi_app__(self) -> Any:
        """The replica's app (Ray Serve calls this after the constructor and runs its lifespan)."""
        app = create_app(self.reranker, self.config)
        app.state.service.replica = self.replica
        return app


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
    config: ServiceConfig | None = None,
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
        config: The service's settings (:class:`~qwen3_rerank_plugins.server_defaults.ServiceConfig`).
        **options: Engine settings of :class:`RerankDeployment` (``device``, ``dtype``, ``source``,
            ``max_length``, ``instruction``, ``long_documents``, ...), and service settings that
            replace ``config``'s (``api_key``, ``max_documents``, ``max_batch_pairs``,
            ``batch_wait_ms``, ``bands`` as a ``ConfidenceBands`` or ``(high, medium)``, ...).

    Returns:
        A ``ray.serve.Application`` for ``serve.run``.

    Raises:
        ValueError: A replica count, resource or service setting out of range.
        TypeError: An unknown option.
    """
    service = {name: options.pop(name) for name in list(options) if name in _SERVICE_OPTIONS}
    if isinstance(service.get("bands"), (tuple, list)):
        service["bands"] = ConfidenceBands(*service["bands"])
    config = (config or ServiceConfig()).with_options(**service)
    resources = _resources(options.get("device", "auto"), num_cpus_per_replica, num_gpus_per_replica)
    if replicas is None:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 0
        replicas = max(1, int(gpus / resources["num_gpus"])) if resources["num_gpus"] and gpus else 1
    check_positive_int(replicas, "replicas")
    ray_config: dict[str, Any] = {
        "ray_actor_options": resources,
        "max_ongoing_requests": max_ongoing_requests,
    }
    if max_queued_requests is not None:
        ray_config["max_queued_requests"] = max_queued_requests
    if graceful_shutdown_timeout_s is not None:
        ray_config["graceful_shutdown_timeout_s"] = graceful_shutdown_timeout_s
    if not access_log:
        ray_config["logging_config"] = {"enable_access_log": False}
    if max_replicas is not None:
        if not isinstance(max_replicas, int) or max_replicas < replicas:
            raise ValueError(f"max_replicas must be an int >= replicas ({replicas}), got {max_replicas!r}")
        ray_config["autoscaling_config"] = {
            "min_replicas": replicas,
            "initial_replicas": replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
        }
    else:
        ray_config["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress()(RerankDeployment), name="Qwen3Reranker", **ray_config)
    return deployment.bind(model, config=config, **options)


def app_builder(args: Mapping[str, str]) -> Any:
    """Build the application from ``key=value`` strings, for ``serve run`` and RayService.

    Keys: ``model`` (required), ``replicas``, ``max_replicas``, ``num_cpus_per_replica``,
    ``num_gpus_per_replica``, ``device``, ``dtype``, ``source``, ``max_length``, ``instruction``,
    ``api_key`` (default: ``$QWEN3_RERANK_API_KEY``), ``max_documents``, ``max_body_bytes``,
    ``body_timeout``, ``max_request_tokens``, ``max_batch_pairs``, ``batch_wait_ms``,
    ``max_queue``, ``max_queue_wait`` (seconds; 0: no limit), ``model_name``, ``max_queued_requests``,
    ``graceful_shutdown_timeout_s``.

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
        "max_body_bytes",
        "max_request_tokens",
        "max_batch_pairs",
        "max_queue",
        "max_queued_requests",
        "cache_size",
    )
    floats = (
        "num_cpus_per_replica",
        "num_gpus_per_replica",
        "batch_wait_ms",
        "target_ongoing_requests",
        "graceful_shutdown_timeout_s",
        "body_timeout",
        "cache_ttl",
        "max_queue_wait",
    )
    kwargs: dict[str, Any] = {}
    for key, value in args.items():
        try:
            kwargs[key] = int(value) if key in ints else float(value) if key in floats else value
        except ValueError:
            kind = "an integer" if key in ints else "a number"
            raise ValueError(f"{key} must be {kind}, got {value!r}") from None
    if kwargs.get("max_queue_wait") == 0:
        kwargs["max_queue_wait"] = None
    kwargs.setdefault("api_key", api_key_from_env())
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
