"""Qwen3-Reranker as a one-line reranking step for RAG pipelines.

One engine (:class:`Reranker`) scores (query, document) pairs exactly as the model card does,
fast and in batches; thin adapters put it into LlamaIndex (``qwen3_rerank_plugins.llama_index``)
and LangChain (``qwen3_rerank_plugins.langchain``), and the ``qwen3-rerank`` command serves it
over HTTP.

Example:
    >>> from qwen3_rerank_plugins import get_reranker
    >>> rr = get_reranker("Qwen/Qwen3-Reranker-0.6B")  # doctest: +SKIP
    >>> rr.rerank("发票怎么开", ["【发票申请指南】点击申请开票", "退货流程"], top_n=1)  # doctest: +SKIP
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports name what __getattr__ exports)
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module that defines it. Imported on first use, so that
# ``import qwen3_rerank_plugins`` (and the torch-free modules under it: ``client``, ``remote``,
# ``templates``, ``fallback``) does not load torch.
_EXPORTS = {
    "DEFAULT_INSTRUCTION": "templates",
    "INSTRUCTION_TEMPLATES": "templates",
    "Band": "results",
    "ConfidenceBands": "results",
    "Document": "validation",
    "FallbackRerank": "results",
    "GroupScores": "protocol",
    "InputTooLongError": "validation",
    "InstructionTemplate": "templates",
    "ModelSourceError": "sources",
    "Qwen3RerankWarning": "notices",
    "RandomWeightsWarning": "notices",
    "UnknownTemplateWarning": "notices",
    "RerankAttempt": "results",
    "RerankResult": "results",
    "Reranker": "engine",
    "RerankerSettings": "settings",
    "ScoreCache": "cache",
    "ScoreGroup": "protocol",
    "Scorer": "protocol",
    "ScoringStopped": "protocol",
    "clear_reranker_cache": "registry",
    "generalize": "generalize",
    "get_reranker": "registry",
    "list_instruction_templates": "templates",
    "register_instruction_template": "templates",
    "rerank_with_fallback": "fallback",
    "resolve_device": "device",
    "resolve_dtype": "device",
    "resolve_instruction": "templates",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from .cache import ScoreCache
    from .device import resolve_device, resolve_dtype
    from .engine import Reranker
    from .fallback import rerank_with_fallback
    from .generalize import generalize
    from .notices import Qwen3RerankWarning, RandomWeightsWarning, UnknownTemplateWarning
    from .protocol import GroupScores, ScoreGroup, Scorer, ScoringStopped
    from .registry import clear_reranker_cache, get_reranker
    from .results import Band, ConfidenceBands, FallbackRerank, RerankAttempt, RerankResult
    from .settings import RerankerSettings
    from .sources import ModelSourceError
    from .templates import (
        DEFAULT_INSTRUCTION,
        INSTRUCTION_TEMPLATES,
        InstructionTemplate,
        list_instruction_templates,
        register_instruction_template,
        resolve_instruction,
    )
    from .validation import Document, InputTooLongError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


logging.getLogger(__name__).addHandler(logging.NullHandler())
