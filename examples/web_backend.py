"""Embedding the shared reranker in a web backend (FastAPI), loaded once per process.

Shows how a Django/Flask/FastAPI backend uses the engine directly, without an extra service:
the model is loaded once when the app starts (``get_reranker`` returns the same object to
every caller in the process), each request only scores, and the async endpoint awaits
``arerank_with_fallback`` so the event loop keeps serving other requests while the model runs.

``POST /tickets/similar`` takes ``{"ticket": str, "candidates": [{"id", "text"}], "top_n": 3}``
and returns the best candidates with ids, scores and bands; when the best score is low, the
ticket is generalized and reranked again and the response says whether an operator should look.

Run:
    pip install torch==2.13.0 -e ".[examples]"
    python examples/web_backend.py --port 8001             # Qwen/Qwen3-Reranker-0.6B
    python examples/web_backend.py --demo --port 8001      # offline, meaningless scores
    curl -s localhost:8001/tickets/similar -H 'Content-Type: application/json' \\
        -d '{"ticket": "电梯又坏了", "candidates": [{"id": "H-1", "text": "电梯故障，居民被困"},
             {"id": "H-2", "text": "路灯不亮"}]}'

The same in a Flask (or Django) view, where a module-level engine is shared by every request::

    from flask import Flask, jsonify, request
    from qwen3_rerank_plugins import get_reranker

    app = Flask(__name__)
    reranker = get_reranker("Qwen/Qwen3-Reranker-0.6B", instruction="similar_ticket")  # once

    @app.post("/tickets/similar")
    def similar():
        body = request.get_json()
        results = reranker.rerank(body["ticket"], body["candidates"], top_n=3)
        return jsonify([r.to_dict(include_document=False) for r in results])
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from _common import add_model_options, load_reranker
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from qwen3_rerank_plugins.fallback import arerank_with_fallback

logger = logging.getLogger("web_backend")


class Candidate(BaseModel):
    id: str | int
    text: str


class SimilarRequest(BaseModel):
    ticket: str = Field(min_length=1)
    candidates: list[Candidate] = Field(max_length=1000)
    top_n: int = Field(default=3, gt=0)


def create_app(args: argparse.Namespace) -> FastAPI:
    """The app; the reranker is loaded once, at startup, and kept in ``app.state``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        start = time.perf_counter()
        # Loading takes seconds: do it in a thread so startup does not block the loop.
        reranker, is_demo = await asyncio.to_thread(load_reranker, args, instruction="similar_ticket")
        app.state.reranker, app.state.is_demo = reranker, is_demo
        logger.info("Model loaded once: %r in %.1f s", reranker, time.perf_counter() - start)
        yield

    app = FastAPI(title="Hotline backend (example)", lifespan=lifespan)

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": request.app.state.reranker.model_name,
            "demo": request.app.state.is_demo,
        }

    @app.post("/tickets/similar")
    async def similar(body: SimilarRequest, request: Request) -> dict[str, Any]:
        reranker = request.app.state.reranker  # the engine loaded at startup, never reloaded
        docs = [c.model_dump() for c in body.candidates]
        try:
            outcome = await arerank_with_fallback(reranker, body.ticket, docs, top_n=body.top_n)
        except (TypeError, ValueError) as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        logger.info("ranked %d candidates (fell back: %s)", len(docs), outcome.fell_back)
        return {
            "results": [r.to_dict(include_document=False) for r in outcome.results],
            "query_used": outcome.final.query,
            "fell_back": outcome.fell_back,
            "retried_query": outcome.retry.query if outcome.retry is not None else None,
            "needs_review": outcome.needs_review,
            "demo_model": request.app.state.is_demo,
        }

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="TCP port (default: 8001)")
    add_model_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(args), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
