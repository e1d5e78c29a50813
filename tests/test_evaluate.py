"""The evaluate command: metric arithmetic, dataset loaders, BM25, and the command on the tiny engine."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import pytest

from qwen3_rerank_plugins import Reranker, cli
from qwen3_rerank_plugins.evaluate import (
    BM25Index,
    EvalDataset,
    EvalQuery,
    Interval,
    Variant,
    compare,
    compare_instructions,
    evaluate,
    hit_at_k,
    instruction_arms,
    load_beir,
    load_dataset,
    load_jsonl,
    mrr_at_k,
    ndcg_at_k,
    paired_bootstrap,
    plot_report,
    spearman,
    tokenize,
    top_k_overlap,
)
from qwen3_rerank_plugins.templates import list_instruction_templates

ROOT = Path(__file__).resolve().parents[1]

# -- metrics, on hand-computed cases ------------------------------------------------------------

RANKING = ["a", "b", "c", "d"]
TWO_RELEVANT = {"b": 1, "d": 1}


def test_hit_at_k() -> None:
    assert hit_at_k(RANKING, TWO_RELEVANT, 1) == 0.0
    assert hit_at_k(RANKING, TWO_RELEVANT, 2) == 1.0
    assert hit_at_k(RANKING, {"z": 1}, 10) == 0.0  # relevant but never retrieved
    assert hit_at_k(RANKING, {"a": 0, "b": 1}, 1) == 0.0  # grade 0 is judged, not relevant


def test_mrr_at_10() -> None:
    assert mrr_at_k(RANKING, TWO_RELEVANT) == 0.5  # first relevant at rank 2
    assert mrr_at_k(RANKING, {"d": 1}) == 0.25
    ranking = [f"x{i}" for i in range(10)] + ["hit"]
    assert mrr_at_k(ranking, {"hit": 1}) == 0.0  # rank 11 is past the cut-off
    assert mrr_at_k(ranking, {"hit": 1}, 11) == pytest.approx(1 / 11)


def test_ndcg_at_10_binary() -> None:
    # DCG = 1/log2(3) + 1/log2(5); ideal DCG = 1/log2(2) + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(RANKING, TWO_RELEVANT) == pytest.approx(expected)
    assert ndcg_at_k(RANKING, TWO_RELEVANT) == pytest.approx(0.650921, abs=1e-6)
    assert ndcg_at_k(["b", "d", "a"], TWO_RELEVANT) == pytest.approx(1.0)
    assert ndcg_at_k(RANKING, {}) == 0.0


def test_ndcg_at_10_graded_counts_unretrieved_documents_in_the_ideal() -> None:
    # DCG = 1/1 + 2/log2(3); ideal = 3/1 + 2/log2(3) + 1/log2(4)  ("w", grade 3, was never retrieved)
    relevance = {"x": 1, "y": 2, "w": 3}
    expected = (1 + 2 / math.log2(3)) / (3 + 2 / math.log2(3) + 0.5)
    assert ndcg_at_k(["x", "y", "z"], relevance) == pytest.approx(expected)
    assert ndcg_at_k(["x", "y", "z"], relevance) == pytest.approx(0.474995, abs=1e-6)


def test_metrics_reject_bad_k() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be a positive int"):
            hit_at_k(RANKING, TWO_RELEVANT, bad)  # type: ignore[arg-type]


# -- loaders --------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n\n", encoding="utf-8")
    return path


def test_load_jsonl_shares_one_pool(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "set.jsonl",
        [
            {"query": "发票怎么开", "positives": ["开票指南"], "negatives": ["退货政策", "优惠券说明"]},
            {"query": "退货", "positive": ["退货政策"], "negative": [{"text": "开票指南"}]},  # MTEB keys
        ],
    )
    data = load_jsonl(path)
    assert data.name == "set.jsonl"
    assert data.documents == ("开票指南", "退货政策", "优惠券说明")
    first, second = data.queries
    assert (first.id, first.text, dict(first.relevance), first.candidates) == (
        "1",
        "发票怎么开",
        {0: 1.0},
        (0, 1, 2),
    )
    assert (dict(second.relevance), second.candidates) == ({1: 1.0}, (1, 0))
    assert load_dataset(path) == data


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"bad\.jsonl line 2 is not valid JSON"),
        ('["a list"]', r"line 2 must be a JSON object"),
        ('{"positives": ["x"]}', r"line 2 needs a non-empty string 'query'"),
        ('{"query": "q", "negatives": ["x"]}', r"line 2 needs at least one document in 'positives'"),
        ('{"query": "q", "positives": [{"id": 1}]}', r"line 2: positives\[0\] is a mapping without a 'text'"),
        ('{"query": "q", "positives": ["x"], "negatives": 3}', r"line 2: 'negatives' must be a list"),
    ],
)
def test_load_jsonl_names_the_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"query": "ok", "positives": ["doc"]}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_jsonl(path)


def _write_beir(root: Path) -> Path:
    root.mkdir()
    _write_jsonl(
        root / "corpus.jsonl",
        [
            {"_id": "d1", "title": "电梯", "text": "小区电梯故障，居民被困"},
            {"_id": "d2", "text": "路灯不亮"},
            {"_id": "d3", "title": "", "text": "施工噪音扰民"},
        ],
    )
    _write_jsonl(
        root / "queries.jsonl",
        [{"_id": "q1", "text": "电梯坏了"}, {"_id": "q2", "text": "太吵了"}, {"_id": "q3", "text": "无标注"}],
    )
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\nq2\td3\t1\nq3\td2\t0\n", encoding="utf-8"
    )
    return root


def test_load_beir(tmp_path: Path) -> None:
    data = load_beir(_write_beir(tmp_path / "mini"))
    assert data.name == "mini"
    assert data.doc_ids == ("d1", "d2", "d3")
    assert data.documents == ("电梯\n小区电梯故障，居民被困", "路灯不亮", "施工噪音扰民")
    # q3 has no relevant document and is left out.
    assert [(q.id, q.text, dict(q.relevance), q.candidates) for q in data.queries] == [
        ("q1", "电梯坏了", {0: 2.0, 1: 0.0}, None),
        ("q2", "太吵了", {2: 1.0}, None),
    ]
    assert load_dataset(tmp_path / "mini") == data


def test_load_beir_errors_name_the_file(tmp_path: Path) -> None:
    root = _write_beir(tmp_path / "mini")
    with pytest.raises(FileNotFoundError, match=r"qrels/dev\.tsv is missing"):
        load_beir(root, split="dev")
    (root / "qrels" / "test.tsv").write_text("q1\tnope\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown corpus id 'nope'"):
        load_beir(root)
    with pytest.raises(FileNotFoundError, match="dataset not found"):
        load_dataset(tmp_path / "missing.jsonl")


# -- BM25 ---------------------------------------------------------------------------------------


def test_bm25_ranks_chinese_and_english_by_shared_words() -> None:
    docs = [
        "小区电梯故障，居民被困",
        "施工噪音扰民",
        "my coupon does not apply",
        "电梯维修通知",
        "路灯不亮",
        "供暖温度不达标",
    ]
    assert tokenize("My Coupon，电梯故障!") == ["my", "coupon", "电梯", "故障"]
    index = BM25Index(docs)
    ranked = index.search("电梯故障", top_k=2)
    assert [i for i, _ in ranked] == [0, 3]
    assert ranked[0][1] > ranked[1][1] > 0
    assert index.search("coupon")[0][0] == 2
    assert len(index.search("电梯")) == len(docs)


# -- evaluate on the real tiny engine ----------------------------------------------------------------

SMALL = EvalDataset(
    name="small",
    documents=(
        "小区电梯故障，居民被困",
        "施工噪音扰民",
        "路灯不亮",
        "电梯停运一周无人维修",
        "供暖温度不达标",
    ),
    doc_ids=("d0", "d1", "d2", "d3", "d4"),
    queries=(
        EvalQuery("1", "电梯又坏了", {0: 1.0, 3: 1.0}, (0, 1, 2, 3)),
        EvalQuery("2", "工地半夜施工太吵", {1: 1.0}, (1, 2, 4)),
        EvalQuery("3", "暖气不热", {4: 1.0}, (4, 0, 2)),
    ),
)


def _expected(reranker: Reranker, pools: list[list[int]]) -> dict[str, float]:
    """Mean metrics of the engine's own order of each pool, computed independently."""
    rows = []
    for q, pool in zip(SMALL.queries, pools, strict=True):
        scores = reranker.score(q.text, [SMALL.documents[i] for i in pool], "similar_ticket")
        order = [pool[i] for i in sorted(range(len(pool)), key=lambda i: (-scores[i], i))]
        rows.append(
            [hit_at_k(order, q.relevance, 1), mrr_at_k(order, q.relevance), ndcg_at_k(order, q.relevance)]
        )
    return {
        name: sum(r[j] for r in rows) / len(rows) for j, name in enumerate(["hit@1", "MRR@10", "nDCG@10"])
    }


def test_evaluate_bm25_before_and_after(reranker: Reranker) -> None:
    report = evaluate(reranker, SMALL, first_stage="bm25", ks=[1], candidates=3, instruction="similar_ticket")
    index = BM25Index(SMALL.documents)
    pools = [[i for i, _ in index.search(q.text, 3)] for q in SMALL.queries]
    before = [hit_at_k(p, q.relevance, 1) for q, p in zip(SMALL.queries, pools, strict=True)]
    assert report.before["hit@1"] == pytest.approx(sum(before) / 3)
    assert report.after == pytest.approx(_expected(reranker, pools))
    assert list(report.after) == ["hit@1", "MRR@10", "nDCG@10"]
    assert (report.queries, report.documents, report.pairs, report.candidates) == (3, 5, 9, 3)
    assert len(report.latencies_ms) == 3 and report.pairs_per_second > 0
    assert report.latency_ms["p50"] <= report.latency_ms["p95"]
    text = report.format()
    assert "bm25 (jieba + rank-bm25), top 3 candidates" in text
    assert "hit@1" in text and "nDCG@10" in text and "pairs/s" in text
    assert json.loads(json.dumps(report.to_dict()))["after"] == pytest.approx(report.after)


def test_evaluate_none_reranks_each_querys_own_candidates(reranker: Reranker) -> None:
    report = evaluate(reranker, SMALL, first_stage="none", ks=[1], instruction="similar_ticket", seed=3)
    assert report.pairs == 4 + 3 + 3
    assert report.candidates is None
    pools = [list(q.candidates) for q in SMALL.queries]
    assert report.after == pytest.approx(_expected(reranker, pools))
    # The "before" order is a seeded shuffle: the same seed, the same numbers.
    again = evaluate(reranker, SMALL, first_stage="none", ks=[1], instruction="similar_ticket", seed=3)
    assert again.before == report.before


def test_evaluate_on_a_beir_directory(reranker: Reranker, tmp_path: Path) -> None:
    data = load_beir(_write_beir(tmp_path / "mini"))
    whole = evaluate(reranker, data, first_stage="none", ks=[1])
    assert whole.pairs == 2 * 3  # no own candidates: every query reranks the whole corpus
    top = evaluate(reranker, data, first_stage="bm25", ks=[1], candidates=2)
    assert top.pairs == 2 * 2 and top.candidates == 2
    # nDCG uses the graded qrels: q1's only relevant document has grade 2.
    assert 0.0 <= top.after["nDCG@10"] <= 1.0


def test_evaluate_rejects_bad_arguments(reranker: Reranker) -> None:
    with pytest.raises(ValueError, match="first_stage must be one of bm25, none"):
        evaluate(reranker, SMALL, first_stage="dense")
    with pytest.raises(ValueError, match="k must be a positive int"):
        evaluate(reranker, SMALL, ks=[0])
    with pytest.raises(ValueError, match="dataset 'empty' has no queries"):
        evaluate(reranker, EvalDataset(name="empty", documents=(), doc_ids=(), queries=()))


def test_plot_report_writes_a_png(reranker: Reranker, tmp_path: Path) -> None:
    report = evaluate(reranker, SMALL, first_stage="none", ks=[1, 3])
    out = plot_report(report, tmp_path / "chart.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- the command line --------------------------------------------------------------------------------


def test_evaluate_command(
    tiny_model_dir: Path, reranker: Reranker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ROOT / "examples" / "data" / "hotline_eval.jsonl"
    chart = tmp_path / "out.png"
    argv = [
        "evaluate",
        str(data),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--k",
        "1,3",
        "--candidates",
        "5",
    ]
    assert cli.main(["--quiet", *argv, "--instruction", "similar_ticket", "--plot", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "Dataset: hotline_eval.jsonl (24 queries, 48 documents)" in out
    for name in ("hit@1", "hit@3", "MRR@10", "nDCG@10"):
        assert name in out
    assert chart.read_bytes()[:4] == b"\x89PNG"

    assert cli.main([*argv, "--first-stage", "none", "--json", "--quiet"]) == 0  # --quiet after it too
    payload = json.loads(capsys.readouterr().out)
    assert payload["first_stage"] == "none" and payload["queries"] == 24
    assert payload["demo_model"] is False
    assert set(payload["after"]) == {"hit@1", "hit@3", "MRR@10", "nDCG@10"}


def test_evaluate_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--quiet", "evaluate", str(tmp_path / "nope.jsonl"), "--demo"]) == 1
    assert "error: dataset not found" in capsys.readouterr().err
    data = str(ROOT / "examples" / "data" / "hotline_eval.jsonl")
    # Checked before the model loads: a bad chart folder, device or instruction.
    assert cli.main(["--quiet", "evaluate", data, "--demo", "--plot", str(tmp_path / "no" / "x.png")]) == 1
    assert "error: --plot: the folder of" in capsys.readouterr().err
    assert cli.main(["--quiet", "evaluate", data, "--demo", "--instruction", " "]) == 1
    assert "instruction must not be empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "x.jsonl", "--k", "1,zero"])
    assert exc.value.code == 2
    assert "expected comma-separated positive integers" in capsys.readouterr().err


def test_evaluate_help_lists_its_options_and_the_shared_model_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["evaluate", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--first-stage",
        "--k",
        "--candidates",
        "--plot",
        "--split",
        "--model",
        "--demo",
        "--quiet",
    ):
        assert option in out


def test_evaluate_holds_no_command_line_code() -> None:
    """The command lives in cli (which imports evaluate); evaluate never imports cli or argparse."""
    import qwen3_rerank_plugins.evaluate as module

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):  # lazy imports inside functions included
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
            imported.update(f"{'.' * node.level}{alias.name}" for alias in node.names if not node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {name for name in imported if name.lstrip(".").split(".")[-1] == "cli" or name == "argparse"}
    assert not hasattr(module, "add_parser")


# -- comparing instructions, dtypes and models -------------------------------------------------------


class CountingScorer:
    """The real engine, counting its ``score_groups`` calls and the groups each one held."""

    def __init__(self, reranker: Reranker) -> None:
        self.inner = reranker
        self.calls: list[int] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def score_groups(self, groups, **kwargs):  # type: ignore[no-untyped-def]
        self.calls.append(len(groups))
        return self.inner.score_groups(groups, **kwargs)


def _shipped(name: str, queries: int) -> EvalDataset:
    data = load_dataset(ROOT / "examples" / "data" / name)
    return dataclasses.replace(data, queries=data.queries[:queries])


def test_paired_bootstrap_is_seeded_and_paired() -> None:
    diffs = {"a": [1.0, 0.0, 1.0, 1.0, 0.0, 1.0], "b": [1.0] * 6}
    first = paired_bootstrap(diffs, resamples=500, seed=7)
    assert paired_bootstrap(diffs, resamples=500, seed=7) == first
    assert first["b"] == Interval(1.0, 1.0, 1.0) and first["b"].excludes_zero
    a = first["a"]
    assert a.mean == pytest.approx(4 / 6) and 0.0 <= a.low < a.mean < a.high <= 1.0
    with pytest.raises(ValueError, match="one difference per query"):
        paired_bootstrap({"a": [1.0], "b": [1.0, 2.0]})


def test_rank_agreement_helpers() -> None:
    assert spearman([0.1, 0.5, 0.9], [1, 2, 4]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    assert top_k_overlap([3, 2, 1, 0], [3, 0, 2, 1], 2) == 0.5
    assert instruction_arms(["all"])[0] is None
    assert set(instruction_arms(["all"])[1:]) == {t.name for t in list_instruction_templates()}


def test_compare_instructions_on_a_shipped_set_batches_shared_pairs(reranker: Reranker) -> None:
    data = _shipped("hotline_eval.jsonl", 6)
    counting = CountingScorer(reranker)
    instructions = [None, "similar_ticket", "customer_service_faq"]
    report = compare_instructions(
        counting, data, instructions, first_stage="none", ks=[1, 3], resamples=300, bootstrap_seed=5
    )
    # One engine call holding every (instruction, query) group, not one per query per instruction.
    assert counting.calls == [3 * 6] and report.engine_calls == 1
    assert report.pairs == 3 * sum(len(q.candidates or ()) for q in data.queries)
    assert list(report.metrics) == ["default", "similar_ticket", "customer_service_faq"]
    assert report.baseline == "default" and set(report.differences) == {
        "similar_ticket",
        "customer_service_faq",
    }
    # Each arm's metrics are those of a plain evaluation with that instruction.
    for label, instruction in zip(report.metrics, instructions, strict=True):
        alone = evaluate(reranker, data, first_stage="none", ks=[1, 3], instruction=instruction)
        assert report.metrics[label] == pytest.approx(alone.after)
    for label, diffs in report.differences.items():
        for name, iv in diffs.items():
            assert iv.low <= iv.high  # a percentile interval; the observed mean is usually inside
            assert iv.mean == pytest.approx(report.metrics[label][name] - report.metrics["default"][name])
        assert -1.0 <= report.agreement[label]["spearman"] <= 1.0
    # A winner only where its interval excludes zero.
    for name, winner in report.winner.items():
        if winner not in (None, "default"):
            assert report.differences[winner][name].low > 0
    # The same seed, the same intervals; the statement of resamples and seed travels with them.
    again = compare_instructions(
        reranker, data, instructions, first_stage="none", ks=[1, 3], resamples=300, bootstrap_seed=5
    )
    assert again.differences == report.differences
    payload = json.loads(json.dumps(report.to_dict()))
    assert payload["bootstrap"] == {"resamples": 300, "seed": 5, "confidence": 0.95}
    assert "300 resamples, seed 5" in report.format()


def test_compare_dtypes_reports_rank_agreement(tiny_model_dir: Path, reranker: Reranker) -> None:
    from qwen3_rerank_plugins import get_reranker

    half = get_reranker(tiny_model_dir, device="cpu", dtype="bfloat16")
    data = _shipped("faq_eval.jsonl", 4)
    report = compare(
        [Variant("float32", reranker), Variant("bfloat16", half)], data, first_stage="none", resamples=200
    )
    assert report.engine_calls == 2 and report.arms["bfloat16"]["device"].endswith("(bfloat16)")
    agreement = report.agreement["bfloat16"]
    assert 0.5 < agreement["spearman"] <= 1.0 and 0 < agreement["max |Δ log-odds|"] < 1.0
    assert set(agreement) >= {"top-1 overlap", "top-10 overlap"}


def test_evaluate_command_compares_instructions(
    tiny_model_dir: Path, reranker: Reranker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "hotline6.jsonl"
    lines = (ROOT / "examples" / "data" / "hotline_eval.jsonl").read_text(encoding="utf-8").splitlines()
    data.write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    argv = ["--quiet", "evaluate", str(data), "--model", str(tiny_model_dir), "--device", "cpu"]
    argv += ["--first-stage", "none", "-i", "default", "-i", "similar_ticket", "--resamples", "200"]
    chart = tmp_path / "compare.png"
    assert cli.main([*argv, "--plot", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "Difference to the baseline" in out and "200 resamples, seed 0" in out and "Winner on" in out
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert cli.main([*argv, "--json", "--baseline", "similar_ticket"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["baseline"] == "similar_ticket" and set(payload["differences"]) == {"default"}
    assert payload["engine_calls"] == 1


def test_the_datas_own_instruction_is_an_arm(reranker: Reranker, tmp_path: Path) -> None:
    from qwen3_rerank_plugins.templates import resolve_instruction

    lines = (ROOT / "examples" / "data" / "hotline_eval.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    own = resolve_instruction("similar_ticket")
    records = [{**json.loads(line), "instruction": own} for line in lines]
    data = load_jsonl(_write_jsonl(tmp_path / "own.jsonl", records))
    assert all(q.instruction == own for q in data.queries)
    report = compare_instructions(reranker, data, ["all"], first_stage="none", ks=[1], resamples=100)
    assert list(report.metrics)[:2] == ["default", "data"] and "similar_ticket" in report.metrics
    assert report.engine_calls == 1
    # Every query's own instruction is similar_ticket's text: the same scores as that template.
    assert report.metrics["data"] == report.metrics["similar_ticket"]
    assert (
        report.agreement["data"]["max |Δ log-odds|"] == report.agreement["similar_ticket"]["max |Δ log-odds|"]
    )
    with pytest.raises(ValueError, match="gives no query an 'instruction'"):
        compare_instructions(reranker, _shipped("hotline_eval.jsonl", 2), ["data", None], first_stage="none")
    (tmp_path / "bad.jsonl").write_text(
        '{"query": "q", "positives": ["x"], "instruction": 3}\n', encoding="utf-8"
    )
    with pytest.raises(ValueError, match=r"line 1: 'instruction' must be a non-empty string"):
        load_jsonl(tmp_path / "bad.jsonl")
