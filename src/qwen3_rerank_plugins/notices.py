"""Warnings a Python user sees without configuring anything, in categories they can filter.

The package logs through :mod:`logging` with a ``NullHandler``, so a script that never set up
logging would see none of its log records. The few things a user must not miss, such as scores
from the random-weight demo model, are therefore also issued with :func:`warnings.warn`, under
categories of their own:

- :class:`RandomWeightsWarning`: the model has random weights, so its scores are meaningless.
- :class:`UnknownTemplateWarning`: an instruction looks like a mistyped template name.

Each warning is issued once per process and key (model name, template name), next to the usual
WARNING log record, and points at the caller's code rather than at this package.

Example:
    >>> import warnings
    >>> from qwen3_rerank_plugins import RandomWeightsWarning
    >>> warnings.filterwarnings("ignore", category=RandomWeightsWarning)  # I know, it is the demo
    >>> warnings.filterwarnings("error", category=RandomWeightsWarning)  # never in production
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "Qwen3RerankWarning",
    "RandomWeightsWarning",
    "UnknownTemplateWarning",
    "notices_logged_only",
    "warn_once",
]

_PACKAGE_DIR = str(Path(__file__).resolve().parent)
_seen: set[tuple[type[Warning], str]] = set()
_lock = threading.Lock()


class Qwen3RerankWarning(UserWarning):
    """Base class of this package's warnings (filter it to silence them all)."""


class RandomWeightsWarning(Qwen3RerankWarning):
    """The model has random weights (the offline demo model): its scores are meaningless."""


class UnknownTemplateWarning(Qwen3RerankWarning):
    """An instruction looks like a template name but is none (a "did you mean" hint)."""


def warn_once(category: type[Qwen3RerankWarning], key: str, message: str) -> bool:
    """Issue ``message`` as a ``category`` warning, once per process, category and key.

    The caller logs the same message through :mod:`logging` as usual; this makes it visible to
    a user who configured no logging. The warning is attributed to the first stack frame
    outside this package, so it points at the user's line.

    Args:
        category: The warning class.
        key: What the notice is about (a model or template name); a second call with the same
            category and key does nothing.
        message: The text, complete (no ``%`` arguments).

    Returns:
        Whether the warning was issued now (``False`` when it was issued before).
    """
    with _lock:
        if (category, key) in _seen:
            return False
        _seen.add((category, key))
    warnings.warn(message, category, stacklevel=_stacklevel())
    return True


@contextlib.contextmanager
def notices_logged_only() -> Iterator[None]:
    """Within the block, this package's warnings are not shown (for programs, such as the CLI,
    whose logging already shows the same messages)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Qwen3RerankWarning)
        yield


def _stacklevel() -> int:
    """The ``stacklevel`` of the first frame outside this package, as seen from ``warn_once``."""
    frame = sys._getframe(2)  # the caller of warn_once
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
