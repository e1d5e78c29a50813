"""The answers of the scoring endpoints, built from a validated request and a way to score it.

The routes of :mod:`.app` pass a parsed request model (:mod:`.schemas`) and the service's
per-request scoring function; these functions shape what the client gets back.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from ..fallback import FallbackRerank, RerankAttempt, retry_query
from ..protocol import ScoreGroup
from ..results import ConfidenceBands, rank_results, sigmoid
from ..templates import list_instruction_templates, resolve_instruction, suggest_template_name
from .batcher import ScoredRequest
from .schemas import RankRequest, RequestError, RerankRequest, TeiRerankRequest

__all__ = [
    "ScoreFn",
    "check_bearer",
    "instruction_meta",
    "rank_response",
    "rerank_response",
    "too_large",
]


#: How a front end scores one request's group: ``await score(group)`` -> its
#: :class:`~.batcher.ScoredRequest` (log-odds in input order, prompt tokens, spans of documents
#: read in windows). Raises :class:`RequestError`.
ScoreFn = Callable[[ScoreGroup], Awaitable[ScoredRequest]]


_NO_BANDS = ConfidenceBands()  # /v1/rerank and TEI answers carry no band
_ONE_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # free text that may be a mistyped template name


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


async def rerank_response(
    req: RerankRequest | TeiRerankRequest,
    *,
    score: ScoreFn,
    model_name: str | None,
    default_instruction: str | None = None,
) -> dict[str, Any] | list[dict[str, Any]]:
    """Answer ``POST /v1/rerank`` (also ``/v2/rerank`` and ``/rerank``).

    A text-embeddings-inference request (``texts`` on ``/rerank``) gets TEI's answer: a bare
    list of ``{index, score[, text]}``.

    Args:
        req: The validated request.
        score: How this front end scores a request.
        model_name: Reported in the response.
        default_instruction: The instruction text a request without one is scored with (reported
            in ``meta.instruction``; ``None`` when the front end does not know it).

    Returns:
        The JSON-ready response body.

    Raises:
        RequestError: As ``score`` raises.
    """
    if isinstance(req, TeiRerankRequest):
        logits = (await score(req.to_group())).logits
        out = []
        for r in rank_results(logits, req.texts, bands=_NO_BANDS, top_n=req.top_n):
            item: dict[str, Any] = {"index": r.index, "score": r.logit if req.raw_scores else r.score}
            if req.return_text:
                item["text"] = r.document
            out.append(item)
        return out
    scored = await score(req.to_group())
    logits, tokens, spans = scored.logits, scored.total_tokens, scored.spans
    documents = req.sent_documents
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
    # As OpenAI and vLLM report a prompt cache: the same tokens, of which this many were answered
    # from the score cache instead of the model.
    details = {"cached_tokens": scored.cached_tokens or 0}
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "prompt_tokens_details": details},
        "results": results,
        "meta": {
            "tokens": {"input_tokens": tokens, "output_tokens": 0},
            "instruction": instruction_meta(req.instruction, default_instruction),
        },
    }


async def rank_response(
    req: RankRequest,
    *,
    score: ScoreFn,
    bands: ConfidenceBands,
    model_name: str | None,
    default_instruction: str | None = None,
) -> dict[str, Any]:
    """Answer ``POST /rank``: ``{id, text}`` records ranked, each with its score and band.

    With ``"fallback": true``, a first pass whose best score is in the low band is retried with
    the generalized query (:func:`~qwen3_rerank_plugins.fallback.retry_query`); the better pass is
    answered (:attr:`~qwen3_rerank_plugins.fallback.FallbackRerank.final`) with a ``fallback``
    block: ``retried_query`` (``null`` when no retry was made), ``used_query`` and ``needs_review``.

    Args:
        req: The validated request.
        score: How this front end scores a request.
        bands: Cut-offs of the bands and of the fallback's low band.
        model_name: Reported in the response.
        default_instruction: As for :func:`rerank_response`.

    Returns:
        The JSON-ready response body.

    Raises:
        RequestError: As ``score`` raises.
    """

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
        item: dict[str, Any] = {"id": r.document["id"], "index": r.index, "score": r.score, "band": r.band}
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
    ids, texts = req.ids, req.texts
    documents = [{"id": doc_id, "text": text} for doc_id, text in zip(ids, texts, strict=True)]
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
