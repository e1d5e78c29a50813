"""The loaded Qwen3-Reranker and its batching: forward passes over rows of many queries at once.

A *row* is one sequence the model reads: either the tail of one document (``" " + doc`` and the
template's suffix) continuing its query's cached prefix, or a whole prompt. Rows of different
queries share forward passes:

* the prefixes (template prefix + instruction + query) of many queries are run together in one
  right-padded pass (*a wave*), and their key/value caches are kept, read only, while the wave's
  rows are scored;
* each row continues its own query's cache: the pass gives every row its own positions
  (``prefix length + i``) and, when the prefixes in a batch differ in length, an attention mask
  that hides the other prefixes' padding; rows are right-padded, so under causal attention no
  real token ever sees a pad;
* rows are sorted by length and batched by a token budget that counts what each row attends
  over (its prefix and its width), so a long query cannot multiply into an oversized batch;
* only two rows of the LM head are used (``h . (W[yes] - W[no])`` in float32).

On out-of-memory a batch (or a wave of prefixes) is split and retried, never dropped.
"""

from __future__ import annotations

import inspect
import logging
import threading
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

import torch

from .modeling import Qwen3Backbone
from .plain_tokenizer import plain_text_tokenizer
from .protocol import ScoringStopped, StopCheck
from .templates import PROMPT_PREFIX, PROMPT_SUFFIX

__all__ = [
    "DEFAULT_BATCH_TOKENS",
    "Int8Linear",
    "Row",
    "ScoringModel",
    "plan_batches",
    "plan_waves",
    "quantize_int8",
    "score_rows",
]

logger = logging.getLogger(__name__)

#: Token budget of one forward pass by device type (rows x attended length).
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "mps": 8192, "cuda": 32768}
# Largest share of padding tolerated in a batch that is already big enough to run efficiently.
_MAX_PADDING = 0.1
# Share of the token budget that one wave's cached prefixes may hold (rows x padded length): the
# keys and values of a wave stay in memory while its rows are scored.
_WAVE_SHARE = 2
# Rows wider than this are batched only with rows of their own query: mixing prefixes of other
# lengths needs a rows x width x (prefix + width) mask, which is cheap only for short rows (and
# long rows fill a forward pass on their own anyway).
_MIX_MAX_WIDTH = 1024


@dataclass
class Row:
    """One sequence to score.

    Attributes:
        ids: The token ids this row feeds to the model.
        prefix: Index of the cached prefix it continues (into the wave's prefixes), or -1 when
            ``ids`` is a whole prompt.
        slot: Where its log-odds go in the output.
        span: The ``(start, end)`` characters of the document this row reads, when it reads a
            window of it.
    """

    ids: list[int]
    prefix: int
    slot: int
    span: tuple[int, int] | None = None


# ---------------------------------------------------------------------------------------------
# Planning (pure Python)
# ---------------------------------------------------------------------------------------------


def plan_waves(prefix_lengths: list[int], batch_tokens: int, max_rows: int) -> list[list[int]]:
    """Prefixes grouped into waves, each run as one right-padded forward pass.

    A wave holds at most ``batch_tokens / 2`` padded prefix tokens and ``max_rows`` prefixes;
    prefixes are sorted by length so that little padding is run or kept.
    """
    order = sorted(range(len(prefix_lengths)), key=lambda i: -prefix_lengths[i])
    cap = max(batch_tokens // _WAVE_SHARE, 1)
    waves: list[list[int]] = []
    wave: list[int] = []
    for i in order:
        width = prefix_lengths[wave[0]] if wave else prefix_lengths[i]
        if wave and ((len(wave) + 1) * width > cap or len(wave) >= max_rows):
            waves.append(wave)
            wave = []
        wave.append(i)
    if wave:
        waves.append(wave)
    return waves


def plan_batches(
    lengths: list[int],
    prefix_lengths: list[int],
    batch_tokens: int,
    max_batch_size: int,
    *,
    can_mix: bool = True,
) -> Iterable[list[int]]:
    """Indices into ``lengths`` grouped longest first so each batch stays under the budget.

    Each row attends over its prefix (``prefix_lengths[i]`` cached tokens, 0 for a whole prompt)
    and its own padded width: a batch costs ``rows x (widest row + longest prefix)``.

    A batch is also closed early, once it holds an eighth of the budget in real tokens, before a
    row that would make more than :data:`_MAX_PADDING` of it padding: a forward pass of that size
    already runs at full speed, so splitting costs nothing while padding costs its share.

    Args:
        lengths: Tokens of each row.
        prefix_lengths: Cached prefix tokens each row continues.
        batch_tokens: Budget of one pass.
        max_batch_size: Most rows per pass.
        can_mix: Whether rows with prefixes of different lengths may share a pass (they need an
            explicit attention mask).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], prefix_lengths[i]))
    min_tokens = batch_tokens // 8
    batch: list[int] = []
    real = 0
    longest_prefix = 0
    for i in order:
        width = lengths[batch[0]] if batch else lengths[i]
        rows = len(batch) + 1
        attended = width + max(longest_prefix, prefix_lengths[i])
        full = rows * attended > batch_tokens or len(batch) >= max_batch_size
        wasteful = real >= min_tokens and real + lengths[i] < (1 - _MAX_PADDING) * rows * width
        mixed = bool(batch) and prefix_lengths[i] != prefix_lengths[batch[0]]
        if batch and (full or wasteful or (mixed and (not can_mix or width > _MIX_MAX_WIDTH))):
            yield batch
            batch, real, longest_prefix = [], 0, 0
        batch.append(i)
        real += lengths[i]
        longest_prefix = max(longest_prefix, prefix_lengths[i])
    if batch:
        yield batch


def _is_oom(exc: BaseException) -> bool:
    message = str(exc).lower()
    # CUDA/MPS say "out of memory"; the CPU allocator says "can't allocate memory".
    return isinstance(exc, torch.OutOfMemoryError) or any(
        words in message for words in ("out of memory", "allocate memory")
    )


# ---------------------------------------------------------------------------------------------
# Key/value caches of many prefixes
# ---------------------------------------------------------------------------------------------


class _PrefixLayer:
    """One layer's cached prefixes, read only, gathered for the rows of a batch.

    ``keys``/``values`` hold one prefix per index along dim 0 (right-padded to a common length).
    ``update`` returns, for each row, its own prefix (cut to the batch's longest) followed by the
    row's new keys/values, without storing anything: between layers only the wave's prefixes stay
    in memory.
    """

    is_sliding = False
    is_compileable = False
    is_initialized = True

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor | None, rows: int
    ) -> None:
        self._keys, self._values, self._index, self._rows = keys, values, index, rows
        self.dtype, self.device = keys.dtype, keys.device

    def _gather(self, cached: torch.Tensor) -> torch.Tensor:
        if self._index is None:  # every row continues the one prefix: broadcast, no copy
            return cached.expand(self._rows, -1, -1, -1)
        return cached.index_select(0, self._index)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys = torch.cat([self._gather(self._keys), key_states], dim=-2)
        values = torch.cat([self._gather(self._values), value_states], dim=-2)
        return keys, values

    def get_seq_length(self) -> int:
        return self._keys.shape[-2]

    def get_mask_sizes(self, query_length: int, *args: Any) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


@dataclass
class _Prefixes:
    """The per-layer keys and values of a wave's prefixes, and each prefix's real length."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    lengths: list[int]


class _PrefixCache:
    """The layers of :func:`_prefix_cache`, as :class:`~.modeling.Qwen3Backbone` reads them."""

    def __init__(self, layers: list[_PrefixLayer]) -> None:
        self.layers = layers

    def get_seq_length(self) -> int:
        return self.layers[0].get_seq_length()


def _prefix_cache(prefixes: _Prefixes, rows: list[int], width: int, device: torch.device, *, native: bool):
    """A read-only cache giving each row its own prefix (``rows[i]`` indexes ``prefixes``).

    For the native decoder a :class:`_PrefixCache`; for transformers' a ``Cache`` of the same
    layers.
    """
    layers = _prefix_layers(prefixes, rows, width, device)
    if native:
        return _PrefixCache(layers)
    from transformers.cache_utils import Cache, CacheLayerMixin

    # Registered as a virtual subclass so the cache's isinstance checks treat it as an attention layer.
    CacheLayerMixin.register(_PrefixLayer)
    return Cache(layers=layers)


def _prefix_layers(
    prefixes: _Prefixes, rows: list[int], width: int, device: torch.device
) -> list[_PrefixLayer]:
    distinct = sorted(set(rows))
    if len(distinct) == 1:
        g = distinct[0]
        return [
            _PrefixLayer(k[g : g + 1, :, :width], v[g : g + 1, :, :width], None, len(rows))
            for k, v in prefixes.layers
        ]
    index = torch.tensor(rows, dtype=torch.long, device=device)
    return [_PrefixLayer(k[:, :, :width], v[:, :, :width], index, len(rows)) for k, v in prefixes.layers]


def _row_mask(
    prefix_lengths: list[int], width: int, rows_width: int, dtype: torch.dtype, device: torch.device
):
    """Additive attention mask ``[rows, 1, rows_width, width + rows_width]``.

    Row ``b``'s token ``i`` sees the first ``prefix_lengths[b]`` cached positions (its own
    prefix; the rest is another prefix's padding) and its own tokens ``0..i``.
    """
    lengths = torch.tensor(prefix_lengths, device=device).view(-1, 1, 1, 1)
    keys = torch.arange(width + rows_width, device=device).view(1, 1, 1, -1)
    queries = torch.arange(rows_width, device=device).view(1, 1, -1, 1)
    allowed = (keys < lengths) | ((keys >= width) & (keys - width <= queries))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------
# The loaded model
# ---------------------------------------------------------------------------------------------


def _token_ids(tokenizer: Any, tokens: tuple[str, ...]) -> dict[str, int | None]:
    """The id of each token in the vocabulary (added tokens included), ``None`` if it has none.

    A fast tokenizer is asked token by token: ``get_vocab()`` would copy Qwen3's 151k-entry
    vocabulary into a dict (a quarter of a second at start-up) to read two entries.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return {token: backend.token_to_id(token) for token in tokens}
    vocab = tokenizer.get_vocab()
    return {token: vocab.get(token) for token in tokens}


class ScoringModel:
    """Weights, tokenizers and the two-row head of one loaded Qwen3-Reranker.

    Several rerankers with different settings may share one of these; a lock serialises forward
    passes so threads can call in at once.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.config = model.config
        self.backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.backbone.eval()
        #: Whether the backbone is this package's own decoder (:mod:`.modeling`), not transformers'.
        self.native = isinstance(self.backbone, Qwen3Backbone)
        first = next(self.backbone.parameters())
        self.device, self.dtype = first.device, first.dtype

        ids = _token_ids(tokenizer, ("yes", "no"))
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(
                f"the tokenizer of {name} has no single token for {missing}; not a Qwen3-Reranker"
            )
        self.yes_id, self.no_id = ids["yes"], ids["no"]
        lm_head = model.get_output_embeddings()
        with torch.no_grad():
            # (W[yes] - W[no]) in float32: the only two rows of the LM head the score depends on.
            self.head = (lm_head.weight[self.yes_id].float() - lm_head.weight[self.no_id].float()).to(
                self.device
            )

        self.plain = plain_text_tokenizer(tokenizer)  # shares the model: no seconds-long JSON copy
        self.prefix_ids: list[int] = tokenizer.encode(PROMPT_PREFIX, add_special_tokens=False)
        self.suffix_ids: list[int] = tokenizer.encode(PROMPT_SUFFIX, add_special_tokens=False)
        pad_id = tokenizer.pad_token_id
        self.pad_id: int = pad_id if pad_id is not None else (tokenizer.eos_token_id or 0)
        self.max_positions: int | None = getattr(self.config, "max_position_embeddings", None)
        # transformers renamed the forward's ``past_key_values`` to ``cache`` (5.x).
        params = inspect.signature(self.backbone.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # Rows continuing prefixes of different lengths need an explicit 4D mask, which the
        # eager and SDPA attention read; other kernels (flash attention) get batches whose
        # prefixes are all of one length.
        attn = getattr(self.config, "_attn_implementation", None) or "eager"
        self.can_mix_prefixes = attn in ("sdpa", "eager")
        self.mask_keys = sorted(set(getattr(self.config, "layer_types", None) or ["full_attention"]))
        self.lock = threading.Lock()
        #: ``"int8"`` once :func:`quantize_int8` has quantized the backbone's linear layers.
        self.quantization: str | None = None
        #: What loaded these weights (set by the registry; ``None`` for a model built by hand).
        self.origin: Any = None
        self._check_plain_text()

    def _check_plain_text(self) -> None:
        special = set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder)
        special.discard(self.tokenizer.unk_token_id)  # an unknown word is text, not a control token
        probe = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nyes<|endoftext|>"
        leaked = special.intersection(self.plain.encode(probe, add_special_tokens=False).ids)
        if leaked:
            raise ValueError(
                f"the tokenizer of {self.name} maps plain text to control tokens {sorted(leaked)}"
            )

    # -- tokenising ----------------------------------------------------------------------------

    def encode_plain(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, read as plain text."""
        return [enc.ids for enc in self.plain.encode_batch(texts, add_special_tokens=False)]

    def encode_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """Token ids of each text with each token's ``(start, end)`` character offsets."""
        return [(e.ids, e.offsets) for e in self.plain.encode_batch(texts, add_special_tokens=False)]

    def cut_for_tokens(self, text: str, tokens: int) -> str:
        """A prefix of ``text`` whose first ``tokens`` token ids are exactly those of ``text``.

        Tokenising a 1 MB document to keep its first 8,000 tokens would cost seconds; this cuts
        the text first, at a pre-tokeniser boundary (the tokenizer splits text into pieces, each
        encoded on its own, so the pieces before a boundary encode the same with or without what
        follows). Every piece gives at least one token, so keeping ``tokens`` pieces keeps at
        least ``tokens`` tokens. Texts of up to ``tokens`` characters are returned as they are.
        """
        margin = 4
        if len(text) <= tokens + margin or self.plain.pre_tokenizer is None:
            return text
        normalizer = self.plain.normalizer
        if normalizer is not None and not unicodedata.is_normalized("NFC", text):
            text = normalizer.normalize_str(text)
        window = 4 * (tokens + margin)
        while window < len(text):
            pieces = self.plain.pre_tokenizer.pre_tokenize_str(text[:window])
            if len(pieces) > tokens + margin:
                return text[: pieces[tokens + margin][1][0]]
            window *= 4
        return text

    # -- forward passes ------------------------------------------------------------------------

    @torch.inference_mode()
    def run_prefixes(self, prefixes: list[list[int]]) -> _Prefixes:
        """Run several prefixes in one right-padded pass; return their keys and values."""
        lengths = [len(p) for p in prefixes]
        batch = self._padded(prefixes)
        out = self.backbone(input_ids=batch, use_cache=True)
        cache = out.cache if self.cache_kwarg == "cache" else out.past_key_values
        layers = cache if self.native else cache.layers
        return _Prefixes([(layer.keys, layer.values) for layer in layers], lengths)

    @torch.inference_mode()
    def run_rows(
        self, rows: list[list[int]], prefixes: _Prefixes | None, row_prefixes: list[int]
    ) -> torch.Tensor:
        """Log-odds ``z_yes - z_no`` (float32, on CPU) of right-padded rows.

        Args:
            rows: Token ids of each row.
            prefixes: The wave's cached prefixes, or ``None`` when every row is a whole prompt.
            row_prefixes: For each row, the index of the prefix it continues (-1: none).
        """
        lengths = [len(s) for s in rows]
        batch = self._padded(rows)
        kwargs: dict[str, Any] = {"use_cache": False}
        if prefixes is not None and any(p >= 0 for p in row_prefixes):
            own = [prefixes.lengths[p] if p >= 0 else 0 for p in row_prefixes]
            width = max(own)
            kwargs = {
                "use_cache": True,
                self.cache_kwarg: _prefix_cache(
                    prefixes, [max(p, 0) for p in row_prefixes], width, self.device, native=self.native
                ),
            }
            if min(own) != width:
                # Each row at its own positions, seeing only its own prefix.
                offsets = torch.tensor(own, device=self.device).unsqueeze(1)
                kwargs["position_ids"] = offsets + torch.arange(batch.shape[1], device=self.device)
                mask = _row_mask(own, width, batch.shape[1], self.dtype, self.device)
                kwargs["attention_mask"] = mask if self.native else dict.fromkeys(self.mask_keys, mask)
        hidden = self.backbone(input_ids=batch, **kwargs).last_hidden_state
        last = torch.tensor(lengths, device=self.device) - 1
        h_last = hidden[torch.arange(len(rows), device=self.device), last]
        return (h_last.float() @ self.head).cpu()

    def _padded(self, sequences: list[list[int]]) -> torch.Tensor:
        width = max(len(s) for s in sequences)
        batch = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(sequences):
            batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return batch.to(self.device, non_blocking=True)


#: How the second int8 digit of an activation scales against the first: x = s * (high + low / 254).
_LOW_DIGIT = 254.0


class Int8Linear(torch.nn.Module):
    """Linear layers in int8: int8 weights per output channel, activations as two int8 digits.

    **Weights**: each output channel's largest magnitude maps to ``weight_max``.

    **Activations**, per token (row) of the input: with ``s`` = the row's largest magnitude / 127,
    the row is written as two int8 digits, ``high = round(x / s)`` and ``low = round((x / s -
    high) * 254)`` (within +-127, as the remainder is within +-0.5), so that ``x = s * (high +
    low / 254)`` to within ``s / 508``: about 16 bits. Both digit rows go through one
    ``torch._int_mm`` (int8 products accumulated exactly in int32 by oneDNN's VNNI/AMX kernels)
    and are joined (in int32 where the weights' row sums rule out overflow, else in float32)
    and rescaled with the row's and the channel's scales.

    A token's output therefore depends only on that token: a document scores the same whatever
    it is batched with (PyTorch's ``quantize_dynamic`` uses one scale for the whole input, which
    made scores depend on their batch-mates). One digit alone (plain int8 activations) ran faster,
    2.0-2.8x float32 against two digits' 1.45-1.87x, but its rounding error, largest on the
    feed-forward's heavy-tailed inner activations, was 2-3 times the two digits' relative to the
    spread of a request's scores, and swapped W3's passages (benchmarks/RESULTS-precision.md).

    Several layers that read the same input (queries, keys and values; gate and up) can be one
    ``Int8Linear`` over their concatenated weights: the input is quantized once and multiplied
    once, and the output is theirs side by side.

    Args:
        linears: The float layer, or layers with the same input size, to quantize (their weights
            are copied, not kept).
        weight_max: Largest quantized weight magnitude: 127, or 63 on CPUs without VNNI, where
            oneDNN multiplies pairs into 16-bit sums that 8-bit weights would saturate
            (measured with ``ONEDNN_MAX_CPU_ISA=AVX2``: ``torch._int_mm`` is exact with weights
            within 63 and off by up to 20 % of the result with weights up to 127).
    """

    #: The scheme's name, part of the score cache's key (another scheme gives other scores).
    SCHEME = "int8 weights per channel, activations in two int8 digits per token"

    def __init__(self, linears: torch.nn.Linear | Sequence[torch.nn.Linear], weight_max: int = 127) -> None:
        super().__init__()
        layers = [linears] if isinstance(linears, torch.nn.Linear) else list(linears)
        if len({layer.in_features for layer in layers}) != 1:
            raise ValueError(f"layers fused into one Int8Linear need one input size, got {layers}")
        weight = torch.cat([layer.weight.detach().float() for layer in layers])
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / weight_max
        quantized = torch.round(weight / scale[:, None]).clamp(-weight_max, weight_max).to(torch.int8)
        # (in, out) as the transpose of a contiguous (out, in): the layout _int_mm reads fastest.
        self.register_buffer("weight_t", quantized.t(), persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        bias = None
        if any(layer.bias is not None for layer in layers):
            bias = torch.cat(
                [
                    torch.zeros(layer.out_features) if layer.bias is None else layer.bias.detach().float()
                    for layer in layers
                ]
            )
        self.register_buffer("bias", bias, persistent=False)
        self.in_features = layers[0].in_features
        self.out_features = weight.shape[0]
        # Whether high * 254 + low sums in int32 for every input: each digit is within 127, so
        # each product is within 127 times the row's L1 norm. Then the digits are joined exactly
        # in integers and converted once; otherwise (wide layers) in float32.
        l1 = quantized.abs().sum(dim=1, dtype=torch.int64).max().item() if quantized.numel() else 0
        self.sum_in_int32 = 127 * (int(_LOW_DIGIT) + 1) * l1 < 2**31

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        count = rows.shape[0]
        amax = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
        scaled = rows.mul(127.0 / amax)
        high = scaled.round()
        digits = torch.empty((2 * count, self.in_features), dtype=torch.int8, device=rows.device)
        digits[:count].copy_(high)
        digits[count:].copy_(scaled.sub_(high).mul_(_LOW_DIGIT).round_())
        products = torch._int_mm(digits, self.weight_t)
        if self.sum_in_int32:
            joined = products[:count].mul_(int(_LOW_DIGIT)).add_(products[count:])
            out = torch.mul(joined, amax.div_(127.0 * _LOW_DIGIT))
        else:
            out = torch.mul(products[count:], 1.0 / _LOW_DIGIT).add_(products[:count])
            out = out.mul_(amax.div_(127.0))
        out = out.mul_(self.weight_scale)
        if self.bias is not None:
            out = out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            "weights=int8 per channel, activations=two int8 digits per token"
        )


def quantize_int8(model: ScoringModel, *, vnni: bool = True, keep_float: Sequence[str] = ()) -> None:
    """Quantize the backbone's linear layers to int8, in place (CPU only).

    Every ``nn.Linear`` of the backbone becomes an :class:`Int8Linear` (int8 weights per output
    channel, activations in two int8 digits per token, int8 products with int32 accumulation
    through ``torch._int_mm``, output float32); in the native decoder the projections that read
    one input (queries, keys and values; gate and up) become one fused layer each. Everything
    else is unchanged: embeddings, norms and attention stay float32, and so does the two-row head
    (it was taken from the LM head, which is not part of the backbone), so prefix reuse,
    cross-query batching and the template work as before. Measured on this project's engine
    before choosing (benchmarks/RESULTS-precision.md): PyTorch's ``quantize_dynamic`` (one
    activation scale per call) was as fast but agreed with float32 only to Spearman 0.83 on W2;
    torchao's int8 dynamic path ran 4x slower than float32 without ``torch.compile``.

    Args:
        model: A float32 model on CPU.
        vnni: Whether the CPU has int8 dot-product instructions (VNNI/AMX); without them the
            weights use 6 bits and a sign so AVX2's 16-bit intermediate sums cannot saturate.
        keep_float: ``fnmatch`` patterns of backbone module names whose linear layers stay float32
            (for example ``"*.down_proj"`` or ``"layers.0.*"``); none by default. A fused group
            with a kept layer is not fused: its other layers are quantized one by one.

    Raises:
        ValueError: The model is not float32 on CPU.
        RuntimeError: This torch has no int8 matrix product.
    """
    if model.device.type != "cpu" or model.dtype != torch.float32:
        raise ValueError(
            f"int8 quantization needs float32 weights on CPU, got {model.dtype} on {model.device}"
        )
    if model.quantization is not None:
        return
    if not hasattr(torch, "_int_mm"):  # pragma: no cover - torch before 2.2
        raise RuntimeError(
            f"dtype='int8' needs torch._int_mm, which torch {torch.__version__} lacks; use dtype='float32'"
        )
    weight_max = 127 if vnni else 63

    def kept(prefix: str, name: str) -> bool:
        qualified = f"{prefix}.{name}" if prefix else name
        return any(fnmatch(qualified, pattern) for pattern in keep_float)

    with torch.no_grad():
        for prefix, module in list(model.backbone.named_modules()):
            names = getattr(module, "PROJECTIONS", ())
            if (
                names
                and all(type(getattr(module, name, None)) is torch.nn.Linear for name in names)
                and not any(kept(prefix, name) for name in names)
            ):
                module.fuse_projections(lambda layers: Int8Linear(layers, weight_max))
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear and not kept(prefix, name):
                    setattr(module, name, Int8Linear(child, weight_max))
    model.quantization = "int8"
    logger.info("%s: linear layers in int8 (%s)", model.name, Int8Linear.SCHEME)


# ---------------------------------------------------------------------------------------------
# Running a plan
# ---------------------------------------------------------------------------------------------


def score_rows(
    model: ScoringModel,
    prefixes: list[list[int]],
    rows: list[Row],
    slots: int,
    *,
    batch_tokens: int,
    max_batch_size: int,
    progress: Callable[[int], None] | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[list[float], list[tuple[int, int] | None]]:
    """Log-odds of every slot: the best over the rows that write to it.

    Args:
        model: The loaded model.
        prefixes: Token ids of each cached prefix (rows refer to them by index).
        rows: The rows to run, in any order.
        slots: How many outputs there are (every slot must be written by at least one row).
        batch_tokens: Token budget of one forward pass.
        max_batch_size: Most rows per pass.
        progress: Called with the number of rows each finished pass scored.
        should_stop: Asked before every forward pass; once it returns ``True`` nothing more is
            run.

    Returns:
        One value per slot (the maximum over its rows: a document read in windows scores by
        its best window, the earliest on a tie), and the span of the row that gave it.

    Raises:
        ScoringStopped: ``should_stop`` returned ``True`` before the last pass.
    """
    out = [float("-inf")] * slots
    spans: list[tuple[int, int] | None] = [None] * slots
    by_prefix: dict[int, list[Row]] = {}
    for row in rows:
        by_prefix.setdefault(row.prefix, []).append(row)
    whole = by_prefix.pop(-1, [])
    used = sorted(by_prefix)
    waves = plan_waves([len(prefixes[p]) for p in used], batch_tokens, max_batch_size)
    runner = _Runner(model, batch_tokens, max_batch_size, out, spans, progress, should_stop)
    if not waves:
        runner.run_wave([], [], whole)
    for n, wave in enumerate(waves):
        members = [used[i] for i in wave]
        wave_rows = [row for p in members for row in by_prefix[p]]
        last = n == len(waves) - 1
        runner.run_wave([prefixes[p] for p in members], members, wave_rows + (whole if last else []))
    return out, spans


class _Runner:
    """Runs waves and batches under the model's lock, splitting on out-of-memory."""

    def __init__(
        self,
        model: ScoringModel,
        batch_tokens: int,
        max_batch_size: int,
        out: list[float],
        spans: list[tuple[int, int] | None],
        progress: Callable[[int], None] | None,
        should_stop: StopCheck | None = None,
    ) -> None:
        self.model, self.batch_tokens, self.max_batch_size = model, batch_tokens, max_batch_size
        self.out, self.spans, self.progress = out, spans, progress
        self.should_stop = should_stop
        self.passes = 0

    def run_wave(self, prefix_ids: list[list[int]], members: list[int], rows: list[Row]) -> None:
        if not rows:
            return
        local = {p: i for i, p in enumerate(members)}
        cached = None
        if prefix_ids:
            try:
                cached = self._locked(self.model.run_prefixes, prefix_ids)
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                if len(prefix_ids) == 1:
                    raise self._clear(exc) from exc
                self._after_oom(f"a wave of {len(prefix_ids)} prefixes")
                half = len(prefix_ids) // 2
                first = set(members[:half])
                self.run_wave(prefix_ids[:half], members[:half], [r for r in rows if r.prefix in first])
                self.run_wave(prefix_ids[half:], members[half:], [r for r in rows if r.prefix not in first])
                return
        row_prefix = [local[r.prefix] if r.prefix >= 0 else -1 for r in rows]
        lengths = [len(r.ids) for r in rows]
        own = [cached.lengths[p] if p >= 0 and cached is not None else 0 for p in row_prefix]
        for batch in plan_batches(
            lengths, own, self.batch_tokens, self.max_batch_size, can_mix=self.model.can_mix_prefixes
        ):
            self._run_batch([rows[i] for i in batch], [row_prefix[i] for i in batch], cached)

    def _run_batch(self, rows: list[Row], row_prefix: list[int], cached: _Prefixes | None) -> None:
        try:
            logits = self._locked(self.model.run_rows, [r.ids for r in rows], cached, row_prefix).tolist()
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            if len(rows) == 1:
                raise self._clear(exc) from exc
            half = len(rows) // 2
            self._after_oom(f"a batch of {len(rows)}; retrying as {half} + {len(rows) - half}")
            self._run_batch(rows[:half], row_prefix[:half], cached)
            self._run_batch(rows[half:], row_prefix[half:], cached)
            return
        for row, value in zip(rows, logits, strict=True):
            best, held = self.out[row.slot], self.spans[row.slot]
            earlier = row.span is not None and held is not None and row.span[0] < held[0]
            if value > best or (value == best and earlier):
                self.out[row.slot], self.spans[row.slot] = value, row.span
        if self.progress is not None:
            self.progress(len(rows))

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.should_stop is not None and self.should_stop():
            raise ScoringStopped(f"stopped after {self.passes} forward passes")
        with self.model.lock:
            result = fn(*args)
        self.passes += 1
        return result

    def _after_oom(self, what: str) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning("Out of memory on %s with %s", self.model.device, what)

    def _clear(self, exc: BaseException) -> RuntimeError:
        return RuntimeError(
            f"{self.model.name} ran out of memory on {self.model.device} even for a single document; "
            "lower max_length, use a smaller model, or another device"
        )
