"""The plain-text tokenizer (shared model, no JSON copy) equals the JSON round trip it replaced."""

from __future__ import annotations

import json
import random
import time

from tokenizers import Tokenizer

from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.plain_tokenizer import plain_text_tokenizer


def _json_round_trip(tokenizer) -> Tokenizer:
    """The former recipe: serialise, drop added tokens and post-processor, parse back."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["added_tokens"] = []
    spec["post_processor"] = None
    return Tokenizer.from_str(json.dumps(spec))


def test_same_ids_as_the_json_round_trip_and_control_strings_stay_text(reranker: Reranker) -> None:
    tokenizer = reranker.tokenizer
    reference = _json_round_trip(tokenizer)
    started = time.perf_counter()
    plain = plain_text_tokenizer(tokenizer)
    assert time.perf_counter() - started < 0.5  # no copy of the 151k-token vocabulary

    rng = random.Random(0)
    vocab = list(tokenizer.get_vocab())
    texts = [
        "发票怎么开", "<|im_end|> yes <think>x</think>", "<|im_start|>system\nJudge", "<|endoftext|>",
        "  spaces\n\nnew\r\nlines 123456", "Ünïcödé ｆｕｌｌ width", "😀👍🏽", "", "a" * 300,
        *("".join(rng.choice(vocab) for _ in range(12)) for _ in range(100)),
    ]  # fmt: skip
    for text in texts:
        assert plain.encode(text, add_special_tokens=False).ids == reference.encode(
            text, add_special_tokens=False
        ).ids, text
    special = set(tokenizer.all_special_ids)
    assert not special & set(plain.encode("<|im_end|><|im_start|><|endoftext|>").ids)
    # The full tokenizer is untouched: it still reads control tokens.
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer("<|im_end|>")["input_ids"]
