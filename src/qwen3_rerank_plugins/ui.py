"""A small web page to try the reranker (extra ``[ui]``: Gradio).

A query box, a documents box (one document per line), an instruction picked from the named
templates or written freely, and top-n; the page shows the ranked list with scores, bands and
the time taken. Run it with ``qwen3-rerank ui`` or::

    from qwen3_rerank_plugins import get_reranker
    from qwen3_rerank_plugins.ui import build_ui
    build_ui(get_reranker("Qwen/Qwen3-Reranker-0.6B")).launch()
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any

from ._optional import require
from .protocol import Scorer, precision_name
from .results import ConfidenceBands, RerankResult
from .templates import list_instruction_templates, resolve_instruction

__all__ = ["DEFAULT_TEMPLATE_CHOICE", "UIRanking", "build_ui", "rank_for_ui"]

#: Dropdown value meaning "the reranker's default instruction".
DEFAULT_TEMPLATE_CHOICE = ""
COLUMNS = ["rank", "score", "band", "document"]

_EXAMPLES = [
    [
        "订单还没发货，能查一下吗？",
        "\n".join(
            [
                "[FAQ] 发票怎么开：在订单详情页点击“申请开票”，填写抬头和税号，电子发票1个工作日内发到邮箱。",
                "[FAQ] 订单发货查询：付款后48小时内发货。进入“我的订单”，点击订单即可查看物流单号和进度。",
                "[Policy] 退货政策：签收后7天内可申请无理由退货，商品及包装需保持完好。",
                "【优惠券使用说明】优惠券需在有效期内使用，部分特价商品不可叠加。",
            ]
        ),
        "customer_service_faq",
    ],
    [
        "my coupon doesn't work",
        "\n".join(
            [
                "[FAQ] Coupons: a coupon applies only before its expiry date, not to items already on sale.",
                "[Policy] Refunds are issued to the original payment method within 7 business days.",
                "[FAQ] To track an order, open My Orders and select the order to see the tracking number.",
            ]
        ),
        "explicit_object",
    ],
]


@dataclass(frozen=True)
class UIRanking:
    """What the page shows for one click: table rows, a status line, the instruction used, and
    the matching part of each long document read in windows (HTML, the span in ``<mark>``)."""

    rows: list[list[Any]]
    status: str
    instruction: str
    seconds: float
    matches_html: str = field(default="")


# Characters of context shown on each side of a matching span.
_CONTEXT = 120


def _matches_html(results: list[RerankResult]) -> str:
    """Each windowed document with the best window's span highlighted (all text escaped)."""
    parts = []
    for rank, r in enumerate(results, start=1):
        if r.span is None:
            continue
        start, end = r.span
        text = r.text
        before = ("…" if start > _CONTEXT else "") + text[max(start - _CONTEXT, 0) : start]
        after = text[end : end + _CONTEXT] + ("…" if end + _CONTEXT < len(text) else "")
        marked = f"{html.escape(before)}<mark>{html.escape(text[start:end])}</mark>{html.escape(after)}"
        parts.append(
            f'<div class="match"><strong>#{rank}</strong> ({r.score:.4f}, characters {start}-{end} of '
            f"{len(text)}): {marked}</div>"
        )
    return "\n".join(parts)


def _documents(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def rank_for_ui(
    reranker: Scorer,
    query: str,
    documents_text: str,
    template: str | None = DEFAULT_TEMPLATE_CHOICE,
    custom_instruction: str | None = "",
    top_n: float | int | None = None,
    bands: ConfidenceBands | None = None,
    long_documents: bool = False,
) -> UIRanking:
    """Rank the page's inputs: the function behind the Rerank button.

    Args:
        reranker: A loaded :class:`~qwen3_rerank_plugins.Reranker`.
        query: The query box.
        documents_text: The documents box, one document per line (blank lines skipped).
        template: A template name from the dropdown, or ``""`` for the reranker's default.
        custom_instruction: Free text; when not blank it wins over the dropdown.
        top_n: Keep this many (``None`` or 0: all).
        bands: Cut-offs for the band column (default: the reranker's).
        long_documents: Read documents longer than the budget in windows; the matching part of
            each is highlighted in :attr:`UIRanking.matches_html`.

    Raises:
        ValueError: Empty query, no documents, or a negative top-n (shown as an error on the page).
    """
    if not query or not query.strip():
        raise ValueError("Enter a query.")
    docs = _documents(documents_text)
    if not docs:
        raise ValueError("Enter at least one document (one per line).")
    keep = int(top_n or 0)
    if keep < 0:
        raise ValueError("Top-n must be 0 (all) or a positive number.")
    if custom_instruction and custom_instruction.strip():
        instruction: str | None = custom_instruction.strip()
    else:
        instruction = template or None
    if long_documents:
        try:
            reranker = reranker.with_settings(long_documents=True)
        except TypeError as exc:  # a remote backend: windows are the server's setting
            raise ValueError(f"Long-document mode is not available here: {exc}") from exc
    start = time.perf_counter()
    results = reranker.rerank(query.strip(), docs, top_n=keep or None, instruction=instruction)
    seconds = time.perf_counter() - start
    classify = (bands or reranker.bands).classify
    rows = [[rank, round(r.score, 4), classify(r.score), r.text] for rank, r in enumerate(results, start=1)]
    used = resolve_instruction(instruction, reranker.instruction)
    status = (
        f"Ranked **{len(docs)}** documents in **{seconds * 1000:.1f} ms** "
        f"· {reranker.model_name} on {reranker.device} ({precision_name(reranker)})"
        f"\n\nInstruction: *{used}*"
    )
    return UIRanking(
        rows=rows, status=status, instruction=used, seconds=seconds, matches_html=_matches_html(results)
    )


def _template_info(name: str | None) -> str:
    for t in list_instruction_templates():
        if t.name == name:
            return f"**{t.name}**: {t.description}\n\n> {t.text}"
    return (
        "The reranker's default instruction (the model card's web-search instruction unless set otherwise)."
    )


def build_ui(
    reranker: Scorer,
    *,
    bands: ConfidenceBands | None = None,
    title: str = "Qwen3-Reranker",
    demo_model: bool = False,
) -> Any:
    """The web page as a ``gradio.Blocks`` (call ``.launch()`` on it).

    Args:
        reranker: A loaded :class:`~qwen3_rerank_plugins.Reranker`.
        bands: Cut-offs for the band column (default: the reranker's).
        title: Page title.
        demo_model: Show a banner saying the scores come from a random demo model.

    Returns:
        A ``gradio.Blocks``. The Rerank button's API name is ``"rerank"`` (for ``gradio_client``).
    """
    gr = require("gradio", "ui", "The web page")
    choices = [("default instruction", DEFAULT_TEMPLATE_CHOICE)] + [
        (t.name, t.name) for t in list_instruction_templates()
    ]

    def on_rerank(query: str, documents: str, template: str, custom: str, top_n: float, long: bool = False):
        try:
            out = rank_for_ui(reranker, query, documents, template, custom, top_n, bands, bool(long))
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        return out.rows, out.status, out.matches_html

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(f"# {title}\nRerank documents for a query. One document per line.")
        if demo_model:
            gr.Markdown(
                "⚠️ **Demo model with random weights**: the ranking machinery is real, "
                "**the scores are meaningless**. Start with `--model` for real scores.",
                elem_id="demo-warning",
            )
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Textbox(label="Query", placeholder="发票怎么开", lines=1, elem_id="query")
                documents = gr.Textbox(
                    label="Documents (one per line)",
                    placeholder="【发票申请指南】在订单详情页点击“申请开票”…\n[Policy] 退货政策…",
                    lines=10,
                    elem_id="documents",
                )
                with gr.Row():
                    template = gr.Dropdown(
                        choices=choices,
                        value=DEFAULT_TEMPLATE_CHOICE,
                        label="Instruction template",
                        elem_id="template",
                    )
                    top_n = gr.Number(
                        value=0, precision=0, minimum=0, label="Top-n (0 = all)", elem_id="top-n"
                    )
                template_info = gr.Markdown(_template_info(DEFAULT_TEMPLATE_CHOICE))
                custom = gr.Textbox(
                    label="Custom instruction (English recommended; overrides the template)",
                    placeholder="Prioritize documents that contain step-by-step instructions for users",
                    lines=1,
                    elem_id="custom-instruction",
                )
                long_documents = gr.Checkbox(
                    value=False,
                    label="Long documents: read past max_length in windows and highlight the match",
                    elem_id="long-documents",
                )
                button = gr.Button("Rerank", variant="primary", elem_id="rerank-button")
            with gr.Column(scale=1):
                table = gr.Dataframe(
                    headers=COLUMNS,
                    datatype=["number", "number", "str", "str"],
                    label="Ranked documents",
                    interactive=False,
                    wrap=True,
                    column_widths=["10%", "14%", "12%", "64%"],
                    elem_id="results",
                )
                status = gr.Markdown(elem_id="status")
                matches = gr.HTML(elem_id="matches")
        gr.Examples(examples=_EXAMPLES, inputs=[query, documents, template], label="Examples")
        template.change(_template_info, inputs=template, outputs=template_info, api_visibility="private")
        inputs = [query, documents, template, custom, top_n, long_documents]
        outputs = [table, status, matches]
        button.click(on_rerank, inputs=inputs, outputs=outputs, api_name="rerank")
        query.submit(on_rerank, inputs=inputs, outputs=outputs, api_visibility="private")
    return page


def launch_ui(
    reranker: Scorer,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    demo_model: bool = False,
    bands: ConfidenceBands | None = None,
) -> None:
    """Serve the page until interrupted (what ``qwen3-rerank ui`` runs)."""
    page = build_ui(reranker, demo_model=demo_model, bands=bands)
    page.launch(server_name=host, server_port=port, show_error=True, footer_links=["api"])
