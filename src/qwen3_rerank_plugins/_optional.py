"""Imports of optional dependencies that fail with the exact install line."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise an ImportError naming the extra that provides it.

    Args:
        module: Module to import, e.g. ``"llama_index.core"``.
        extra: The package extra that installs it, e.g. ``"llama-index"``.
        feature: What needs it, for the message, e.g. ``"The LlamaIndex postprocessor"``.

    Raises:
        ImportError: ``"<feature> needs <module>: pip install 'qwen3-rerank-plugins[<extra>]'"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{feature} needs the optional dependency '{module.split('.')[0]}', which is not installed. "
            f"Install it with: pip install 'qwen3-rerank-plugins[{extra}]' "
            f"(from a clone of the project: pip install -e '.[{extra}]')"
        ) from exc
