"""Performance properties of the engine and the benchmark suite, on the tiny real-vocabulary model.

Speed itself is measured by ``benchmarks/run.py``, never asserted here; these tests check what
makes the engine fast without timing it: how many tokens reach the model (prefix reuse, linear
cost, truncation), the optional bfloat16 path, and that the benchmark harness runs and judges.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FAQ_DOCS, FAQ_QUERY
from qwen3_rerank_plugins import Reranker, ScoreGroup

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import spearman, top_k_agreement  # noqa: E402
from workloads import SIZES, build_workloads  # noqa: E402

LONG_DOC = "长文档的内容，" * 300 + " with an English tail " * 100


class TokenCounter:
    """Records, for every forward pass of the backbone, the new tokens and the cached prefix length."""

    def __init__(self, reranker: Reranker) -> None:
        self.calls: list[tuple[int, int, int]] = []  # (rows, new tokens per row, cached tokens)
        self._handle = reranker._core.backbone.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs["input_ids"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = cache.get_seq_length() if cache is not None else 0
        self.calls.append((ids.shape[0], ids.shape[1], cached))

    @property
    def tokens(self) -> int:
        return sum(rows * width for rows, width, _ in self.calls)

    def close(self) -> None:
        self._handle.remove()


def _count(reranker: Reranker, docs: list[str], **kwargs: Any) -> tuple[TokenCounter, list[float]]:
    counter = TokenCounter(reranker)
    try:
        scores = reranker.score(FAQ_QUERY, docs, **kwargs)
    finally:
        counter.close()
    return counter, scores


# ------------------------------------------------------------------ tokens that reach the model


def test_prefix_reuse_reads_the_shared_prefix_once(reranker: Reranker):
    docs = [d for d in FAQ_DOCS if d.strip()]
    cached, scores = _count(reranker, docs)
    plain, plain_scores = _count(reranker.with_settings(prefix_cache=False), docs)

    prefix = len(reranker._encode(ScoreGroup(FAQ_QUERY, [])).prefix)
    assert max(abs(a - b) for a, b in zip(scores, plain_scores, strict=True)) <= 1e-5
    assert cached.calls[0] == (1, prefix, 0)  # the prefix, alone, once
    assert all(c == prefix for _, _, c in cached.calls[1:])  # every document batch reuses it
    assert plain.tokens - cached.tokens >= (len(docs) - 1) * prefix


def test_cost_is_linear_in_documents(reranker: Reranker):
    docs = ["[FAQ] 订单发货时间：付款后48小时内发货。", "How do I reset my password?", "退货政策：7天无理由"]
    counts = [_count(reranker, docs * k)[0].tokens for k in (1, 2, 4)]
    per_copy = counts[1] - counts[0]
    assert per_copy > 0
    assert counts[2] - counts[1] == 2 * per_copy  # each extra document costs the same tokens
    prefix = reranker._encode(ScoreGroup(FAQ_QUERY, [])).prefix
    assert counts[0] - per_copy == len(prefix)  # the prefix, read once


def test_padding_stays_small_with_mixed_lengths(reranker: Reranker):
    docs = ["短", "中等长度的文档内容" * 5, "长" * 200, "x", "another medium sized English document " * 4]
    counter, _ = _count(reranker.with_settings(batch_tokens=256), docs)
    prefix = counter.calls[0][1]
    tails = [len(ids) - prefix for ids in reranker.prompt_ids(FAQ_QUERY, docs)]
    read = counter.tokens - prefix
    # Sorted, budgeted batches read far less than one batch padded to the longest document.
    assert sum(tails) <= read < 0.6 * len(docs) * max(tails)


@pytest.mark.parametrize("max_length", [90, 128, 512])
def test_long_documents_never_exceed_max_length(reranker: Reranker, max_length: int):
    rr = reranker.with_settings(max_length=max_length)
    docs = [LONG_DOC, "short", LONG_DOC[:700]]
    prompts = rr.prompt_ids(FAQ_QUERY, docs)
    suffix = reranker._core.suffix_ids
    assert all(len(p) <= max_length for p in prompts)
    assert all(p[-len(suffix) :] == suffix for p in prompts)  # the template's end is never cut
    assert len(prompts[0]) == max_length  # the long document fills the budget exactly

    counter = TokenCounter(rr)
    try:
        rr.score(FAQ_QUERY, docs)
    finally:
        counter.close()
    assert all(cached + width <= max_length for _, width, cached in counter.calls)


# ------------------------------------------------------------------ low-precision path


def test_bfloat16_path_keeps_a_float32_head_and_tracks_float32(tiny_model_dir: Path, reranker: Reranker):
    bf16 = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert bf16._core.head.dtype == torch.float32
    docs = [d for d in FAQ_DOCS if d.strip()]
    fp32 = reranker.score(FAQ_QUERY, docs, return_logits=True)
    low = bf16.score(FAQ_QUERY, docs, return_logits=True)
    assert all(isinstance(x, float) for x in low)
    # bfloat16 keeps about 3 significant digits; the tiny model's log-odds move by hundredths.
    assert max(abs(a - b) for a, b in zip(fp32, low, strict=True)) < 0.1
    assert spearman(fp32, low) > 0.5
    first, again = bf16.score(FAQ_QUERY, [docs[0], docs[0]])
    assert first == again  # deterministic within a call


# ------------------------------------------------------------------ benchmark harness


def test_rank_agreement_helpers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 2]) == pytest.approx(0.8660254, abs=1e-6)  # ties: average ranks
    assert top_k_agreement([0.9, 0.8, 0.7, 0.1], [0.1, 0.8, 0.7, 0.9]) == pytest.approx(2 / 3)
    assert top_k_agreement([0.3, 0.2], [0.2, 0.3]) == 1.0


def test_workloads_are_deterministic_and_shaped(reranker: Reranker):
    first, again = build_workloads("cpu"), build_workloads("cpu")
    assert [w.to_dict() for w in first] == [w.to_dict() for w in again]
    by_name = {w.name: w for w in build_workloads("issue")}
    assert by_name["W1"].pairs == 20
    assert by_name["W2"].pairs == 50
    assert all(100 <= len(d) <= 400 for d in by_name["W2"].requests[0].documents)
    assert (len(by_name["W3"].requests), by_name["W3"].pairs) == (32, 32 * 32)
    w4 = by_name["W4"]
    assert w4.pairs == SIZES["issue"]["W4"][0]
    lengths = [len(ids) for ids in reranker.prompt_ids(w4.requests[0].query, w4.requests[0].documents)]
    assert min(lengths) > 3000  # ~4k-token documents
    with pytest.raises(ValueError, match="not in size"):
        build_workloads("quick", ["W3"])


@pytest.mark.slow
def test_quick_benchmark_runs_and_checks(tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "quick.md"
    command = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--model", str(tiny_model_dir)]
    proc = subprocess.run(
        [*command, "--min-speedup", "0", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "quick check: passed" in proc.stdout
    report = out.read_text()
    rows = re.findall(
        r"^\| (W[12]) \| engine \| (\d+) \| [\d.]+ \| [\d.]+ \| \d+ \| [\d.]+ \| ([\d.e+-]+) \|$",
        report,
        re.M,
    )
    assert [r[0] for r in rows] == ["W1", "W2"]
    assert all(float(dscore) <= 1e-5 for *_, dscore in rows)

    # The same check fails, with a reason, when the engine misses the required speed-up.
    failed = subprocess.run(
        [*command, "--min-speedup", "1000", "--out", str(out)], capture_output=True, text=True, timeout=300
    )
    assert failed.returncode == 1
    assert "REGRESSION: W1: engine" in failed.stdout


def test_readme_benchmarks_snippet_runs(tiny_model_dir: Path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- section: benchmarks -->", 1)[1].split("<!-- section:", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code, "the benchmarks section of README.md has a python example"
    source = code.group(1).replace("Qwen/Qwen3-Reranker-0.6B", str(tiny_model_dir))
    namespace: dict[str, Any] = {}
    exec(compile(source, "README.md[benchmarks]", "exec"), namespace)
    scores = namespace["scores"]
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
