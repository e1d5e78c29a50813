"""The test oracle: a straightforward transcription of the Qwen3-Reranker model card's code.

Kept deliberately naive (full-vocabulary logits, left padding, one padded batch) and independent
of the package: it imports nothing from ``qwen3_rerank_plugins``, so the engine is checked
against the published recipe, not against itself.
"""

from __future__ import annotations

import torch

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"


def format_instruction(instruction: str | None, query: str, doc: str) -> str:
    if instruction is None:
        instruction = DEFAULT_TASK
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}"


def body_token_ids(tokenizer, pairs, instruction=None, max_length=8192, plain_text=False) -> list[list[int]]:
    """Token ids of each full prompt, exactly as the model card builds them.

    ``plain_text=True`` tokenises the body with special tokens split (what the engine does for
    user text); the model card itself reads ``<|im_end|>`` inside a document as a control token.
    """
    prefix_tokens = tokenizer.encode(PREFIX, add_special_tokens=False)
    suffix_tokens = tokenizer.encode(SUFFIX, add_special_tokens=False)
    texts = [format_instruction(instruction, q, d) for q, d in pairs]
    inputs = tokenizer(
        texts,
        padding=False,
        truncation="longest_first",
        return_attention_mask=False,
        max_length=max_length - len(prefix_tokens) - len(suffix_tokens),
        split_special_tokens=plain_text,
    )
    return [prefix_tokens + ids + suffix_tokens for ids in inputs["input_ids"]]


@torch.no_grad()
def model_card_scores(
    model, tokenizer, pairs, instruction=None, max_length=8192, plain_text=False
) -> list[float]:
    """P(yes) for each (query, document) pair, computed as on the model card."""
    token_false_id = tokenizer.convert_tokens_to_ids("no")
    token_true_id = tokenizer.convert_tokens_to_ids("yes")
    ids = body_token_ids(tokenizer, pairs, instruction, max_length, plain_text)
    tokenizer.padding_side = "left"
    inputs = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    batch_scores = model(**inputs).logits[:, -1, :]
    true_vector = batch_scores[:, token_true_id]
    false_vector = batch_scores[:, token_false_id]
    batch_scores = torch.stack([false_vector, true_vector], dim=1)
    batch_scores = torch.nn.functional.log_softmax(batch_scores, dim=1)
    return batch_scores[:, 1].exp().tolist()
