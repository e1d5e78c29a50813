"""The response models of the HTTP service: what each endpoint answers, and every error.

The routes of :mod:`.app` declare them as ``response_model`` and error ``responses``; FastAPI
generates ``/openapi.json`` from them and from the request models of :mod:`.schemas`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "ERROR_DESCRIPTIONS",
    "ErrorResponse",
    "HealthDown",
    "HealthOk",
    "ModelList",
    "RankResponse",
    "Readiness",
    "RerankResponse",
    "TeiRerankResult",
]


class PromptTokensDetails(BaseModel):
    """OpenAI's (and vLLM's) ``usage.prompt_tokens_details``."""

    cached_tokens: int = Field(
        description="Of prompt_tokens, those of pairs answered from the score cache, not computed"
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class Tokens(BaseModel):
    input_tokens: int
    output_tokens: int


class InstructionMeta(BaseModel):
    """How the request's instruction was read."""

    source: Literal["template", "free_text", "default"]
    template: str | None = Field(description="The template's name, when one was used")
    text: str | None = Field(description="What the model read (null: the front end's default, unknown)")
    did_you_mean: str | None = Field(None, description="Free text that looks like this template's name")


class RerankMeta(BaseModel):
    tokens: Tokens
    instruction: InstructionMeta


class Span(BaseModel):
    """Character offsets, in the document's text, of the window that gave a long document its score."""

    start: int
    end: int


class RerankResult(BaseModel):
    index: int
    relevance_score: float = Field(description="P(yes) in [0, 1], or log-odds with raw_scores")
    span: Span | None = Field(None, description="With max_chunks_per_doc: the best window of a long document")
    document: dict[str, Any] | None = Field(
        None, description="With return_documents: {'text': ...} for a string, else the object sent"
    )


class RerankResponse(BaseModel):
    id: str
    model: str | None
    usage: Usage
    results: list[RerankResult]
    meta: RerankMeta


class TeiRerankResult(BaseModel):
    index: int
    score: float
    text: str | None = None


class RankResult(BaseModel):
    id: str | int
    index: int
    score: float
    band: Literal["high", "medium", "low"]
    span: Span | None = Field(None, description="With max_chunks_per_doc: the best window of a long document")


class FallbackInfo(BaseModel):
    retried_query: str | None
    used_query: str
    needs_review: bool


class RankMeta(BaseModel):
    instruction: InstructionMeta


class RankResponse(BaseModel):
    model: str | None
    results: list[RankResult]
    fallback: FallbackInfo | None = None
    meta: RankMeta


class HealthOk(BaseModel):
    status: Literal["ok"]
    model: str | None
    device: str
    dtype: str
    queue: int
    replica: str | None = Field(None, description="Under Ray Serve: the replica that answered")


class HealthDown(BaseModel):
    status: Literal["loading", "error"]
    error: str | None = None


class Readiness(BaseModel):
    """``GET /ready``: whether a request sent now would be admitted (for load balancers)."""

    ready: bool
    reason: Literal["loading", "error", "queue_full", "overloaded"] | None = Field(
        None, description="Why new work would be refused"
    )
    queue: int | None = Field(None, description="Requests waiting to be scored")
    estimated_wait_s: float | None = Field(
        None, description="Estimated wait before scoring (null until the first engine call is measured)"
    )
    max_queue_wait_s: float | None = Field(None, description="The service's max_queue_wait (null: no limit)")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every error: OpenAI's ``error`` object, and its message again as ``detail`` (Jina's clients)."""

    error: ErrorInfo
    detail: str


#: What each error status of the scoring endpoints means.
ERROR_DESCRIPTIONS = {
    400: "The body is empty, not UTF-8 or not valid JSON",
    401: "Authorization: Bearer <key> is missing or wrong",
    408: "The body did not arrive within the service's body timeout",
    413: "Too many documents, too large a body, or too many tokens",
    422: "A field is missing or invalid (error.param names it)",
    503: (
        "The model is loading or failed to load, the queue is full, the request would wait (or"
        " waited) past max_queue_wait or its X-Request-Timeout, or the service is shutting down"
    ),
}
