"""Process-wide sharing: :func:`get_reranker` gives one reranker per set of arguments.

The weights are shared more widely still: calls that differ only in scoring settings get
distinct rerankers over one loaded model, so a LlamaIndex postprocessor and a LangChain
compressor in one process load the model once. With ``base_url`` the reranker is a
:class:`~qwen3_rerank_plugins.remote.RemoteReranker` over a shared connection pool, and torch is
never imported: the engine and the device helpers are imported only when a local model is asked for.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .protocol import Scorer
from .settings import DEFAULT_MODEL, RerankerSettings

if TYPE_CHECKING:
    import torch

    from .cache import ScoreCache
    from .engine import Reranker
    from .remote import RemoteReranker

__all__ = ["clear_reranker_cache", "get_reranker", "loaded_with"]


@dataclass(frozen=True)
class _Weights:
    """Which weights were loaded: the arguments that decide them."""

    model: str
    device: str
    dtype: str
    source: str
    revision: str | None
    cache_dir: str | None
    attn_implementation: str | None
    modeling: str = "auto"


_models: dict[_Weights, Reranker] = {}
_rerankers: dict[tuple[Any, RerankerSettings], Scorer] = {}
_registry_lock = threading.Lock()
_loading_locks: dict[_Weights, threading.Lock] = {}


def get_reranker(
    model_name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    source: str = "auto",
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = "sdpa",
    modeling: str = "auto",
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | None = None,
    on_overload: str = "raise",
    cache: ScoreCache | int | None = None,
    cache_url: str | None = None,
    **settings: Any,
) -> Reranker | RemoteReranker:
    """A process-wide shared :class:`~qwen3_rerank_plugins.Reranker`: the same arguments give the same object.

    Calls that differ only in scoring settings (``max_length``, ``instruction``,
    ``batch_tokens``, ...) or in their score cache get distinct rerankers over one loaded model;
    calls with the same ``cache`` and ``cache_url`` share one cache.

    With ``base_url`` nothing is loaded here: the result is a shared
    :class:`~qwen3_rerank_plugins.remote.RemoteReranker` with the same scoring methods, backed by
    this project's service (``qwen3-rerank serve`` or its Ray Serve deployment).

    Args:
        model_name_or_path, device, dtype, source, revision, cache_dir, attn_implementation, modeling:
            As for :meth:`Reranker.from_pretrained` (``"demo"`` is the tiny random-weight demo
            model); they decide which weights are loaded.
        base_url: URL of this project's rerank service or its Ray Serve deployment to score on
            instead of a local model (needs the ``[server]`` extra for its HTTP client); the
            loading arguments are then ignored. For vLLM build
            ``RemoteReranker(url, model=..., prompt_format="vllm")`` instead.
        api_key: Bearer key of that service.
        timeout: Seconds one call to that service may take, retries included (``None``: the
            client's default, 60 s).
        on_overload: ``"raise"`` or ``"keep_order"`` when that service is overloaded (see
            :class:`~qwen3_rerank_plugins.remote.RemoteReranker`).
        cache, cache_url: An exact score cache, as for :meth:`Reranker.from_pretrained`: a
            number of in-process entries or a :class:`~qwen3_rerank_plugins.cache.ScoreCache`
            (``None``, the default: off), and a Redis URL for a shared tier (the ``[cache]``
            extra). Part of the shared reranker's identity. A remote reranker has none of its
            own (its service caches).
        **settings: Scoring settings as for :class:`Reranker` (for a remote reranker: those a
            client can choose, such as ``instruction`` and ``bands``).

    Example:
        >>> rr = get_reranker("Qwen/Qwen3-Reranker-0.6B")  # doctest: +SKIP
        >>> cached = get_reranker("Qwen/Qwen3-Reranker-0.6B", cache=100_000)  # doctest: +SKIP
        >>> remote = get_reranker(base_url="http://rerank:8000")  # doctest: +SKIP
    """
    if base_url is not None:
        if cache is not None or cache_url is not None:
            raise TypeError(
                "cache and cache_url apply to a local model; a remote service caches on its own side "
                "(qwen3-rerank serve --cache-size / --cache-url)"
            )
        return _get_remote(base_url, api_key, settings, timeout=timeout, on_overload=on_overload)
    if timeout is not None or on_overload != "raise":
        raise TypeError("timeout and on_overload apply to a remote service: pass base_url= too")
    from .device import resolve_device, resolve_precision  # torch: only for a local model
    from .engine import Reranker

    checked = RerankerSettings.from_kwargs(**settings)
    torch_device = resolve_device(device)
    precision = resolve_precision(dtype, torch_device)
    name = os.fspath(model_name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local.resolve())
    weights = _Weights(
        name,
        str(torch_device),
        precision.name,
        source,
        revision,
        None if cache_dir is None else os.fspath(cache_dir),
        attn_implementation,
        modeling,
    )
    key = (weights, checked, (cache or None, cache_url))
    with _registry_lock:
        if key in _rerankers:
            return _rerankers[key]  # type: ignore[return-value]
        # One lock per set of weights: loading (maybe a download) blocks only callers that
        # wait for the same model, never the whole registry.
        loading = _loading_locks.setdefault(weights, threading.Lock())
    with loading:
        with _registry_lock:
            if key in _rerankers:
                return _rerankers[key]  # type: ignore[return-value]
            base = _models.get(weights)
        from .cache import ScoreCache

        score_cache = ScoreCache.build(cache, cache_url)  # bad cache arguments fail before loading
        if base is not None:
            reranker = base.with_settings(**checked.as_dict())
        else:
            reranker = Reranker.from_pretrained(
                model_name_or_path,
                device=torch_device,
                dtype=precision.quantization or precision.dtype,
                source=source,
                revision=revision,
                cache_dir=cache_dir,
                attn_implementation=attn_implementation,
                modeling=modeling,
                **settings,
            )
        with _registry_lock:
            _models.setdefault(weights, reranker)  # without a cache: the base of every view
            if reranker._core.origin is None:
                reranker._core.origin = weights
        if score_cache is not None:
            reranker = reranker.with_cache(score_cache)
        with _registry_lock:
            return _rerankers.setdefault(key, reranker)  # type: ignore[return-value]


def _get_remote(
    base_url: str, api_key: str | None, settings: dict[str, Any], *, timeout: float | None, on_overload: str
) -> RemoteReranker:
    from .remote import RemoteReranker  # its HTTP client needs the [server] extra

    connection = ("remote", base_url.rstrip("/"), api_key, timeout, on_overload)
    options: dict[str, Any] = {"on_overload": on_overload}
    if timeout is not None:
        options["timeout"] = timeout
    with _registry_lock:
        base = _rerankers.get((connection, RerankerSettings()))
        if base is None:
            base = RemoteReranker(base_url, api_key=api_key, **options)
            _rerankers[(connection, RerankerSettings())] = base
    # with_settings names any setting that belongs to the server's model.
    view = base.with_settings(**settings) if settings else base
    with _registry_lock:
        return _rerankers.setdefault((connection, view.scoring_settings), view)  # type: ignore[return-value]


def loaded_with(reranker: Scorer) -> dict[str, str] | None:
    """The :func:`get_reranker` arguments that loaded ``reranker``'s weights, or ``None``.

    Known for weights that :func:`get_reranker` loaded with the default revision, cache,
    attention and modeling; an engine built by hand (``Reranker(model, tokenizer)``) has none.

    Returns:
        ``{"model", "device", "dtype", "source"}`` or ``None``.
    """
    weights = getattr(getattr(reranker, "_core", None), "origin", None)
    if not isinstance(weights, _Weights):
        return None
    defaults = (None, None, "sdpa", "auto")
    if (weights.revision, weights.cache_dir, weights.attn_implementation, weights.modeling) != defaults:
        return None
    return {
        "model": weights.model,
        "device": weights.device,
        "dtype": weights.dtype,
        "source": weights.source,
    }


def clear_reranker_cache() -> None:
    """Forget the shared rerankers (their memory is freed once no one else holds them)."""
    with _registry_lock:
        _rerankers.clear()
        _models.clear()
