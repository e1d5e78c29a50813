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

import copy
import dataclasses
import hashlib
import logging
import os
import weakref
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .backend import DEFAULT_BATCH_TOKENS, Int8Linear, Row, ScoringModel, quantize_int8, score_rows
from .cache import CACHE_FORMAT_VERSION, CachedScore, ScoreCache
from .device import cpu_features, resolve_device, resolve_precision, warn_if_emulated
from .modeling import load_native, native_support
from .protocol import GroupScores, ScoreGroup, StopCheck, precision_name
from .scoring import BaseReranker
from .settings import DEFAULT_MAX_LENGTH, DEFAULT_MODEL, RerankerSettings
from .sources import resolve_model_dir, validate_model_dir
from .templates import InstructionTemplate, format_document, format_head, resolve_instruction
from .validation import Document, InputTooLongError

__all__ = ["Document", "Reranker"]

logger = logging.getLogger(__name__)

# Below this many rows per query, a separate forward pass for the shared prefix costs more than it
# saves; such rows carry their whole prompt (and are batched with everyone else's).
_MIN_ROWS_FOR_PREFIX_CACHE = 2

# Settings that change how fast a pair is scored, not its log-odds (or that enter the score-cache
# key through the token ids and the effective per-group limits); every other setting, including
# any added later, enters the key as it is.
_SETTINGS_NOT_IN_KEY = frozenset(
    {
        "batch_tokens",
        "max_batch_size",
        "show_progress",
        "bands",
        "prefix_cache",
        "instruction",
        "max_query_tokens",
        "max_doc_tokens",
        "long_documents",
        "max_windows",
    }
)
# The weights' fingerprint of each loaded model, computed once.
_fingerprints: weakref.WeakKeyDictionary[ScoringModel, bytes] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _Limits:
    """What one group is read with: its instruction and the caps it ends up under."""

    instruction: str
    max_query: int | None
    max_doc: int | None
    windows: bool
    max_windows: int


@dataclass
class _EncodedGroup:
    """One group's prompt: the shared prefix ids and, per document, the rows it is read as."""

    prefix: list[int]
    # For each document: its rows' tail ids (document tokens + suffix) and character spans.
    documents: list[list[tuple[list[int], tuple[int, int] | None]]]
    limits: _Limits | None = None

    @property
    def rows(self) -> int:
        return sum(len(d) for d in self.documents)

    @property
    def tokens(self) -> int:
        return sum(self.document_tokens(i) for i in range(len(self.documents)))

    def document_tokens(self, i: int) -> int:
        return sum(len(self.prefix) + len(tail) for tail, _ in self.documents[i])


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
        cache: An exact score cache (a :class:`~qwen3_rerank_plugins.cache.ScoreCache`, or a
            number of in-process entries); ``None`` (default): every pair is computed.

    Example:
        >>> rr = Reranker.from_pretrained("Qwen/Qwen3-Reranker-0.6B")  # doctest: +SKIP
        >>> rr.rerank("发票怎么开", ["【发票申请指南】...", "退货政策..."], top_n=1)  # doctest: +SKIP
        [RerankResult(index=0, score=0.97, logit=3.5, band='high')]
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        cache: ScoreCache | int | None = None,
        **settings: Any,
    ) -> None:
        display = name or Path(str(getattr(model, "name_or_path", "") or "Qwen3-Reranker")).name
        checked = RerankerSettings.from_kwargs(**settings)
        self._init(ScoringModel(model, tokenizer, display), checked, ScoreCache.build(cache))

    def _init(self, core: ScoringModel, settings: RerankerSettings, cache: ScoreCache | None = None) -> None:
        self._core = core
        self._settings = self._check_settings(settings)
        self._truncation_warned = False
        self._cache: ScoreCache | None = None
        self._attach(cache)

    @classmethod
    def _from_core(
        cls, core: ScoringModel, settings: RerankerSettings, cache: ScoreCache | None = None
    ) -> Reranker:
        reranker = object.__new__(cls)
        reranker._init(core, settings, cache)
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
        model_name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        source: str = "auto",
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        attn_implementation: str | None = "sdpa",
        modeling: str = "auto",
        cache: ScoreCache | int | None = None,
        cache_url: str | None = None,
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
                float32 head; approximate). bf16/fp16 on a CPU that only emulates them, and int8
                on one without VNNI/AMX, warn
                (:class:`~qwen3_rerank_plugins.device.SlowPrecisionWarning`).
            source: ``"auto"`` (local directory, then Hugging Face, then ModelScope),
                ``"local"``, ``"huggingface"`` or ``"modelscope"``.
            revision: Hub revision.
            cache_dir: Download cache directory.
            attn_implementation: ``"sdpa"`` (default), or another kernel transformers offers
                (``"flash_attention_2"``, ``"eager"``, ...), which loads through transformers.
            modeling: Which decoder code runs the checkpoint: ``"auto"`` (default) this
                package's own (:mod:`~qwen3_rerank_plugins.modeling`: the same operations as
                transformers' SDPA path, without its seconds-long import) when it describes the
                checkpoint, else transformers'; ``"native"`` (an error if it cannot) or
                ``"transformers"``.
            cache: An exact score cache: a number of in-process entries (about 240 bytes each),
                or a :class:`~qwen3_rerank_plugins.cache.ScoreCache`; ``None`` (default): off.
                See :meth:`with_cache`.
            cache_url: A Redis URL (``redis://HOST:PORT/DB``) for a shared cache tier (needs the
                ``[cache]`` extra); with ``cache`` a number or ``None``.
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
        from transformers import AutoTokenizer

        if modeling not in _MODELING:
            raise ValueError(f"modeling must be one of {', '.join(map(repr, _MODELING))}, got {modeling!r}")
        checked = RerankerSettings.from_kwargs(**settings)  # before minutes of loading
        score_cache = ScoreCache.build(cache, cache_url)
        torch_device = resolve_device(device)
        precision = resolve_precision(dtype, torch_device)
        warn_if_emulated(precision, torch_device)
        torch_dtype = precision.dtype
        path, used = resolve_model_dir(model_name_or_path, source, revision=revision, cache_dir=cache_dir)
        config = validate_model_dir(path)
        name = Path(os.fspath(model_name_or_path)).name if used not in ("local", "demo") else path.name

        tokenizer = AutoTokenizer.from_pretrained(path)
        model = _load_model(path, config, modeling, attn_implementation, torch_dtype, torch_device)
        display = name or Path(str(getattr(model, "name_or_path", "") or "Qwen3-Reranker")).name
        core = ScoringModel(model, tokenizer, display)
        if precision.quantization == "int8":
            quantize_int8(core, vnni=cpu_features().vnni)
        reranker = cls._from_core(core, checked, score_cache)
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

    @property
    def cache(self) -> ScoreCache | None:
        """The exact score cache this reranker reads and fills, or ``None``."""
        return self._cache

    def with_cache(self, cache: ScoreCache | int | None, *, cache_url: str | None = None) -> Reranker:
        """A reranker over the same loaded model (and settings) with this score cache.

        A pair already scored under the same configuration is then answered from the cache and
        only the misses go to the model (still batched across queries). The key is a hash of the
        weights' fingerprint, dtype, the cache format version, every scoring setting the log-odds
        depend on and the exact token ids the model reads (template, instruction, query and
        document, after caps and cuts); a hit gives the log-odds and window span a computation
        gives. Several rerankers may share one cache.

        Args:
            cache: A :class:`~qwen3_rerank_plugins.cache.ScoreCache`, a number of in-process
                entries, or ``None``/``0`` for none.
            cache_url: A Redis URL for a shared tier (with ``cache`` a number or ``None``).

        Example:
            >>> cached = reranker.with_cache(100_000)  # doctest: +SKIP
            >>> cached.cache.stats()["hits"]  # doctest: +SKIP
            {'memory': 0}
        """
        view = copy.copy(self)
        view._cache = None
        view._attach(ScoreCache.build(cache, cache_url))
        return view

    def _attach(self, cache: ScoreCache | None) -> None:
        if cache is not None and self._core not in _fingerprints:
            _fingerprints[self._core] = _weights_fingerprint(self._core)
        self._cache = cache

    def shares_model_with(self, other: Reranker) -> bool:
        """Whether ``other`` uses the very same loaded weights."""
        return self._core is getattr(other, "_core", None)

    def __repr__(self) -> str:
        cache = "" if self._cache is None else f", cache={self._cache!r}"
        device, dtype = str(self.device), precision_name(self)
        return f"Reranker({self.model_name!r}, device={device!r}, dtype={dtype!r}{cache})"

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

    def lookup(self, group: ScoreGroup) -> tuple[int, GroupScores | None]:
        """The group's prompt tokens (as :meth:`count_tokens` counts them), and its scores when
        the score cache holds every one of its pairs (else ``None``), from one tokenisation.

        Nothing is computed: what a service needs at admission, to answer at once work that
        costs the model nothing and to count the rest. A group with any miss gets ``None`` and
        counts nothing in the cache's statistics (its later scoring looks the pairs up again).
        A cached answer equals what :meth:`score_groups` returns for the group, with every
        token reported as cached.

        Raises:
            ValueError, TypeError: As :meth:`score_groups`, for a malformed group.
        """
        encoded = self._encode(self._checked_groups([group])[0])
        cache = self._cache
        if cache is None or not group.cache:
            return encoded.tokens, None
        keys = _pair_keys(self._cache_config(), encoded)
        found = cache.get_many(keys, all_or_nothing=True)
        if not found:
            return encoded.tokens, None
        hits = [found[key] for key in keys]
        cached_tokens = sum(encoded.document_tokens(d) for d in range(len(keys)))
        cache.count_saved(len(keys), cached_tokens)
        windowed = any(len(w) > 1 for w in encoded.documents)
        return encoded.tokens, GroupScores(
            logits=[hit.logit for hit in hits],
            tokens=encoded.tokens,
            spans=[hit.span for hit in hits] if windowed else None,
            cached_tokens=cached_tokens,
        )

    # -- the backend primitive ------------------------------------------------------------------

    def _score_groups(
        self, groups: list[ScoreGroup], show_progress: bool, should_stop: StopCheck | None = None
    ) -> list[GroupScores]:
        encoded = [self._encode(group) for group in groups]
        cache = self._cache
        # Per group, per document: its cache key (None: not cached).
        keys: list[list[bytes | None]] = [[None] * len(g.documents) for g in encoded]
        found: dict[bytes, CachedScore] = {}
        if cache is not None:
            config = self._cache_config()
            for i, (group, enc) in enumerate(zip(groups, encoded, strict=True)):
                if group.cache:
                    keys[i] = list(_pair_keys(config, enc))
            found = cache.get_many(k for group_keys in keys for k in group_keys if k is not None)

        # Only the misses become rows; a pair asked twice in one call is computed once.
        prefixes: list[list[int]] = []
        rows: list[Row] = []
        slot_of: dict[bytes, int] = {}
        where: list[list[int]] = []  # per group, per document: its slot, or -1 when cached
        slot = 0
        for enc, group_keys in zip(encoded, keys, strict=True):
            todo: list[tuple[int, int]] = []  # (document, slot)
            places = []
            for d, key in enumerate(group_keys):
                if key is not None and key in found:
                    places.append(-1)
                elif key is not None and key in slot_of:
                    places.append(slot_of[key])
                else:
                    if key is not None:
                        slot_of[key] = slot
                    todo.append((d, slot))
                    places.append(slot)
                    slot += 1
            where.append(places)
            cached = self.prefix_cache and sum(len(enc.documents[d]) for d, _ in todo) >= (
                _MIN_ROWS_FOR_PREFIX_CACHE
            )
            if cached:
                prefixes.append(enc.prefix)
            for d, s in todo:
                for tail, span in enc.documents[d]:
                    if cached:
                        rows.append(Row(tail, len(prefixes) - 1, s, span))
                    else:
                        rows.append(Row(enc.prefix + tail, -1, s, span))

        logits: list[float] = []
        spans: list[tuple[int, int] | None] = []
        if rows:
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
        if cache is not None and slot_of:
            cache.put_many({key: CachedScore(logits[s], spans[s]) for key, s in slot_of.items()})

        out = []
        saved_pairs = saved_tokens = 0
        computed: set[int] = set()  # slots already reported as computed (the rest are repeats)
        for enc, places, group_keys in zip(encoded, where, keys, strict=True):
            values: list[float] = []
            group_spans: list[tuple[int, int] | None] = []
            cached_tokens = 0
            for d, s in enumerate(places):
                if s < 0:
                    hit = found[group_keys[d]]  # type: ignore[index]
                    values.append(hit.logit)
                    group_spans.append(hit.span)
                else:
                    values.append(logits[s])
                    group_spans.append(spans[s])
                    if s not in computed:
                        computed.add(s)
                        continue
                cached_tokens += enc.document_tokens(d)
                saved_pairs += 1
            saved_tokens += cached_tokens
            windowed = any(len(w) > 1 for w in enc.documents)
            out.append(
                GroupScores(
                    logits=values,
                    tokens=enc.tokens,
                    spans=group_spans if windowed else None,
                    cached_tokens=cached_tokens,
                )
            )
        if cache is not None:
            cache.count_saved(saved_pairs, saved_tokens)
        return out

    # -- encoding -------------------------------------------------------------------------------

    def _encode(self, group: ScoreGroup) -> _EncodedGroup:
        """Token rows of one group, truncated as the model card does (or read in windows).

        The model card truncates the tokenised body ``head + doc`` from the right to
        ``max_length - len(prefix) - len(suffix)``; since the head comes first, the document gets
        what the head leaves. No text is tokenised further than can be read.
        """
        core, settings = self._core, self._settings
        limits = self._limits(group)
        instruction, max_query, max_doc = limits.instruction, limits.max_query, limits.max_doc
        windows, max_windows = limits.windows, limits.max_windows

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
        return _EncodedGroup(core.prefix_ids + head, documents, limits)

    def _limits(self, group: ScoreGroup) -> _Limits:
        """The instruction and caps a group is read with: its own, else this reranker's."""
        settings = self._settings
        return _Limits(
            instruction=group.instruction if group.instruction is not None else self.instruction,
            max_query=group.max_query_tokens
            if group.max_query_tokens is not None
            else settings.max_query_tokens,
            max_doc=group.max_doc_tokens if group.max_doc_tokens is not None else settings.max_doc_tokens,
            windows=group.long_documents if group.long_documents is not None else settings.long_documents,
            max_windows=group.max_windows if group.max_windows is not None else settings.max_windows,
        )

    # -- the score cache's key ------------------------------------------------------------------

    def _cache_config(self) -> bytes:
        """What every key of this reranker starts with: the weights, dtype, format and settings."""
        scoring = {
            name: value
            for name, value in self._settings.as_dict().items()
            if name not in _SETTINGS_NOT_IN_KEY
        }
        parts = [
            f"format={CACHE_FORMAT_VERSION}",
            f"weights={_fingerprints[self._core].hex()}",
            f"dtype={self._core.dtype}",
            f"quantization={self._core.quantization}"
            + (f",{Int8Linear.SCHEME},vnni={cpu_features().vnni}" if self._core.quantization else ""),
            f"yes={self._core.yes_id},no={self._core.no_id}",
            *(f"{name}={value!r}" for name, value in sorted(scoring.items())),
        ]
        return "\n".join(parts).encode()

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


_MODELING = ("auto", "native", "transformers")


def _load_model(
    path: Path,
    config: dict[str, Any],
    modeling: str,
    attn_implementation: str | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Any:
    """The checkpoint's causal LM, through this package's decoder or transformers' (see ``modeling``)."""
    reason = native_support(path, config, attn_implementation)
    if modeling == "native" and reason is not None:
        raise ValueError(
            f"modeling='native' cannot load {path}: {reason}; use modeling='auto' or 'transformers'"
        )
    if modeling != "transformers" and reason is None:
        return load_native(path, config, dtype, device)
    if modeling == "auto":
        logger.info("%s: loading through transformers' modelling code (%s)", path.name, reason)
    from transformers import AutoModelForCausalLM

    load_kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        load_kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs)
    if model.__class__.__name__ != "Qwen3ForCausalLM":
        raise ValueError(f"{path} loaded as {model.__class__.__name__}; Qwen3ForCausalLM is required")
    return model.to(device)


def _ids_bytes(ids: list[int]) -> bytes:
    data = array("i", ids).tobytes()
    return len(data).to_bytes(4, "little") + data


def _pair_keys(config: bytes, group: _EncodedGroup) -> list[bytes]:
    """One key per document: a hash of the configuration, the group's caps and the exact ids read.

    The ids are the whole prompt (template prefix, instruction and query, each document row with
    the template's suffix), so any change of text, truncation or window gives another key; the
    effective caps enter too, so a changed ``max_length`` or window setting misses even where it
    would cut nothing.
    """
    base = hashlib.blake2b(config, digest_size=16, person=b"qwen3-rerank")
    limits = group.limits
    base.update(repr(limits).encode() if limits is not None else b"-")
    base.update(_ids_bytes(group.prefix))
    keys = []
    for windows in group.documents:
        h = base.copy()
        h.update(len(windows).to_bytes(4, "little"))
        for tail, span in windows:
            h.update(_ids_bytes(tail))
            start, end = span if span is not None else (-1, -1)
            h.update(array("q", (start, end)).tobytes())
        keys.append(h.digest())
    return keys


def _weights_fingerprint(core: ScoringModel) -> bytes:
    """A cheap fingerprint of the loaded weights (about 15 ms for the 0.6B shape on CPU).

    The score head ``W[yes] - W[no]`` in full, and for every parameter and buffer its name, shape, dtype and
    64 values spread over it, and every module's class (a quantised layer is another class).
    Two checkpoints that share a name but not their weights get different fingerprints.
    """
    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        h.update(core.head.detach().float().cpu().numpy().tobytes())
        for name, module in core.backbone.named_modules():
            h.update(f"{name}:{type(module).__name__};".encode())
            packed = getattr(module, "weight", None)
            if callable(packed) and not isinstance(packed, torch.Tensor):  # a quantized layer's weights
                weight = packed()
                flat = (weight.dequantize() if weight.is_quantized else weight).reshape(-1)
                h.update(flat[:: max(flat.numel() // 64, 1)][:64].float().cpu().numpy().tobytes())
        # Buffers too: an int8 layer keeps its quantized weights and scales in buffers.
        tensors = [*core.backbone.named_parameters(), *core.backbone.named_buffers()]
        for name, tensor in tensors:
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(flat.numel() // 64, 1)][:64]
            h.update(f"{name}{tuple(tensor.shape)}{tensor.dtype};".encode())
            h.update(sample.float().cpu().numpy().tobytes())
    return h.digest()
