"""Request handling shared by the plain service (:mod:`.app`) and the Ray Serve deployment.

Both front ends read and authenticate a request, then build the same responses, so a client of
one works unchanged against the other. What differs between them is only how a request is
scored: the plain service queues it on its :class:`~.batcher.MicroBatcher`, a Ray replica merges
it with ``@serve.batch``. Each front end passes its way of scoring as a :data:`ScoreFn`.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.requests import ClientDisconnect

from ..fallback import FallbackRerank, RerankAttempt, retry_query
from ..results import ConfidenceBands, RerankResult, ranked_order, sigmoid
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

#: ``await score(query, texts, instruction, count_tokens)`` -> ``(logits in input order, tokens)``;
#: ``tokens`` may be ``None`` when ``count_tokens`` is false. Raises :class:`RequestError`.
ScoreFn = Callable[[str, list[str], str | None, bool], Awaitable[tuple[list[float], int | None]]]

TEI_PATH = "/rerank"
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

    Returns:
        The JSON-ready response body.

    Raises:
        RequestError: On an invalid body, or as ``score`` raises.
    """
    if path.rstrip("/") == TEI_PATH and "texts" in body and "documents" not in body:
        tei = parse_tei(body, max_documents=max_documents)
        logits, _ = await score(tei.query, tei.texts, tei.instruction, False)
        out = []
        for i in ranked_order(logits, None):
            item: dict[str, Any] = {"index": i, "score": logits[i] if tei.raw_scores else sigmoid(logits[i])}
            if tei.return_text:
                item["text"] = tei.texts[i]
            out.append(item)
        return out
    req = parse_rerank(body, max_documents=max_documents)
    logits, tokens = await score(req.query, req.texts, req.instruction, True)
    results = []
    for i in ranked_order(logits, req.top_n):
        item = {"index": i, "relevance_score": sigmoid(logits[i])}
        if req.return_documents:
            item["document"] = {"text": req.texts[i]}
        results.append(item)
    tokens = tokens or 0
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model_name,
        "usage": {"total_tokens": tokens},
        "results": results,
        "meta": {"tokens": {"input_tokens": tokens, "output_tokens": 0}},
    }


async def rank_response(
    body: Mapping[str, Any],
    *,
    score: ScoreFn,
    bands: ConfidenceBands,
    max_documents: int,
    model_name: str | None,
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

    Returns:
        The JSON-ready response body.

    Raises:
        RequestError: On an invalid body, or as ``score`` raises.
    """
    req = parse_rank(body, max_documents=max_documents)

    async def attempt(query: str) -> RerankAttempt:
        logits, _ = await score(query, req.texts, req.instruction, False)
        return _attempt(req, query, logits, bands)

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
    results = [
        {"id": req.ids[r.index], "index": r.index, "score": r.score, "band": r.band} for r in final.results
    ]
    return {"model": model_name, "results": results, **extra}


def _attempt(req: RankRequest, query: str, logits: list[float], bands: ConfidenceBands) -> RerankAttempt:
    """One ``/rank`` pass as the library's :class:`RerankAttempt` (best score over all documents)."""
    results = []
    for i in ranked_order(logits, req.top_n):
        value = sigmoid(logits[i])
        document = {"id": req.ids[i], "text": req.texts[i]}
        results.append(RerankResult(i, value, logits[i], document, bands.classify(value)))
    best = sigmoid(max(logits)) if logits else None
    return RerankAttempt(
        query=query,
        results=tuple(results),
        best_score=best,
        best_band=None if best is None else bands.classify(best),
    )
