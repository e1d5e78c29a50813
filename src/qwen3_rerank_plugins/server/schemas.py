"""Request validation and response shapes of the HTTP service.

Requests are validated by hand rather than by pydantic so that every rejection names the exact
field (``documents[3]``, ``top_n``) in one short sentence, in the same error shape for every
endpoint:

.. code-block:: json

    {"error": {"message": "documents[3] must be a string or an object with a 'text' string, got int",
               "type": "invalid_request_error", "param": "documents[3]", "code": 422}}

Unknown fields are ignored, so clients written for Cohere, Jina, vLLM or TEI can send their usual
extras (``max_tokens_per_doc``, ``rank_fields``, ``truncate_prompt_tokens``, ``user``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "RankRequest",
    "RequestError",
    "RerankRequest",
    "TeiRerankRequest",
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
    """The JSON body of every error response (OpenAI-style ``{"error": {...}}``)."""
    return {"error": {"message": message, "type": type, "param": param, "code": status_code}}


@dataclass(frozen=True)
class RerankRequest:
    """``POST /v1/rerank`` (Cohere / Jina / vLLM shape), validated."""

    query: str
    texts: list[str]
    top_n: int | None
    return_documents: bool
    instruction: str | None


@dataclass(frozen=True)
class TeiRerankRequest:
    """``POST /rerank`` in the text-embeddings-inference shape (``texts`` instead of ``documents``)."""

    query: str
    texts: list[str]
    raw_scores: bool
    return_text: bool
    instruction: str | None


@dataclass(frozen=True)
class RankRequest:
    """``POST /rank`` (hotline backends: documents are ``{id, text}`` records), validated."""

    query: str
    texts: list[str]
    ids: list[Any]
    top_n: int | None
    instruction: str | None
    fallback: bool = False


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Decode a request body that must be a JSON object."""
    if not raw.strip():
        raise RequestError("request body is empty; send a JSON object", status_code=400, type="invalid_json")
    try:
        body = json.loads(raw)
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
    if not isinstance(body, dict):
        raise RequestError(
            f"request body must be a JSON object, got {_json_type(body)}", status_code=422, param=None
        )
    return body


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
    if not query.strip():
        raise RequestError("query must not be empty", param="query")
    return query


def _top_n(body: Mapping[str, Any]) -> int | None:
    """``top_n``: absent, null or 0 (vLLM's default) mean every document."""
    top_n = body.get("top_n")
    if top_n is None:
        return None
    if isinstance(top_n, float) and top_n.is_integer():
        top_n = int(top_n)
    if isinstance(top_n, bool) or not isinstance(top_n, int):
        raise RequestError(
            f"top_n must be a non-negative integer (0: all), got {_json_type(top_n)}", param="top_n"
        )
    if top_n < 0:
        raise RequestError(f"top_n must be a non-negative integer (0: all), got {top_n}", param="top_n")
    return top_n or None


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false, got {_json_type(value)}", param=name)
    return value


def _instruction(body: Mapping[str, Any]) -> str | None:
    value = body.get("instruction")
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError(
            f"instruction must be a template name or free text, got {_json_type(value)}", param="instruction"
        )
    if not value.strip():
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


def parse_rerank(body: Mapping[str, Any], *, max_documents: int) -> RerankRequest:
    """Validate a ``/v1/rerank`` body.

    ``return_documents`` defaults to true, as Jina and vLLM do (Cohere's default is false);
    clients that read only ``index`` and ``relevance_score`` are unaffected either way.
    The ``model`` field is accepted and ignored: the service serves one model.
    """
    query = _query(body)
    docs = _document_list(body, "documents", max_documents)
    texts = [_text_of(doc, f"documents[{i}]") for i, doc in enumerate(docs)]
    return RerankRequest(
        query=query,
        texts=texts,
        top_n=_top_n(body),
        return_documents=_flag(body, "return_documents", True),
        instruction=_instruction(body),
    )


def parse_tei(body: Mapping[str, Any], *, max_documents: int) -> TeiRerankRequest:
    """Validate a text-embeddings-inference ``/rerank`` body.

    The body is ``{query, texts, raw_scores?, return_text?}``.
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
        if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)):
            raise RequestError(
                f"{label}.id must be a string or an integer, got {_json_type(doc_id)}", param=f"{label}.id"
            )
        ids.append(doc_id)
    return RankRequest(
        query=query,
        texts=texts,
        ids=ids,
        top_n=_top_n(body),
        instruction=_instruction(body),
        fallback=_flag(body, "fallback", False),
    )
