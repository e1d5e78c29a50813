"""The local engine: a Qwen3-Reranker loaded in this process, scored exactly as the model card does.

A (query, document) pair is scored by the probability that the causal LM answers ``yes`` rather
than ``no`` after the model card's chat template (see :mod:`qwen3_rerank_plugins.templates`).
:class:`Reranker` turns each group of documents into the token rows the model reads and hands
them to :mod:`qwen3_rerank_plugins.backend`, which batches rows of many queries together:

* user text (instruction, query, document) is tokenised as plain text, so a document holding
  ``<|im_end|>`` cannot inject control tokens, and never more of a text than can be read;
* only the body is truncated, from its end; the template's prefix and suffix never are;
* a query's prefix (template prefix + instruction + query) is computed once and its key/value
  cache reused for every document of that query (exact: the split falls on a token boundary);
* optionally, a document longer than the budget is read in overlapping windows and scored by its
  best one (``long_documents=True``).

The scoring surface (``score``, ``rerank``, ``rank``, async twins, fallback) is
:class:`~qwen3_rerank_plugins.scoring.BaseReranker`'s; no framework is imported here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .backend import DEFAULT_BATCH_TOKENS, Row, ScoringModel, quantize_int8, score_rows
from .device import cpu_features, resolve_device, resolve_precision, warn_if_emulated
from .protocol import GroupScores, ScoreGroup, StopCheck
from .scoring import BaseReranker
from .settings import DEFAULT_MAX_LENGTH, RerankerSettings
from .sources import resolve_model_dir, validate_model_dir
from .templates import InstructionTemplate, format_document, format_head, resolve_instruction
from .validation import Document, InputTooLongError

__all__ = ["Document", "Reranker"]

logger = logging.getLogger(__name__)

# Below this many rows per query, a separate forward pass for the shared prefix costs more than it
# saves; such rows carry their whole prompt (and are batched with everyone else's).
_MIN_ROWS_FOR_PREFIX_CACHE = 2


@dataclass
class _EncodedGroup:
    """One group's prompt: the shared prefix ids and, per document, the rows it is read as."""

    prefix: list[int]
    # For each document: its rows' tail ids (document tokens + suffix) and character spans.
    documents: list[list[tuple[list[int], tuple[int, int] | None]]]

    @property
    def rows(self) -> int:
        return sum(len(d) for d in self.documents)

    @property
    def tokens(self) -> int:
        return sum(len(self.prefix) + len(tail) for d in self.documents for tail, _ in d)


class Reranker(BaseReranker):
    """Qwen3-Reranker scorer: exact model-card scores, batched across queries, with instruction templates.

    Create one with :meth:`from_pretrained` (or :func:`~qwen3_rerank_plugins.get_reranker` for a
    process-wide shared instance). All methods are safe to call from several threads;
    ``a``-prefixed methods run the model in a worker thread and never block the event loop.

    Args:
        model: A loaded ``Qwen3ForCausalLM`` (the original Qwen3-Reranker checkpoint).
        tokenizer: Its fast tokenizer.
        name: Display name used in logs (defaults to the model's ``name_or_path``).
        **settings: Scoring settings, as the fields of
            :class:`~qwen3_rerank_plugins.settings.RerankerSettings`: ``max_length`` (8192),
            ``instruction`` (a template name or free text), ``batch_tokens`` (by device: 4096 on
            CPU, 8192 on MPS, 32768 on CUDA), ``max_batch_size``, ``show_progress``, ``bands``,
            ``prefix_cache``, ``max_query_tokens``, ``max_doc_tokens``, ``long_documents``,
            ``window_tokens``, ``window_overlap``, ``max_windows``.

    Example:
        >>> rr = Reranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B")  # doctest: +SKIP
        >>> rr.rerank("发票怎么开", ["【发票申请指南】...", "退货政策..."], top_n=1)  # doctest: +SKIP
        [RerankResult(index=0, score=0.97, logit=3.5, band='high')]
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str | None = None, **settings: Any) -> None:
        display = name or Path(str(getattr(model, "name_or_path", "") or "Qwen3-Reranker")).name
        self._init(ScoringModel(model, tokenizer, display), RerankerSettings.from_kwargs(**settings))

    def _init(self, core: ScoringModel, settings: RerankerSettings) -> None:
        self._core = core
        self._settings = self._check_settings(settings)
        self._truncation_warned = False

    @classmethod
    def _from_core(cls, core: ScoringModel, settings: RerankerSettings) -> Reranker:
        reranker = object.__new__(cls)
        reranker._init(core, settings)
        return reranker

    def _check_settings(self, settings: RerankerSettings) -> RerankerSettings:
        core = self._core
        template_tokens = len(core.prefix_ids) + len(core.suffix_ids)
        if settings.max_length <= template_tokens:
            raise ValueError(
                f"max_length={settings.max_length} leaves no room for the query and document: the prompt "
                f"template alone takes {template_tokens} tokens; use at least {template_tokens + 64} "
                f"(the model card uses {DEFAULT_MAX_LENGTH})"
            )
        if core.max_positions is not None and settings.max_length > core.max_positions:
            raise ValueError(
                f"max_length={settings.max_length} exceeds the model's context of {core.max_positions} tokens"
            )
        return settings

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_path: str | os.PathLike[str] = "Qwen/Qwen3-Reranker-0.6B",
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        source: str = "auto",
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        attn_implementation: str | None = "sdpa",
        **settings: Any,
    ) -> Reranker:
        """Load a Qwen3-Reranker (0.6B, 4B or 8B) from a hub id or a local directory.

        Args:
            model_name_or_path: Hub id (``"Qwen/Qwen3-Reranker-4B"``), local directory, or
                ``"demo"`` for a tiny random-weight model built locally (meaningless scores:
                for trying the pipeline offline).
            device: ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
            dtype: ``"auto"`` (bf16 on capable CUDA, fp16 on other CUDA and MPS; on CPU float32
                unless a lower precision is native there and was measured faster and in agreement,
                see :func:`~qwen3_rerank_plugins.device.auto_cpu_precision`), ``"float32"``,
                ``"bfloat16"``, ``"float16"`` or ``"int8"`` (CPU: dynamic int8 linear layers,
                float32 head; approximate). bf16/fp16 on a CPU that only emulates them warns
                (:class:`~qwen3_rerank_plugins.device.SlowPrecisionWarning`).
            source: ``"auto"`` (local directory, then Hugging Face, then ModelScope),
                ``"local"``, ``"huggingface"`` or ``"modelscope"``.
            revision: Hub revision.
            cache_dir: Download cache directory.
            attn_implementation: Passed to transformers (``"sdpa"``, ``"flash_attention_2"``, ...).
            **settings: Scoring settings (see :class:`Reranker`): ``max_length``, ``instruction``,
                ``batch_tokens``, ...

        Returns:
            A ready :class:`Reranker`.

        Raises:
            ModelSourceError: The model could not be found or downloaded (the message says what
                was tried and what to do).
            ValueError: The directory is not a Qwen3 causal LM, or a setting is invalid.
            RuntimeError: The requested device is not available.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        checked = RerankerSettings.from_kwargs(**settings)  # before minutes of loading
        torch_device = resolve_device(device)
        precision = resolve_precision(dtype, torch_device)
        warn_if_emulated(precision, torch_device)
        torch_dtype = precision.dtype
        path, used = resolve_model_dir(model_name_or_path, source, revision=revision, cache_dir=cache_dir)
        validate_model_dir(path)
        name = Path(os.fspath(model_name_or_path)).name if used not in ("local", "demo") else path.name

        tokenizer = AutoTokenizer.from_pretrained(path)
        load_kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
        if model.__class__.__name__ != "Qwen3ForCausalLM":
            raise ValueError(f"{path} loaded as {model.__class__.__name__}; Qwen3ForCausalLM is required")
        model.to(torch_device)
        display = name or Path(str(getattr(model, "name_or_path", "") or "Qwen3-Reranker")).name
        core = ScoringModel(model, tokenizer, display)
        if precision.quantization == "int8":
            quantize_int8(core, vnni=cpu_features().vnni)
        reranker = cls._from_core(core, checked)
        logger.info("%s on %s (%s)", name, torch_device, precision.name)
        return reranker

    # -- settings and introspection ------------------------------------------------------------

    def settings(self) -> dict[str, Any]:
        """The scoring settings of this reranker (``batch_tokens`` resolved for its device)."""
        return {**super().settings(), "batch_tokens": self.batch_tokens}

    @property
    def max_length(self) -> int:
        """Most prompt tokens per (query, document) pair, template included."""
        return self._settings.max_length

    @property
    def instruction(self) -> str:
        """The default instruction text."""
        return resolve_instruction(self._settings.instruction)

    @property
    def batch_tokens(self) -> int:
        """Token budget of one forward pass (the device's default unless set)."""
        return self._settings.batch_tokens or DEFAULT_BATCH_TOKENS.get(self._core.device.type, 4096)

    @property
    def max_batch_size(self) -> int:
        """Most rows in one forward pass."""
        return self._settings.max_batch_size

    @property
    def prefix_cache(self) -> bool:
        """Whether each query's prefix cache is reused across its documents."""
        return self._settings.prefix_cache

    @property
    def model_name(self) -> str:
        """Display name of the loaded model, e.g. ``"Qwen3-Reranker-0.6B"``."""
        return self._core.name

    @property
    def device(self) -> torch.device:
        """Device the model runs on."""
        return self._core.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model weights (scores are always finished in float32)."""
        return self._core.dtype

    @property
    def quantization(self) -> str | None:
        """``"int8"`` when the linear layers are int8-quantized (``dtype="int8"``), else ``None``."""
        return self._core.quantization

    @property
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (for decoding :meth:`prompt_ids`)."""
        return self._core.tokenizer

    def shares_model_with(self, other: Reranker) -> bool:
        """Whether ``other`` uses the very same loaded weights."""
        return self._core is getattr(other, "_core", None)

    def __repr__(self) -> str:
        dtype = self.quantization or str(self.dtype).removeprefix("torch.")
        return f"Reranker({self.model_name!r}, device={str(self.device)!r}, dtype={dtype!r})"

    # -- token views ----------------------------------------------------------------------------

    def prompt_ids(
        self,
        query: str,
        documents: Sequence[Document],
        instruction: str | InstructionTemplate | None = None,
    ) -> list[list[int]]:
        """The exact token ids the model reads for each document (template included, truncated).

        With ``long_documents``, a long document's entry is its first window (what the model card
        reads). ``tokenizer.decode`` turns the ids back into text.
        """
        encoded = self._encode(self._group(query, documents, instruction))
        return [encoded.prefix + rows[0][0] for rows in encoded.documents]

    def count_tokens(
        self,
        query: str,
        documents: Sequence[Document],
        instruction: str | InstructionTemplate | None = None,
        **limits: Any,
    ) -> int:
        """Prompt tokens the model reads for these pairs (after truncation, template included;
        every window of a long document counted).

        ``limits`` are the per-call caps of a :class:`~qwen3_rerank_plugins.protocol.ScoreGroup`
        (``max_query_tokens``, ``max_doc_tokens``, ``long_documents``, ``max_windows``).
        """
        group = dataclasses.replace(self._group(query, documents, instruction), **limits)
        return self._encode(self._checked_groups([group])[0]).tokens

    # -- the backend primitive ------------------------------------------------------------------

    def _score_groups(
        self, groups: list[ScoreGroup], show_progress: bool, should_stop: StopCheck | None = None
    ) -> list[GroupScores]:
        encoded = [self._encode(group) for group in groups]
        prefixes: list[list[int]] = []
        rows: list[Row] = []
        slot = 0
        for group in encoded:
            cached = self.prefix_cache and group.rows >= _MIN_ROWS_FOR_PREFIX_CACHE
            if cached:
                prefixes.append(group.prefix)
            for windows in group.documents:
                for tail, span in windows:
                    if cached:
                        rows.append(Row(tail, len(prefixes) - 1, slot, span))
                    else:
                        rows.append(Row(group.prefix + tail, -1, slot, span))
                slot += 1
        bar = tqdm(total=len(rows), desc="Reranking", unit="row") if show_progress else None
        try:
            logits, spans = score_rows(
                self._core,
                prefixes,
                rows,
                slot,
                batch_tokens=self.batch_tokens,
                max_batch_size=self.max_batch_size,
                progress=None if bar is None else bar.update,
                should_stop=should_stop,
            )
        finally:
            if bar is not None:
                bar.close()
        out, start = [], 0
        for group in encoded:
            n = len(group.documents)
            windowed = any(len(w) > 1 for w in group.documents)
            out.append(
                GroupScores(
                    logits=logits[start : start + n],
                    tokens=group.tokens,
                    spans=spans[start : start + n] if windowed else None,
                )
            )
            start += n
        return out

    # -- encoding -------------------------------------------------------------------------------

    def _encode(self, group: ScoreGroup) -> _EncodedGroup:
        """Token rows of one group, truncated as the model card does (or read in windows).

        The model card truncates the tokenised body ``head + doc`` from the right to
        ``max_length - len(prefix) - len(suffix)``; since the head comes first, the document gets
        what the head leaves. No text is tokenised further than can be read.
        """
        core, settings = self._core, self._settings
        instruction = group.instruction if group.instruction is not None else self.instruction
        max_query = (
            group.max_query_tokens if group.max_query_tokens is not None else settings.max_query_tokens
        )
        max_doc = group.max_doc_tokens if group.max_doc_tokens is not None else settings.max_doc_tokens
        windows = group.long_documents if group.long_documents is not None else settings.long_documents
        max_windows = group.max_windows if group.max_windows is not None else settings.max_windows

        budget = settings.max_length - len(core.prefix_ids) - len(core.suffix_ids)
        head = self._head_ids(instruction, group.query, budget, max_query)
        room = budget - len(head)
        if max_doc is not None:
            room = min(room, max_doc)
        if windows and settings.window_tokens is not None:
            room = min(room, settings.window_tokens)
        stride = max(room - settings.window_overlap, 1)
        readable = room + (max_windows - 1) * stride if windows else room
        texts = [core.cut_for_tokens(format_document(t), readable + 1) for t in group.texts]
        suffix = core.suffix_ids
        documents: list[list[tuple[list[int], tuple[int, int] | None]]] = []
        truncated = 0
        if windows:
            for ids, offsets in core.encode_offsets(texts):
                if len(ids) <= room:
                    documents.append([(ids + suffix, None)])
                    continue
                truncated += 1
                parts = []
                for begin in range(0, len(ids), stride)[:max_windows]:
                    end = min(begin + room, len(ids))
                    # Offsets count the leading space of " {document}"; spans are in the document.
                    span = (max(offsets[begin][0] - 1, 0), max(offsets[end - 1][1] - 1, 0))
                    parts.append((ids[begin:end] + suffix, span))
                    if end == len(ids):
                        break
                documents.append(parts)
        else:
            for ids in core.encode_plain(texts):
                truncated += len(ids) > room
                documents.append([(ids[:room] + suffix, None)])
        if truncated:
            log = logger.debug if self._truncation_warned else logger.info
            what = "read in windows" if windows else "truncated"
            log(
                "%d of %d documents %s to fit max_length=%d", truncated, len(texts), what, settings.max_length
            )
            self._truncation_warned = True
        return _EncodedGroup(core.prefix_ids + head, documents)

    def _head_ids(self, instruction: str, query: str, budget: int, max_query: int | None) -> list[int]:
        """Ids of the instruction + query part, the query cut to ``max_query`` tokens if given."""
        core = self._core
        if max_query is not None:
            cut = core.cut_for_tokens(query, max_query + 1)
            ids, offsets = core.encode_offsets([cut])[0]
            if len(ids) > max_query:
                query = query[: offsets[max_query - 1][1]]
        text = format_head(instruction, query)
        head = core.encode_plain([core.cut_for_tokens(text, budget + 1)])[0]
        if len(head) >= budget:
            taken = f"{len(head)} tokens" if len(head) <= budget else f"more than {budget} tokens"
            raise InputTooLongError(
                f"the instruction and query take {taken}, but max_length={self.max_length} leaves "
                f"{budget} for instruction, query and document together: no token of any document "
                "would be read. Shorten the query, raise max_length, or set max_query_tokens to cut "
                "the query",
                param="query",
            )
        return head
