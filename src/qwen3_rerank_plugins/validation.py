"""Argument checks shared by every scoring surface: the local engine, the remote backend, the client.

Plain Python, no torch. One check per kind of argument, and one exception type per mistake: a
value of the wrong type raises :class:`TypeError`, a value of the right type out of range raises
:class:`ValueError`; every message names the argument (``documents[3]``, ``top_n``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "Document",
    "InputTooLongError",
    "check_bool",
    "check_optional_positive_int",
    "check_positive_int",
    "check_query",
    "check_threshold",
    "check_top_n",
    "document_text",
    "document_texts",
    "json_type",
    "pair_texts",
]

#: A document: its text, or a mapping with a ``"text"`` key (other keys such as ``"id"`` ride along).
Document = str | Mapping[str, Any]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_query(query: Any, name: str = "query") -> str:
    """``query`` itself, or :class:`TypeError` when it is not a string."""
    if not isinstance(query, str):
        raise TypeError(f"{name} must be a str, got {type(query).__name__}")
    return query


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type (``"number"``, ``"object"``, ...), for messages."""
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


def document_text(doc: Any, label: str, *, wire: bool = False) -> str:
    """The text of one document: a string, or a mapping with a ``"text"`` string.

    The one document rule, used by the engine, the client, the batch job, evaluate and the HTTP
    service. Empty text is accepted: the model card's recipe scores an empty document like any
    other (a low score), so refusing it would only break a batch over one blank record. The
    exception raised names the offending field in its ``param`` attribute (``label``, or the
    document's ``text``).

    Args:
        doc: The document.
        label: How messages name it (``"documents[3]"``).
        wire: Word the errors as a JSON API does (``object``, ``string``, ``number``;
            ``documents[3].text``) rather than in Python's terms.

    Raises:
        ValueError: A mapping without ``"text"``.
        TypeError: Neither a string nor a mapping, or a ``"text"`` that is not a string.
    """
    if isinstance(doc, str):
        return doc
    kind = json_type if wire else (lambda value: type(value).__name__)
    text_field = f"{label}.text" if wire else f"{label}['text']"
    if isinstance(doc, Mapping):
        if "text" not in doc:
            if wire:
                raise _naming(ValueError(f"{label} is an object without a 'text' field"), f"{label}.text")
            keys = sorted(map(str, doc))
            raise _naming(ValueError(f"{label} is a mapping without a 'text' key (keys: {keys})"), text_field)
        text = doc["text"]
        if not isinstance(text, str):
            what = "a string" if wire else "a str"
            raise _naming(TypeError(f"{text_field} must be {what}, got {kind(text)}"), text_field)
        return text
    expected = (
        "a string or an object with a 'text' string" if wire else "a str or a mapping with a 'text' key"
    )
    raise _naming(TypeError(f"{label} must be {expected}, got {kind(doc)}"), label)


def _naming(exc: Exception, param: str) -> Exception:
    exc.param = param  # type: ignore[attr-defined]
    return exc


def document_texts(documents: Any) -> list[str]:
    """Validate ``documents`` and return their texts, naming the index of a bad element."""
    if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence):
        raise TypeError(
            "documents must be a list of strings or of mappings with a 'text' key, "
            f"got {type(documents).__name__}"
        )
    return [document_text(doc, f"documents[{i}]") for i, doc in enumerate(documents)]


def pair_texts(pairs: Any) -> list[tuple[str, str]]:
    """Validate ``(query, document)`` pairs and return ``(query, text)``, naming a bad element."""
    if isinstance(pairs, (str, bytes, Mapping)) or not isinstance(pairs, Sequence):
        raise TypeError(f"pairs must be a list of (query, document) tuples, got {type(pairs).__name__}")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"pairs[{i}] must be a (query, document) pair, got {pair!r:.80}")
        out.append((check_query(pair[0], f"pairs[{i}][0]"), document_text(pair[1], f"pairs[{i}][1]")))
    return out


def check_top_n(top_n: Any) -> int | None:
    """``top_n`` as given: ``None`` (all results) or a positive int."""
    if top_n is None:
        return None
    if not _is_int(top_n):
        raise TypeError(f"top_n must be a positive int or None, got {type(top_n).__name__}")
    if top_n <= 0:
        raise ValueError(f"top_n must be a positive int or None, got {top_n}")
    return top_n


def check_threshold(threshold: Any) -> float | None:
    """``threshold`` as a float in [0, 1], or ``None`` (keep every result)."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise TypeError(f"threshold must be a number in [0, 1] or None, got {threshold!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1] or None, got {threshold}")
    return float(threshold)


def check_positive_int(value: Any, name: str) -> int:
    """``value`` when it is an int >= 1."""
    if not _is_int(value):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r:.40}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value}")
    return value


def check_optional_positive_int(value: Any, name: str) -> int | None:
    """``value`` when it is ``None`` or an int >= 1."""
    return None if value is None else check_positive_int(value, name)


def check_bool(value: Any, name: str) -> bool:
    """``value`` when it is a bool (``1`` or ``"yes"`` are refused: they hide mistakes)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r:.40}")
    return value


class InputTooLongError(ValueError):
    """An input that cannot be scored within the token budget (e.g. a query with no room left
    for any document); ``param`` names the argument or request field (``"query"``)."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param
