"""The web page: its ranking function, Gradio's own client, and a real headless Chromium.

The page is served by Gradio on a free port of 127.0.0.1 over the tiny random model (scores are
meaningless; the demo banner says so). The browser test drives Debian's Chromium through
Playwright and leaves a screenshot in ``test-output/ui.png``.
"""

from __future__ import annotations

import html
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gradio_client import Client

from helpers import CHROMIUM, CHROMIUM_FLAGS, free_port
from qwen3_rerank_plugins import ConfidenceBands, Reranker, list_instruction_templates, resolve_instruction
from qwen3_rerank_plugins.ui import DEFAULT_TEMPLATE_CHOICE, build_ui, rank_for_ui

ROOT = Path(__file__).resolve().parents[1]
QUERY = "发票怎么开"
DOCS = [
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[Policy] 退货政策：签收后7天内可无理由退货。",
    "[FAQ] 订单发货时间：付款后48小时内发货。",
    "my coupon doesn't work: coupons apply only before their expiry date.",
]
DOCS_BOX = "\n".join([DOCS[0], "", DOCS[1], "   ", *DOCS[2:]])  # blank lines are skipped


def _expected_rows(
    reranker: Reranker, instruction: str | None = None, top_n: int | None = None
) -> list[list]:
    results = reranker.rerank(QUERY, DOCS, top_n=top_n, instruction=instruction)
    return [[rank, round(r.score, 4), r.band, r.text] for rank, r in enumerate(results, start=1)]


@pytest.fixture(scope="module")
def page_url(reranker: Reranker) -> Iterator[str]:
    """The page with the demo banner, served by Gradio on 127.0.0.1."""
    page = build_ui(reranker, demo_model=True)
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


# -- the function behind the button -------------------------------------------------------------


def test_rank_for_ui_matches_the_engine(reranker: Reranker) -> None:
    out = rank_for_ui(reranker, QUERY, DOCS_BOX, "customer_service_faq", "", 3)

    assert out.rows == _expected_rows(reranker, "customer_service_faq", top_n=3)
    assert out.instruction == resolve_instruction("customer_service_faq")
    assert f"Ranked **{len(DOCS)}** documents in" in out.status
    assert out.seconds > 0


def test_custom_instruction_wins_over_the_template(reranker: Reranker) -> None:
    custom = "Prioritize documents that contain step-by-step instructions for users"
    out = rank_for_ui(reranker, QUERY, DOCS_BOX, "similar_ticket", f"  {custom} ", 0)

    assert out.instruction == custom
    assert out.rows == _expected_rows(reranker, custom)


def test_default_choice_uses_the_rerankers_instruction_and_bands(reranker: Reranker) -> None:
    scores = sorted(reranker.score(QUERY, DOCS))
    bands = ConfidenceBands(high=scores[-1], medium=scores[0])
    out = rank_for_ui(reranker, QUERY, DOCS_BOX, DEFAULT_TEMPLATE_CHOICE, "", None, bands)

    assert out.instruction == reranker.instruction
    # The best score reaches ``high``; the worst sits exactly on ``medium`` (inclusive).
    assert [row[2] for row in out.rows] == ["high", "medium", "medium", "medium"]


@pytest.mark.parametrize(
    ("query", "docs", "top_n", "message"),
    [
        ("  ", DOCS_BOX, 0, "Enter a query."),
        (QUERY, "\n  \n", 0, "at least one document"),
        (QUERY, DOCS_BOX, -1, "Top-n"),
    ],
)
def test_rank_for_ui_rejects_bad_input(
    reranker: Reranker, query: str, docs: str, top_n: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        rank_for_ui(reranker, query, docs, DEFAULT_TEMPLATE_CHOICE, "", top_n)


def test_dropdown_offers_every_named_template_and_banner_only_for_the_demo(reranker: Reranker) -> None:
    def components(page: Any) -> dict[str, dict]:
        return {
            c["props"].get("elem_id"): c["props"]
            for c in page.config["components"]
            if c["props"].get("elem_id")
        }

    demo = components(build_ui(reranker, demo_model=True))
    real = components(build_ui(reranker))

    names = [value for _, value in demo["template"]["choices"]]
    assert names == [DEFAULT_TEMPLATE_CHOICE] + [t.name for t in list_instruction_templates()]
    assert "random weights" in demo["demo-warning"]["value"]
    assert "demo-warning" not in real
    assert {"query", "documents", "custom-instruction", "top-n", "rerank-button", "results", "status"} <= set(
        real
    )


# -- Gradio's own client --------------------------------------------------------------------------


def test_gradio_client_ranks_through_the_page(page_url: str, reranker: Reranker) -> None:
    client = Client(page_url, verbose=False)
    table, status, matches = client.predict(QUERY, DOCS_BOX, "explicit_object", "", 2, api_name="/rerank")
    assert matches == ""  # short documents are read whole: nothing to highlight

    assert table["headers"] == ["rank", "score", "band", "document"]
    assert table["data"] == _expected_rows(reranker, "explicit_object", top_n=2)
    assert f"Ranked **{len(DOCS)}** documents in" in status
    assert " ms" in status and "cpu (float32)" in status


def test_gradio_client_highlights_the_matching_part_of_a_long_document(
    page_url: str, reranker: Reranker
) -> None:
    long = "会员积分规则：" + "积分有效期为一年，过期自动清零。" * 800 + "兑换：在积分商城兑换优惠券。<b>"
    client = Client(page_url, verbose=False)
    _, _, matches = client.predict("积分怎么兑换", f"{long}\n短文档", "", "", 0, True, api_name="/rerank")
    [result] = [
        r
        for r in reranker.with_settings(long_documents=True).rerank("积分怎么兑换", [long, "短文档"])
        if r.span
    ]
    start, end = result.span
    assert f"<mark>{html.escape(long[start:end])}</mark>" in matches
    assert "优惠券。&lt;b&gt;" in matches and "优惠券。<b>" not in matches  # document text is escaped


def test_gradio_client_gets_the_error_message(page_url: str) -> None:
    client = Client(page_url, verbose=False)
    with pytest.raises(Exception, match="Enter a query"):
        client.predict("", DOCS_BOX, DEFAULT_TEMPLATE_CHOICE, "", 0, api_name="/rerank")


# -- a real browser -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_page_in_headless_chromium(page_url: str, reranker: Reranker) -> None:
    from playwright.sync_api import sync_playwright

    out_dir = ROOT / "test-output"
    out_dir.mkdir(exist_ok=True)
    screenshot = out_dir / "ui.png"
    screenshot.unlink(missing_ok=True)
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        browser = pw.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = browser.new_page()
            page.goto(page_url, wait_until="networkidle", timeout=60_000)
            banner = page.inner_text("#demo-warning")
            page.fill("#query textarea", QUERY)
            page.fill("#documents textarea", DOCS_BOX)
            page.click("#template input")
            page.get_by_role("option", name="customer_service_faq").click()
            page.click("#rerank-button")
            page.wait_for_selector("#status:has-text('Ranked')", timeout=60_000)
            cells = page.locator("#results [role='gridcell'][data-row]").evaluate_all(
                "els => els.map(e => [Number(e.dataset.row), Number(e.dataset.col), e.innerText.trim()])"
            )
            status = page.inner_text("#status")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    assert "random weights" in banner
    table: dict[int, dict[int, str]] = {}
    for row, col, text in cells:
        table.setdefault(row, {})[col] = text
    shown = [[table[row][col] for col in sorted(table[row])] for row in sorted(table)]
    expected = _expected_rows(reranker, "customer_service_faq")
    assert shown == [[str(rank), f"{score}", band, text] for rank, score, band, text in expected]
    assert f"Ranked {len(DOCS)} documents in" in status
    assert resolve_instruction("customer_service_faq") in status
    assert screenshot.stat().st_size > 10_000
