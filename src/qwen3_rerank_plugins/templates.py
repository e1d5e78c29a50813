"""The Qwen3-Reranker prompt recipe and the named instruction templates.

Everything that decides *what text the model reads* lives here: the fixed chat template of the
model card, the default instruction, and a registry of named, reusable instructions for the
common reranking tasks (customer-service FAQs, hotline tickets, ...).

The model card recommends instructions written in English even when the query and documents are
Chinese; the built-in templates follow that advice.
"""

from __future__ import annotations

import difflib
import logging
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from .notices import UnknownTemplateWarning, warn_once

__all__ = [
    "DEFAULT_INSTRUCTION",
    "INSTRUCTION_TEMPLATES",
    "PROMPT_PREFIX",
    "PROMPT_SUFFIX",
    "InstructionTemplate",
    "format_body",
    "list_instruction_templates",
    "register_instruction_template",
    "resolve_instruction",
    "suggest_template_name",
]

#: System turn and the opening of the user turn. Never truncated.
PROMPT_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
#: Closing of the user turn and the opening of the assistant turn (with an empty thinking block).
#: The model's next token after this is read as "yes" or "no". Never truncated.
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"

#: The model card's default instruction.
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"

# The body is split where the document begins: the head (instruction and query) is shared by every
# document of one query, and ``" " + document`` starts on a pre-tokeniser boundary, so tokenising
# the two parts separately yields exactly the ids of the whole body.
_HEAD_FORMAT = "<Instruct>: {instruction}\n<Query>: {query}\n<Document>:"
_DOC_FORMAT = " {document}"


def format_head(instruction: str, query: str) -> str:
    """The part of the body shared by every document of one query."""
    return _HEAD_FORMAT.format(instruction=instruction, query=query)


def format_document(document: str) -> str:
    """The per-document tail of the body (note the leading space)."""
    return _DOC_FORMAT.format(document=document)


def format_body(instruction: str, query: str, document: str) -> str:
    """The user-turn body exactly as the model card writes it.

    Example:
        >>> format_body("Find answers", "发票怎么开", "开票指南")
        '<Instruct>: Find answers\\n<Query>: 发票怎么开\\n<Document>: 开票指南'
    """
    return format_head(instruction, query) + format_document(document)


@dataclass(frozen=True)
class InstructionTemplate:
    """A named, reusable reranking instruction.

    Attributes:
        name: Identifier used wherever an instruction is accepted (``instruction="similar_ticket"``).
        text: The English instruction the model reads.
        description: What the template is for, shown in ``qwen3-rerank templates`` and the web page.
    """

    name: str
    text: str
    description: str = ""


logger = logging.getLogger(__name__)
_warned_names: set[str] = set()  # warn once per mistyped template name, not on every call

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# One word that may be a (mistyped) template name, in any case.
_WORD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_lock = threading.Lock()

INSTRUCTION_TEMPLATES: dict[str, InstructionTemplate] = {}
"""Registry of named instructions. Add your own with :func:`register_instruction_template`."""


def register_instruction_template(
    name: str, text: str, description: str = "", *, overwrite: bool = False
) -> InstructionTemplate:
    """Register a named instruction so it can be used by name everywhere.

    Args:
        name: Lower-case identifier (letters, digits, underscores), e.g. ``"billing_faq"``.
        text: The instruction text (English recommended).
        description: One line on when to use it.
        overwrite: Replace an existing template of the same name instead of raising.

    Returns:
        The registered template.

    Raises:
        ValueError: If the name is malformed, the text is empty, or the name is taken and
            ``overwrite`` is false.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"instruction template name must be lower-case letters, digits and underscores, got {name!r}"
        )
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"instruction template {name!r} needs a non-empty text")
    template = InstructionTemplate(name=name, text=text, description=description)
    with _lock:
        if name in INSTRUCTION_TEMPLATES and not overwrite:
            raise ValueError(
                f"instruction template {name!r} already exists; pass overwrite=True to replace it"
            )
        INSTRUCTION_TEMPLATES[name] = template
    return template


def list_instruction_templates() -> list[InstructionTemplate]:
    """All registered templates, in registration order."""
    with _lock:
        return list(INSTRUCTION_TEMPLATES.values())


def resolve_instruction(
    instruction: str | InstructionTemplate | None, default: str | None = None, *, strict: bool = False
) -> str:
    """Turn a template name, a template, free text or ``None`` into the instruction text.

    A string that names a registered template is replaced by the template's text; any other
    non-empty string is used verbatim as a free-form instruction. A string that *looks like* a
    template name (one word of letters, digits, ``_`` or ``-``, with an underscore or close to a
    registered name) but is not one is almost surely a typo:

    - the same name in another case (``"Customer_Service_FAQ"``) is read as that template, with
      a warning (registered names are lower case, so at most one template matches);
    - anything else (``"customer_servic_faq"``) is used as free text, with a warning that
      suggests the closest name ("did you mean 'customer_service_faq'?").

    Each warning is logged once per distinct string. With ``strict=True`` both cases raise a
    ``ValueError`` carrying the same suggestion instead: only exact template names and free text
    (anything that does not look like a name, e.g. a sentence) are accepted.

    Args:
        instruction: Template name, :class:`InstructionTemplate`, free text, or ``None``.
        default: Used when ``instruction`` is ``None`` (itself resolved, with the same
            ``strict``); falls back to :data:`DEFAULT_INSTRUCTION`.
        strict: Raise instead of warning when a string looks like a template name but is not
            exactly one.

    Returns:
        The instruction text the model will read.

    Raises:
        TypeError: If ``instruction`` is not a string, template or ``None``.
        ValueError: If ``instruction`` is an empty or whitespace-only string, or, with
            ``strict=True``, a near miss of a template name.

    Example:
        >>> resolve_instruction("similar_ticket")[:30]
        'Given a new citizen service ti'
        >>> resolve_instruction("similar_tickets", strict=True)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: instruction 'similar_tickets' is not a template name; did you mean 'similar_ticket'?...
    """
    if instruction is None:
        return DEFAULT_INSTRUCTION if default is None else resolve_instruction(default, strict=strict)
    if isinstance(instruction, InstructionTemplate):
        return instruction.text
    if not isinstance(instruction, str):
        raise TypeError(
            f"instruction must be a template name, free text or None, got {type(instruction).__name__}"
        )
    if not instruction.strip():
        raise ValueError("instruction must not be empty; pass None for the default instruction")
    template = INSTRUCTION_TEMPLATES.get(instruction)
    if template is not None:
        return template.text
    if not _WORD_RE.match(instruction):
        return instruction  # a sentence: free text
    # One word is almost surely a template name, not an instruction: exact names only, or a hint.
    folded = INSTRUCTION_TEMPLATES.get(instruction.lower())
    if folded is not None:
        message = (
            f"instruction {instruction!r} is not a template name; did you mean {folded.name!r}? "
            "(template names are lower case)"
        )
        if strict:
            raise ValueError(message)
        _warn_once(
            instruction,
            "instruction %r is read as the template %r (template names are lower case)",
            instruction,
            folded.name,
        )
        return folded.text
    suggestion = suggest_template_name(instruction)
    if suggestion is None and "_" not in instruction:
        return instruction  # one ordinary word, far from every name: free text
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    if strict:
        known = ", ".join(sorted(INSTRUCTION_TEMPLATES))
        raise ValueError(
            f"instruction {instruction!r} is not a template name{hint or f' (known: {known})'}; "
            "pass a registered name or a free-text sentence"
        )
    _warn_once(
        instruction, "instruction %r is not a template name, so it is used as free text%s", instruction, hint
    )
    return instruction


def suggest_template_name(name: str) -> str | None:
    """The registered template name closest to ``name`` (ignoring case), or ``None``.

    Example:
        >>> suggest_template_name("Customer_Servic_FAQ")
        'customer_service_faq'
    """
    with _lock:
        names = list(INSTRUCTION_TEMPLATES)
    wanted = name.lower().replace("-", "_")
    close = difflib.get_close_matches(wanted, names, n=1)
    return close[0] if close else None


def _warn_once(key: str, message: str, *args: object) -> None:
    # A warnings.warn (UnknownTemplateWarning) as well as a log record: seen with no logging set up.
    if key in _warned_names:
        return
    _warned_names.add(key)
    logger.warning(message, *args)
    warn_once(UnknownTemplateWarning, key, message % args)


_BUILTIN: Mapping[str, tuple[str, str]] = {
    "web_search": (
        DEFAULT_INSTRUCTION,
        "The model card's default: general web/passage retrieval.",
    ),
    "customer_service_faq": (
        "Given a customer's question to an online shop's support chatbot, retrieve the FAQ entries and "
        "policy passages that answer the question",
        "Customer-service chatbots matching short, colloquial questions to FAQ and policy chunks.",
    ),
    "step_by_step": (
        "Prioritize documents that contain step-by-step instructions for users",
        "Prefer how-to chunks with concrete steps over general descriptions.",
    ),
    "explicit_object": (
        "Focus on documents that explicitly name the user's action or object mentioned in the query",
        "Prefer chunks about the exact thing the user names (order, invoice, coupon, ...).",
    ),
    "refund_vs_return": (
        "If the query mentions refund, prioritize refund process documents; if it mentions return, "
        "prioritize return policy documents",
        "Disambiguate refund questions from return questions.",
    ),
    "official_notices_first": (
        "Give higher scores to documents titled Official Notice, Policy Update or Announcement",
        "Prefer authoritative announcements over user posts and older texts.",
    ),
    "similar_ticket": (
        "Given a new citizen service ticket, retrieve past tickets that describe the same underlying "
        "problem at the same kind of place",
        "Government hotlines matching a new ticket to historical tickets about the same problem.",
    ),
}

for _name, (_text, _description) in _BUILTIN.items():
    register_instruction_template(_name, _text, _description)
