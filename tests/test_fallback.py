"""Query fallback: the rule-based generalizer, and rerank-then-retry on the real tiny engine."""

from __future__ import annotations

import json

import pytest

from qwen3_rerank_plugins import ConfidenceBands, Reranker, RerankResult
from qwen3_rerank_plugins.fallback import (
    FallbackRerank,
    RerankAttempt,
    arerank_with_fallback,
    generalize,
    rerank_with_fallback,
    retry_query,
)

TICKET = "朝阳区建国路88号3号楼电梯昨晚十一点又坏了，张女士被困二十分钟"
PAST = [
    {"id": "T-1021", "text": "小区电梯故障，居民被困电梯内，物业迟迟未到场"},
    {"id": "T-0932", "text": "路灯不亮，夜间出行不便"},
    {"id": "T-1102", "text": "施工噪音扰民，深夜仍在作业"},
    {"id": "T-0755", "text": "供暖温度不达标，室内温度偏低"},
]
# Every score is below 1.0, so these cut-offs put every result in the low band.
ALWAYS_LOW = ConfidenceBands(high=1.0, medium=1.0)
NEVER_LOW = ConfidenceBands(high=0.0, medium=0.0)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("朝阳区建国路88号3号楼电梯昨晚十一点又坏了", "电梯又坏了"),
        ("张女士反映：海淀区中关村大街路灯上周三开始不亮", "反映：路灯开始不亮"),
        ("建国路施工噪音扰民，晚上十一点后仍在作业", "施工噪音扰民，仍在作业"),
        ("2024年3月5日下午3点在丰台区看丹路的超市买的牛奶过期了", "超市买的牛奶过期了"),
        ("我叫王小明，住在通州区梨园镇，家门口马路上的井盖丢了三天了", "家门口马路上的井盖丢了"),
        ("北京市朝阳区望京街道阜通东大街6号院楼下餐馆油烟扰民", "楼下餐馆油烟扰民"),
        ("浙江省杭州市西湖区文三路的共享单车乱停放", "共享单车乱停放"),
        ("老李家的狗每天早上6点叫", "家的狗每天叫"),
        ("出租车司机绕路多收了30元", "出租车司机绕路多收了"),
    ],
)
def test_generalize_strips_chinese_specifics(query: str, expected: str) -> None:
    assert generalize(query) == expected


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("My order #48213 from March 3rd hasn't arrived at 12 Baker Street", "My order hasn't arrived"),
        (
            "Mr. Smith called on Monday at 10:30 pm about noise in Apt 4B, 221 Oak Avenue",
            "called about noise",
        ),
        ("I was charged $25 twice yesterday", "I was charged twice"),
        ("The elevator at 88 Jianguo Road broke down last night for 20 minutes", "The elevator broke down"),
        ("Order A123456 placed on 2024-03-05 was charged twice", "Order placed was charged twice"),
        ("Can I return shoes I bought in May?", "Can I return shoes I bought?"),
        ("my name is Anna Lee and my refund from 03/02/2024 is missing", "and my refund is missing"),
    ],
)
def test_generalize_strips_english_specifics(query: str, expected: str) -> None:
    assert generalize(query) == expected


@pytest.mark.parametrize(
    "query",
    [
        "订单还没发货，能查一下吗？",  # the 一 of 查一下 is not a number
        "发票怎么开",
        "我要投诉小区物业",  # 小区 is not a district
        "一直没人管，万一出事怎么办",
        "在城市道路上开车",  # 城市 and 道路 are everyday words, not places
        "my coupon doesn't work",
        "退货流程是什么？",
    ],
)
def test_generalize_leaves_general_queries_alone(query: str) -> None:
    assert generalize(query) == query


def test_generalize_keeps_the_query_when_nothing_would_be_left() -> None:
    assert generalize("  12345 ") == "12345"
    assert generalize("") == ""


def test_generalize_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="query must be a str"):
        generalize(None)  # type: ignore[arg-type]


def test_low_best_score_retries_with_the_generalized_query(reranker: Reranker) -> None:
    outcome = rerank_with_fallback(reranker, TICKET, PAST, bands=ALWAYS_LOW, instruction="similar_ticket")

    assert outcome.fell_back
    assert [a.query for a in outcome.attempts] == [TICKET, generalize(TICKET)]
    assert outcome.retry is not None and outcome.retry.query == "电梯又坏了，被困"
    # Each attempt is exactly what the engine gives for its query.
    for attempt in outcome.attempts:
        expected = reranker.rerank(attempt.query, PAST, instruction="similar_ticket")
        assert [r.id for r in attempt.results] == [r.id for r in expected]
        assert [r.score for r in attempt.results] == pytest.approx([r.score for r in expected], abs=1e-6)
        assert attempt.best_score == pytest.approx(expected[0].score, abs=1e-6)
        assert attempt.best_band == "low"
        assert {r.band for r in attempt.results} == {"low"}
    # Still low after the retry: a person should look.
    assert outcome.needs_review
    assert outcome.final in outcome.attempts
    assert outcome.final.best_score == max(a.best_score for a in outcome.attempts)
    # The caller's reranker keeps its own cut-offs.
    assert reranker.bands == ConfidenceBands()


def test_no_retry_when_the_best_score_is_not_low(reranker: Reranker) -> None:
    outcome = rerank_with_fallback(reranker, TICKET, PAST, bands=NEVER_LOW, top_n=2)
    assert not outcome.fell_back
    assert outcome.retry is None
    assert outcome.attempts == (outcome.first,)
    assert outcome.final is outcome.first
    assert not outcome.needs_review
    assert len(outcome.results) == 2
    assert {r.band for r in outcome.results} == {"high"}


def test_custom_generalizer_is_called_and_its_query_used(reranker: Reranker) -> None:
    seen: list[str] = []

    def to_category(query: str) -> str:
        seen.append(query)
        return "电梯故障"

    outcome = rerank_with_fallback(reranker, TICKET, PAST, generalize=to_category, bands=ALWAYS_LOW)
    assert seen == [TICKET]
    assert outcome.retry is not None and outcome.retry.query == "电梯故障"
    expected = reranker.rerank("电梯故障", PAST)
    assert [r.index for r in outcome.retry.results] == [r.index for r in expected]


def test_no_retry_when_generalize_changes_nothing(reranker: Reranker) -> None:
    outcome = rerank_with_fallback(reranker, "发票怎么开", PAST, bands=ALWAYS_LOW)
    assert not outcome.fell_back
    assert outcome.needs_review  # low, and nothing more general to try


def test_threshold_filters_results_but_not_the_low_band_test(reranker: Reranker) -> None:
    outcome = rerank_with_fallback(reranker, TICKET, PAST, threshold=1.0, bands=ALWAYS_LOW)
    assert outcome.fell_back
    assert outcome.first.results == ()
    assert outcome.first.best_score is not None and outcome.first.best_score < 1.0


def test_mapping_documents_keep_their_ids(reranker: Reranker) -> None:
    outcome = rerank_with_fallback(reranker, TICKET, PAST, top_n=3, bands=ALWAYS_LOW)
    for attempt in outcome.attempts:
        assert len(attempt.results) == 3
        assert all(r.document is PAST[r.index] for r in attempt.results)
        assert {r.id for r in attempt.results} <= {d["id"] for d in PAST}


def test_no_documents_means_no_retry(reranker: Reranker) -> None:
    outcome = rerank_with_fallback(reranker, TICKET, [], bands=ALWAYS_LOW)
    assert outcome.first == RerankAttempt(query=TICKET, results=(), best_score=None, best_band=None)
    assert not outcome.fell_back
    assert not outcome.needs_review


async def test_async_gives_the_same_attempts(reranker: Reranker) -> None:
    sync = rerank_with_fallback(reranker, TICKET, PAST, bands=ALWAYS_LOW)
    got = await arerank_with_fallback(reranker, TICKET, PAST, bands=ALWAYS_LOW)
    assert [a.query for a in got.attempts] == [a.query for a in sync.attempts]
    for a, b in zip(got.attempts, sync.attempts, strict=True):
        assert [r.index for r in a.results] == [r.index for r in b.results]
        assert a.best_score == pytest.approx(b.best_score, abs=1e-6)


def test_bad_arguments_fail_clearly(reranker: Reranker) -> None:
    with pytest.raises(TypeError, match="generalize must be a callable"):
        rerank_with_fallback(reranker, TICKET, PAST, generalize="simplify")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="generalize must return a str, got NoneType"):
        rerank_with_fallback(reranker, TICKET, PAST, generalize=lambda q: None, bands=ALWAYS_LOW)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="threshold must be a number in"):
        rerank_with_fallback(reranker, TICKET, PAST, threshold=1.5)
    with pytest.raises(TypeError, match="bands must be a ConfidenceBands"):
        rerank_with_fallback(reranker, TICKET, PAST, bands=(0.9, 0.7))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"documents\[1\]"):
        rerank_with_fallback(reranker, TICKET, ["ok", 3])  # type: ignore[list-item]


def _result(index: int, score: float, band: str = "low") -> RerankResult:
    return RerankResult(index=index, score=score, logit=0.0, document=f"doc {index}", band=band)  # type: ignore[arg-type]


def test_final_is_the_attempt_with_the_better_best_score() -> None:
    first = RerankAttempt("q", (_result(0, 0.4),), 0.4, "low")
    better = RerankAttempt("general q", (_result(1, 0.9, "high"),), 0.9, "high")
    worse = RerankAttempt("general q", (_result(1, 0.2),), 0.2, "low")

    improved = FallbackRerank(first, better)
    assert improved.final is better and improved.results == better.results
    assert not improved.needs_review
    assert FallbackRerank(first, worse).final is first
    assert FallbackRerank(first, worse).needs_review

    payload = improved.to_dict(include_document=False)
    assert json.loads(json.dumps(payload)) == payload
    assert payload["final"] == "retry" and payload["fell_back"] and not payload["needs_review"]
    assert payload["first"]["query"] == "q" and payload["retry"]["results"][0]["index"] == 1


def test_retry_query_is_the_decision_alone() -> None:
    assert retry_query(TICKET, 0.5) == generalize(TICKET)
    assert retry_query(TICKET, 0.75) is None  # medium with the default cut-offs
    assert retry_query(TICKET, 0.75, ConfidenceBands(high=0.9, medium=0.8)) == generalize(TICKET)
    assert retry_query(TICKET, None) is None
    assert retry_query("发票怎么开", 0.1) is None
    assert retry_query(TICKET, 0.1, generalize=lambda q: "  ") is None
