"""The random-weight notice and the template "did you mean" reach a user who configured nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

from qwen3_rerank_plugins import (
    Qwen3RerankWarning,
    RandomWeightsWarning,
    UnknownTemplateWarning,
    resolve_instruction,
)
from qwen3_rerank_plugins.notices import notices_logged_only, warn_once

SRC = Path(__file__).resolve().parent.parent / "src"


@pytest.fixture(scope="module")
def demo_cache(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-model cache holding the tiny model (the demo model is built by the same recipe)."""
    root = tmp_path_factory.mktemp("demo-cache")
    target = root / "random-qwen3-reranker-tiny"
    shutil.copytree(tiny_model_dir, target)
    (target / ".complete").write_text(json.dumps({"size": "tiny", "random_weights": True}))
    return root


def _plain_python(code: str, demo_cache: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that sets up no logging and no warning filters."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHONWARNINGS")}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["QWEN3_RERANK_DEMO_CACHE"] = str(demo_cache)
    return subprocess.run(
        [sys.executable, *options, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


USER_SCRIPT = """
    from qwen3_rerank_plugins import Reranker, get_reranker

    rr = Reranker.from_pretrained("demo", device="cpu")
    rr = Reranker.from_pretrained("demo", device="cpu")   # the same model again: no second warning
    shared = get_reranker("demo", device="cpu")
    for _ in range(3):
        rr.rerank("发票怎么开", ["开票指南", "退货政策"], instruction="customer_servic_faq")
    print("ok")
"""


def test_a_user_who_configured_nothing_sees_each_notice_once(demo_cache: Path) -> None:
    done = _plain_python(USER_SCRIPT, demo_cache)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert done.stderr.count("RandomWeightsWarning") == 1, done.stderr
    assert "scores are MEANINGLESS" in done.stderr
    assert done.stderr.count("UnknownTemplateWarning") == 1, done.stderr
    assert "did you mean 'customer_service_faq'?" in done.stderr
    # Attributed to the user's line, not to a file inside the package.
    warning_lines = [line for line in done.stderr.splitlines() if "Warning:" in line]
    assert all(line.startswith("<string>:") for line in warning_lines), warning_lines


def test_the_categories_can_be_filtered_like_any_warning(demo_cache: Path) -> None:
    strict = _plain_python(USER_SCRIPT, demo_cache, "-W", "error::qwen3_rerank_plugins.Qwen3RerankWarning")
    assert strict.returncode != 0
    assert "RandomWeightsWarning" in strict.stderr
    assert "ok" not in strict.stdout


def test_a_mistyped_template_name_warns_once_per_name() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            resolve_instruction("similar_tiket")
        resolve_instruction("Web_Search")  # a different name: its own warning
        resolve_instruction("web_search")  # a real name: none
    messages = [str(w.message) for w in caught if issubclass(w.category, UnknownTemplateWarning)]
    assert len(messages) == 2, messages
    assert "did you mean 'similar_ticket'?" in messages[0]
    assert "'web_search'" in messages[1]
    assert all(w.filename == __file__ for w in caught)  # points at the caller


def test_the_warning_classes_are_user_warnings() -> None:
    assert issubclass(RandomWeightsWarning, Qwen3RerankWarning)
    assert issubclass(UnknownTemplateWarning, Qwen3RerankWarning)
    assert issubclass(Qwen3RerankWarning, UserWarning)


def test_programs_that_log_the_notices_can_hide_the_duplicates() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with notices_logged_only():
            assert warn_once(RandomWeightsWarning, "test-notices-hidden", "hidden")
        assert not warn_once(RandomWeightsWarning, "test-notices-hidden", "hidden")  # once per key
        assert warn_once(RandomWeightsWarning, "test-notices-shown", "shown")
    assert [str(w.message) for w in caught] == ["shown"]
