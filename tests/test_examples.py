"""Every example through its real entry point (``python examples/x.py --demo ...``), offline.

Each runs in a subprocess on the tiny demo model, bounded in time, and its printed output is
checked: ranked lists in score order, ids from the bundled data, bands, the demo warning. The
subprocess tests are marked ``slow`` (10-20 s each: every one imports torch and the frameworks).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from helpers import free_port
from qwen3_rerank_plugins.fallback import generalize

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data"
TIMEOUT = 300


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _jsonl(name: str) -> list[dict]:
    return [
        json.loads(line) for line in (DATA / name).read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _scores(lines: list[str]) -> list[float]:
    return [float(re.search(r"score (\d\.\d{4})", line).group(1)) for line in lines]


# -- bundled data -------------------------------------------------------------------------------------


def test_bundled_data_is_labelled_and_consistent() -> None:
    kb, faq_eval = _jsonl("faq_kb.jsonl"), _jsonl("faq_eval.jsonl")
    tickets, hotline_eval = _jsonl("hotline_tickets.jsonl"), _jsonl("hotline_eval.jsonl")
    assert len(faq_eval) >= 30 and len(hotline_eval) >= 20
    assert all(
        re.match(r"^(\[FAQ\]|\[Policy\]|\[Official Notice\]|\[Announcement\]|【)", r["text"]) for r in kb
    )
    kb_texts, ticket_texts = {r["text"] for r in kb}, {t["text"] for t in tickets}
    assert len({t["id"] for t in tickets}) == len(tickets)
    for records, texts in ((faq_eval, kb_texts), (hotline_eval, ticket_texts)):
        for r in records:
            assert r["query"].strip() and r["positives"]
            assert set(r["positives"]) <= texts and set(r["negatives"]) <= texts
            assert not set(r["positives"]) & set(r["negatives"])


# -- quickstart ---------------------------------------------------------------------------------------


def _ranked_blocks(out: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("Query: "):
            current = line.removeprefix("Query: ").split("   ")[0]
            blocks[current] = []
        elif current and re.match(r"^\s+\d+\. \d\.\d{4} \[", line):
            blocks[current].append(line)
    return blocks


@pytest.mark.slow
def test_quickstart_demo() -> None:
    out = _run("quickstart.py", "--demo")
    assert "THE SCORES BELOW ARE MEANINGLESS" in out
    blocks = _ranked_blocks(out)
    assert list(blocks) == ["订单还没发货，能查一下吗？", "my coupon doesn't work"]
    assert [len(lines) for lines in blocks.values()] == [5, 4]
    for lines in blocks.values():
        scores = [float(line.split()[1]) for line in lines]
        assert scores == sorted(scores, reverse=True)
        assert all(re.search(r"\[(high|medium|low)\s*\]", line) for line in lines)
    assert any("[FAQ] 订单发货查询" in line for line in blocks["订单还没发货，能查一下吗？"])


@pytest.mark.slow
def test_quickstart_falls_back_when_no_hub_is_reachable() -> None:
    # Hub hosts that can never resolve (RFC 2606 ".invalid"), and no proxy: what an offline machine sees.
    offline = {"HF_ENDPOINT": "https://huggingface.invalid", "MODELSCOPE_DOMAIN": "modelscope.invalid"}
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    out = _run("quickstart.py", env={**offline, **dict.fromkeys(proxies, "")})
    assert "Could not load 'Qwen/Qwen3-Reranker-0.6B': no model hub is reachable" in out
    assert "THE SCORES BELOW ARE MEANINGLESS" in out
    assert len(_ranked_blocks(out)) == 2


@pytest.mark.slow
def test_quickstart_rejects_a_missing_local_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py"), "--model", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "missing" in proc.stderr
    assert "MEANINGLESS" not in proc.stdout  # no silent switch to random weights


@pytest.mark.slow
def test_quickstart_local_model(tiny_model_dir: Path) -> None:
    out = _run("quickstart.py", "--model", str(tiny_model_dir), "--device", "cpu")
    assert "MEANINGLESS" not in out
    assert "Using Reranker('tiny-qwen3', device='cpu', dtype='float32')" in out


# -- LlamaIndex FAQ bot -------------------------------------------------------------------------------


@pytest.mark.slow
def test_customer_service_faq_demo() -> None:
    kb_ids = {r["id"] for r in _jsonl("faq_kb.jsonl")}
    out = _run(
        "customer_service_faq.py", "--demo", "--query", "发票怎么开", "--query", "my coupon doesn't work"
    )
    assert "THE SCORES BELOW ARE MEANINGLESS" in out
    assert "LLM: extractive-echo" in out
    questions = out.split("Q: ")[1:]
    assert len(questions) == 2
    for block in questions:
        vector_ids = re.search(r"vector search order: (.*)", block).group(1).split(", ")
        assert len(vector_ids) == 10 and set(vector_ids) <= kb_ids
        ranked = [line for line in block.splitlines() if re.match(r"^\s+\d\. f\d\d ", line)]
        assert len(ranked) == 3
        ids = [line.split()[1] for line in ranked]
        assert set(ids) <= set(vector_ids)  # the reranker reorders what retrieval found
        assert _scores(ranked) == sorted(_scores(ranked), reverse=True)
        # The extractive answer is the reranked top chunk.
        top_text = next(r["text"] for r in _jsonl("faq_kb.jsonl") if r["id"] == ids[0])
        assert re.search(r"^A: .*" + re.escape(top_text), block, re.MULTILINE)


# -- LangChain hotline ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_hotline_similar_cases_demo() -> None:
    tickets = {t["id"]: t for t in _jsonl("hotline_tickets.jsonl")}
    ticket = "朝阳区建国路88号3号楼电梯昨晚十一点又坏了，张女士被困二十分钟"
    out = _run("hotline_similar_cases.py", "--demo", "--ticket", ticket)
    assert "First stage: BM25 (jieba) over 48 past tickets, top 50" in out
    lines = out.splitlines()
    start = lines.index(f"New ticket: {ticket}")
    ranked = [line for line in lines[start:] if re.match(r"^\s+\d\. H-\d{4} ", line)]
    first = ranked[:3]
    assert _scores(first) == sorted(_scores(first), reverse=True)
    for line in first:
        ticket_id, band = re.search(r"(H-\d{4})  score \d\.\d{4}  \[(\w+)", line).groups()
        assert ticket_id in tickets and band in ("high", "medium", "low")
        assert tickets[ticket_id]["text"] in line
    # Random weights score low, so the fallback path runs: the generalized ticket, then a flag.
    assert f"Low confidence; retried as: {generalize(ticket)}" in out
    assert "flagged for an operator" in out


class _ElasticsearchStandIn(BaseHTTPRequestHandler):
    """Answers ``_bulk`` and ``_search`` as Elasticsearch does, for the example's ES code path."""

    store: ClassVar[dict[str, dict]] = {}
    searches: ClassVar[list[dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"])).decode()
        if self.path.startswith("/_bulk"):
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            for action, source in zip(lines[::2], lines[1::2], strict=True):
                self.store[action["index"]["_id"]] = source
            answer: dict = {"errors": False, "items": []}
        else:
            request = json.loads(body)
            self.searches.append({"path": self.path, **request})
            query = request["query"]["match"]["text"]
            scored = [(sum(ch in src["text"] for ch in set(query)), i, src) for i, src in self.store.items()]
            hits = sorted((h for h in scored if h[0] > 0), key=lambda h: -h[0])[: request["size"]]
            answer = {
                "hits": {"hits": [{"_id": i, "_score": float(n), "_source": src} for n, i, src in hits]}
            }
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_hotline_similar_cases_with_elasticsearch_first_stage() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ElasticsearchStandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        ticket = "小区电梯坏了，被困"
        out = _run(
            "hotline_similar_cases.py", "--demo", "--es-url", url, "--es-index", "tickets", "--es-load",
            "--ticket", ticket,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    tickets = {t["id"]: t for t in _jsonl("hotline_tickets.jsonl")}
    assert set(_ElasticsearchStandIn.store) == set(tickets)
    assert _ElasticsearchStandIn.searches[0]["path"] == "/tickets/_search"
    assert _ElasticsearchStandIn.searches[0]["size"] == 50
    assert f"First stage: Elasticsearch {url}/tickets, top 50" in out
    ranked = re.findall(r"^\s+\d\. (H-\d{4})  score", out, re.MULTILINE)
    assert ranked and set(ranked) <= set(tickets)
    # Category and resolution came back from Elasticsearch's _source.
    first = tickets[ranked[0]]
    assert f"{first['category']}: {first['resolution']}" in out


# -- web backend -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_web_backend_demo_loads_the_model_once() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "web_backend.py"), "--demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    candidates = [{"id": t["id"], "text": t["text"]} for t in _jsonl("hotline_tickets.jsonl")[:8]]
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, "web_backend.py exited early"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "web_backend.py did not start in time"
            time.sleep(0.5)
        assert httpx.get(f"{url}/health").json()["demo"] is True
        for _ in range(3):
            body = {"ticket": "朝阳区建国路电梯又坏了", "candidates": candidates, "top_n": 3}
            response = httpx.post(f"{url}/tickets/similar", json=body, timeout=60)
            assert response.status_code == 200, response.text
            payload = response.json()
            ids = [r["id"] for r in payload["results"]]
            assert len(ids) == 3 and set(ids) <= {c["id"] for c in candidates}
            scores = [r["score"] for r in payload["results"]]
            assert scores == sorted(scores, reverse=True)
            assert payload["fell_back"] and payload["needs_review"] and payload["demo_model"]
        bad = httpx.post(f"{url}/tickets/similar", json={"ticket": "", "candidates": []}, timeout=30)
        assert bad.status_code == 422
        assert httpx.get(f"{url}/health").status_code == 200  # still serving
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert out.count("Model loaded once") == 1
    assert out.count("ranked 8 candidates") == 3


@pytest.mark.slow
def test_django_backend_demo_loads_the_model_once() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "django_backend.py"), "--demo", "--port", str(port)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    documents = [{"id": t["id"], "text": t["text"]} for t in _jsonl("hotline_tickets.jsonl")[:8]]
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert proc.poll() is None, "django_backend.py exited early"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "django_backend.py did not start in time"
            time.sleep(0.5)
        assert httpx.get(f"{url}/health").json()["demo"] is True
        body = {"query": "朝阳区建国路电梯又坏了", "documents": documents, "top_n": 3}
        with ThreadPoolExecutor(3) as pool:  # concurrent requests share the one engine
            answers = list(pool.map(lambda _: httpx.post(f"{url}/rank", json=body, timeout=60), range(3)))
        for response in answers:
            assert response.status_code == 200, response.text
            payload = response.json()
            assert payload["demo_model"] is True
            results = payload["results"]
            assert len(results) == 3 and {r["id"] for r in results} <= {d["id"] for d in documents}
            assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
            assert all(r["band"] in ("high", "medium", "low") for r in results)
            assert [documents[r["index"]]["id"] for r in results] == [r["id"] for r in results]
        assert answers[0].json() == answers[1].json() == answers[2].json()
        # The named template gives the same ranking as its text; a mistyped name is refused.
        named = httpx.post(f"{url}/rank", json={**body, "instruction": "similar_ticket"}, timeout=60).json()
        assert named == answers[0].json()
        bad_requests = [
            ({**body, "instruction": "Similar_Ticket"}, 422, "did you mean 'similar_ticket'?"),
            ({**body, "documents": [{"id": "H-1"}]}, 422, "documents[0].text: must be a string"),
            ({**body, "top_n": 0}, 422, "top_n: must be a positive integer"),
            ({"documents": documents}, 422, "query: must be a non-empty string"),
        ]
        for request, status, message in bad_requests:
            response = httpx.post(f"{url}/rank", json=request, timeout=30)
            assert response.status_code == status and message in response.json()["error"]["message"]
        broken = httpx.post(f"{url}/rank", content=b"{not json", timeout=30)
        assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
        assert httpx.get(f"{url}/rank", timeout=30).status_code == 405
        too_big = httpx.post(f"{url}/rank", content=b" " * (3 * 1024 * 1024), timeout=30)
        assert too_big.status_code == 413 and "larger than 2 MiB" in too_big.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 200  # still serving
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert out.count("Model loaded once") == 1
    assert out.count("ranked 8 documents") == 4


# -- HTTP service and client ------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_and_query_demo() -> None:
    out = _run("serve_and_query.py", "--demo")
    assert "THE SCORES BELOW ARE MEANINGLESS" in out
    assert "GET /health -> {'status': 'ok'" in out
    rerank = re.findall(r"^\s+index (\d)  relevance_score (\d\.\d{4})", out, re.MULTILINE)
    assert len(rerank) == 3
    assert [float(s) for _, s in rerank] == sorted((float(s) for _, s in rerank), reverse=True)
    rank = re.findall(r"^\s+(H-\d{4})  score \d\.\d{4}  \[(\w+)", out, re.MULTILINE)
    assert sorted(i for i, _ in rank) == ["H-1001", "H-1007", "H-1009", "H-1041"]
    assert "A malformed request gets 422" in out
    assert "Service stopped." in out
