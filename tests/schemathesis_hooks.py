"""Schemathesis hooks for tests/test_openapi.py (loaded through ``SCHEMATHESIS_HOOKS``).

One rule of ``/v1/rerank`` cannot be written in JSON Schema: with ``rank_fields``, every object
document must have each field it names (the service answers 422 naming the field otherwise, as
Cohere does). The published schema says so in words. ``filter_body`` keeps the generated bodies
that follow it; the coverage phase builds its cases without that filter, so ``filter_failure``
drops exactly the "schema-valid request rejected" failures whose 422 names such a missing field
(checked against the body that was sent). Every other failure stands.
"""

from __future__ import annotations

from typing import Any

import schemathesis


def _missing_rank_fields(body: Any) -> set[str]:
    """``documents[i].<name>`` of each field ``rank_fields`` names that document ``i`` lacks."""
    if not isinstance(body, dict) or not isinstance(body.get("rank_fields"), list):
        return set()
    documents = body.get("documents")
    if not isinstance(documents, list):
        return set()
    names = [name for name in body["rank_fields"] if isinstance(name, str)]
    return {
        f"documents[{i}].{name}"
        for i, doc in enumerate(documents)
        if isinstance(doc, dict)
        for name in names
        if name not in doc
    }


@schemathesis.hook
def filter_body(context: Any, body: Any) -> bool:
    return not _missing_rank_fields(body)


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    if getattr(failure, "code", None) != "ST202" or response.status_code != 422:
        return True
    try:
        param = response.json()["error"]["param"]
    except (ValueError, KeyError, TypeError):
        return True
    return param not in _missing_rank_fields(case.body)
