"""The service's published contract: the JSON schemas behind ``/openapi.json``.

Requests are read as raw bytes and validated by hand (:mod:`.schemas`), so that the body limit
applies while reading and every error names its field in one sentence. The pydantic models here
are never used to validate; they *describe* what that code accepts and answers, for clients,
code generators and schema-driven fuzzers. A test runs schemathesis against the served
``/openapi.json`` with all of its checks, so the two cannot drift apart.

What a JSON schema cannot say, the descriptions do: an object document needs a ``text`` string
unless ``rank_fields`` is sent, and then it needs every field ``rank_fields`` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ErrorResponse",
    "RankRequest",
    "RerankRequest",
    "RerankResponse",
    "TeiRerankRequest",
    "build_openapi",
]

_REF = "#/components/schemas/{model}"

NonBlank = Annotated[str, Field(min_length=1, pattern=r"\S")]
#: Boolean fields also take these strings, in any case (RAGFlow's Xinference provider sends "true").
BooleanString = Annotated[str, Field(pattern=r"^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])$")]
Flag = bool | BooleanString | None
TokenCount = Annotated[int, Field(ge=1)]

_CACHE_FLAG = "false: score afresh, neither reading nor filling the score cache (default true)"


class _Open(BaseModel):
    """Unknown fields are accepted and ignored, as the servers these clients were written for do."""

    model_config = ConfigDict(extra="allow")


class DocumentObject(_Open):
    """A document as an object: read by its ``text``, or by the fields ``rank_fields`` names.

    Every field comes back whole in the result's ``document``.
    """

    text: str = Field(
        None,  # type: ignore[assignment]  # optional, but never null
        description="What the model reads; required unless rank_fields names the fields to read",
    )


_DOCUMENTS_DESCRIPTION = (
    "Strings, or objects read by their 'text' (required then) or by the fields rank_fields names "
    "(each object must have all of them)"
)


#: Without ``rank_fields``, an object document must have a ``text`` string.
_TEXT_UNLESS_RANK_FIELDS = {
    "if": {"required": ["rank_fields"], "properties": {"rank_fields": {"type": "array"}}},
    "else": {
        "properties": {
            "documents": {"items": {"anyOf": [{"type": "string"}, {"type": "object", "required": ["text"]}]}}
        }
    },
}


class RerankRequest(_Open):
    """``POST /v1/rerank``: the rerank request of Cohere (v1 and v2), Jina, vLLM and Infinity."""

    model_config = ConfigDict(extra="allow", json_schema_extra=_TEXT_UNLESS_RANK_FIELDS)

    query: NonBlank
    documents: list[str | DocumentObject] = Field(min_length=1, description=_DOCUMENTS_DESCRIPTION)
    model: Any = Field(None, description="Accepted and ignored: the service serves one model")
    top_n: Annotated[int, Field(ge=0)] | None = Field(None, description="Keep the best N; 0 or null: all")
    return_documents: Flag = Field(None, description="Echo each document in its result (default true)")
    raw_scores: Flag = Field(None, description="Report log-odds instead of P(yes) (Infinity's field)")
    instruction: NonBlank | None = Field(
        None, description="A template name (see `qwen3-rerank templates`) or free text; null: the default"
    )
    rank_fields: Annotated[list[str], Field(min_length=1)] | None = Field(
        None,
        description="Cohere v1: the object fields the model reads, in order (one field: its value; "
        "several: 'name: value' lines)",
    )
    max_tokens_per_doc: TokenCount | None = Field(
        None, description="Cut each document to this many tokens (the template is never cut)"
    )
    max_tokens_per_query: TokenCount | None = Field(
        None, description="Cut the instruction + query to this many tokens"
    )
    truncate_prompt_tokens: Literal[-1] | TokenCount | None = Field(
        None, description="vLLM's field: accepted; prompts are cut to the service's max_length"
    )
    max_chunks_per_doc: TokenCount | None = Field(
        None,
        description="Cohere v1: read a document longer than the budget in up to this many overlapping "
        "windows; it scores by its best window, whose character span comes back as `span`",
    )
    cache: Flag = Field(None, description=_CACHE_FLAG)


class TeiRerankRequest(_Open):
    """``POST /rerank`` in the shape of text-embeddings-inference: ``texts`` instead of ``documents``.

    TEI's ``truncate`` and ``truncation_direction`` are accepted and ignored (documents are cut from
    their end to fit); ``top_n``, which TEI ignores, keeps the best N here.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"not": {"required": ["documents"]}})

    query: NonBlank
    texts: list[str] = Field(min_length=1)
    raw_scores: Flag = Field(None, description="Report log-odds instead of P(yes)")
    return_text: Flag = Field(None, description="Echo each text in its result")
    instruction: NonBlank | None = None
    top_n: Annotated[int, Field(ge=0)] | None = None
    max_tokens_per_doc: TokenCount | None = None
    max_tokens_per_query: TokenCount | None = None


class RankDocument(_Open):
    """A ``/rank`` record: its ``id`` comes back with its score."""

    id: str | int | None = Field(None, description="Echoed in the result; default: the position")
    text: str


class RankRequest(_Open):
    """``POST /rank``: ``{id, text}`` records ranked with scores and confidence bands."""

    query: NonBlank
    documents: list[str | RankDocument] = Field(min_length=1)
    top_n: Annotated[int, Field(ge=0)] | None = None
    instruction: NonBlank | None = None
    fallback: Flag = Field(None, description="Retry a low-confidence query generalized (default false)")
    max_tokens_per_doc: TokenCount | None = None
    max_tokens_per_query: TokenCount | None = None
    max_chunks_per_doc: TokenCount | None = Field(
        None, description="Read long documents in up to this many windows (see /v1/rerank)"
    )


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


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


class HealthDown(BaseModel):
    status: Literal["loading", "error"]
    error: str | None = None


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


_ERRORS = {
    400: "The body is empty, not UTF-8 or not valid JSON",
    401: "Authorization: Bearer <key> is missing or wrong",
    408: "The body did not arrive within the service's body timeout",
    413: "Too many documents, too large a body, or too many tokens",
    422: "A field is missing or invalid (error.param names it)",
    503: "The model is loading or failed to load, the queue is full, or the service is shutting down",
}


@dataclass(frozen=True)
class _Operation:
    request: Any = None  # a model, or a JSON schema
    ok: Any = None
    errors: tuple[int, ...] = ()
    auth: bool = True
    media_type: str = "application/json"
    extra: Mapping[int, tuple[str, Any]] | None = None


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


_SCORING_ERRORS = (400, 408, 413, 422, 503)
_OPERATIONS: dict[tuple[str, str], _Operation] = {
    ("/v1/rerank", "post"): _Operation(RerankRequest, RerankResponse, _SCORING_ERRORS),
    ("/v2/rerank", "post"): _Operation(RerankRequest, RerankResponse, _SCORING_ERRORS),
    ("/rerank", "post"): _Operation(
        {"anyOf": [_ref(RerankRequest), _ref(TeiRerankRequest)]},
        {"anyOf": [_ref(RerankResponse), {"type": "array", "items": _ref(TeiRerankResult)}]},
        _SCORING_ERRORS,
    ),
    ("/rank", "post"): _Operation(RankRequest, RankResponse, _SCORING_ERRORS),
    ("/health", "get"): _Operation(
        ok=HealthOk, auth=False, extra={503: ("The model is loading or failed to load", HealthDown)}
    ),
    ("/v1/models", "get"): _Operation(ok=ModelList),
    ("/metrics", "get"): _Operation(ok={"type": "string"}, auth=False, media_type="text/plain"),
}
_MODELS: tuple[type[BaseModel], ...] = (
    RerankRequest,
    TeiRerankRequest,
    RankRequest,
    RerankResponse,
    TeiRerankResult,
    RankResponse,
    HealthOk,
    HealthDown,
    ModelList,
    ErrorResponse,
)


def _schema(value: Any) -> dict[str, Any]:
    return _ref(value) if isinstance(value, type) else value


def component_schemas(*, max_documents: int) -> dict[str, Any]:
    """The JSON schema of every request and response model, as ``components.schemas``."""
    from pydantic.json_schema import models_json_schema

    _, top = models_json_schema([(model, "validation") for model in _MODELS], ref_template=_REF)
    schemas: dict[str, Any] = top.get("$defs", {})
    for name, field in (
        ("RerankRequest", "documents"),
        ("TeiRerankRequest", "texts"),
        ("RankRequest", "documents"),
    ):
        schemas[name]["properties"][field]["maxItems"] = max_documents
        schemas[name]["properties"][field]["description"] = (
            schemas[name]["properties"][field].get("description", "")
            + f" (at most {max_documents}; more is answered 413)"
        ).lstrip()
    return schemas


def build_openapi(base: dict[str, Any], *, api_key: bool, max_documents: int) -> dict[str, Any]:
    """Complete FastAPI's generated document with the real request and response schemas.

    Args:
        base: What ``fastapi.openapi.utils.get_openapi`` made of the app's routes (paths,
            summaries, operation ids); changed in place and returned.
        api_key: Whether the service requires ``Authorization: Bearer <key>`` (declared as the
            ``bearerAuth`` security scheme on every endpoint but ``/health`` and ``/metrics``).
        max_documents: The service's limit, published as ``maxItems``.

    Returns:
        The OpenAPI document.
    """
    components = base.setdefault("components", {})
    components["schemas"] = component_schemas(max_documents=max_documents)
    if api_key:
        components["securitySchemes"] = {
            "bearerAuth": {"type": "http", "scheme": "bearer", "description": "serve --api-key"}
        }
    for (path, method), spec in _OPERATIONS.items():
        operation = base.get("paths", {}).get(path, {}).get(method)
        if operation is None:
            continue
        if spec.request is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": _schema(spec.request)}},
            }
        responses: dict[str, Any] = {
            "200": {"description": "OK", "content": {spec.media_type: {"schema": _schema(spec.ok)}}}
        }
        errors = (*spec.errors, 401) if api_key and spec.auth else spec.errors
        for status in sorted(errors):
            responses[str(status)] = {
                "description": _ERRORS[status],
                "content": {"application/json": {"schema": _ref(ErrorResponse)}},
            }
        for status, (description, model) in (spec.extra or {}).items():
            responses[str(status)] = {
                "description": description,
                "content": {"application/json": {"schema": _schema(model)}},
            }
        operation["responses"] = responses
        if api_key and spec.auth:
            operation["security"] = [{"bearerAuth": []}]
    return base
