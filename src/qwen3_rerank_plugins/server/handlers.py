"""Request handling shared by the plain service (:mod:`.app`) and the Ray Serve deployment.

Both front ends read and authenticate a request, then build the same responses, so a client of
one works unchanged against the other. What differs between them is only how a request is
scored: the plain service queues it on its :class:`~.batcher.MicroBatcher`, a Ray replica merges
it with ``@serve.batch``. Each front end passes its way of scoring as a :data:`ScoreFn`.
"""

from __future__ import annotations

import hmac
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import ClientDisconnect

from ..fallback import FallbackRerank, RerankAttempt, retry_query
from ..protocol import ScoreGroup
from ..results import ConfidenceBands, rank_results, sigmoid
from ..templates import list_instruction_templates, resolve_instruction, suggest_template_name
from .batcher import ScoredRequest
from .schemas import (
    RankRequest,
    RequestError,
    parse_json_body,
    parse_rank,
    parse_rerank,
    parse_tei,
)

__all__ = [
    "ScoreFn",
    "check_bearer",
    "rank_response",
    "read_json",
    "rerank_response",
    "too_large",
]


#: How a front end scores one request's group: ``await score(group)`` -> its
#: :class:`~.batcher.ScoredRequest` (log-odds in input order, prompt tokens, spans of documents
#: read in windows). Raises :class:`RequestError`.
ScoreFn = Callable[[ScoreGroup], Awaitable[ScoredRequest]]


TEI_PATH = "/rerank"
_NO_BANDS = ConfidenceBands()  # /v1/rerank and TEI answers carry no band
_ONE_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # free text that may be a mistyped template name
#: nginx's status for a request whose client closed the connection (never sent: nobody reads it).
CLIENT_CLOSED = 499

logger = logging.getLogger(__name__)


def check_bearer(authorization: str | None, api_key: str | None) -> None:
    """Refuse a request whose ``Authorization`` header does not carry ``Bearer <api_key>``.

    Args:
        authorization: The request's ``Authorization`` header (``None`` or ``""`` when absent).
        api_key: The service's key; ``None`` lets every request through.

    Raises:
        RequestError: 401 ``authentication_error`` with ``WWW-Authenticate: Bearer``.
    """
    if api_key is None:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(
            "missing or invalid API key: send the header 'Authorization: Bearer <key>'",
            status_code=401,
            type="authentication_error",
            headers={"WWW-Authenticate": "Bearer"},
        )


def too_large(size: int, limit: int) -> RequestError:
    """The 413 error for a body of ``size`` bytes or more against a limit of ``limit`` bytes."""
    return RequestError(
        f"request body is {size} bytes or more; this service accepts at most {limit} bytes",
        status_code=413,
        type="body_too_large",
    )


async def read_json(request: Any, max_body_bytes: int) -> dict[str, Any]:
    """Read a Starlette request's body, at most ``max_body_bytes`` of it, as a JSON object.

    The declared ``Content-Length`` is checked before anything is read, and the stream is cut
    off as soon as it passes the limit, so an oversized body is never held in memory.

    Args:
        request: A ``starlette.requests.Request`` (FastAPI's, or the one Ray Serve passes).
        max_body_bytes: Largest body accepted.

    Returns:
        The decoded JSON object.

    Raises:
        RequestError: 413 for a body over the limit; 499 ``client_closed_request`` when the
            client hangs up before its body has arrived (its doing, not the service's: logged
            at INFO, without a traceback); 400/422 as :func:`.schemas.parse_json_body`.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large(int(declared), max_body_bytes)
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise too_large(size, max_body_bytes)
            chunks.append(chunk)
    except ClientDisconnect:
        logger.info("client disconnected after %d bytes of its request body; nothing was scored", size)
        raise RequestError(
            "the client disconnected before its request body arrived",
            status_code=CLIENT_CLOSED,
            type="client_closed_request",
        ) from None
    return parse_json_body(b"".join(chunks))


async def rerank_response(
    body: Mapping[str, Any],
    *,
    path: str,
    score: ScoreFn,
    max_documents: int,
    model_name: str | None,
    default_instruction: str | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Answer ``POST /v1/rerank`` (also ``/v2/rerank`` and ``/rerank``).

    On ``/rerank``, a body with ``texts`` and no ``documents`` is a text-embeddings-inference
    request and gets TEI's answer: a bare list of ``{index, score[, text]}``.

    Args:
        body: The decoded JSON body.
        path: The request path (decides whether the TEI shape applies).
        score: How this front end scores a request.
        max_documents: Most documents per request (413 beyond).
        model_name: Reported in the response.
        default_instruction: The instruction text a request without one is scored with (reported
            in ``meta.instruction``; ``None`` when the front end does not know it).

    Returns:
        The JSON-ready response body.

    Raises:
        RequestError: On an invalid body, or as ``score`` raises.
    """
    if path.rstrip("/") == TEI_PATH and "texts" in body and "documents" not in body:
        tei = parse_tei(body, max_documents=max_documents)
        logits = (await score(tei.to_group())).logits
        out = []
        for r in rank_results(logits, tei.texts, bands=_NO_BANDS, top_n=tei.top_n):
            item: dict[str, Any] = {"index": r.index, "score": r.logit if tei.raw_scores else r.score}
            if tei.return_text:
                item["text"] = r.document
            out.append(item)
        return out
    req = parse_rerank(body, max_documents=max_documents)
    scored = await score(req.to_group())
    logits, tokens, spans = scored.logits, scored.total_tokens, scored.spans
    documents = req.documents if req.documents is not None else req.texts
    results = []
    for r in rank_results(logits, documents, bands=_NO_BANDS, top_n=req.top_n, spans=spans):
        item = {"index": r.index, "relevance_score": r.logit if req.raw_scores else r.score}
        if r.span is not None:  # the best window of a long document (max_chunks_per_doc)
            item["span"] = {"start": r.span[0], "end": r.span[1]}
        if req.return_documents:
            # Cohere, Jina and vLLM clients read {"text": ...}; an object comes back whole.
            item["document"] = {"text": r.document} if isinstance(r.document, str) else r.document
        results.append(item)
    tokens = tokens or 0
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "results": results,
        "meta": {
            "tokens": {"input_tokens": tokens, "output_tokens": 0},
            "instruction": instruction_meta(req.instruction, default_instruction),
        },
    }


async def rank_response(
    body: Mapping[str, Any],
    *,
    score: ScoreFn,
    bands: ConfidenceBands,
    max_documents: int,
    model_name: str | None,
    default_instruction: str | None = None,
) -> dict[str, Any]:
    """Answer ``POST /rank``: ``{id, text}`` records ranked, each with its score and band.

    With ``"fallback": true``, a first pass whose best score is in the low band is retried with
    the generalized query (:func:`~qwen3_rerank_plugins.fallback.retry_query`); the better pass is
    answered (:attr:`~qwen3_rerank_plugins.fallback.FallbackRerank.final`) with a ``fallback``
    block: ``retried_query`` (``null`` when no retry was made), ``used_query`` and ``needs_review``.

    Args:
        body: The decoded JSON body.
        score: How this front end scores a request.
        bands: Cut-offs of the bands and of the fallback's low band.
        max_documents: Most documents per request (413 beyond).
        model_name: Reported in the response.
        default_instruction: As for :func:`rerank_response`.

    Returns:
        The JSON-ready response body.

    Raises:
        RequestError: On an invalid body, or as ``score`` raises.
    """
    req = parse_rank(body, max_documents=max_documents)

    async def attempt(query: str) -> RerankAttempt:
        scored = await score(req.to_group(query))
        return _attempt(req, query, scored.logits, bands, scored.spans)

    first = await attempt(req.query)
    extra: dict[str, Any] = {}
    final = first
    if req.fallback:
        again = retry_query(req.query, first.best_score, bands)
        outcome = FallbackRerank(first, None if again is None else await attempt(again))
        final = outcome.final
        extra["fallback"] = {
            "retried_query": again,
            "used_query": final.query,
            "needs_review": outcome.needs_review,
        }
    results = []
    for r in final.results:
        item: dict[str, Any] = {"id": req.ids[r.index], "index": r.index, "score": r.score, "band": r.band}
        if r.span is not None:
            item["span"] = {"start": r.span[0], "end": r.span[1]}
        results.append(item)
    meta = {"instruction": instruction_meta(req.instruction, default_instruction)}
    return {"model": model_name, "results": results, **extra, "meta": meta}


def _attempt(
    req: RankRequest,
    query: str,
    logits: list[float],
    bands: ConfidenceBands,
    spans: list[tuple[int, int] | None] | None,
) -> RerankAttempt:
    """One ``/rank`` pass as the library's :class:`RerankAttempt` (best score over all documents)."""
    documents = [{"id": doc_id, "text": text} for doc_id, text in zip(req.ids, req.texts, strict=True)]
    results = rank_results(logits, documents, bands=bands, top_n=req.top_n, spans=spans)
    best = sigmoid(max(logits)) if logits else None
    return RerankAttempt(
        query=query,
        results=tuple(results),
        best_score=best,
        best_band=None if best is None else bands.classify(best),
    )


def instruction_meta(instruction: str | None, default: str | None = None) -> dict[str, Any]:
    """How a request's instruction was read, for the response's ``meta.instruction``.

    A client can see there whether its ``instruction`` named a template or was read as free text
    (a mistyped name is only logged otherwise), and what the model read.

    Args:
        instruction: The request's ``instruction`` (``None`` when it sent none).
        default: The instruction text the front end scores such a request with, if known.

    Returns:
        ``{"source": "template" | "free_text" | "default", "template": name or None,
        "text": what the model read (None for an unknown default)}``, plus ``"did_you_mean"``
        when free text looks like a mistyped template name.
    """
    templates = {t.name: t for t in list_instruction_templates()}
    if instruction is None:
        text = default
        named = next((name for name, t in templates.items() if text is not None and t.text == text), None)
        return {"source": "default", "template": named, "text": text}
    text = resolve_instruction(instruction)
    template = templates.get(instruction) or templates.get(instruction.lower())
    if template is not None and template.text == text:
        return {"source": "template", "template": template.name, "text": text}
    out: dict[str, Any] = {"source": "free_text", "template": None, "text": text}
    if _ONE_WORD.fullmatch(instruction):
        suggestion = suggest_template_name(instruction)
        if suggestion is not None:
            out["did_you_mean"] = suggestion
    return out
