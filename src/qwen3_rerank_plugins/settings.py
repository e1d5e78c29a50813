"""The scoring settings of a reranker: one frozen object, checked once.

A :class:`RerankerSettings` is what differs between rerankers that share one loaded model
(``get_reranker`` keys its registry on it, ``with_settings`` makes a changed copy). The checks
here need no model; those that do (``max_length`` against the template and the model's context)
are the engine's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .results import ConfidenceBands
from .templates import InstructionTemplate, resolve_instruction
from .validation import check_bool, check_optional_positive_int, check_positive_int

__all__ = [
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_LENGTH",
    "DEFAULT_MAX_WINDOWS",
    "DEFAULT_MODEL",
    "DEFAULT_WINDOW_OVERLAP",
    "RerankerSettings",
]

#: The model card's prompt budget (the model's context is 32k).
#: The model loaded when none is named (library, adapters, CLI and service).
DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"
DEFAULT_MAX_LENGTH = 8192
DEFAULT_MAX_BATCH_SIZE = 128
#: Long-document mode: most windows read per document, and tokens shared by neighbouring windows.
DEFAULT_MAX_WINDOWS = 16
DEFAULT_WINDOW_OVERLAP = 64


@dataclass(frozen=True)
class RerankerSettings:
    """How a reranker scores; everything besides which weights are loaded.

    Attributes:
        max_length: Most prompt tokens per (query, document) pair, template included. Only the
            body is truncated, from its end; the template never is.
        instruction: Default instruction: a template name, an :class:`InstructionTemplate`, free
            text, or ``None`` for the model card's default.
        batch_tokens: Token budget of one forward pass (rows x attended length); ``None``: the
            device's default.
        max_batch_size: Most rows in one forward pass.
        show_progress: Show a progress bar over documents by default.
        bands: Cut-offs of the high / medium / low band of each result.
        prefix_cache: Reuse each query's prefix key/value cache across its documents (exact;
            switch off only to compare).
        max_query_tokens: Cut the instruction + query to this many tokens (``None``: never cut;
            a query that leaves no room for the document is then an error).
        max_doc_tokens: Cut each document to this many tokens before the ``max_length`` budget
            applies (``None``: only ``max_length`` limits it).
        long_documents: Read a document longer than the budget in overlapping windows and score
            it by its best window, instead of cutting it where the budget ends.
        window_tokens: Document tokens per window (``None``: all the room ``max_length`` leaves).
        window_overlap: Tokens each window shares with the one before it.
        max_windows: Most windows read per document (the rest of a longer one is not read).
    """

    max_length: int = DEFAULT_MAX_LENGTH
    instruction: str | InstructionTemplate | None = None
    batch_tokens: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    show_progress: bool = False
    bands: ConfidenceBands = field(default_factory=ConfidenceBands)
    prefix_cache: bool = True
    max_query_tokens: int | None = None
    max_doc_tokens: int | None = None
    long_documents: bool = False
    window_tokens: int | None = None
    window_overlap: int = DEFAULT_WINDOW_OVERLAP
    max_windows: int = DEFAULT_MAX_WINDOWS

    def __post_init__(self) -> None:
        if self.bands is None:
            object.__setattr__(self, "bands", ConfidenceBands())
        elif not isinstance(self.bands, ConfidenceBands):
            raise TypeError(f"bands must be a ConfidenceBands, got {type(self.bands).__name__}")
        check_positive_int(self.max_length, "max_length")
        if self.instruction is not None:
            resolve_instruction(self.instruction)  # a bad instruction fails here, not at the first call
        check_optional_positive_int(self.batch_tokens, "batch_tokens")
        check_positive_int(self.max_batch_size, "max_batch_size")
        check_bool(self.show_progress, "show_progress")
        check_bool(self.prefix_cache, "prefix_cache")
        check_optional_positive_int(self.max_query_tokens, "max_query_tokens")
        check_optional_positive_int(self.max_doc_tokens, "max_doc_tokens")
        check_bool(self.long_documents, "long_documents")
        check_optional_positive_int(self.window_tokens, "window_tokens")
        if isinstance(self.window_overlap, bool) or not isinstance(self.window_overlap, int):
            raise TypeError(f"window_overlap must be an int, got {type(self.window_overlap).__name__}")
        if self.window_overlap < 0:
            raise ValueError(f"window_overlap must be >= 0, got {self.window_overlap}")
        if self.window_tokens is not None and self.window_overlap >= self.window_tokens:
            raise ValueError(
                f"window_overlap={self.window_overlap} must be smaller than "
                f"window_tokens={self.window_tokens}"
            )
        check_positive_int(self.max_windows, "max_windows")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, owner: str = "Reranker", **kwargs: Any) -> RerankerSettings:
        """Settings from keyword arguments, naming any unknown one."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"unknown {owner} settings: {', '.join(unknown)}")
        return cls(**kwargs)

    def replace(self, owner: str = "Reranker", **changes: Any) -> RerankerSettings:
        """A copy with ``changes`` applied (checked like new settings)."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise TypeError(f"unknown {owner} settings: {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The settings as keyword arguments (shallow: ``bands`` stays an object)."""
        return {name: getattr(self, name) for name in self.names()}
