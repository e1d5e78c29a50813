"""The request models of the HTTP service: they validate each body and publish its schema.

Each body is one pydantic model, which is both the route's parameter (FastAPI validates the
body with it and generates ``/openapi.json`` from it) and the validator: a model's
``mode="before"`` validator checks the body in the order a client reads it and refuses the first
problem in one short sentence naming the exact field (``documents[3]``, ``top_n``); the
``RequestValidationError`` handler of :mod:`.app` answers it in the same error shape for every
endpoint:

.. code-block:: json

    {"error": {"message": "documents[3] must be a string or an object with a 'text' string, got number",
               "type": "invalid_request_error", "param": "documents[3]", "code": 422},
     "detail": "documents[3] must be a string or an object with a 'text' string, got number"}

(``detail`` repeats the message for clients written for Jina's API, which raise ``resp["detail"]``.)
Unknown fields are ignored, so clients written for Cohere, Jina, vLLM, Infinity or TEI can send their
usual extras (``user``, ``truncation_direction``, ...). Boolean fields also take the strings
``"true"`` / ``"false"`` in any case, as the servers those clients were written for do.

What a JSON schema cannot say, the descriptions do: an object document needs a ``text`` string
unless ``rank_fields`` is sent, and then it needs every field ``rank_fields`` names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException

from ..protocol import ScoreGroup
from ..validation import document_text, json_type

__all__ = [
    "INVALID_REQUEST",
    "DocumentObject",
    "RankDocument",
    "RankRequest",
    "RequestError",
    "RerankRequest",
    "TeiRerankRequest",
    "check_document_count",
    "error_body",
    "parse_json_body",
]

#: The pydantic error type of a refusal made by a model's own validator (its context holds
#: ``param``, ``status`` and ``kind``).
INVALID_REQUEST = "invalid_request"


class RequestError(HTTPException):
    """A request the service refuses; becomes a JSON error response.

    Attributes:
        status_code: HTTP status (400 malformed JSON, 413 too large, 422 invalid field, ...).
        message: One sentence naming the field and what is wrong.
        param: The offending field (``"documents[2]"``), or ``None``.
        type: Machine-readable error kind.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 422,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code, detail=message, headers=dict(headers or {}) or None)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.type = type
        self.headers = dict(headers or {})


def error_body(message: str, *, status_code: int, param: str | None = None, type: str) -> dict[str, Any]:
    """The JSON body of every error response: OpenAI-style ``{"error": {...}}`` plus Jina's ``detail``."""
    return {
        "error": {"message": message, "type": type, "param": param, "code": status_code},
        "detail": message,
    }


_SURROGATE = re.compile("[\ud800-\udfff]")
_NON_BLANK = re.compile(r"\S")  # what the published schema's ``pattern`` says, in Python's dialect
_BOOLEAN_STRINGS = {"true": True, "false": False}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object.

    Anything that cannot be decoded (empty, not UTF-8, malformed, nested too deeply, an integer of
    more digits than Python converts, ``NaN``) is a 400; a string that is not valid Unicode (a lone
    surrogate such as ``"\\ud800"``) is a 422 naming its field, since it could neither be tokenised
    nor echoed back.
    """
    if not raw.strip():
        raise RequestError("request body is empty; send a JSON object", status_code=400, type="invalid_json")
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise RequestError(f"request body is not UTF-8: {exc}", status_code=400, type="invalid_json") from exc
    except json.JSONDecodeError as exc:
        raise RequestError(
            f"request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
            status_code=400,
            type="invalid_json",
        ) from exc
    except RecursionError as exc:
        raise RequestError(
            "request body is not valid JSON: it is nested too deeply", status_code=400, type="invalid_json"
        ) from exc
    except ValueError as exc:  # an integer literal beyond Python's int-digit limit, NaN, Infinity
        reason = str(exc).split(";")[0]  # not Python's advice to the server's operator
        raise RequestError(
            f"request body is not valid JSON: {reason}", status_code=400, type="invalid_json"
        ) from exc
    if not isinstance(body, dict):
        raise RequestError(
            f"request body must be a JSON object, got {json_type(body)}", status_code=422, param=None
        )
    _check_unicode(body)
    return body


def _check_unicode(body: dict[str, Any]) -> None:
    """Refuse a string (a value or a field name) holding a lone surrogate, naming where it is."""
    stack: list[tuple[str | None, Any]] = [(None, body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise _surrogate_error(path, value, is_key=False)
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key in value:
                if _SURROGATE.search(key):
                    raise _surrogate_error(path, key, is_key=True)
            stack.extend(
                (key if path is None else f"{path}.{key}", item) for key, item in reversed(value.items())
            )


def _surrogate_error(path: str | None, text: str, *, is_key: bool) -> RequestError:
    found = _SURROGATE.search(text)
    assert found is not None
    code = f"\\u{ord(found.group()):04x}"
    if is_key:
        where = "the request body" if path is None else path
        what = f"a field name in {where}"
    else:
        what = str(path)
    return RequestError(
        f"{what} holds a lone surrogate ({code} at position {found.start()}), which is not valid "
        "Unicode text; send UTF-8 (a character beyond U+FFFF is escaped as a surrogate pair)",
        param=path,
    )


def _query(body: Mapping[str, Any]) -> str:
    if "query" not in body or body["query"] is None:
        raise RequestError("query is required", param="query")
    query = body["query"]
    if not isinstance(query, str):
        raise RequestError(f"query must be a string, got {json_type(query)}", param="query")
    if not _NON_BLANK.search(query):
        raise RequestError("query must not be empty", param="query")
    return query


def _integer(value: Any) -> int | None:
    """``value`` as an int when it is a JSON integer (``2.0`` included, as JSON Schema counts it)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def _top_n(body: Mapping[str, Any]) -> int | None:
    """``top_n``: absent, null or 0 (vLLM's default) mean every document."""
    value = body.get("top_n")
    if value is None:
        return None
    top_n = _integer(value)
    if top_n is None:
        raise RequestError(
            f"top_n must be a non-negative integer (0: all), got {json_type(value)}", param="top_n"
        )
    if top_n < 0:
        raise RequestError(f"top_n must be a non-negative integer (0: all), got {top_n}", param="top_n")
    return top_n or None


def _token_cap(body: Mapping[str, Any], name: str) -> int | None:
    """A positive token count, or absent / null for the service's setting."""
    value = body.get(name)
    if value is None:
        return None
    count = _integer(value)
    if count is None or count < 1:
        got = json_type(value) if count is None else str(count)
        raise RequestError(f"{name} must be a positive integer (tokens), got {got}", param=name)
    return count


def _truncate_prompt_tokens(body: Mapping[str, Any]) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: ``-1`` (the model's limit) or a positive count."""
    value = body.get("truncate_prompt_tokens")
    if value is None:
        return None
    count = _integer(value)
    if count is None or count == 0 or count < -1:
        got = json_type(value) if count is None else str(count)
        raise RequestError(
            f"truncate_prompt_tokens must be -1 or a positive integer, got {got}",
            param="truncate_prompt_tokens",
        )
    return count


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    """A boolean field; the strings ``"true"`` / ``"false"`` (any case) count, nothing else does."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, str) and value.lower() in _BOOLEAN_STRINGS:
        return _BOOLEAN_STRINGS[value.lower()]
    if not isinstance(value, bool):
        got = repr(value) if isinstance(value, str) else json_type(value)
        raise RequestError(f"{name} must be true or false, got {got:.60}", param=name)
    return value


def _instruction(body: Mapping[str, Any]) -> str | None:
    value = body.get("instruction")
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(
            f"instruction must be a template name or free text, got {json_type(value)}", param="instruction"
        )
    if not _NON_BLANK.search(value):
        raise RequestError("instruction must not be empty; leave it out for the default", param="instruction")
    return value


def _document_list(body: Mapping[str, Any], field: str) -> list[Any]:
    if field not in body or body[field] is None:
        raise RequestError(f"{field} is required: a non-empty list of documents", param=field)
    docs = body[field]
    if not isinstance(docs, list):
        raise RequestError(f"{field} must be a list, got {json_type(docs)}", param=field)
    if not docs:
        raise RequestError(f"{field} must not be empty", param=field)
    return docs


def check_document_count(count: int, field: str, max_documents: int) -> None:
    """Refuse a request with more documents than the service takes (413 naming ``field``)."""
    if count > max_documents:
        raise RequestError(
            f"{field} has {count} entries; this service accepts at most {max_documents} per request",
            status_code=413,
            param=field,
            type="too_many_documents",
        )


def _text_of(doc: Any, label: str) -> str:
    """The text of one document (:func:`~qwen3_rerank_plugins.validation.document_text`'s rule)."""
    try:
        return document_text(doc, label, wire=True)
    except (TypeError, ValueError) as exc:
        raise RequestError(str(exc), param=getattr(exc, "param", label)) from None


def _rank_fields(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    value = body.get("rank_fields")
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestError(
            f"rank_fields must be a list of field names, got {json_type(value)}", param="rank_fields"
        )
    if not value:
        raise RequestError(
            "rank_fields must name at least one field; leave it out for 'text'", param="rank_fields"
        )
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise RequestError(
                f"rank_fields[{i}] must be a field name (string), got {json_type(name)}",
                param=f"rank_fields[{i}]",
            )
    return tuple(value)


def _field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _ranked_text(doc: Any, label: str, rank_fields: tuple[str, ...] | None) -> str:
    """What the model reads of one ``/v1/rerank`` document (Cohere's ``rank_fields`` semantics).

    A string is read as it is. An object is read by its ``text`` field, or, with ``rank_fields``,
    by the named fields in their order: one field alone as its value, several as ``name: value``
    lines (non-string values written as JSON).
    """
    if rank_fields is None or not isinstance(doc, dict):
        return _text_of(doc, label)
    if "text" in doc and not isinstance(doc["text"], str):
        raise RequestError(
            f"{label}.text must be a string, got {json_type(doc['text'])}", param=f"{label}.text"
        )
    for name in rank_fields:
        if name not in doc:
            raise RequestError(
                f"{label} has no field {name!r}, which rank_fields names (its fields: "
                f"{', '.join(map(repr, doc)) or 'none'})",
                param=f"{label}.{name}",
            )
    if len(rank_fields) == 1:
        return _field_text(doc[rank_fields[0]])
    return "\n".join(f"{name}: {_field_text(doc[name])}" for name in rank_fields)


@contextmanager
def _refusing() -> Iterator[None]:
    """Turn a :class:`RequestError` raised by the checks into pydantic's error for the handler."""
    try:
        yield
    except RequestError as exc:
        context = {"param": exc.param, "status": exc.status_code, "kind": exc.type}
        raise PydanticCustomError(
            INVALID_REQUEST, exc.message.replace("{", "{{").replace("}", "}}"), context
        ) from None  # type: ignore[arg-type]


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RequestError(f"request body must be a JSON object, got {json_type(data)}")
    return dict(data)


def _checked_limits(data: dict[str, Any], *names: str) -> None:
    for name in names:
        data[name] = _token_cap(data, name)


NonBlank = Annotated[str, Field(min_length=1, pattern=r"\S")]
#: Boolean fields also take these strings, in any case (RAGFlow's Xinference provider sends "true").
BooleanString = Annotated[str, Field(pattern=r"^([Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee])$")]
Flag = bool | BooleanString | None
TokenCount = Annotated[int, Field(ge=1)]
TopN = Annotated[int, Field(ge=0)]
_CACHE_FLAG = "false: score afresh, neither reading nor filling the score cache (default true)"


class _Request(BaseModel):
    """Unknown fields are accepted and ignored, as the servers these clients were written for do."""

    model_config = ConfigDict(extra="allow")

    def _caps(self) -> dict[str, Any]:
        caps = {
            "max_doc_tokens": getattr(self, "max_tokens_per_doc", None),
            "max_query_tokens": getattr(self, "max_tokens_per_query", None),
        }
        windows = getattr(self, "max_chunks_per_doc", None)
        if windows is not None:
            caps.update(long_documents=True, max_windows=windows)
        if getattr(self, "cache", None) is False:
            caps["cache"] = False
        return {name: value for name, value in caps.items() if value is not None}

    def to_group(self, query: str | None = None) -> ScoreGroup:
        """This request's work for the engine (``query`` replaces its own, for a retry)."""
        texts = self.texts  # type: ignore[attr-defined]
        own = self.query  # type: ignore[attr-defined]
        instruction = self.instruction  # type: ignore[attr-defined]
        return ScoreGroup(own if query is None else query, texts, instruction, **self._caps())


class DocumentObject(BaseModel):
    """A document as an object: read by its ``text``, or by the fields ``rank_fields`` names.

    Every field comes back whole in the result's ``document``.
    """

    model_config = ConfigDict(extra="allow")

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


class RerankRequest(_Request):
    """``POST /v1/rerank``: the rerank request of Cohere (v1 and v2), Jina, vLLM and Infinity.

    ``return_documents`` defaults to true, as Jina and vLLM do (Cohere's default is false);
    clients that read only ``index`` and ``relevance_score`` are unaffected either way. The
    ``model`` field is accepted and ignored: the service serves one model.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra=_TEXT_UNLESS_RANK_FIELDS)

    query: NonBlank
    documents: list[str | DocumentObject] = Field(min_length=1, description=_DOCUMENTS_DESCRIPTION)
    model: Any = Field(None, description="Accepted and ignored: the service serves one model")
    top_n: TopN | None = Field(None, description="Keep the best N; 0 or null: all")
    return_documents: Flag = Field(True, description="Echo each document in its result (default true)")
    raw_scores: Flag = Field(False, description="Report log-odds instead of P(yes) (Infinity's field)")
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
    cache: Flag = Field(True, description=_CACHE_FLAG)

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        with _refusing():
            data = _object(data)
            data["query"] = _query(data)
            docs = _document_list(data, "documents")
            rank_fields = _rank_fields(data)
            for i, doc in enumerate(docs):
                _ranked_text(doc, f"documents[{i}]", rank_fields)
            data["top_n"] = _top_n(data)
            data["return_documents"] = _flag(data, "return_documents", True)
            data["raw_scores"] = _flag(data, "raw_scores", False)
            data["cache"] = _flag(data, "cache", True)
            data["instruction"] = _instruction(data)
            _checked_limits(data, "max_tokens_per_doc", "max_tokens_per_query", "max_chunks_per_doc")
            data["truncate_prompt_tokens"] = _truncate_prompt_tokens(data)
        return data

    @cached_property
    def sent_documents(self) -> list[Any]:
        """Each document as it was sent: a string, or the whole object."""
        return [d if isinstance(d, str) else d.model_dump(exclude_unset=True) for d in self.documents]

    @cached_property
    def texts(self) -> list[str]:
        """What the model reads of each document (``rank_fields`` applied)."""
        fields = tuple(self.rank_fields) if self.rank_fields is not None else None
        return [_ranked_text(doc, f"documents[{i}]", fields) for i, doc in enumerate(self.sent_documents)]


class TeiRerankRequest(_Request):
    """``POST /rerank`` in the shape of text-embeddings-inference: ``texts`` instead of ``documents``.

    TEI's ``truncate`` and ``truncation_direction`` are accepted and ignored (documents are cut from
    their end to fit); ``top_n``, which TEI ignores but LiteLLM's ``huggingface`` provider sends,
    keeps the best N here.
    """

    model_config = ConfigDict(extra="allow", json_schema_extra={"not": {"required": ["documents"]}})

    query: NonBlank
    texts: list[str] = Field(min_length=1)
    raw_scores: Flag = Field(False, description="Report log-odds instead of P(yes)")
    return_text: Flag = Field(False, description="Echo each text in its result")
    instruction: NonBlank | None = None
    top_n: TopN | None = None
    max_tokens_per_doc: TokenCount | None = None
    max_tokens_per_query: TokenCount | None = None

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        with _refusing():
            data = _object(data)
            data["query"] = _query(data)
            for i, doc in enumerate(_document_list(data, "texts")):
                if not isinstance(doc, str):
                    raise RequestError(
                        f"texts[{i}] must be a string, got {json_type(doc)}", param=f"texts[{i}]"
                    )
            data["raw_scores"] = _flag(data, "raw_scores", False)
            data["return_text"] = _flag(data, "return_text", False)
            data["instruction"] = _instruction(data)
            data["top_n"] = _top_n(data)
            _checked_limits(data, "max_tokens_per_doc", "max_tokens_per_query")
        return data

    @property
    def documents(self) -> list[str]:
        return self.texts


class RankDocument(BaseModel):
    """A ``/rank`` record: its ``id`` comes back with its score."""

    model_config = ConfigDict(extra="allow")

    id: str | int | None = Field(None, description="Echoed in the result; default: the position")
    text: str


class RankRequest(_Request):
    """``POST /rank``: ``{id, text}`` records ranked with scores and confidence bands.

    A document without ``id`` gets its position in the list; plain strings are accepted the same way.
    """

    query: NonBlank
    documents: list[str | RankDocument] = Field(min_length=1)
    top_n: TopN | None = None
    instruction: NonBlank | None = None
    fallback: Flag = Field(False, description="Retry a low-confidence query generalized (default false)")
    max_tokens_per_doc: TokenCount | None = None
    max_tokens_per_query: TokenCount | None = None
    max_chunks_per_doc: TokenCount | None = Field(
        None, description="Read long documents in up to this many windows (see /v1/rerank)"
    )
    cache: Flag = Field(True, description=_CACHE_FLAG)

    @model_validator(mode="before")
    @classmethod
    def _check(cls, data: Any) -> Any:
        with _refusing():
            data = _object(data)
            data["query"] = _query(data)
            docs = _document_list(data, "documents")
            checked = []
            for i, doc in enumerate(docs):
                label = f"documents[{i}]"
                _text_of(doc, label)
                if isinstance(doc, dict):
                    doc_id = doc.get("id")
                    if doc_id is not None and not isinstance(doc_id, str):
                        as_int = _integer(doc_id)
                        if as_int is None:
                            raise RequestError(
                                f"{label}.id must be a string or an integer, got {json_type(doc_id)}",
                                param=f"{label}.id",
                            )
                        doc = {**doc, "id": as_int}
                checked.append(doc)
            data["documents"] = checked
            data["top_n"] = _top_n(data)
            data["instruction"] = _instruction(data)
            data["fallback"] = _flag(data, "fallback", False)
            data["cache"] = _flag(data, "cache", True)
            _checked_limits(data, "max_tokens_per_doc", "max_tokens_per_query", "max_chunks_per_doc")
        return data

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]

    @property
    def ids(self) -> list[str | int]:
        """Each document's ``id``, or its position when it has none."""
        return [i if isinstance(d, str) or d.id is None else d.id for i, d in enumerate(self.documents)]
