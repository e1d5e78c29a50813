"""Request validation and response shapes of the HTTP service.

Requests are validated by hand rather than by pydantic so that every rejection names the exact
field (``documents[3]``, ``top_n``) in one short sentence, in the same error shape for every
endpoint:

.. code-block:: json

    {"error": {"message": "documents[3] must be a string or an object with a 'text' string, got int",
               "type": "invalid_request_error", "param": "documents[3]", "code": 422},
     "detail": "documents[3] must be a string or an object with a 'text' string, got int"}

(``detail`` repeats the message for clients written for Jina's API, which raise ``resp["detail"]``.)
Unknown fields are ignored, so clients written for Cohere, Jina, vLLM, Infinity or TEI can send their
usual extras (``max_chunks_per_doc``, ``truncation_direction``, ``user``, ...). Boolean fields also
take the strings ``"true"`` / ``"false"`` in any case, as the servers those clients were written for
do. The JSON schema of each body, as ``/openapi.json`` publishes it, is in :mod:`.openapi`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RankRequest",
    "RequestError",
    "RerankRequest",
    "TeiRerankRequest",
    "TokenLimits",
    "error_body",
    "parse_json_body",
    "parse_rank",
    "parse_rerank",
    "parse_tei",
]


class RequestError(Exception):
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
        super().__init__(message)
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


@dataclass(frozen=True)
class TokenLimits:
    """Per-request token caps (Cohere v2 / vLLM fields), passed on to the scoring function.

    Attributes:
        max_doc_tokens: ``max_tokens_per_doc``: cut each document to this many tokens (the
            template is never cut); ``None``: the service's setting.
        max_query_tokens: ``max_tokens_per_query``: cut the instruction + query to this many
            tokens; ``None``: the service's setting.
        max_windows: ``max_chunks_per_doc`` (Cohere v1): read a long document in up to this many
            windows and score it by the best; ``None``: the service's setting.
        cache: ``"cache": false`` scores the request afresh and stores nothing in the score cache.
    """

    max_doc_tokens: int | None = None
    max_query_tokens: int | None = None
    max_windows: int | None = None
    cache: bool = True

    def as_kwargs(self) -> dict[str, Any]:
        """The caps that are set, as keyword arguments of the scoring function.

        ``max_windows`` (Cohere v1's ``max_chunks_per_doc``) also switches on the long-document
        mode: a document longer than the budget is read in up to that many windows, scored by
        the best.
        """
        out: dict[str, Any] = {
            "max_doc_tokens": self.max_doc_tokens,
            "max_query_tokens": self.max_query_tokens,
        }
        if self.max_windows is not None:
            out.update(long_documents=True, max_windows=self.max_windows)
        if not self.cache:
            out["cache"] = False
        return {name: value for name, value in out.items() if value is not None}


@dataclass(frozen=True)
class RerankRequest:
    """``POST /v1/rerank`` (Cohere / Jina / vLLM / Infinity shape), validated.

    Attributes:
        query: The query.
        texts: What the model reads of each document (``rank_fields`` applied).
        documents: Each document as it was sent (a string, or the whole object).
        top_n: Keep the best N (``None``: all).
        return_documents: Echo each document in its result.
        raw_scores: Report log-odds instead of probabilities (Infinity's ``raw_scores``).
        instruction: Template name or free text, ``None`` for the service's default.
        rank_fields: Cohere's ``rank_fields``: the object fields the model reads, in order.
        limits: Token caps of this request.
        truncate_prompt_tokens: vLLM's field, validated; the service's ``max_length`` applies.
    """

    query: str
    texts: list[str]
    top_n: int | None
    return_documents: bool
    instruction: str | None
    documents: list[Any] | None = None
    raw_scores: bool = False
    rank_fields: tuple[str, ...] | None = None
    limits: TokenLimits = TokenLimits()
    truncate_prompt_tokens: int | None = None


@dataclass(frozen=True)
class TeiRerankRequest:
    """``POST /rerank`` in the text-embeddings-inference shape (``texts`` instead of ``documents``)."""

    query: str
    texts: list[str]
    raw_scores: bool
    return_text: bool
    instruction: str | None
    top_n: int | None = None
    limits: TokenLimits = TokenLimits()


@dataclass(frozen=True)
class RankRequest:
    """``POST /rank`` (hotline backends: documents are ``{id, text}`` records), validated."""

    query: str
    texts: list[str]
    ids: list[Any]
    top_n: int | None
    instruction: str | None
    fallback: bool = False
    limits: TokenLimits = TokenLimits()


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
            f"request body must be a JSON object, got {_json_type(body)}", status_code=422, param=None
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


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _query(body: Mapping[str, Any]) -> str:
    if "query" not in body or body["query"] is None:
        raise RequestError("query is required", param="query")
    query = body["query"]
    if not isinstance(query, str):
        raise RequestError(f"query must be a string, got {_json_type(query)}", param="query")
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
            f"top_n must be a non-negative integer (0: all), got {_json_type(value)}", param="top_n"
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
        got = _json_type(value) if count is None else str(count)
        raise RequestError(f"{name} must be a positive integer (tokens), got {got}", param=name)
    return count


def _limits(body: Mapping[str, Any]) -> TokenLimits:
    return TokenLimits(
        max_doc_tokens=_token_cap(body, "max_tokens_per_doc"),
        max_query_tokens=_token_cap(body, "max_tokens_per_query"),
        max_windows=_token_cap(body, "max_chunks_per_doc"),
        cache=_flag(body, "cache", True),
    )


def _truncate_prompt_tokens(body: Mapping[str, Any]) -> int | None:
    """vLLM's ``truncate_prompt_tokens``: ``-1`` (the model's limit) or a positive count."""
    value = body.get("truncate_prompt_tokens")
    if value is None:
        return None
    count = _integer(value)
    if count is None or count == 0 or count < -1:
        got = _json_type(value) if count is None else str(count)
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
        got = repr(value) if isinstance(value, str) else _json_type(value)
        raise RequestError(f"{name} must be true or false, got {got:.60}", param=name)
    return value


def _instruction(body: Mapping[str, Any]) -> str | None:
    value = body.get("instruction")
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(
            f"instruction must be a template name or free text, got {_json_type(value)}", param="instruction"
        )
    if not _NON_BLANK.search(value):
        raise RequestError("instruction must not be empty; leave it out for the default", param="instruction")
    return value


def _document_list(body: Mapping[str, Any], field: str, max_documents: int) -> list[Any]:
    if field not in body or body[field] is None:
        raise RequestError(f"{field} is required: a non-empty list of documents", param=field)
    docs = body[field]
    if not isinstance(docs, list):
        raise RequestError(f"{field} must be a list, got {_json_type(docs)}", param=field)
    if not docs:
        raise RequestError(f"{field} must not be empty", param=field)
    if len(docs) > max_documents:
        raise RequestError(
            f"{field} has {len(docs)} entries; this service accepts at most {max_documents} per request",
            status_code=413,
            param=field,
            type="too_many_documents",
        )
    return docs


def _text_of(doc: Any, label: str, *, allow_string: bool = True) -> str:
    if allow_string and isinstance(doc, str):
        return doc
    if isinstance(doc, dict):
        if "text" not in doc:
            raise RequestError(f"{label} is an object without a 'text' field", param=f"{label}.text")
        text = doc["text"]
        if not isinstance(text, str):
            raise RequestError(
                f"{label}.text must be a string, got {_json_type(text)}", param=f"{label}.text"
            )
        return text
    expected = "a string or an object with a 'text' string" if allow_string else "an object {id, text}"
    raise RequestError(f"{label} must be {expected}, got {_json_type(doc)}", param=label)


def _rank_fields(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    value = body.get("rank_fields")
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestError(
            f"rank_fields must be a list of field names, got {_json_type(value)}", param="rank_fields"
        )
    if not value:
        raise RequestError(
            "rank_fields must name at least one field; leave it out for 'text'", param="rank_fields"
        )
    for i, name in enumerate(value):
        if not isinstance(name, str):
            raise RequestError(
                f"rank_fields[{i}] must be a field name (string), got {_json_type(name)}",
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
            f"{label}.text must be a string, got {_json_type(doc['text'])}", param=f"{label}.text"
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


def parse_rerank(body: Mapping[str, Any], *, max_documents: int) -> RerankRequest:
    """Validate a ``/v1/rerank`` body.

    ``return_documents`` defaults to true, as Jina and vLLM do (Cohere's default is false);
    clients that read only ``index`` and ``relevance_score`` are unaffected either way.
    The ``model`` field is accepted and ignored: the service serves one model.
    """
    query = _query(body)
    docs = _document_list(body, "documents", max_documents)
    rank_fields = _rank_fields(body)
    texts = [_ranked_text(doc, f"documents[{i}]", rank_fields) for i, doc in enumerate(docs)]
    return RerankRequest(
        query=query,
        texts=texts,
        documents=list(docs),
        top_n=_top_n(body),
        return_documents=_flag(body, "return_documents", True),
        raw_scores=_flag(body, "raw_scores", False),
        instruction=_instruction(body),
        rank_fields=rank_fields,
        limits=_limits(body),
        truncate_prompt_tokens=_truncate_prompt_tokens(body),
    )


def parse_tei(body: Mapping[str, Any], *, max_documents: int) -> TeiRerankRequest:
    """Validate a text-embeddings-inference ``/rerank`` body.

    The body is ``{query, texts, raw_scores?, return_text?}``; TEI's ``truncate`` and
    ``truncation_direction`` are ignored (documents are always cut from their end to fit). ``top_n``,
    which TEI itself ignores but LiteLLM's ``huggingface`` provider sends, keeps the best N.
    """
    query = _query(body)
    docs = _document_list(body, "texts", max_documents)
    texts = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise RequestError(f"texts[{i}] must be a string, got {_json_type(doc)}", param=f"texts[{i}]")
        texts.append(doc)
    return TeiRerankRequest(
        query=query,
        texts=texts,
        raw_scores=_flag(body, "raw_scores", False),
        return_text=_flag(body, "return_text", False),
        instruction=_instruction(body),
        top_n=_top_n(body),
        limits=_limits(body),
    )


def parse_rank(body: Mapping[str, Any], *, max_documents: int) -> RankRequest:
    """Validate a ``/rank`` body: documents are ``{id, text}`` objects (``id`` a string or integer).

    A document without ``id`` gets its position in the list; plain strings are accepted the same way.
    """
    query = _query(body)
    docs = _document_list(body, "documents", max_documents)
    texts, ids = [], []
    for i, doc in enumerate(docs):
        label = f"documents[{i}]"
        texts.append(_text_of(doc, label))
        doc_id = doc.get("id", i) if isinstance(doc, dict) else i
        if doc_id is None:
            doc_id = i
        if not isinstance(doc_id, str):
            as_int = _integer(doc_id)
            if as_int is None:
                raise RequestError(
                    f"{label}.id must be a string or an integer, got {_json_type(doc_id)}",
                    param=f"{label}.id",
                )
            doc_id = as_int
        ids.append(doc_id)
    return RankRequest(
        query=query,
        texts=texts,
        ids=ids,
        top_n=_top_n(body),
        instruction=_instruction(body),
        fallback=_flag(body, "fallback", False),
        limits=_limits(body),
    )
