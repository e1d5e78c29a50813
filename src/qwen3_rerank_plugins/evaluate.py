"""Measure what reranking gains on labelled data: ``qwen3-rerank evaluate``.

A first stage (BM25 over the whole document pool, or none) proposes candidates for each query;
the reranker reorders them. Hit@k, MRR@10 and nDCG@10 are computed on both orders, with the
reranker's latency per query and its throughput in pairs per second.

Datasets:

* **JSONL**, one query per line: ``{"query": ..., "positives": [...], "negatives": [...]}``
  (MTEB reranking's ``"positive"`` / ``"negative"`` are accepted too). Documents are strings or
  ``{"text": ...}`` objects. All documents of the file form one pool, which BM25 searches.
* **BEIR / MTEB retrieval** directories: ``corpus.jsonl`` (``{_id, title?, text}``),
  ``queries.jsonl`` (``{_id, text}``) and ``qrels/<split>.tsv`` (``query-id corpus-id score``,
  with a header line). Graded relevance counts as gain in nDCG.

First stages: ``bm25`` ranks the pool with BM25 over jieba word segmentation (Chinese and
English alike; needs the ``[examples]`` extra) and keeps the top ``candidates``; ``none`` gives
the reranker each JSONL query's own positives and negatives (a BEIR query: the whole corpus),
and the "before" order is then a shuffle with a fixed seed, a random baseline.

Example:
    >>> from qwen3_rerank_plugins import get_reranker
    >>> from qwen3_rerank_plugins.evaluate import evaluate, load_dataset
    >>> report = evaluate(get_reranker(), load_dataset("examples/data/faq_eval.jsonl"))  # doctest: +SKIP
    >>> print(report.format())  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import random
import re
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._optional import require
from .validation import document_text

if TYPE_CHECKING:
    from .protocol import Scorer
    from .templates import InstructionTemplate

__all__ = [
    "ALL_INSTRUCTIONS",
    "BOOTSTRAP_RESAMPLES",
    "DATA_INSTRUCTION",
    "FIRST_STAGES",
    "BM25Index",
    "ComparisonReport",
    "EvalDataset",
    "EvalQuery",
    "EvaluationReport",
    "Interval",
    "Variant",
    "compare",
    "compare_instructions",
    "evaluate",
    "hit_at_k",
    "instruction_arms",
    "load_beir",
    "load_dataset",
    "load_jsonl",
    "mrr_at_k",
    "ndcg_at_k",
    "paired_bootstrap",
    "plot_comparison",
    "plot_report",
    "spearman",
    "tokenize",
    "top_k_overlap",
]

logger = logging.getLogger(__name__)

FIRST_STAGES = ("bm25", "none")
#: Largest pool the ``none`` first stage reranks whole (a BEIR corpus per query).
MAX_POOL_WITHOUT_FIRST_STAGE = 1000


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return k


def hit_at_k(ranking: Sequence[Any], relevance: Mapping[Any, float], k: int) -> float:
    """1.0 when a relevant document is among the first ``k`` of ``ranking``, else 0.0.

    Args:
        ranking: Document keys, best first.
        relevance: Relevance grade per document key; a grade > 0 is relevant.
        k: Cut-off.

    Example:
        >>> hit_at_k(["a", "b", "c"], {"c": 1}, 2), hit_at_k(["a", "b", "c"], {"c": 1}, 3)
        (0.0, 1.0)
    """
    k = _check_k(k)
    return 1.0 if any(relevance.get(doc, 0) > 0 for doc in ranking[:k]) else 0.0


def mrr_at_k(ranking: Sequence[Any], relevance: Mapping[Any, float], k: int = 10) -> float:
    """Reciprocal rank of the first relevant document within the first ``k``, else 0.0.

    Args:
        ranking: Document keys, best first.
        relevance: Relevance grade per document key; a grade > 0 is relevant.
        k: Cut-off (10 for MRR@10).

    Example:
        >>> mrr_at_k(["a", "b", "c"], {"b": 1, "c": 1})
        0.5
    """
    k = _check_k(k)
    for rank, doc in enumerate(ranking[:k], start=1):
        if relevance.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranking: Sequence[Any], relevance: Mapping[Any, float], k: int = 10) -> float:
    """Normalised discounted cumulative gain at ``k`` (linear gain, as ``trec_eval``).

    ``DCG = sum(rel_i / log2(i + 1))`` over the first ``k`` ranks; the ideal DCG sorts *all*
    judged relevant documents, retrieved or not, so a relevant document the first stage missed
    lowers the score.

    Args:
        ranking: Document keys, best first.
        relevance: Relevance grade per document key (the gain); a grade > 0 is relevant.
        k: Cut-off (10 for nDCG@10).

    Returns:
        A number in [0, 1]; 0.0 when nothing is relevant.

    Example:
        >>> round(ndcg_at_k(["a", "b"], {"b": 1}), 4)  # 1/log2(3) over 1/log2(2)
        0.6309
    """
    k = _check_k(k)
    dcg = sum(relevance.get(doc, 0) / math.log2(rank + 1) for rank, doc in enumerate(ranking[:k], start=1))
    ideal = sorted((g for g in relevance.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def _metrics(ranking: Sequence[int], relevance: Mapping[int, float], ks: Sequence[int]) -> dict[str, float]:
    out = {f"hit@{k}": hit_at_k(ranking, relevance, k) for k in ks}
    out["MRR@10"] = mrr_at_k(ranking, relevance, 10)
    out["nDCG@10"] = ndcg_at_k(ranking, relevance, 10)
    return out


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalQuery:
    """One labelled query.

    Attributes:
        id: Query id (the line number for JSONL).
        text: The query.
        relevance: Relevance grade per document index; > 0 is relevant.
        candidates: The query's own candidate documents (JSONL positives and negatives), or
            ``None`` when every document of the pool is a candidate (BEIR).
        instruction: The query's own instruction from the data (JSONL key ``"instruction"``),
            used by the ``data`` arm of a comparison; ``None`` when the data gives none.
    """

    id: str
    text: str
    relevance: Mapping[int, float]
    candidates: tuple[int, ...] | None = None
    instruction: str | None = None


@dataclass(frozen=True)
class EvalDataset:
    """Queries with relevance labels over one pool of documents.

    Attributes:
        name: Display name (the file or directory name).
        documents: Document texts; queries refer to them by index.
        doc_ids: Document ids, parallel to ``documents``.
        queries: The labelled queries.
    """

    name: str
    documents: tuple[str, ...]
    doc_ids: tuple[str, ...]
    queries: tuple[EvalQuery, ...]


def _doc_text(doc: Any, where: str) -> str:
    return document_text(doc, where)  # the one document rule (empty text is scored, as the engine does)


def _doc_list(record: Mapping[str, Any], names: tuple[str, str], where: str) -> list[Any]:
    value = record.get(names[0], record.get(names[1], []))
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"{where}: '{names[0]}' must be a list of documents, got {type(value).__name__}")
    return value


def load_jsonl(path: str | Path) -> EvalDataset:
    """Load ``{"query", "positives", "negatives"}`` lines (MTEB's singular keys accepted too).

    Identical document texts are stored once, so a document may be positive for one query and a
    negative for another.

    Args:
        path: The JSONL file.

    Returns:
        The dataset; each query's ``candidates`` are its positives then its negatives.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: A line is not JSON or lacks a query or a positive (the message names the line).
    """
    path = Path(path)
    texts: list[str] = []
    index: dict[str, int] = {}
    queries: list[EvalQuery] = []

    def doc_index(text: str) -> int:
        if text not in index:
            index[text] = len(texts)
            texts.append(text)
        return index[text]

    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path.name} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where} is not valid JSON: {exc.msg}") from exc
            if not isinstance(record, Mapping):
                raise ValueError(f"{where} must be a JSON object, got {type(record).__name__}")
            query = record.get("query")
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"{where} needs a non-empty string 'query'")
            positives = _doc_list(record, ("positives", "positive"), where)
            negatives = _doc_list(record, ("negatives", "negative"), where)
            if not positives:
                raise ValueError(f"{where} needs at least one document in 'positives'")
            instruction = record.get("instruction")
            if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()):
                raise ValueError(f"{where}: 'instruction' must be a non-empty string when given")
            relevance: dict[int, float] = {}
            for i, doc in enumerate(positives):
                relevance[doc_index(_doc_text(doc, f"{where}: positives[{i}]"))] = 1.0
            candidates = list(relevance)
            for i, doc in enumerate(negatives):
                j = doc_index(_doc_text(doc, f"{where}: negatives[{i}]"))
                if j not in relevance and j not in candidates:
                    candidates.append(j)
            queries.append(
                EvalQuery(
                    id=str(record.get("id", number)),
                    text=query,
                    relevance=relevance,
                    candidates=tuple(candidates),
                    instruction=instruction,
                )
            )
    if not queries:
        raise ValueError(f"{path} holds no queries: expected one JSON object per line")
    return EvalDataset(
        name=path.name,
        documents=tuple(texts),
        doc_ids=tuple(f"d{i}" for i in range(len(texts))),
        queries=tuple(queries),
    )


def _read_jsonl_records(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path.name} line {number} is not valid JSON: {exc.msg}") from exc
                if not isinstance(record, dict) or "_id" not in record:
                    raise ValueError(f"{path.name} line {number} must be an object with an '_id'")
                yield number, record


def load_beir(path: str | Path, split: str = "test") -> EvalDataset:
    """Load a BEIR / MTEB retrieval directory: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/<split>.tsv``.

    A document's title, when present, is put before its text. Queries without a relevant
    document in the qrels are left out (as ``trec_eval`` does).

    Args:
        path: The directory.
        split: Which ``qrels/<split>.tsv`` to read.

    Returns:
        The dataset; its queries have no own candidates (the whole corpus is the pool).

    Raises:
        FileNotFoundError: A required file is missing (the message names it).
        ValueError: A file is malformed, or the qrels name unknown ids.
    """
    root = Path(path)
    corpus_file, queries_file = root / "corpus.jsonl", root / "queries.jsonl"
    qrels_file = root / "qrels" / f"{split}.tsv"
    for required in (corpus_file, queries_file, qrels_file):
        if not required.is_file():
            raise FileNotFoundError(
                f"{required} is missing: a BEIR/MTEB directory holds corpus.jsonl, queries.jsonl and "
                f"qrels/{split}.tsv"
            )
    texts, ids, index = [], [], {}
    for number, record in _read_jsonl_records(corpus_file):
        text = record.get("text") or ""
        title = record.get("title") or ""
        full = f"{title}\n{text}".strip() if title else text
        if not isinstance(full, str) or not full.strip():
            raise ValueError(f"{corpus_file.name} line {number} has no text")
        index[str(record["_id"])] = len(texts)
        ids.append(str(record["_id"]))
        texts.append(full)
    query_text = {str(r["_id"]): str(r.get("text", "")) for _, r in _read_jsonl_records(queries_file)}

    relevance: dict[str, dict[int, float]] = {}
    with qrels_file.open(encoding="utf-8", newline="") as fh:
        for number, row in enumerate(csv.reader(fh, delimiter="\t"), start=1):
            if not row or (number == 1 and not _is_number(row[-1])):
                continue  # blank line or header
            if len(row) < 3 or not _is_number(row[-1]):
                raise ValueError(
                    f"{qrels_file.name} line {number}: expected 'query-id<TAB>corpus-id<TAB>score'"
                )
            qid, did, grade = row[0], row[-2], float(row[-1])
            if did not in index:
                raise ValueError(f"{qrels_file.name} line {number}: unknown corpus id {did!r}")
            if qid not in query_text:
                raise ValueError(f"{qrels_file.name} line {number}: unknown query id {qid!r}")
            relevance.setdefault(qid, {})[index[did]] = grade
    queries = tuple(
        EvalQuery(id=qid, text=query_text[qid], relevance=rels)
        for qid, rels in relevance.items()
        if any(g > 0 for g in rels.values())
    )
    if not queries:
        raise ValueError(f"{qrels_file} has no query with a relevant document")
    return EvalDataset(name=root.name, documents=tuple(texts), doc_ids=tuple(ids), queries=queries)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_dataset(path: str | Path, split: str = "test") -> EvalDataset:
    """Load a JSONL file (:func:`load_jsonl`) or a BEIR/MTEB directory (:func:`load_beir`).

    Args:
        path: A ``.jsonl`` file or a directory.
        split: The qrels split of a directory.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The data is malformed (the message names the file and line).
    """
    path = Path(path)
    if path.is_dir():
        return load_beir(path, split)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    return load_jsonl(path)


# ---------------------------------------------------------------------------------------------
# First stage: BM25 over jieba tokens
# ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w", re.UNICODE)


@functools.cache
def _jieba() -> Any:
    jieba = require("jieba", "examples", "BM25 word segmentation")
    jieba.setLogLevel(logging.WARNING)  # jieba logs its dictionary loading at DEBUG
    return jieba


def tokenize(text: str) -> list[str]:
    """Lower-cased words for BM25: jieba's search-mode segmentation, punctuation dropped.

    Works for Chinese, English and mixed text (jieba keeps Latin words whole).

    Args:
        text: Any text.

    Returns:
        The tokens, in order (search mode adds the shorter words inside long ones).

    Raises:
        ImportError: jieba is missing (the message names the ``[examples]`` extra).

    Example:
        >>> tokenize("订单还没发货 my Order")  # doctest: +SKIP
        ['订单', '还', '没', '发货', 'my', 'order']
    """
    jieba = _jieba()
    return [t.lower() for t in jieba.lcut_for_search(text) if _WORD.search(t)]


class BM25Index:
    """BM25 (Okapi) over a list of texts, tokenised with :func:`tokenize`.

    Args:
        texts: The documents.

    Example:
        >>> index = BM25Index(["发票怎么开", "退货政策"])  # doctest: +SKIP
        >>> index.search("开发票", top_k=1)  # doctest: +SKIP
        [(0, 0.69)]
    """

    def __init__(self, texts: Sequence[str]) -> None:
        rank_bm25 = require("rank_bm25", "examples", "The BM25 first stage")
        if not texts:
            raise ValueError("BM25Index needs at least one text")
        # An empty token list would divide by zero inside rank_bm25; a placeholder token never matches.
        self._bm25 = rank_bm25.BM25Okapi([tokenize(t) or ["\x00"] for t in texts])
        self.size = len(texts)

    def search(self, query: str, top_k: int | None = None) -> list[tuple[int, float]]:
        """``(index, score)`` of the best ``top_k`` texts (all when ``None``), best first; ties by index."""
        scores = self._bm25.get_scores(tokenize(query))
        order = sorted(range(self.size), key=lambda i: (-scores[i], i))
        return [(i, float(scores[i])) for i in order[:top_k]]


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationReport:
    """Metrics before and after reranking, and the reranker's speed.

    Attributes:
        dataset: Dataset name.
        model: The reranker's model name.
        device: Where it ran, e.g. ``"cpu (float32)"``.
        first_stage: ``"bm25"`` or ``"none"``.
        candidates: The BM25 depth, at most the pool size (``None`` for ``none``).
        instruction: The instruction given (``None``: the reranker's default).
        queries: Number of queries evaluated.
        documents: Size of the document pool.
        before: Mean metrics of the first-stage order.
        after: Mean metrics after reranking.
        latencies_ms: Reranking time of each query, in milliseconds.
        pairs: Total (query, document) pairs reranked.
    """

    dataset: str
    model: str
    device: str
    first_stage: str
    candidates: int | None
    instruction: str | None
    queries: int
    documents: int
    before: dict[str, float]
    after: dict[str, float]
    latencies_ms: tuple[float, ...] = field(repr=False)
    pairs: int = 0

    @property
    def latency_ms(self) -> dict[str, float]:
        """Mean, median and 95th percentile reranking time per query, in milliseconds."""
        values = sorted(self.latencies_ms)
        p95 = values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]
        return {"mean": statistics.fmean(values), "p50": statistics.median(values), "p95": p95}

    @property
    def pairs_per_second(self) -> float:
        """Pairs reranked per second of reranking time."""
        seconds = sum(self.latencies_ms) / 1000
        return self.pairs / seconds if seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (without per-query latencies)."""
        return {
            "dataset": self.dataset,
            "model": self.model,
            "device": self.device,
            "first_stage": self.first_stage,
            "candidates": self.candidates,
            "instruction": self.instruction,
            "queries": self.queries,
            "documents": self.documents,
            "before": self.before,
            "after": self.after,
            "latency_ms": self.latency_ms,
            "pairs": self.pairs,
            "pairs_per_second": self.pairs_per_second,
        }

    def format(self) -> str:
        """The report as a table, for a terminal."""
        stage = (
            f"bm25 (jieba + rank-bm25), top {self.candidates} candidates"
            if self.first_stage == "bm25"
            else "none (each query's own candidates; 'before' is a shuffle with a fixed seed)"
        )
        lines = [
            f"Dataset: {self.dataset} ({self.queries} queries, {self.documents} documents)",
            f"Model: {self.model} on {self.device}; instruction: {self.instruction or 'default'}",
            f"First stage: {stage}",
            "",
            f"{'metric':<9}{'before':>9}{'after':>9}{'change':>9}",
        ]
        for name, before in self.before.items():
            after = self.after[name]
            lines.append(f"{name:<9}{before:>9.3f}{after:>9.3f}{after - before:>+9.3f}")
        lat = self.latency_ms
        lines += [
            "",
            f"Reranking: {self.pairs / max(self.queries, 1):.1f} pairs per query, "
            f"{lat['mean']:.1f} ms per query (p50 {lat['p50']:.1f}, p95 {lat['p95']:.1f}), "
            f"{self.pairs_per_second:.0f} pairs/s",
        ]
        return "\n".join(lines)


def _candidate_pools(
    dataset: EvalDataset, first_stage: str, ks: Sequence[int], candidates: int, seed: int
) -> tuple[tuple[int, ...], list[list[int]]]:
    """The checked cut-offs and each query's first-stage candidates (document indices)."""
    if not dataset.queries:
        raise ValueError(f"dataset {dataset.name!r} has no queries")
    if first_stage not in FIRST_STAGES:
        raise ValueError(f"first_stage must be one of {', '.join(FIRST_STAGES)}, got {first_stage!r}")
    checked = tuple(sorted({_check_k(k) for k in ks}))
    if not checked:
        raise ValueError("ks must name at least one cut-off")
    return checked, _first_stage(dataset, first_stage, _check_k(candidates), seed)


def _first_stage(dataset: EvalDataset, first_stage: str, candidates: int, seed: int) -> list[list[int]]:
    """Candidate indices per query, in first-stage order."""
    if first_stage == "bm25":
        index = BM25Index(dataset.documents)
        return [[i for i, _ in index.search(q.text, candidates)] for q in dataset.queries]
    pools = []
    for q in dataset.queries:
        if q.candidates is not None:
            pool = list(q.candidates)
        elif len(dataset.documents) <= MAX_POOL_WITHOUT_FIRST_STAGE:
            pool = list(range(len(dataset.documents)))
        else:
            raise ValueError(
                f"--first-stage none would rerank all {len(dataset.documents)} documents for every query "
                f"(more than {MAX_POOL_WITHOUT_FIRST_STAGE}); use --first-stage bm25"
            )
        random.Random(f"{seed}:{q.id}").shuffle(pool)
        pools.append(pool)
    return pools


def evaluate(
    reranker: Scorer,
    dataset: EvalDataset,
    *,
    first_stage: str = "bm25",
    ks: Sequence[int] = (1, 3, 10),
    candidates: int = 50,
    instruction: str | InstructionTemplate | None = None,
    seed: int = 0,
    show_progress: bool = False,
) -> EvaluationReport:
    """Rank every query's candidates with the first stage, then with the reranker; compare.

    Args:
        reranker: The engine (:class:`~qwen3_rerank_plugins.Reranker`) or any other
            :class:`~qwen3_rerank_plugins.protocol.Scorer`.
        dataset: From :func:`load_dataset`.
        first_stage: ``"bm25"`` (BM25 over the whole pool, top ``candidates``) or ``"none"``.
        ks: Cut-offs of hit@k (MRR and nDCG are always at 10).
        candidates: How many BM25 results the reranker reorders.
        instruction: Template name or free text; defaults to the reranker's instruction.
        seed: Seed of the random "before" order of ``first_stage="none"``.
        show_progress: Show a progress bar over queries.

    Returns:
        An :class:`EvaluationReport`. One untimed warm-up call precedes the timed ones.

    Raises:
        ValueError: On an unknown first stage or a bad ``ks`` / ``candidates``.
    """
    ks, pools = _candidate_pools(dataset, first_stage, ks, candidates, seed)

    # Warm-up: the first forward pass pays one-off costs (allocations, kernel selection).
    first_texts = [dataset.documents[i] for i in pools[0][:2]]
    reranker.score(dataset.queries[0].text, first_texts, instruction)

    before: list[dict[str, float]] = []
    after: list[dict[str, float]] = []
    latencies: list[float] = []
    pairs = 0
    queries: Iterable[tuple[EvalQuery, list[int]]] = zip(dataset.queries, pools, strict=True)
    if show_progress:
        from tqdm.auto import tqdm

        queries = tqdm(list(queries), desc="Evaluating", unit="query")
    for query, pool in queries:
        before.append(_metrics(pool, query.relevance, ks))
        start = time.perf_counter()
        results = reranker.rerank(query.text, [dataset.documents[i] for i in pool], instruction=instruction)
        latencies.append((time.perf_counter() - start) * 1000)
        pairs += len(pool)
        after.append(_metrics([pool[r.index] for r in results], query.relevance, ks))
    return EvaluationReport(
        dataset=dataset.name,
        model=reranker.model_name,
        device=f"{reranker.device} ({str(reranker.dtype).removeprefix('torch.')})",
        first_stage=first_stage,
        candidates=min(candidates, len(dataset.documents)) if first_stage == "bm25" else None,
        instruction=instruction if instruction is None or isinstance(instruction, str) else instruction.name,
        queries=len(dataset.queries),
        documents=len(dataset.documents),
        before=_mean(before),
        after=_mean(after),
        latencies_ms=tuple(latencies),
        pairs=pairs,
    )


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {name: statistics.fmean(row[name] for row in rows) for name in rows[0]}


def plot_report(report: EvaluationReport, path: str | Path, *, title: str | None = None) -> Path:
    """Write a bar chart of every metric before and after reranking (PNG, SVG or PDF by suffix).

    Args:
        report: From :func:`evaluate`.
        path: Output file; its suffix picks the format.
        title: Chart title (default: dataset and model).

    Returns:
        The written path.
    """
    require("matplotlib", "examples", "The evaluation chart (--plot)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.before)
    x = range(len(names))
    width = 0.38
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4))
    try:
        bars = [
            ax.bar([i - width / 2 for i in x], [report.before[n] for n in names], width, label="before"),
            ax.bar([i + width / 2 for i in x], [report.after[n] for n in names], width, label="after rerank"),
        ]
        for group in bars:
            ax.bar_label(group, fmt="%.2f", fontsize=8, padding=2)
        ax.set_xticks(list(x), names)
        ax.set_ylim(0, 1.1)
        ax.set_ylabel("score")
        ax.legend(loc="upper left")
        stage = f"{report.first_stage} top {report.candidates}" if report.candidates else report.first_stage
        ax.set_title(title or f"{report.dataset}: {stage} vs. {report.model}", fontsize=10)
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# Comparing instructions, models or dtypes on the same candidates
# ---------------------------------------------------------------------------------------------

#: Resamples of the paired bootstrap (stated in every comparison report).
BOOTSTRAP_RESAMPLES = 2000
#: Coverage of the bootstrap intervals.
CONFIDENCE = 0.95
#: The metric a comparison names its winner by.
PRIMARY_METRIC = "nDCG@10"
#: ``instructions=["all"]``: every registered template plus the reranker's own instruction.
ALL_INSTRUCTIONS = "all"
#: Label of the reranker's own instruction (``None``) in a comparison.
DEFAULT_LABEL = "default"
#: The arm that gives each query its own instruction from the data (JSONL ``"instruction"``).
DATA_INSTRUCTION = "data"


@dataclass(frozen=True)
class Variant:
    """One arm of a comparison: a scorer and the instruction it reads.

    Attributes:
        label: How tables, JSON and the chart name it.
        scorer: The reranker (arms that share a scorer are scored in one engine call).
        instruction: Template name or free text; ``None`` for the scorer's own instruction.
    """

    label: str
    scorer: Scorer
    instruction: str | InstructionTemplate | None = None


@dataclass(frozen=True)
class Interval:
    """A mean difference (arm minus baseline) with its paired-bootstrap confidence interval."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or wholly below zero."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, float | bool]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "excludes_zero": self.excludes_zero}

    def format(self) -> str:
        star = "*" if self.excludes_zero else " "
        return f"{self.mean:+.3f} [{self.low:+.3f},{self.high:+.3f}]{star}"


@dataclass(frozen=True)
class ComparisonReport:
    """Several arms (instructions, models or dtypes) evaluated on the same candidates.

    Attributes:
        dataset: Dataset name.
        first_stage: ``"bm25"`` or ``"none"``.
        candidates: The BM25 depth (``None`` for ``none``).
        queries: Number of queries.
        documents: Size of the pool.
        baseline: Label of the arm the others are compared with.
        arms: Per label: ``model``, ``device``, ``instruction`` (text) of that arm.
        before: Mean metrics of the first-stage order.
        metrics: Per label, mean metrics after reranking.
        differences: Per non-baseline label and metric, the mean difference to the baseline with
            its paired-bootstrap interval (queries resampled with replacement; every arm and
            metric uses the same resamples).
        agreement: Per non-baseline label, rank agreement with the baseline's scores over the same
            candidates: mean Spearman correlation per query, mean top-k overlap for each k, and
            the largest absolute log-odds difference.
        winner: Per metric, the label whose interval against the baseline lies above zero with the
            largest mean (the baseline when every other arm's interval lies below zero), or
            ``None`` when the data cannot tell the arms apart.
        resamples: Bootstrap resamples.
        seed: Bootstrap seed.
        pairs: (query, document) pairs scored, all arms together.
        engine_calls: ``score_groups`` calls made (one per distinct scorer).
        seconds: Scoring time, all calls together.
        per_query: Per label, each query's metrics (in dataset order).
    """

    dataset: str
    first_stage: str
    candidates: int | None
    queries: int
    documents: int
    baseline: str
    arms: dict[str, dict[str, str]]
    before: dict[str, float]
    metrics: dict[str, dict[str, float]]
    differences: dict[str, dict[str, Interval]]
    agreement: dict[str, dict[str, float]]
    winner: dict[str, str | None]
    resamples: int
    seed: int
    pairs: int
    engine_calls: int
    seconds: float
    per_query: dict[str, list[dict[str, float]]] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (per-query metrics left out)."""
        return {
            "dataset": self.dataset,
            "first_stage": self.first_stage,
            "candidates": self.candidates,
            "queries": self.queries,
            "documents": self.documents,
            "baseline": self.baseline,
            "arms": self.arms,
            "before": self.before,
            "metrics": self.metrics,
            "differences": {
                label: {m: iv.to_dict() for m, iv in diffs.items()}
                for label, diffs in self.differences.items()
            },
            "agreement": self.agreement,
            "winner": self.winner,
            "bootstrap": {"resamples": self.resamples, "seed": self.seed, "confidence": CONFIDENCE},
            "pairs": self.pairs,
            "engine_calls": self.engine_calls,
            "seconds": self.seconds,
        }

    def format(self) -> str:
        """The comparison as tables, for a terminal."""
        names = list(self.before)
        width = max(10, *(len(label) + 2 for label in self.metrics))
        stage = (
            f"bm25 (jieba + rank-bm25), top {self.candidates} candidates"
            if self.first_stage == "bm25"
            else "none (each query's own candidates)"
        )
        base = self.arms[self.baseline]
        lines = [
            f"Dataset: {self.dataset} ({self.queries} queries, {self.documents} documents)",
            f"First stage: {stage}",
            f"Arms: {len(self.metrics)} on the same candidates; baseline: {self.baseline} "
            f"({base['model']} on {base['device']})",
            f"Scored {self.pairs} pairs in {self.engine_calls} engine call(s), {self.seconds:.1f} s",
            "",
            "Mean metrics after reranking",
            f"{'arm':<{width}}" + "".join(f"{n:>9}" for n in names),
            f"{'(before)':<{width}}" + "".join(f"{self.before[n]:>9.3f}" for n in names),
        ]
        for label, row in self.metrics.items():
            lines.append(f"{label:<{width}}" + "".join(f"{row[n]:>9.3f}" for n in names))
        if self.differences:
            pct = round(CONFIDENCE * 100)
            lines += [
                "",
                f"Difference to the baseline, mean [{pct}% CI]; paired bootstrap over queries, "
                f"{self.resamples} resamples, seed {self.seed}; * = the interval excludes 0",
                f"{'arm':<{width}}" + "".join(f"{n:>25}" for n in names),
            ]
            for label, diffs in self.differences.items():
                lines.append(f"{label:<{width}}" + "".join(f"{diffs[n].format():>25}" for n in names))
            agree_names = list(next(iter(self.agreement.values())))
            lines += [
                "",
                "Rank agreement with the baseline (same candidates)",
                f"{'arm':<{width}}" + "".join(f"{n:>18}" for n in agree_names),
            ]
            for label, row in self.agreement.items():
                lines.append(f"{label:<{width}}" + "".join(f"{row[n]:>18.4f}" for n in agree_names))
        lines.append("")
        best = self.winner.get(PRIMARY_METRIC)
        if not self.differences:
            lines.append("One arm only: nothing to compare.")
        elif best is None:
            lines.append(
                f"Winner on {PRIMARY_METRIC}: none. No arm differs from the baseline beyond noise "
                f"({round(CONFIDENCE * 100)}% intervals include 0); more labelled queries would be needed."
            )
        elif best == self.baseline:
            lines.append(f"Winner on {PRIMARY_METRIC}: {best} (the baseline; every other arm is worse).")
        else:
            iv = self.differences[best][PRIMARY_METRIC]
            lines.append(
                f"Winner on {PRIMARY_METRIC}: {best} ({iv.mean:+.3f} over {self.baseline}, "
                f"{round(CONFIDENCE * 100)}% CI [{iv.low:+.3f}, {iv.high:+.3f}])"
            )
        return "\n".join(lines)


def instruction_arms(instructions: Sequence[str | None], *, data: bool = False) -> list[str | None]:
    """Expand a list of instructions: ``"all"`` becomes the reranker's own (``None``), the data's
    own (``"data"``, when ``data`` is true) and every template.

    Duplicates are dropped, order kept.

    Example:
        >>> instruction_arms(["similar_ticket", None, "similar_ticket"])
        ['similar_ticket', None]
    """
    from .templates import list_instruction_templates

    out: list[str | None] = []
    for item in instructions:
        own = [DATA_INSTRUCTION] if data else []
        templates = [t.name for t in list_instruction_templates()]
        expanded = [None, *own, *templates] if item == ALL_INSTRUCTIONS else [item]
        for one in expanded:
            if one not in out:
                out.append(one)
    if not out:
        raise ValueError("instructions must name at least one instruction")
    return out


def instruction_label(instruction: str | None, limit: int = 28) -> str:
    """A short table label for an instruction: its template name, ``default``, or clipped free text."""
    if instruction is None:
        return DEFAULT_LABEL
    return instruction if len(instruction) <= limit else instruction[: limit - 1] + "…"


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (ties get average ranks); ``None`` when undefined.

    Example:
        >>> spearman([0.1, 0.5, 0.9], [1, 2, 4]), spearman([1, 2, 3], [3, 2, 1])
        (1.0, -1.0)
    """
    if len(a) != len(b):
        raise ValueError("spearman needs two sequences of the same length")
    if len(a) < 2:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return cov / math.sqrt(va * vb)


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """Share of the top ``k`` by ``a`` that is also in the top ``k`` by ``b`` (ties by index).

    Example:
        >>> top_k_overlap([3, 2, 1, 0], [3, 0, 2, 1], 2)
        0.5
    """
    k = min(_check_k(k), len(a))
    if k == 0:
        return 1.0
    top_a = set(ranked_order(a)[:k])
    top_b = set(ranked_order(b)[:k])
    return len(top_a & top_b) / k


def ranked_order(scores: Sequence[float]) -> list[int]:
    """Indices by descending score, ties by index (the reranker's own order)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def paired_bootstrap(
    differences: Mapping[str, Sequence[float]], *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, Interval]:
    """Percentile intervals of the mean of several paired per-query differences.

    Every series is resampled with the *same* query indices (a paired bootstrap), so the
    intervals of several metrics or arms come from one set of resamples. The same ``seed`` gives
    the same intervals.

    Args:
        differences: Per name, one difference per query (all of one length).
        resamples: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        Per name, the observed mean difference and its ``CONFIDENCE`` interval.
    """
    resamples = _check_k(resamples)
    lengths = {len(v) for v in differences.values()}
    if len(lengths) > 1:
        raise ValueError("paired_bootstrap needs one difference per query in every series")
    n = lengths.pop() if lengths else 0
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one query")
    rng = random.Random(seed)
    means: dict[str, list[float]] = {name: [] for name in differences}
    series = {name: list(values) for name, values in differences.items()}
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        for name, values in series.items():
            means[name].append(sum(values[i] for i in idx) / n)
    alpha = (1 - CONFIDENCE) / 2
    lo_i = max(0, math.floor(alpha * resamples))
    hi_i = min(resamples - 1, math.ceil((1 - alpha) * resamples) - 1)
    out = {}
    for name, values in series.items():
        ordered = sorted(means[name])
        out[name] = Interval(statistics.fmean(values), ordered[lo_i], ordered[hi_i])
    return out


def _winner(baseline: str, differences: Mapping[str, Mapping[str, Interval]], metric: str) -> str | None:
    above = [(iv[metric].mean, label) for label, iv in differences.items() if iv[metric].low > 0]
    if above:
        return max(above)[1]
    if differences and all(iv[metric].high < 0 for iv in differences.values()):
        return baseline
    return None


def compare(
    arms: Sequence[Variant],
    dataset: EvalDataset,
    *,
    baseline: str | None = None,
    first_stage: str = "bm25",
    ks: Sequence[int] = (1, 3, 10),
    candidates: int = 50,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = 0,
    show_progress: bool = False,
) -> ComparisonReport:
    """Evaluate several arms (instructions, models, dtypes) on the same first-stage candidates.

    Every arm reranks exactly the same candidates. Arms that share a scorer are scored in one
    ``score_groups`` call holding every (arm, query) group, so the engine batches the pairs of
    all instructions together instead of one call per query per instruction.

    Args:
        arms: The arms; labels must be distinct.
        dataset: From :func:`load_dataset`.
        baseline: Label of the arm the others are compared with (default: the first).
        first_stage, ks, candidates, seed: As for :func:`evaluate`.
        resamples: Paired-bootstrap resamples.
        bootstrap_seed: Seed of the bootstrap; the same seed gives the same intervals.
        show_progress: Show the engine's progress bar.

    Returns:
        A :class:`ComparisonReport`.

    Raises:
        ValueError: No arm, duplicate labels, an unknown baseline, or as :func:`evaluate`.
    """
    from .protocol import ScoreGroup
    from .scoring import BaseReranker

    if not arms:
        raise ValueError("compare needs at least one arm")
    labels = [a.label for a in arms]
    if len(set(labels)) != len(labels):
        raise ValueError(f"arm labels must be distinct, got {labels}")
    baseline = labels[0] if baseline is None else baseline
    if baseline not in labels:
        raise ValueError(f"baseline {baseline!r} is not one of the arms: {', '.join(labels)}")
    ks, pools = _candidate_pools(dataset, first_stage, ks, candidates, seed)
    resamples = _check_k(resamples)

    # One engine call per distinct scorer, holding every (arm, query) group of that scorer.
    logits: dict[str, list[list[float]]] = {}
    by_scorer: dict[int, list[Variant]] = {}
    for arm in arms:
        by_scorer.setdefault(id(arm.scorer), []).append(arm)
    calls, pairs, seconds = 0, 0, 0.0
    for members in by_scorer.values():
        scorer = members[0].scorer
        groups = []
        for arm in members:
            instruction = arm.instruction
            if instruction is not None and not isinstance(instruction, str):
                instruction = instruction.text
            for query, pool in zip(dataset.queries, pools, strict=True):
                own = query.instruction if instruction == DATA_INSTRUCTION else instruction
                if isinstance(scorer, BaseReranker):
                    own = scorer._instruction_text(own)
                groups.append(ScoreGroup(query.text, [dataset.documents[i] for i in pool], own))
        start = time.perf_counter()
        scored = scorer.score_groups(groups, show_progress=show_progress)
        seconds += time.perf_counter() - start
        calls += 1
        pairs += sum(len(g.texts) for g in groups)
        n = len(dataset.queries)
        for j, arm in enumerate(members):
            logits[arm.label] = [s.logits for s in scored[j * n : (j + 1) * n]]

    before_rows = [_metrics(pool, q.relevance, ks) for q, pool in zip(dataset.queries, pools, strict=True)]
    per_query: dict[str, list[dict[str, float]]] = {}
    for label in labels:
        rows = []
        for q, pool, scores in zip(dataset.queries, pools, logits[label], strict=True):
            rows.append(_metrics([pool[i] for i in ranked_order(scores)], q.relevance, ks))
        per_query[label] = rows
    names = list(before_rows[0])

    series = {}
    for label in labels:
        if label == baseline:
            continue
        for name in names:
            series[(label, name)] = [
                row[name] - base[name]
                for row, base in zip(per_query[label], per_query[baseline], strict=True)
            ]
    intervals = (
        paired_bootstrap(
            {f"{label}\x00{name}": values for (label, name), values in series.items()},
            resamples=resamples,
            seed=bootstrap_seed,
        )
        if series
        else {}
    )
    differences: dict[str, dict[str, Interval]] = {}
    for key, interval in intervals.items():
        label, name = key.split("\x00")
        differences.setdefault(label, {})[name] = interval

    agreement: dict[str, dict[str, float]] = {}
    for label in labels:
        if label == baseline:
            continue
        rhos, overlaps, worst = [], {k: [] for k in ks}, 0.0
        for mine, base in zip(logits[label], logits[baseline], strict=True):
            rho = spearman(mine, base)
            if rho is not None:
                rhos.append(rho)
            for k in ks:
                overlaps[k].append(top_k_overlap(base, mine, k))
            worst = max([worst, *(abs(x - y) for x, y in zip(mine, base, strict=True))])
        row = {"spearman": statistics.fmean(rhos) if rhos else float("nan")}
        row.update({f"top-{k} overlap": statistics.fmean(v) for k, v in overlaps.items()})
        row["max |Δ log-odds|"] = worst
        agreement[label] = row

    return ComparisonReport(
        dataset=dataset.name,
        first_stage=first_stage,
        candidates=min(candidates, len(dataset.documents)) if first_stage == "bm25" else None,
        queries=len(dataset.queries),
        documents=len(dataset.documents),
        baseline=baseline,
        arms={
            a.label: {
                "model": a.scorer.model_name,
                "device": f"{a.scorer.device} ({str(a.scorer.dtype).removeprefix('torch.')})",
                "instruction": _arm_instruction_text(a),
            }
            for a in arms
        },
        before=_mean(before_rows),
        metrics={label: _mean(per_query[label]) for label in labels},
        differences=differences,
        agreement=agreement,
        winner={name: _winner(baseline, differences, name) for name in names},
        resamples=resamples,
        seed=bootstrap_seed,
        pairs=pairs,
        engine_calls=calls,
        seconds=seconds,
        per_query=per_query,
    )


def _arm_instruction_text(arm: Variant) -> str:
    from .templates import resolve_instruction

    if arm.instruction is None:
        return arm.scorer.instruction or resolve_instruction(None)
    if arm.instruction == DATA_INSTRUCTION:
        return "each query's own instruction from the data (the reranker's where it gives none)"
    return resolve_instruction(arm.instruction)


def compare_instructions(
    reranker: Scorer,
    dataset: EvalDataset,
    instructions: Sequence[str | None],
    *,
    baseline: str | None = None,
    **options: Any,
) -> ComparisonReport:
    """Compare instructions on the same candidates (see :func:`compare`).

    Args:
        reranker: The engine.
        dataset: From :func:`load_dataset`.
        instructions: Template names, free text, ``None`` (the reranker's own instruction,
            labelled ``default``), ``"data"`` (each query's own instruction from the data) or
            ``"all"`` (the reranker's own, the data's own when it has one, and every template).
        baseline: The baseline's label (a template name, ``"default"`` or the clipped free text;
            default: the first instruction).
        **options: Passed to :func:`compare`.

    Example:
        >>> report = compare_instructions(reranker, data, ["all"], baseline="default")  # doctest: +SKIP
        >>> print(report.format())  # doctest: +SKIP
    """
    has_own = any(q.instruction for q in dataset.queries)
    if DATA_INSTRUCTION in instructions and not has_own:
        raise ValueError(f"dataset {dataset.name!r} gives no query an 'instruction': no 'data' arm")
    expanded = instruction_arms(instructions, data=has_own)
    arms = [Variant(instruction_label(i), reranker, i) for i in expanded]
    return compare(arms, dataset, baseline=baseline, **options)


def plot_comparison(report: ComparisonReport, path: str | Path, *, title: str | None = None) -> Path:
    """Write a chart of a comparison: each arm's metrics, and its difference to the baseline with
    the bootstrap interval on the primary metric (PNG, SVG or PDF by suffix).

    Returns:
        The written path.
    """
    require("matplotlib", "examples", "The evaluation chart (--plot)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.before)
    labels = list(report.metrics)
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(1.2 * len(names) * max(1, len(labels)) / 2 + 6, 4.5),
        gridspec_kw={"width_ratios": [3, 2]},
    )
    try:
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(names))]
            left.bar(xs, [report.metrics[label][n] for n in names], width, label=label)
        left.set_xticks(list(range(len(names))), names)
        left.set_ylim(0, 1.1)
        left.set_ylabel("score")
        left.legend(fontsize=7, loc="upper left")
        others = [label for label in labels if label in report.differences]
        ivs = [report.differences[label][PRIMARY_METRIC] for label in others]
        ys = list(range(len(others)))
        right.errorbar(
            [iv.mean for iv in ivs],
            ys,
            xerr=[[iv.mean - iv.low for iv in ivs], [iv.high - iv.mean for iv in ivs]],
            fmt="o",
            capsize=4,
        )
        right.axvline(0, color="grey", lw=1)
        right.set_yticks(ys, others)
        right.set_ylim(-0.5, max(len(others), 1) - 0.5)
        right.set_xlabel(f"Δ {PRIMARY_METRIC} vs {report.baseline} ({round(CONFIDENCE * 100)}% CI)")
        fig.suptitle(
            title or f"{report.dataset}: {len(labels)} arms, bootstrap {report.resamples} resamples",
            fontsize=10,
        )
        fig.tight_layout()
        out = Path(path)
        fig.savefig(out, dpi=120)
    finally:
        plt.close(fig)
    return out
