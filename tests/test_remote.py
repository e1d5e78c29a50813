"""RemoteReranker against real servers on 127.0.0.1: this project's service and a vLLM-like one.

The service runs the tiny random Qwen3 under uvicorn on a thread; the local engine on the same
model is the oracle, so remote scores must equal local ones.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi import FastAPI, Request

from helpers import FAST, Front, live_server
from helpers import closed_port_url as _closed_port_url
from qwen3_rerank_plugins import (
    ConfidenceBands,
    Reranker,
    RerankResult,
    get_reranker,
    register_instruction_template,
)
from qwen3_rerank_plugins.client import RerankServiceError, RetryPolicy
from qwen3_rerank_plugins.remote import RemoteReranker
from qwen3_rerank_plugins.server import create_app

QUERY = "朝阳区建国路电梯又坏了"
TICKETS = [
    {"id": "T-1021", "text": "建国路88号小区3号楼电梯故障，居民被困二十分钟"},
    {"id": "T-0932", "text": "海淀区中关村大街路灯不亮，夜间出行不便"},
    {"id": "T-1102", "text": "建国路施工噪音扰民，晚上十一点后仍在作业"},
    {"id": "T-0612", "text": "[FAQ] Elevator outages: report to the property manager, then call 12345."},
    {"id": "T-0001", "text": ""},
]
TEXTS = [t["text"] for t in TICKETS]
TOL = 1e-6


@pytest.fixture(scope="module")
def url(reranker: Reranker) -> Iterator[str]:
    with live_server(create_app(reranker)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def remote(url: str) -> Iterator[RemoteReranker]:
    with RemoteReranker(url, retry=FAST) as rr:
        yield rr


def _same_results(got: list[RerankResult], expected: list[RerankResult]) -> None:
    assert [r.index for r in got] == [r.index for r in expected]
    assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=TOL)
    assert [r.logit for r in got] == pytest.approx([r.logit for r in expected], abs=1e-4)
    assert [r.band for r in got] == [r.band for r in expected]
    assert all(g.document is e.document for g, e in zip(got, expected, strict=True))


# -- the engine's surface, over HTTP ------------------------------------------------------------


def test_scores_equal_the_local_engine(remote: RemoteReranker, reranker: Reranker) -> None:
    assert remote.score(QUERY, TEXTS) == pytest.approx(reranker.score(QUERY, TEXTS), abs=TOL)
    assert remote.score(QUERY, TICKETS, return_logits=True) == pytest.approx(
        reranker.score(QUERY, TICKETS, return_logits=True), abs=1e-4
    )
    pairs = [(QUERY, TEXTS[0]), ("路灯不亮", TEXTS[1]), (QUERY, TEXTS[2]), ("路灯不亮", TEXTS[3])]
    assert remote.score_pairs(pairs) == pytest.approx(reranker.score_pairs(pairs), abs=TOL)
    assert remote.score(QUERY, []) == [] and remote.rerank(QUERY, []) == []


def test_rerank_returns_engine_results(remote: RemoteReranker, reranker: Reranker) -> None:
    _same_results(remote.rerank(QUERY, TICKETS), reranker.rerank(QUERY, TICKETS))
    _same_results(remote.rerank(QUERY, TICKETS, top_n=2), reranker.rerank(QUERY, TICKETS, top_n=2))
    cut = sorted(reranker.score(QUERY, TEXTS))[2]
    _same_results(
        remote.rerank(QUERY, TICKETS, threshold=cut), reranker.rerank(QUERY, TICKETS, threshold=cut)
    )
    first = remote.rerank(QUERY, TICKETS, top_n=1)[0]
    assert first.id == TICKETS[first.index]["id"] and first.text == TEXTS[first.index]
    assert remote.rank(QUERY, TEXTS, top_k=2, return_documents=True) == [
        {"corpus_id": r.index, "score": pytest.approx(r.score, abs=TOL), "text": r.text}
        for r in reranker.rerank(QUERY, TEXTS, top_n=2)
    ]


def test_instructions_and_settings(remote: RemoteReranker, reranker: Reranker) -> None:
    expected = reranker.score(QUERY, TEXTS, "similar_ticket")
    assert remote.score(QUERY, TEXTS, "similar_ticket") == pytest.approx(expected, abs=TOL)
    # A template registered in this process only is resolved here, so the server reads its text.
    register_instruction_template("remote_only_test", "Prefer tickets about elevators", overwrite=True)
    local = reranker.score(QUERY, TEXTS, "Prefer tickets about elevators")
    assert remote.score(QUERY, TEXTS, "remote_only_test") == pytest.approx(local, abs=TOL)

    strict = remote.with_settings(instruction="similar_ticket", bands=ConfidenceBands(high=0.99, medium=0.0))
    assert strict.score(QUERY, TEXTS) == pytest.approx(expected, abs=TOL)
    assert {r.band for r in strict.rerank(QUERY, TEXTS)} == {"medium"}
    assert (
        remote.instruction is None
        and strict.instruction == reranker.with_settings(instruction="similar_ticket").instruction
    )
    assert strict._conn is remote._conn  # one connection pool for both
    with pytest.raises(TypeError, match="max_length is a setting of the server's model"):
        remote.with_settings(max_length=512)
    with pytest.raises(TypeError, match="unknown RemoteReranker settings: colour"):
        remote.with_settings(colour="red")


def test_should_stop_is_asked_before_each_request(remote: RemoteReranker, reranker: Reranker) -> None:
    from qwen3_rerank_plugins import ScoreGroup, ScoringStopped

    groups = [ScoreGroup(QUERY, TEXTS), ScoreGroup("路灯不亮", TEXTS[:2]), ScoreGroup(QUERY, TEXTS[2:])]
    asked: list[int] = []

    def second_time() -> bool:
        asked.append(1)
        return len(asked) >= 2

    with pytest.raises(ScoringStopped, match="after 1 of 3 requests"):
        remote.score_groups(groups, should_stop=second_time)
    assert len(asked) == 2  # nothing was sent after the check said stop
    with pytest.raises(ScoringStopped, match="before sending 3 requests"):
        asyncio.run(remote.ascore_groups(groups, should_stop=lambda: True))
    for got, want in zip(
        asyncio.run(remote.ascore_groups(groups, should_stop=lambda: False)),
        reranker.score_groups(groups),
        strict=True,
    ):
        assert got.logits == pytest.approx(want.logits, abs=1e-4)


def test_model_name_is_learned_from_answers_without_asking(reranker: Reranker) -> None:
    front = Front(create_app(reranker))
    with live_server(front) as base_url, RemoteReranker(base_url) as rr:
        assert rr.model_name == base_url  # nothing answered yet, and reading it sends nothing
        assert front.client_ports == set()
        rr.score(QUERY, TEXTS[:2])
        assert rr.model_name == reranker.model_name  # the "model" of the /v1/rerank answer
        assert rr.with_settings(instruction="similar_ticket").model_name == reranker.model_name
        assert [path for _, path, _ in front.posts] == ["/v1/rerank"]  # and never GET /v1/models
    with RemoteReranker(_closed_port_url(), model="qwen3-reranker-pool") as rr:
        assert rr.model_name == "qwen3-reranker-pool"
        assert "qwen3-reranker-pool" in repr(rr)


def test_device_and_dtype_describe_the_remote(remote: RemoteReranker) -> None:
    assert remote.device == remote.base_url and remote.dtype == "remote"


def test_evaluate_and_the_ui_take_a_remote_reranker(url: str, reranker: Reranker) -> None:
    from qwen3_rerank_plugins.evaluate import EvalDataset, EvalQuery, evaluate
    from qwen3_rerank_plugins.ui import rank_for_ui

    data = EvalDataset(
        name="tickets",
        documents=tuple(TEXTS[:4]),
        doc_ids=("a", "b", "c", "d"),
        queries=(EvalQuery("1", QUERY, {0: 1.0}, (0, 1, 2, 3)), EvalQuery("2", "路灯不亮", {1: 1.0}, (1, 0))),
    )
    rr = get_reranker(base_url=url)
    remote_report = evaluate(rr, data, first_stage="none", ks=[1, 3])
    local_report = evaluate(reranker, data, first_stage="none", ks=[1, 3])
    assert remote_report.after == pytest.approx(local_report.after)
    assert remote_report.device == f"{url} (remote)" and remote_report.model == reranker.model_name

    shown = rank_for_ui(rr, QUERY, "\n".join(TEXTS[:4]), "similar_ticket", "", 2)
    expected = reranker.rerank(QUERY, TEXTS[:4], top_n=2, instruction="similar_ticket")
    assert [row[3] for row in shown.rows] == [r.text for r in expected]
    assert f"on {url} (remote)" in shown.status


async def test_fallback_methods_retry_a_low_confidence_query(
    remote: RemoteReranker, reranker: Reranker
) -> None:
    always_low = ConfidenceBands(high=1.0, medium=1.0)  # every score is in the low band
    query = "朝阳区建国路88号3号楼电梯昨晚十一点又坏了"
    low = reranker.with_settings(bands=always_low)
    local = low.rerank_with_fallback(query, TEXTS, top_n=2)
    rr = remote.with_settings(bands=always_low)
    for outcome in (
        rr.rerank_with_fallback(query, TEXTS, top_n=2),
        await rr.arerank_with_fallback(query, TEXTS, top_n=2),
    ):
        assert outcome.fell_back and outcome.retry.query == local.retry.query != query
        for got, expected in zip(outcome.attempts, local.attempts, strict=True):
            _same_results(list(got.results), list(expected.results))
    custom = rr.rerank_with_fallback(query, TEXTS, generalize=lambda q: "电梯坏了")
    assert custom.retry.query == "电梯坏了"
    _same_results(list(custom.retry.results), low.rerank("电梯坏了", TEXTS))


def test_bad_input_is_refused_before_sending(remote: RemoteReranker) -> None:
    with pytest.raises(TypeError, match="query must be a str"):
        remote.score(None, TEXTS)
    with pytest.raises(ValueError, match=r"documents\[1\] is a mapping without a 'text' key"):
        remote.rerank(QUERY, [{"text": "a"}, {"id": 2}])
    with pytest.raises(TypeError, match=r"pairs\[0\] must be a \(query, document\) pair"):
        remote.score_pairs(["not a pair"])
    with pytest.raises(ValueError, match="top_n must be a positive int"):
        remote.rerank(QUERY, TEXTS, top_n=0)
    with pytest.raises(TypeError, match="top_n must be a positive int or None, got str"):
        remote.rerank(QUERY, TEXTS, top_n="3")
    with pytest.raises(TypeError, match="threshold must be a number"):
        remote.rerank(QUERY, TEXTS, threshold="0.5")
    with pytest.raises(ValueError, match="threshold must be a number in"):
        remote.rerank(QUERY, TEXTS, threshold=1.5)
    with pytest.raises(ValueError, match="instruction must not be empty"):
        remote.score(QUERY, TEXTS, instruction="  ")
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        RemoteReranker("http://127.0.0.1:1", prompt_format="tei")


def test_the_servers_refusal_names_the_field(remote: RemoteReranker) -> None:
    with pytest.raises(RerankServiceError) as info:
        remote.score("", TEXTS)  # the service refuses an empty query; the engine would score it
    assert info.value.status_code == 422 and info.value.param == "query"


# -- scale: splitting, failures -----------------------------------------------------------------


def test_ten_thousand_documents_split_across_requests_in_input_order(reranker: Reranker) -> None:
    docs = [f"工单{i}：{TEXTS[i % 4]}" for i in range(10_000)]
    front = Front(create_app(reranker))
    with live_server(front) as base_url, RemoteReranker(base_url, batch_size=1000, max_concurrency=2) as rr:
        scores = rr.score(QUERY, docs)
        assert [n for _, _, n in front.posts] == [1000] * 10  # the service takes at most 1000 per request
        assert scores == pytest.approx(reranker.score(QUERY, docs), abs=TOL)
        top = rr.rerank(QUERY, docs, top_n=20)
    # The best 20 of the whole list, though each request only saw a tenth of it (compared by
    # score: two calls may differ in the last float bit, which can swap near-equal neighbours).
    assert [r.score for r in top] == pytest.approx(sorted(scores, reverse=True)[:20], abs=TOL)
    assert all(r.document is docs[r.index] for r in top)
    assert [r.score for r in top] == sorted((r.score for r in top), reverse=True)


def test_a_server_that_fails_then_recovers(reranker: Reranker) -> None:
    front = Front(create_app(reranker), failures=(500, 429))
    with live_server(front) as base_url, RemoteReranker(base_url, retry=FAST) as rr:
        _same_results(rr.rerank(QUERY, TICKETS), reranker.rerank(QUERY, TICKETS))
    assert len(front.posts) == 3


def test_an_unreachable_server_is_a_clear_error() -> None:
    rr = RemoteReranker(_closed_port_url(), retry=RetryPolicy(max_retries=1, backoff=0.01))
    with pytest.raises(
        RerankServiceError, match=r"could not reach the rerank service at http://127\.0\.0\.1:"
    ):
        rr.rerank(QUERY, TICKETS)
    assert rr.model_name == rr.base_url  # a display name never raises
    rr.close()


# -- async --------------------------------------------------------------------------------------


async def test_async_path(remote: RemoteReranker, reranker: Reranker) -> None:
    assert await remote.ascore(QUERY, TEXTS) == pytest.approx(reranker.score(QUERY, TEXTS), abs=TOL)
    _same_results(await remote.arerank(QUERY, TICKETS, top_n=3), reranker.rerank(QUERY, TICKETS, top_n=3))
    pairs = [(QUERY, TEXTS[0]), ("路灯不亮", TEXTS[1]), (QUERY, TEXTS[2])]
    assert await remote.ascore_pairs(pairs) == pytest.approx(reranker.score_pairs(pairs), abs=TOL)
    queries = [QUERY, "路灯不亮", "噪音扰民"] * 4
    answers = await asyncio.gather(*(remote.arerank(q, TICKETS) for q in queries))
    for q, got in zip(queries, answers, strict=True):
        _same_results(got, reranker.rerank(q, TICKETS))
    assert remote._conn.async_client() is remote._conn.async_client()  # one pool per event loop


def _open_connections_to(base_url: str) -> int | None:
    """This machine's established TCP connections to ``base_url``'s port (None off Linux)."""
    table = Path("/proc/net/tcp")
    if not table.exists():
        return None
    port = int(base_url.rsplit(":", 1)[1])
    rows = [line.split() for line in table.read_text().splitlines()[1:]]
    # Client side: remote address (column 2) is the server's port, state 01 is ESTABLISHED.
    return sum(1 for row in rows if int(row[2].split(":")[1], 16) == port and row[3] == "01")


def test_one_pool_per_event_loop_closed_with_its_loop(url: str, reranker: Reranker) -> None:
    rr = RemoteReranker(url)
    expected = reranker.score(QUERY, TEXTS)
    clients = []

    async def one_request() -> list[float]:
        clients.append(rr._conn.async_client())
        return await rr.ascore(QUERY, TEXTS)

    before = _open_connections_to(url)
    for _ in range(6):  # code that calls asyncio.run per request: a new event loop each time
        assert asyncio.run(one_request()) == pytest.approx(expected, abs=TOL)
    assert len(set(map(id, clients))) == 6  # a pool cannot move between loops...
    assert all(c._http.is_closed for c in clients)  # ...so each one closed with its loop
    assert rr._conn.pool_count() == 0
    if before is not None:
        assert _open_connections_to(url) == before

    # A loop closed by hand, without shutting down its async generators: its pool is let go
    # the next time any loop asks, so at most one pool per live loop is ever held.
    loop = asyncio.new_event_loop()
    loop.run_until_complete(rr.ascore(QUERY, TEXTS))
    loop.close()
    assert asyncio.run(rr.ascore(QUERY, TEXTS)) == pytest.approx(expected, abs=TOL)
    assert rr._conn.pool_count() == 0

    # aclose() closes the running loop's pool at once, and the reranker keeps working after it.
    async def use_then_close() -> None:
        await rr.ascore(QUERY, TEXTS)
        client = rr._conn.async_client()
        await rr.aclose()
        assert client._http.is_closed and rr._conn.pool_count() == 0

    asyncio.run(use_then_close())
    rr.close()


def test_the_shared_remote_reranker_keeps_no_pool_per_asyncio_run(url: str) -> None:
    rr = get_reranker(base_url=url)
    for _ in range(4):
        asyncio.run(rr.arerank(QUERY, TEXTS, top_n=1))
    assert rr._conn.pool_count() == 0


# -- a vLLM-style server ------------------------------------------------------------------------


def vllm_like_app(hf_model: Any) -> tuple[FastAPI, list[dict[str, Any]]]:
    """``/v1/rerank`` as vLLM serves the original Qwen3-Reranker with its published overrides.

    vLLM turns the checkpoint into a classifier over ``z_yes - z_no`` and tokenises each pair as
    query ids followed by document ids, with the template's control tokens read as such.
    """
    model, tokenizer = hf_model
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    app, seen = FastAPI(), []

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> dict[str, Any]:
        body = await request.json()
        seen.append(body)
        results = []
        for i, doc in enumerate(body["documents"]):
            ids = tokenizer.encode(body["query"], add_special_tokens=False)
            ids += tokenizer.encode(doc, add_special_tokens=False)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            z = float(logits[yes] - logits[no])
            results.append({"index": i, "relevance_score": 1 / (1 + math.exp(-z)), "document": {"text": doc}})
        results.sort(key=lambda r: -r["relevance_score"])
        top_n = body.get("top_n") or len(results)
        return {
            "id": "rerank-x",
            "model": body.get("model"),
            "usage": {"total_tokens": 0},
            "results": results[:top_n],
        }

    return app, seen


def test_vllm_prompt_format_gives_the_model_card_scores(hf_model: Any, reranker: Reranker) -> None:
    app, seen = vllm_like_app(hf_model)
    with live_server(app) as base_url:
        rr = RemoteReranker(
            base_url, model="Qwen/Qwen3-Reranker-0.6B", prompt_format="vllm", instruction="similar_ticket"
        )
        texts = TEXTS[:4]
        assert rr.score(QUERY, texts) == pytest.approx(
            reranker.score(QUERY, texts, "similar_ticket"), abs=1e-5
        )
        _same_results(
            rr.rerank(QUERY, texts, top_n=2),
            reranker.rerank(QUERY, texts, top_n=2, instruction="similar_ticket"),
        )
        rr.close()
    assert all("instruction" not in body and body["model"] == "Qwen/Qwen3-Reranker-0.6B" for body in seen)
    assert seen[0]["query"].startswith("<|im_start|>system\n") and seen[0]["query"].endswith("<Document>:")


def test_readme_scaling_out_snippet_runs(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- section: scaling-out -->", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "http://rerank:8000" in code
    exec(compile(code.replace("http://rerank:8000", url), "README.md", "exec"), {})
    index, score, band = capsys.readouterr().out.split()
    assert index in {"0", "1"} and 0.0 <= float(score) <= 1.0 and band in {"high", "medium", "low"}


# -- every per-request option the service accepts ----------------------------------------------

LONG_POLICY = (
    "会员积分规则："
    + "积分有效期为一年，过期自动清零，不可转让。" * 40
    + "兑换方法：在积分商城用积分兑换优惠券。"
)


def test_token_caps_reach_the_service(url: str, reranker: Reranker) -> None:
    """`max_doc_tokens` / `max_query_tokens` are sent (max_tokens_per_doc / _per_query) and honoured."""
    texts = [LONG_POLICY, *TEXTS[:3]]
    capped = reranker.with_settings(max_doc_tokens=4)
    with RemoteReranker(url, retry=FAST, max_doc_tokens=4) as remote:
        got = remote.score(QUERY, texts, return_logits=True)
        assert got == pytest.approx(capped.score(QUERY, texts, return_logits=True), abs=1e-4)
        # The cap changed what the model read: the uncapped scores differ.
        assert got != pytest.approx(reranker.score(QUERY, texts, return_logits=True), abs=1e-3)
        both = remote.with_settings(max_query_tokens=6)
        assert both._conn is remote._conn
        assert both.score(QUERY, texts) == pytest.approx(
            reranker.with_settings(max_doc_tokens=4, max_query_tokens=6).score(QUERY, texts), abs=TOL
        )
    # A ScoreGroup's own caps win over the reranker's.
    from qwen3_rerank_plugins import ScoreGroup

    with RemoteReranker(url, retry=FAST) as remote:
        (scored,) = remote.score_groups([ScoreGroup(QUERY, texts, max_doc_tokens=4)])
        assert scored.logits == pytest.approx(capped.score(QUERY, texts, return_logits=True), abs=1e-4)


def test_long_document_windows_and_spans_over_http(reranker: Reranker) -> None:
    """`long_documents` / `max_windows` are sent as max_chunks_per_doc; the best window's span comes back."""
    served = reranker.with_settings(max_length=200)
    local = served.with_settings(long_documents=True, max_windows=8)
    docs = [LONG_POLICY, TEXTS[0]]
    with (
        live_server(create_app(served)) as base_url,
        RemoteReranker(base_url, retry=FAST, long_documents=True, max_windows=8) as remote,
    ):
        got, expected = remote.rerank(QUERY, docs), local.rerank(QUERY, docs)
        assert [(r.index, r.span) for r in got] == [(r.index, r.span) for r in expected]
        assert any(r.span is not None for r in got)
        assert [r.logit for r in got] == pytest.approx([r.logit for r in expected], abs=1e-4)


def test_log_odds_are_the_services_raw_scores(url: str, reranker: Reranker) -> None:
    """raw_scores: logits that saturate as probabilities still come back finite and exact."""
    with RemoteReranker(url, retry=FAST) as remote:
        request = remote._request(remote._group(QUERY, TEXTS, None))
        assert request["raw_scores"] is True
        assert remote.score(QUERY, TEXTS, return_logits=True) == pytest.approx(
            reranker.score(QUERY, TEXTS, return_logits=True), abs=1e-5
        )
    with pytest.raises(ValueError, match="cannot be sent to vLLM"):
        RemoteReranker(url, prompt_format="vllm", max_doc_tokens=8)


# -- overload: a timeout and on_overload --------------------------------------------------------


def test_overload_raises_by_default_and_keep_order_keeps_the_input_order(
    reranker: Reranker, caplog: pytest.LogCaptureFixture
) -> None:
    """A service answering 503 + Retry-After (its --max-queue refusal) beyond the call's timeout."""
    app = create_app(reranker)
    front = Front(app, failures=(503,) * 50, retry_after="5")
    with live_server(front) as base_url:
        with RemoteReranker(base_url, retry=FAST, timeout=1.0) as strict:
            with pytest.raises(RerankServiceError, match="past this call's timeout of 1 s") as info:
                strict.rerank(QUERY, TICKETS, top_n=3)
            assert info.value.overloaded and info.value.status_code == 503
        assert len(front.posts) == 1  # a Retry-After past the timeout is not waited for

        with RemoteReranker(base_url, retry=FAST, timeout=1.0, on_overload="keep_order") as kind:
            with caplog.at_level("WARNING", logger="qwen3_rerank_plugins.remote"):
                kept = kind.rerank(QUERY, TICKETS, top_n=3)
            assert [r.index for r in kept] == [0, 1, 2]
            assert all(not r.reranked and math.isnan(r.score) for r in kept)
            assert [r.id for r in kept] == [t["id"] for t in TICKETS[:3]]
            assert "overloaded" in caplog.text and "keeping the input order" in caplog.text
            kept_async = asyncio.run(kind.arerank(QUERY, TICKETS))
            assert [r.index for r in kept_async] == list(range(len(TICKETS)))
            # Only overload keeps the order: a refused request still raises.
            front.failures.clear()
            with pytest.raises(RerankServiceError) as bad:
                kind.rerank("   ", TICKETS)
            assert bad.value.status_code == 422 and not bad.value.overloaded


def test_retry_after_within_the_timeout_is_honoured(reranker: Reranker) -> None:
    front = Front(create_app(reranker), failures=(503,), retry_after="1")
    with live_server(front) as base_url, RemoteReranker(base_url, retry=FAST, timeout=5.0) as remote:
        got = remote.rerank(QUERY, TICKETS)
    (first, _, _), (second, _, _) = front.posts
    assert second - first >= 0.9
    _same_results(got, reranker.rerank(QUERY, TICKETS))
