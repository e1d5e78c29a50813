"""Template names: exact names, free text, near misses (warned, or refused with ``strict=True``).

Plain Python, no model: ``resolve_instruction`` decides what text the model reads. Every warning
is logged once per distinct string, so each test uses strings of its own.
"""

from __future__ import annotations

import logging

import pytest

from qwen3_rerank_plugins import Reranker, resolve_instruction
from qwen3_rerank_plugins.templates import (
    DEFAULT_INSTRUCTION,
    INSTRUCTION_TEMPLATES,
    register_instruction_template,
    suggest_template_name,
)

FAQ = INSTRUCTION_TEMPLATES["customer_service_faq"].text
LOGGER = "qwen3_rerank_plugins"


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each name warns once per process; another test module may have used it already.
    from qwen3_rerank_plugins import templates

    monkeypatch.setattr(templates, "_warned_names", set())


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_exact_names_templates_and_none() -> None:
    assert resolve_instruction("customer_service_faq") == FAQ
    assert resolve_instruction("customer_service_faq", strict=True) == FAQ
    assert resolve_instruction(INSTRUCTION_TEMPLATES["similar_ticket"], strict=True).startswith("Given a new")
    assert resolve_instruction(None) == DEFAULT_INSTRUCTION
    assert resolve_instruction(None, "customer_service_faq", strict=True) == FAQ


def test_free_text_is_used_verbatim_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    sentences = [
        "Find the FAQ entry that answers the question",
        "Prefer documents about order_id lookups",  # an underscore inside a sentence
        "Relevance",  # one ordinary word, close to no template name
        "检索能回答问题的FAQ条目",
    ]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for text in sentences:
            assert resolve_instruction(text) == text
            assert resolve_instruction(text, strict=True) == text
    assert _warnings(caplog) == []


def test_a_mistyped_name_is_free_text_with_one_did_you_mean(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_instruction("customer_srvice_faq") == "customer_srvice_faq"
        assert resolve_instruction("customer_srvice_faq") == "customer_srvice_faq"
    assert _warnings(caplog) == [
        "instruction 'customer_srvice_faq' is not a template name, so it is used as free text; "
        "did you mean 'customer_service_faq'?"
    ]


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("customer_servic_faq", "customer_service_faq"),
        ("Customer_Servic_FAQ", "customer_service_faq"),  # wrong case and a typo
        ("customer-service-faq", "customer_service_faq"),  # dashes
        ("CustomerServiceFAQ", "customer_service_faq"),  # no underscore at all
        ("similar_tickets", "similar_ticket"),
    ],
)
def test_strict_refuses_a_near_miss_with_the_suggestion(typo: str, meant: str) -> None:
    assert suggest_template_name(typo) == meant
    expected = rf"instruction '{typo}' is not a template name; did you mean '{meant}'\?"
    with pytest.raises(ValueError, match=expected):
        resolve_instruction(typo, strict=True)


def test_strict_lists_the_names_when_nothing_is_close() -> None:
    expected = r"'billing_desk' is not a template name \(known: customer_service_faq, "
    with pytest.raises(ValueError, match=expected):
        resolve_instruction("billing_desk", strict=True)
    with pytest.raises(ValueError, match="did you mean 'web_search'"):
        resolve_instruction(None, "web_serch", strict=True)  # the default is resolved with the same rule


def test_wrong_case_reads_the_template_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert resolve_instruction("Customer_Service_FAQ") == FAQ
        assert resolve_instruction("Customer_Service_FAQ") == FAQ
        assert resolve_instruction("CUSTOMER_SERVICE_FAQ") == FAQ
    assert _warnings(caplog) == [
        "instruction 'Customer_Service_FAQ' is read as the template 'customer_service_faq' "
        "(template names are lower case)",
        "instruction 'CUSTOMER_SERVICE_FAQ' is read as the template 'customer_service_faq' "
        "(template names are lower case)",
    ]


def test_strict_refuses_the_wrong_case_with_the_same_did_you_mean() -> None:
    with pytest.raises(ValueError) as excinfo:
        resolve_instruction("Customer_Service_FAQ", strict=True)
    assert str(excinfo.value) == (
        "instruction 'Customer_Service_FAQ' is not a template name; did you mean 'customer_service_faq'? "
        "(template names are lower case)"
    )


def test_registered_templates_are_suggested_too() -> None:
    register_instruction_template("billing_faq_test", "Prioritize billing FAQ entries", overwrite=True)
    try:
        assert resolve_instruction("Billing_FAQ_Test") == "Prioritize billing FAQ entries"
        with pytest.raises(ValueError, match="did you mean 'billing_faq_test'"):
            resolve_instruction("biling_faq_test", strict=True)
    finally:
        INSTRUCTION_TEMPLATES.pop("billing_faq_test")


def test_bad_types_and_empty_strings_are_refused() -> None:
    with pytest.raises(TypeError, match="instruction must be a template name, free text or None, got int"):
        resolve_instruction(3, strict=True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="instruction must not be empty"):
        resolve_instruction("  ", strict=True)


def test_the_engine_reads_a_wrong_case_name_as_the_template(reranker: Reranker) -> None:
    docs = ["【发票申请指南】在订单详情页点击“申请开票”", "[Policy] 退货政策：7天无理由"]
    expected = reranker.score("发票怎么开", docs, instruction="customer_service_faq")
    assert reranker.score("发票怎么开", docs, instruction="Customer_Service_FAQ") == expected
    assert reranker.score("发票怎么开", docs, instruction="customer_servic_faq") != expected
