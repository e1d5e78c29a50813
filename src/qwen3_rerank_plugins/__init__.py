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

import logging

from .device import resolve_device, resolve_dtype
from .engine import Document, Reranker, clear_reranker_cache, get_reranker
from .fallback import FallbackRerank, RerankAttempt, generalize, rerank_with_fallback
from .results import Band, ConfidenceBands, RerankResult
from .sources import ModelSourceError
from .templates import (
    DEFAULT_INSTRUCTION,
    INSTRUCTION_TEMPLATES,
    InstructionTemplate,
    list_instruction_templates,
    register_instruction_template,
    resolve_instruction,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_INSTRUCTION",
    "INSTRUCTION_TEMPLATES",
    "Band",
    "ConfidenceBands",
    "Document",
    "FallbackRerank",
    "InstructionTemplate",
    "ModelSourceError",
    "RerankAttempt",
    "RerankResult",
    "Reranker",
    "__version__",
    "clear_reranker_cache",
    "generalize",
    "get_reranker",
    "list_instruction_templates",
    "register_instruction_template",
    "rerank_with_fallback",
    "resolve_device",
    "resolve_dtype",
    "resolve_instruction",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
