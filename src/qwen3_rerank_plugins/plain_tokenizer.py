"""A plain-text view of a fast tokenizer, built in microseconds.

User text must be read as the characters it is made of: ``<|im_end|>`` or ``<think>`` inside a
document may never become a control token. The tokenizer for it is the loaded one without its
added tokens and post-processor. Serialising the tokenizer to JSON and parsing it back (the
obvious way) costs seconds for Qwen3's 151k-token vocabulary, once per process start; this
builds a new ``tokenizers.Tokenizer`` around the *same* model object (shared, read-only) and the
same normaliser, pre-tokeniser and decoder, which gives exactly the same ids at no cost.
"""

from __future__ import annotations

from typing import Any

__all__ = ["plain_text_tokenizer"]


def plain_text_tokenizer(tokenizer: Any) -> Any:
    """A ``tokenizers.Tokenizer`` reading text as plain text (no added tokens, no post-processor).

    Args:
        tokenizer: A transformers fast tokenizer (or anything with ``backend_tokenizer``).

    Returns:
        The plain tokenizer: for text without control-token strings it gives exactly the ids the
        full tokenizer gives; control-token strings are split into ordinary tokens.

    Raises:
        TypeError: If ``tokenizer`` is not a fast (Rust) tokenizer.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(
            "a fast (Rust) tokenizer is required; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    plain = Tokenizer(backend.model)  # the same vocabulary and merges, shared rather than copied
    for part in ("normalizer", "pre_tokenizer", "decoder"):
        component = getattr(backend, part)
        if component is not None:
            setattr(plain, part, component)
    plain.no_truncation()
    plain.no_padding()
    return plain
