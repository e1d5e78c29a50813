"""Embedding the shared reranker in a Django backend: one model per process, a ``POST /rank`` view.

The hotline's backend is Django. This file is a whole (single-file) Django project so it runs
as is; in your project the three parts go where the comments say:

* ``services.py``: ``shared_reranker()`` loads the engine on first use and returns the same
  object afterwards (``get_reranker`` is process-wide and thread-safe), so each worker process
  (``gunicorn -w 4`` runs four) holds one copy of the model and every request only scores.
  Warm it up in your ``AppConfig.ready()`` (as ``main()`` does here before serving) so the
  first request does not wait for the model. Never call ``get_reranker`` or
  ``Reranker.from_pretrained`` with new arguments inside a view body.
* ``views.py``: ``rank`` takes ``{"query": str, "documents": [{"id", "text"}], "top_n"?,
  "instruction"?}`` and returns ``{"results": [{"id", "index", "score", "band"}], ...}``, best
  first. Bad input gets a 4xx JSON error naming the field; a mistyped template name gets a 422
  with a "did you mean" (``resolve_instruction(..., strict=True)``).
* ``urls.py``: ``path("rank", rank)`` and ``path("health", health)``.

Run:
    pip install torch==2.13.0 -e ".[examples]"
    python examples/django_backend.py --port 8002            # Qwen/Qwen3-Reranker-0.6B
    python examples/django_backend.py --demo --port 8002     # offline, meaningless scores
    curl -s localhost:8002/rank -H 'Content-Type: application/json' \\
        -d '{"query": "电梯又坏了", "documents": [{"id": "H-1", "text": "电梯故障，居民被困"},
             {"id": "H-2", "text": "路灯不亮"}]}'

``main()`` serves with Django's development server (threaded, no auto-reloader, which would load
the model twice). In production run the WSGI ``application`` under gunicorn or uWSGI
(``gunicorn --chdir examples -w 2 django_backend:application``: two processes, two models). The
view is CSRF-exempt because it is a JSON API for other backends: put it behind your usual API
authentication.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
import time
from typing import Any

import django
from django.conf import settings

# -- settings.py (the few settings this example needs) -------------------------------------------------
if not settings.configured:
    settings.configure(
        DEBUG=False,
        SECRET_KEY="example-only-not-secret",
        ROOT_URLCONF=__name__,
        ALLOWED_HOSTS=["127.0.0.1", "localhost", "[::1]"],
        INSTALLED_APPS=[],
        MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
        DATA_UPLOAD_MAX_MEMORY_SIZE=2 * 1024 * 1024,  # request bodies over 2 MiB are refused
        LOGGING_CONFIG=None,
    )
    django.setup()

from _common import add_model_options, load_reranker
from django.core.exceptions import RequestDataTooBig
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from qwen3_rerank_plugins import Reranker, resolve_instruction

logger = logging.getLogger("django_backend")

MAX_DOCUMENTS = 1000

# -- services.py: one engine per process ----------------------------------------------------------------
_lock = threading.Lock()
_engine: tuple[Reranker, bool] | None = None
_model_args = argparse.Namespace(model="Qwen/Qwen3-Reranker-0.6B", demo=False, device="auto")


def shared_reranker() -> tuple[Reranker, bool]:
    """``(reranker, is_demo)`` for this process: loaded by the first caller, then reused."""
    global _engine
    with _lock:  # two first requests at once must not load two models
        if _engine is None:
            start = time.perf_counter()
            _engine = load_reranker(_model_args, instruction="similar_ticket")
            logger.info("Model loaded once: %r in %.1f s", _engine[0], time.perf_counter() - start)
        return _engine


# -- views.py -----------------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": {"message": message, "status": status}}, status=status)


def _parse(request: HttpRequest) -> tuple[str, list[dict[str, Any]], int | None, str | None]:
    try:
        body = json.loads(request.body)
    except RequestDataTooBig as exc:
        raise BadRequest(413, "request body is larger than 2 MiB") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(400, f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest(422, "request body must be a JSON object")
    unknown = sorted(set(body) - {"query", "documents", "top_n", "instruction"})
    if unknown:
        raise BadRequest(422, f"unknown field(s): {', '.join(unknown)}")
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise BadRequest(422, "query: must be a non-empty string")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise BadRequest(422, "documents: must be a non-empty list of {id, text} objects")
    if len(documents) > MAX_DOCUMENTS:
        raise BadRequest(422, f"documents: at most {MAX_DOCUMENTS} per request, got {len(documents)}")
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict) or "id" not in doc:
            raise BadRequest(422, f"documents[{i}]: must be an object with 'id' and 'text'")
        if not isinstance(doc["id"], (str, int)) or isinstance(doc["id"], bool):
            raise BadRequest(422, f"documents[{i}].id: must be a string or an integer")
        if not isinstance(doc.get("text"), str):
            raise BadRequest(422, f"documents[{i}].text: must be a string")
    top_n = body.get("top_n")
    if top_n is not None and (not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1):
        raise BadRequest(422, "top_n: must be a positive integer")
    instruction = body.get("instruction")
    if instruction is not None:
        if not isinstance(instruction, str):
            raise BadRequest(422, "instruction: must be a template name or free text")
        try:  # a template name, or free text; a mistyped name is refused with a "did you mean"
            instruction = resolve_instruction(instruction, strict=True)
        except ValueError as exc:
            raise BadRequest(422, str(exc)) from exc  # "instruction 'x' is not a template name; ..."
    return query, [{"id": d["id"], "text": d["text"]} for d in documents], top_n, instruction


@csrf_exempt
def rank(request: HttpRequest) -> JsonResponse:
    """``POST /rank``: the hotline's similar-ticket lookup."""
    if request.method != "POST":
        return _error(405, "use POST with a JSON body")
    try:
        query, documents, top_n, instruction = _parse(request)
    except BadRequest as exc:
        return _error(exc.status, str(exc))
    reranker, is_demo = shared_reranker()  # the process's engine, never reloaded
    try:
        results = reranker.rerank(query, documents, top_n=top_n, instruction=instruction)
    except (TypeError, ValueError) as exc:  # the engine names the argument at fault
        return _error(422, str(exc))
    logger.info("ranked %d documents", len(documents))
    return JsonResponse(
        {
            "results": [{"id": r.id, "index": r.index, "score": r.score, "band": r.band} for r in results],
            "model": reranker.model_name,
            "demo_model": is_demo,
        },
        json_dumps_params={"ensure_ascii": False},
    )


def health(request: HttpRequest) -> JsonResponse:
    """``GET /health``: 200 once the model is loaded."""
    reranker, is_demo = shared_reranker()
    return JsonResponse({"status": "ok", "model": reranker.model_name, "demo": is_demo})


# -- urls.py -------------------------------------------------------------------------------------------
urlpatterns = [path("rank", rank), path("health", health)]

# -- wsgi.py -------------------------------------------------------------------------------------------
application = WSGIHandler()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8002, help="TCP port (default: 8002)")
    add_model_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    vars(_model_args).update(model=args.model, demo=args.demo, device=args.device)
    shared_reranker()  # warm up before serving, as AppConfig.ready() would

    from django.core.management import call_command

    call_command("runserver", f"{args.host}:{args.port}", use_reloader=False, use_threading=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
