"""The README's Python snippets, run offline as written.

Every ```python block of README.md is run here. The only change is the one the README tells an
offline reader to make: the notes beside the snippets say to write ``"demo"`` for the model,
and each hub id line carries that switch as a comment (checked). Snippets that talk to a
service run against ``qwen3-rerank serve --demo`` on 127.0.0.1, at the address the snippet
names swapped for the test's port. A new snippet in a section this file does not know fails
``test_every_snippet_is_run``, so none is skipped silently.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import free_port
from qwen3_rerank_plugins import ConfidenceBands

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
HUB_ID = '"Qwen/Qwen3-Reranker-0.6B"'
OFFLINE_SWITCH = re.compile(r'#.*offline[^#\n]*"demo"')
# The addresses the service snippets name, and the sections whose snippets need a running service.
SERVICE_URLS = ("http://127.0.0.1:8000", "http://rerank:8000")
LOCAL = {"engine", "llama-index", "langchain", "examples", "benchmarks"}
SERVED = {"serving", "scaling-out"}


def _snippets() -> list[tuple[str, int, str]]:
    """``(section, n, code)`` for each Python block; the section is the last ``<!-- section: -->``."""
    found = []
    parts = re.split(r"<!-- section: ([\w-]+) -->", README)
    sections = [("top", parts[0]), *zip(parts[1::2], parts[2::2], strict=True)]
    for name, text in sections:
        for n, code in enumerate(re.findall(r"```python\n(.*?)```", text, re.DOTALL)):
            found.append((name, n, textwrap.dedent(code)))
    return found


SNIPPETS = _snippets()


def _offline(code: str) -> str:
    """The snippet with the README's offline switch applied: ``"demo"`` for the hub id."""
    for line in code.splitlines():
        if HUB_ID in line and not line.lstrip().startswith("#"):
            assert OFFLINE_SWITCH.search(line) or OFFLINE_SWITCH.search(code), (
                f"the README must say beside this line that offline it is 'demo': {line.strip()}"
            )
    return code.replace(HUB_ID, '"demo"')


def _run(code: str, section: str) -> dict:
    namespace: dict = {"__name__": f"readme_{section}"}
    exec(compile(code, f"README.md ({section})", "exec"), namespace)
    return namespace


def test_every_snippet_is_run() -> None:
    assert len(SNIPPETS) >= 7
    unknown = sorted({name for name, _, _ in SNIPPETS} - LOCAL - SERVED)
    assert not unknown, f"README sections with Python snippets this file does not run: {unknown}"


def test_the_notes_tell_an_offline_reader_what_to_write() -> None:
    for name in ("engine", "llama-index", "langchain"):
        section = README.split(f"<!-- section: {name} -->", 1)[1].split("```python", 1)[0]
        assert '"demo"' in section and "meaningless" in section, name
    model_files = README.split("<!-- section: model-files -->", 1)[1].split("<!-- section:", 1)[0]
    assert "hf download Qwen/Qwen3-Reranker-0.6B --local-dir" in model_files
    assert "modelscope download Qwen/Qwen3-Reranker-0.6B --local-dir" in model_files


@pytest.mark.parametrize(
    ("section", "n", "code"),
    [s for s in SNIPPETS if s[0] in LOCAL],
    ids=[f"{s[0]}-{s[1]}" for s in SNIPPETS if s[0] in LOCAL],
)
def test_snippet_runs_offline(
    section: str, n: int, code: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="qwen3_rerank_plugins"):
        namespace = _run(_offline(code), section)
    out = capsys.readouterr().out
    if section == "engine" and "groups" in namespace:  # the cross-query snippet
        assert len(out.splitlines()) == len(namespace["groups"]) == 2
    elif section == "engine":
        docs = namespace["docs"]
        assert "MEANINGLESS" in caplog.text  # from_pretrained("demo") loads, and says what it is
        assert len(namespace["results"]) == len(docs)  # the last line: all documents, best first
        scores = [r.score for r in namespace["results"]]
        assert scores == sorted(scores, reverse=True)
    elif section == "llama-index":
        lines = out.splitlines()
        assert len(lines) == 2
        assert all(re.match(r"^0\.\d{3} (发货时间|发票|Refunds)$", line) for line in lines)
    elif section == "langchain":
        lines = out.splitlines()
        assert len(lines) == 2
        assert all(re.match(r"^T-\d{4} 0\.\d{3} (high|medium|low)$", line) for line in lines)
    elif section == "examples":
        outcome = namespace["outcome"]
        # The demo model's random scores are low under the default cut-offs: the retry ran.
        assert outcome.fell_back and outcome.retry.query == "电梯又坏了，被困"
        assert {r.id for r in outcome.results} <= {"H-1001", "H-1009"}
        assert "retried as: 电梯又坏了，被困" in out
        assert ConfidenceBands().classify(outcome.final.best_score) == outcome.final.best_band
        assert ("needs review" in out) == outcome.needs_review
    elif section == "benchmarks":
        assert len(namespace["scores"]) == 2 and str(namespace["fast"].dtype) == "torch.bfloat16"


# -- snippets that talk to the service ----------------------------------------------------------------


@pytest.fixture(scope="module")
def service_url() -> Iterator[str]:
    """``qwen3-rerank serve --demo`` on a free local port, stopped with SIGINT afterwards."""
    port = free_port()
    serve = [sys.executable, "-m", "qwen3_rerank_plugins", "serve", "--demo", "--host", "127.0.0.1"]
    proc = subprocess.Popen(
        [*serve, "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"qwen3-rerank serve exited early:\n{proc.stderr.read()[-3000:]}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "qwen3-rerank serve did not start in time"
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("section", "n", "code"),
    [s for s in SNIPPETS if s[0] in SERVED],
    ids=[f"{s[0]}-{s[1]}" for s in SNIPPETS if s[0] in SERVED],
)
def test_service_snippet_runs_against_a_local_service(
    section: str, n: int, code: str, service_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    named = [u for u in SERVICE_URLS if u in code]
    assert named, f"the {section} snippet names none of {SERVICE_URLS}"
    for url in named:
        code = code.replace(url, service_url)
    _run(_offline(code), section)
    out = capsys.readouterr().out
    if section == "serving":
        first, ranked = out.splitlines()[:2]
        assert re.match(r"^[01] 0\.\d+", first) and "'band'" in ranked and "T-1021" in ranked
    else:
        assert re.match(r"^[01] 0\.\d{1,3} (high|medium|low)$", out.strip())
