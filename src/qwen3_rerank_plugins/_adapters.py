"""What the framework adapters share: the fields that choose and tune their engine.

The LlamaIndex postprocessor and the LangChain compressor / cross-encoder are pydantic models
that inherit :class:`EngineSettings`. It turns their ``model`` / ``device`` / ``dtype`` /
``source`` fields into an engine from :func:`~qwen3_rerank_plugins.get_reranker` (so adapters
with equal model arguments share one loaded model), or takes an existing engine as
``reranker=``. No framework is imported here, and no torch: an adapter with ``base_url=`` runs
in a thin client process without it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .protocol import Scorer
from .registry import get_reranker, loaded_with
from .results import FallbackRerank, RerankResult, ranked_order
from .server_defaults import api_key_from_env
from .settings import DEFAULT_MODEL
from .templates import InstructionTemplate, resolve_instruction

__all__ = [
    "DEFAULT_MODEL",
    "LOAD_FIELDS",
    "RERANKED_KEY",
    "SPAN_KEY",
    "EngineSettings",
    "FallbackSetting",
    "span_metadata",
]

logger = logging.getLogger(__name__)

#: Fields that choose which weights are loaded (and the score cache put in front of them); they
#: cannot apply to a reranker passed in.
LOAD_FIELDS = ("model", "device", "dtype", "source", "cache", "cache_url")
# The score cache's fields: a local model's (a remote service caches on its own side).
_CACHE_FIELDS = ("cache", "cache_url")
# Fields that are engine settings: applied over the engine with ``with_settings``.
_ENGINE_OVERRIDES = ("max_length", "batch_tokens", "long_documents", "max_doc_tokens", "max_query_tokens")
# Of those, the ones a remote service takes per request (the others belong to the server's model).
_REMOTE_OVERRIDES = ("long_documents", "max_doc_tokens", "max_query_tokens")
#: Metadata key of the ``{"start", "end"}`` span of a long document's best window.
SPAN_KEY = "match_span"
#: Metadata key set to ``False`` on what ``on_overload="keep_order"`` returned unreranked.
RERANKED_KEY = "reranked"


class EngineSettings(BaseModel):
    """Fields shared by the adapters: which engine, with what settings."""

    model_config = ConfigDict(
        arbitrary_types_allowed=True,
        extra="forbid",
        use_attribute_docstrings=True,
    )

    model: str | None = DEFAULT_MODEL
    """Hub id (``"Qwen/Qwen3-Reranker-4B"``) or local directory of a Qwen3-Reranker."""
    base_url: str | None = None
    """URL of a rerank service to score on instead of a local model: this project's
    ``qwen3-rerank serve`` or its Ray Serve deployment (the server applies the prompt template).
    For vLLM pass ``reranker=RemoteReranker(url, model=..., prompt_format="vllm")`` instead.
    ``model``, ``device``, ``dtype`` and ``source`` are then ignored."""
    api_key: str | None = Field(default=None, exclude=True, repr=False)
    """Bearer key of the ``base_url`` service (default: ``$QWEN3_RERANK_API_KEY``); never serialised."""
    reranker: Scorer | None = Field(default=None, exclude=True)
    """An existing engine (a :class:`~qwen3_rerank_plugins.Reranker`, a
    :class:`~qwen3_rerank_plugins.remote.RemoteReranker`, or anything else that satisfies the
    :class:`~qwen3_rerank_plugins.protocol.Scorer` protocol) to use instead of loading one from
    ``model``. Cannot be combined with
    ``model``, ``device``, ``dtype`` or ``source``; never serialised."""
    instruction: str | InstructionTemplate | None = None
    """Instruction template name (e.g. ``"similar_ticket"``), free English text, or ``None`` for
    the engine's default (the model card's instruction unless the engine was given another)."""
    device: str = "auto"
    """``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"``."""
    dtype: str = "auto"
    """``"auto"``, ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
    source: str = "auto"
    """Where to get the weights: ``"auto"``, ``"local"``, ``"huggingface"`` or ``"modelscope"``."""
    max_length: int | None = Field(default=None, gt=0)
    """Maximum prompt tokens per (query, document) pair; ``None`` keeps the engine's (8192 for a
    new one). Only the document is truncated, never the template."""
    batch_tokens: int | None = Field(default=None, gt=0)
    """Token budget of one forward pass; ``None`` keeps the engine's device default."""
    long_documents: bool | None = None
    """Read a document longer than the budget in overlapping windows and score it by its best
    window (its character span lands in the result's metadata as ``match_span``); ``None`` keeps
    the engine's setting (off: the model card's truncation)."""
    max_doc_tokens: int | None = Field(default=None, gt=0)
    """Cut each document to this many tokens (``None``: only ``max_length`` limits it)."""
    max_query_tokens: int | None = Field(default=None, gt=0)
    """Cut the query to this many tokens, keeping room for the document (``None``: a query that
    leaves no room for any document is an error)."""
    timeout: float | None = Field(default=None, gt=0)
    """Seconds one call to the ``base_url`` service may take, retries and ``Retry-After`` waits
    included (``None``: the client's 60 s). Only with ``base_url``."""
    cache: int | None = Field(default=None, ge=0)
    """Exact score cache: in-process entries (about 240 bytes each) kept of pairs already scored,
    so a repeated (query, document) pair is answered without the model; ``None`` or ``0``: off.
    Adapters with the same model, settings and cache share one cache. Not with ``base_url``
    (the service caches) or ``reranker=`` (use ``reranker.with_cache(n)``)."""
    cache_url: str | None = Field(default=None, exclude=True, repr=False)
    """``redis://HOST:PORT/DB``: a score-cache tier shared by every process (needs the
    ``[cache]`` extra); only hashes and scores are stored there, never text. Like ``api_key``,
    it is left out of the adapter's repr and serialisation (it may carry a password)."""

    _engine: Scorer = PrivateAttr()

    @field_validator("model", mode="before")
    @classmethod
    def _path_to_str(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("device", "dtype", mode="before")
    @classmethod
    def _torch_to_str(cls, value: Any) -> Any:
        torch = sys.modules.get("torch")  # a torch object exists only once torch is loaded
        if torch is None:
            return value
        if isinstance(value, torch.device):
            return str(value)
        if isinstance(value, torch.dtype):
            return str(value).removeprefix("torch.")
        return value

    @field_validator("instruction")
    @classmethod
    def _check_instruction(cls, value: str | InstructionTemplate | None) -> str | InstructionTemplate | None:
        resolve_instruction(value)  # raises on an empty instruction, before any document is scored
        return value

    @model_validator(mode="after")
    def _attach_engine(self) -> EngineSettings:
        overrides = {
            name: getattr(self, name) for name in _ENGINE_OVERRIDES if getattr(self, name) is not None
        }
        if self.base_url is None and self.timeout is not None:
            raise ValueError("timeout= applies to a base_url= service (a reranker= has its own timeout)")
        if self.base_url is not None:
            server_side = {"reranker", *_CACHE_FIELDS, *(n for n in overrides if n not in _REMOTE_OVERRIDES)}
            clashing = sorted(
                server_side & {n for n in self.model_fields_set if getattr(self, n) is not None}
            )
            if clashing:
                raise ValueError(
                    f"base_url= scores on a remote service; {', '.join(clashing)}= cannot apply to it "
                    "(set the model's settings where the service runs)"
                )
            api_key = self.api_key or api_key_from_env()
            remote = get_reranker(base_url=self.base_url, api_key=api_key, timeout=self.timeout)
            # The caps a service takes per request ride on each request.
            self._engine = remote.with_settings(**overrides) if overrides else remote
        elif self.reranker is not None:
            clashing = sorted(set(LOAD_FIELDS) & self.model_fields_set)
            if clashing:
                cached = set(_CACHE_FIELDS) & set(clashing)
                hint = " (for a score cache, pass reranker.with_cache(n))" if cached else ""
                raise ValueError(
                    f"pass either reranker= or {', '.join(clashing)}=, not both: "
                    f"the reranker's model is already loaded{hint}"
                )
            # Other settings over the same loaded weights.
            self._engine = self.reranker.with_settings(**overrides) if overrides else self.reranker
        elif self.model is None:
            raise ValueError(
                "model is None: this configuration was saved from an engine passed as reranker=, "
                "which is not serialised; pass that engine again as reranker= "
                "(e.g. Qwen3Rerank.from_dict(data, reranker=engine))"
            )
        else:
            self._engine = get_reranker(
                self.model,
                device=self.device,
                dtype=self.dtype,
                source=self.source,
                cache=self.cache or None,
                cache_url=self.cache_url,
                **overrides,
            )
        logger.debug("%s uses %r", type(self).__name__, self._engine)
        return self

    @property
    def engine(self) -> Scorer:
        """The engine that does the scoring: a local :class:`~qwen3_rerank_plugins.Reranker`, or a
        :class:`~qwen3_rerank_plugins.remote.RemoteReranker` with ``base_url``."""
        return self._engine

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle the configuration, never the model: unpickling gets the engine from ``get_reranker``."""
        config = {
            name: getattr(self, name) for name, field in type(self).model_fields.items() if not field.exclude
        }
        return (_rebuild, (type(self), {**config, **self.saved_fields()}))

    def saved_fields(self) -> dict[str, Any]:
        """Field values a saved configuration needs besides the serialised fields.

        The engine (``reranker=``) and other objects are never serialised; this returns what
        stands for them (see :meth:`engine_fields`).
        """
        return self.engine_fields()

    def engine_fields(self) -> dict[str, Any]:
        """Field values that stand for ``reranker=`` in a saved configuration.

        Empty for an adapter built from model arguments: its own fields already re-create its
        engine through ``get_reranker``. For one built on ``reranker=`` (which is never
        serialised): the arguments that loaded the engine's weights (``model`` is ``None`` when
        they are unknown, e.g. for an engine built by hand) and the engine's effective
        ``max_length``, ``batch_tokens`` and, unless set here, ``instruction``, so that scores
        stay the same.
        """
        if self.reranker is None:
            return {}
        base_url = getattr(self._engine, "base_url", None)
        if base_url is not None:  # a remote backend: its URL stands for it
            fields = {"model": None, "base_url": base_url}
            if self.instruction is None:
                fields["instruction"] = self._engine.settings()["instruction"]
            return fields
        fields: dict[str, Any] = loaded_with(self._engine) or {"model": None}
        fields["max_length"] = self._engine.max_length
        fields["batch_tokens"] = self._engine.batch_tokens
        if self.instruction is None:
            fields["instruction"] = self._engine.instruction
        return fields


def _rebuild(cls: type[EngineSettings], config: dict[str, Any]) -> EngineSettings:
    return cls(**config)


class FallbackSetting(EngineSettings):
    """:class:`EngineSettings` plus the ``fallback`` field, for the adapters that rerank."""

    fallback: bool | Callable[[str], str] = Field(default=False, exclude=True)
    """When the best score is in the low band, rewrite the query more generally and rerank
    again, keeping the better attempt: ``True`` uses the rule-based
    :func:`~qwen3_rerank_plugins.fallback.generalize`, or pass any ``str -> str`` callable."""
    on_overload: Literal["raise", "keep_order"] = "raise"
    """What to do when a remote service is overloaded (503 or 429 past the retries, or no answer
    within ``timeout``): ``"raise"`` the error, or ``"keep_order"``: return the retrieved items
    in their input order, cut to ``top_n``, marked ``metadata["reranked"] = False``, and log a
    WARNING, so a chatbot keeps answering with the retriever's order."""

    def saved_fields(self) -> dict[str, Any]:
        """As :meth:`EngineSettings.saved_fields`, plus ``fallback=True`` when it is set.

        A custom rewrite function is code and is not saved: pass it again when loading.
        """
        fields = super().saved_fields()
        if self.fallback is True:
            fields["fallback"] = True
        elif self.fallback:
            logger.debug("fallback=%r is a function and is not saved with the configuration", self.fallback)
        return fields

    def _generalizer(self) -> Callable[[str], str] | None:
        return None if self.fallback is True else self.fallback  # type: ignore[return-value]

    def _rerank(
        self, query: str, texts: list[str], **kwargs: Any
    ) -> tuple[list[RerankResult], FallbackRerank | None]:
        """Results best first (or, on overload with ``keep_order``, unreranked in input order)."""
        try:
            if not self.fallback:
                return self._engine.rerank(query, texts, **kwargs), None
            outcome = self._engine.rerank_with_fallback(
                query, texts, generalize=self._generalizer(), **kwargs
            )
        except RuntimeError as exc:
            return self._kept_order(exc, texts, kwargs.get("top_n")), None
        return list(outcome.results), outcome

    async def _arerank(
        self, query: str, texts: list[str], **kwargs: Any
    ) -> tuple[list[RerankResult], FallbackRerank | None]:
        try:
            if not self.fallback:
                return await self._engine.arerank(query, texts, **kwargs), None
            outcome = await self._engine.arerank_with_fallback(
                query, texts, generalize=self._generalizer(), **kwargs
            )
        except RuntimeError as exc:
            return self._kept_order(exc, texts, kwargs.get("top_n")), None
        return list(outcome.results), outcome

    def _kept_order(self, exc: RuntimeError, texts: list[str], top_n: int | None) -> list[RerankResult]:
        """The items unreranked in input order, cut to ``top_n``, for an overloaded service.

        Re-raises ``exc`` unless ``on_overload="keep_order"`` and the error says the service is
        overloaded (:class:`~qwen3_rerank_plugins.client.RerankServiceError` ``.overloaded``).
        """
        if self.on_overload != "keep_order" or not getattr(exc, "overloaded", False):
            raise exc
        logger.warning(
            "%s: the rerank service is overloaded (%s); keeping the retriever's order of %d items%s",
            type(self).__name__,
            exc,
            len(texts),
            "" if top_n is None else f", cut to top_n={top_n}",
        )
        keep = ranked_order([0.0] * len(texts), top_n)  # input order, cut as a ranking is
        nan = float("nan")
        return [RerankResult(index=i, score=nan, logit=nan, document=texts[i], reranked=False) for i in keep]


def span_metadata(result: RerankResult) -> dict[str, Any]:
    """``{"match_span": {"start", "end"}}`` for a result scored by a window, else ``{}``.

    The offsets index the text that was scored (for LlamaIndex: the node's embed-mode content).
    """
    if result.span is None:
        return {}
    return {SPAN_KEY: {"start": result.span[0], "end": result.span[1]}}
