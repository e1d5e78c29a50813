"""Where model files come from: a local directory, the Hugging Face hub, or ModelScope.

Every path ends in a local directory that is checked to be a Qwen3 causal LM before any weight
is loaded, so a wrong checkpoint fails with a message instead of producing random scores.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from .notices import RandomWeightsWarning, warn_once

__all__ = ["MODEL_FILE_PATTERNS", "ModelSourceError", "resolve_model_dir", "validate_model_dir"]

logger = logging.getLogger(__name__)

SOURCES = ("auto", "local", "huggingface", "modelscope")

#: Files needed to score; optimizer states, ONNX exports and the like are skipped.
MODEL_FILE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.txt",
    "*.model",
    "*.tiktoken",
]


class ModelSourceError(OSError):
    """The model could not be found or downloaded from any of the sources tried."""


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _huggingface_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _modelscope_endpoint() -> str:
    endpoint = os.environ.get("MODELSCOPE_ENDPOINT") or os.environ.get("MODELSCOPE_DOMAIN") or "modelscope.cn"
    return endpoint if "://" in endpoint else f"https://{endpoint}"


def _host_unreachable(endpoint: str) -> str | None:
    """Why ``endpoint``'s host surely cannot be reached, or ``None`` if it may be.

    A host name that does not resolve (and no proxy that could resolve it for us) is a definite
    "offline": the hub clients would otherwise retry with back-off for half a minute.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    host = urlparse(endpoint).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError) as exc:
        return f"cannot resolve {host} ({exc})"
    return None


def _snapshot_function(source: str):
    """The ``snapshot_download`` of a hub's client library (both take the same arguments)."""
    if source == "huggingface":
        from huggingface_hub import snapshot_download

        return snapshot_download
    try:
        from modelscope import snapshot_download
    except ImportError as exc:  # modelscope is a core dependency; a broken install should say so
        raise ModelSourceError(
            "ModelScope download requested but the 'modelscope' package cannot be imported "
            f"({exc}); reinstall it with `pip install modelscope`"
        ) from exc
    return snapshot_download


def _download(
    source: str, repo_id: str, revision: str | None, cache_dir: str | None, local_files_only: bool = False
) -> Path:
    snapshot_download = _snapshot_function(source)
    return Path(
        snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=MODEL_FILE_PATTERNS,
            local_files_only=local_files_only,
        )
    )


#: Model names that stand for the random-weight demo checkpoint (:mod:`qwen3_rerank_plugins.demo`),
#: built locally: for trying the pipeline offline; its scores are meaningless.
DEMO_MODELS = {"demo": "tiny", "demo-tiny": "tiny", "demo-0.6b": "0.6b"}

_ENDPOINTS = {"huggingface": _huggingface_endpoint, "modelscope": _modelscope_endpoint}


def resolve_model_dir(
    model: str | os.PathLike[str],
    source: str = "auto",
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[Path, str]:
    """Find or download the model and return its local directory.

    ``source="auto"`` uses an existing local directory if ``model`` is one; otherwise it tries the
    Hugging Face hub, then ModelScope, and logs which one served the files. Downloads are cached
    by the hub libraries, so the second start needs no network. A hub whose host name does not
    resolve (no network, no proxy) is not retried: only its local cache is looked at, so an
    offline start fails (or falls back) in about a second. The default source can be set
    with the environment variable ``QWEN3_RERANK_SOURCE`` (e.g. ``modelscope`` in mainland China).

    Args:
        model: Hub id such as ``"Qwen/Qwen3-Reranker-0.6B"``, a local directory, or ``"demo"``
            for the tiny random-weight demo model (built locally, meaningless scores, a warning).
        source: ``"auto"``, ``"local"``, ``"huggingface"`` or ``"modelscope"``.
        revision: Branch, tag or commit on the hub.
        cache_dir: Download cache location (the hub library's default when ``None``).

    Returns:
        ``(directory, source_used)``.

    Raises:
        ValueError: For an unknown ``source``.
        ModelSourceError: If no source could provide the model; the message lists each attempt
            and what to do.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a hub id or a directory path, got {type(model).__name__}")
    if source == "auto":
        source = os.environ.get("QWEN3_RERANK_SOURCE", "auto") or "auto"
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(map(repr, SOURCES))}, got {source!r}")
    name = os.fspath(model)
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    local = Path(name).expanduser()

    if name in DEMO_MODELS and source == "auto" and not local.is_dir():
        from .demo import demo_model_dir

        path = demo_model_dir(DEMO_MODELS[name])
        notice = (
            f"model {name!r} is the demo model: tiny and built locally with RANDOM weights, so its scores "
            "are MEANINGLESS (it only shows the pipeline working offline); pass a hub id or a local "
            "directory of Qwen3-Reranker for real scores"
        )
        logger.warning("%s", notice)
        warn_once(RandomWeightsWarning, name, notice)  # seen with no logging set up, once per name
        return path, "demo"

    if source == "local" or (source == "auto" and local.is_dir()):
        if not local.is_dir():
            raise ModelSourceError(f"model directory {name!r} does not exist (source='local')")
        logger.info("Loading %s from local directory %s", local.name, local.resolve())
        return local.resolve(), "local"

    if not _looks_like_hub_id(name):
        raise ModelSourceError(
            f"{name!r} is neither an existing directory nor a hub id like 'Qwen/Qwen3-Reranker-0.6B'"
        )

    order = ["huggingface", "modelscope"] if source == "auto" else [source]
    failures: list[str] = []
    for candidate in order:
        offline = _host_unreachable(_ENDPOINTS[candidate]())
        if offline:
            logger.info("%s is unreachable (%s); looking in its local cache only", candidate, offline)
        try:
            path = _download(candidate, name, revision, cache, local_files_only=bool(offline))
        except Exception as exc:
            # Offline, the hub client's own advice (e.g. "pass local_files_only=False") misleads.
            reason = f"{offline}, and no copy in its local cache" if offline else str(exc)
            logger.warning("Could not get %s from %s: %s", name, candidate, reason)
            failures.append(f"{candidate}: {type(exc).__name__}: {reason}")
            continue
        logger.info("Loading %s from %s (%s)", name, candidate, path)
        return path, candidate

    tried = "\n  ".join(failures)
    raise ModelSourceError(
        f"Could not get model {name!r}. Tried:\n  {tried}\n"
        "What to do: check the network or proxy; in mainland China use source='modelscope' "
        "(or QWEN3_RERANK_SOURCE=modelscope); set HF_ENDPOINT to a mirror; or download the model "
        "once elsewhere and pass its local directory."
    )


def validate_model_dir(path: Path) -> dict:
    """Check that ``path`` holds a Qwen3 causal LM checkpoint with a tokenizer.

    Returns:
        The parsed ``config.json``.

    Raises:
        ValueError: If the directory is not a Qwen3 causal LM (for instance a sequence-classification
            conversion, or another model family), or lacks weights or tokenizer files.
    """
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json: it is not a Hugging Face model directory")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc

    model_type = config.get("model_type")
    architectures = config.get("architectures") or []
    if model_type != "qwen3":
        raise ValueError(
            f"{path} holds a {model_type!r} model; a Qwen3-Reranker checkpoint (model_type 'qwen3', "
            "Qwen3ForCausalLM) is required"
        )
    if any("SequenceClassification" in arch for arch in architectures):
        raise ValueError(
            f"{path} is a sequence-classification conversion ({', '.join(architectures)}). This engine "
            "scores with the causal-LM head (yes/no logits); load the original Qwen/Qwen3-Reranker-* "
            "checkpoint instead."
        )
    if architectures and "Qwen3ForCausalLM" not in architectures:
        raise ValueError(f"{path} declares architectures {architectures}; Qwen3ForCausalLM is required")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ValueError(f"{path} has no weight files (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json or vocab.json + merges.txt)")
    return config
