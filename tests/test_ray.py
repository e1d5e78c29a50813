"""The Ray Serve deployment: end to end on a local Ray cluster with 2 CPU replicas, over real HTTP.

The cluster is started once for the module (about a minute on 2 cores) and every wait on it is
bounded. The replica's batching is also checked without a cluster, on the deployment class itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from helpers import TICKETS, ServerThread, free_port

pytest.importorskip("ray.serve", reason="needs the [ray] extra")

import ray
from ray import serve

from qwen3_rerank_plugins import Reranker
from qwen3_rerank_plugins.cli import build_parser
from qwen3_rerank_plugins.client import RerankClient
from qwen3_rerank_plugins.fallback import generalize
from qwen3_rerank_plugins.ray_serve import app_builder, build_app
from qwen3_rerank_plugins.remote import RemoteReranker
from qwen3_rerank_plugins.server import create_app
from qwen3_rerank_plugins.server.batcher import ScoreRequest, score_requests

pytestmark = pytest.mark.slow

QUERY = "订单还没发货，能查一下吗？"
DOCS = [
    "[FAQ] 订单发货时间：付款后48小时内发货，可在“我的订单”中查看物流。",
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[Policy] Refunds are issued to the original payment method within 7 business days.",
    "",
    "退货政策：签收后7天内可无理由退货，商品需保持完好。",
]
DEPLOY_TIMEOUT_S = 240
TOL = 1e-6
# Limits of the module's Ray application, small enough for the tests to pass them.
BODY_TIMEOUT_S = 3.0
MAX_REQUEST_TOKENS = 4000


@pytest.fixture(scope="module")
def ray_url(tiny_model_dir: Path) -> Iterator[str]:
    """The application on a local 2-CPU Ray cluster: 2 replicas of half a CPU each."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    app = build_app(
        str(tiny_model_dir),
        replicas=2,
        num_cpus_per_replica=0.5,
        num_gpus_per_replica=0,
        device="cpu",
        body_timeout=BODY_TIMEOUT_S,
        max_request_tokens=MAX_REQUEST_TOKENS,
    )

    def deploy() -> None:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name="qwen3-rerank-test", route_prefix="/")

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pool.submit(deploy).result(timeout=DEPLOY_TIMEOUT_S)
        yield f"http://127.0.0.1:{port}"
    except concurrent.futures.TimeoutError:
        pytest.fail(f"the Ray Serve application was not ready within {DEPLOY_TIMEOUT_S} s")
    finally:
        serve.shutdown()
        ray.shutdown()
        pool.shutdown(wait=False, cancel_futures=True)


def test_serve_ray_starts_replicas_and_stops_on_sigint() -> None:
    """``qwen3-rerank serve --ray`` (or :func:`serve_ray` itself where the command line has no
    ``--ray``) in a process of its own; runs first, before the module's cluster exists."""
    port = free_port()
    if _serve_has_ray_flag():
        command = [sys.executable, "-m", "qwen3_rerank_plugins", "serve", "--ray", "--demo", "--device=cpu"]
        command += ["--replicas=2", "--cpus-per-replica=0.5", "--gpus-per-replica=0", f"--port={port}"]
    else:
        code = (
            "from qwen3_rerank_plugins.demo import demo_model_dir\n"
            "from qwen3_rerank_plugins.ray_serve import serve_ray\n"
            f"serve_ray(str(demo_model_dir('tiny')), port={port}, replicas=2, num_cpus_per_replica=0.5,"
            " num_gpus_per_replica=0, device='cpu')\n"
        )
        command = [sys.executable, "-c", code]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"serve --ray exited early: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"serve --ray was not ready within {DEPLOY_TIMEOUT_S} s"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        with RemoteReranker(url) as rr:
            results = rr.rerank(QUERY, DOCS, top_n=2)
        assert len(results) == 2 and results[0].score >= results[1].score
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _serve_has_ray_flag() -> bool:
    return any("--ray" in action.option_strings for action in _serve_parser()._actions)


def _serve_parser():
    parser = build_parser()
    (subparsers,) = (a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return subparsers.choices["serve"]


def test_scores_equal_the_local_engine(ray_url: str, reranker: Reranker) -> None:
    with RemoteReranker(ray_url) as rr:
        got = rr.rerank(QUERY, DOCS)
        expected = reranker.rerank(QUERY, DOCS)
        assert [r.index for r in got] == [r.index for r in expected]
        assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=TOL)
        assert rr.score(QUERY, DOCS, "customer_service_faq") == pytest.approx(
            reranker.score(QUERY, DOCS, "customer_service_faq"), abs=TOL
        )
        assert rr.model_name == reranker.model_name
    with RerankClient(ray_url) as client:
        hits = client.rank(QUERY, [{"id": f"Q-{i}", "text": t} for i, t in enumerate(DOCS)], top_n=2)
        assert [h.id for h in hits] == [f"Q-{r.index}" for r in expected[:2]]
        assert [h.band for h in hits] == [r.band for r in expected[:2]]


def test_concurrent_requests_are_spread_over_both_replicas(ray_url: str, reranker: Reranker) -> None:
    expected = reranker.score(QUERY, DOCS)

    def one(_: int) -> tuple[str, list[float]]:
        with httpx.Client(base_url=ray_url, timeout=60) as http:
            replica = http.get("/health").json()["replica"]
            body = http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()
        scores = [0.0] * len(DOCS)
        for r in body["results"]:
            scores[r["index"]] = r["relevance_score"]
        return replica, scores

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(32), timeout=120))
    assert len({replica for replica, _ in answers}) == 2
    for _, scores in answers:
        assert scores == pytest.approx(expected, abs=TOL)


def test_a_repeated_request_is_answered_from_the_score_cache(ray_url: str, reranker: Reranker) -> None:
    """Each replica keeps its own in-process cache (on by default, as in ``serve``): of N identical
    requests at most one per replica is computed, the others are answered from the cache."""
    query = f"Ray 缓存测试 {time.monotonic_ns()}"  # new to every replica's cache
    tokens = reranker.count_tokens(query, DOCS)
    expected = reranker.score(query, DOCS)
    cached = []
    with httpx.Client(base_url=ray_url, timeout=60) as http:
        for _ in range(6):
            answer = http.post("/v1/rerank", json={"query": query, "documents": DOCS})
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["usage"]["prompt_tokens"] == tokens
            cached.append(body["usage"]["prompt_tokens_details"]["cached_tokens"])
            scores = [0.0] * len(DOCS)
            for r in body["results"]:
                scores[r["index"]] = r["relevance_score"]
            assert scores == pytest.approx(expected, abs=TOL)  # a hit answers as the computation did
    assert cached[0] == 0 and set(cached) <= {0, tokens}
    assert cached.count(tokens) >= len(cached) - 2  # computed at most once per replica


@pytest.fixture(scope="module")
def plain_url(reranker: Reranker) -> Iterator[str]:
    """The plain service (``qwen3-rerank serve``) on the same tiny model, to compare answers with."""
    with ServerThread(create_app(reranker)) as server:
        yield server.url


def _same_answer(ray_url: str, plain_url: str, path: str, body: dict) -> dict | list:
    with httpx.Client(timeout=60) as http:
        on_ray, plain = http.post(ray_url + path, json=body), http.post(plain_url + path, json=body)
    assert on_ray.status_code == plain.status_code == 200, (on_ray.text, plain.text)
    got, expected = on_ray.json(), plain.json()
    if isinstance(expected, dict):  # /v1/rerank answers carry a fresh id each time
        got.pop("id", None)
        expected.pop("id", None)
    assert _close(got, expected)
    return got


def _close(got: object, expected: object) -> bool:
    """Equal JSON up to float rounding between processes."""
    if isinstance(expected, float):
        return got == pytest.approx(expected, abs=TOL)
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), (got, expected)
        return all(_close(got[k], v) for k, v in expected.items())
    if isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), (got, expected)
        return all(_close(g, e) for g, e in zip(got, expected, strict=True))
    assert got == expected
    return True


def test_rank_fallback_answers_as_the_plain_service(ray_url: str, plain_url: str) -> None:
    """The plain service's answer is checked against the engine in test_server.py."""
    query = "朝阳区建国路88号3号楼电梯昨晚十一点又坏了"
    got = _same_answer(ray_url, plain_url, "/rank", {"query": query, "documents": TICKETS, "fallback": True})

    # Random tiny-model scores are all in the default low band: the retry always runs.
    assert got["fallback"]["retried_query"] == generalize(query) != query
    assert got["fallback"]["needs_review"] is True
    assert sorted(r["index"] for r in got["results"]) == list(range(len(TICKETS)))
    assert [r["id"] for r in got["results"]] == [TICKETS[r["index"]]["id"] for r in got["results"]]
    plain = _same_answer(ray_url, plain_url, "/rank", {"query": query, "documents": TICKETS})
    assert "fallback" not in plain


def test_tei_texts_on_rerank_answer_as_the_plain_service(
    ray_url: str, plain_url: str, reranker: Reranker
) -> None:
    body = {"query": QUERY, "texts": DOCS, "raw_scores": True, "return_text": True}
    got = _same_answer(ray_url, plain_url, "/rerank", body)

    logits = reranker.score(QUERY, DOCS, return_logits=True)
    assert [r["index"] for r in got] == sorted(range(len(DOCS)), key=lambda i: (-logits[i], i))
    assert [r["text"] for r in got] == [DOCS[r["index"]] for r in got]
    _same_answer(ray_url, plain_url, "/rerank", {"query": QUERY, "texts": DOCS[:2]})
    _same_answer(ray_url, plain_url, "/v1/rerank", {"query": QUERY, "documents": DOCS, "top_n": 3})


def test_bad_requests_get_4xx_and_the_service_keeps_serving(ray_url: str) -> None:
    with httpx.Client(base_url=ray_url, timeout=60) as http:
        bad = http.post("/v1/rerank", json={"query": QUERY, "documents": ["ok", 7]})
        assert bad.status_code == 422
        assert bad.json()["error"]["param"] == "documents[1]"
        assert http.post("/v1/rerank", content=b"{not json").status_code == 400
        assert http.post("/v1/rerank", content=b"[" * 50_000).json()["error"]["type"] == "invalid_json"
        tei = http.post("/rerank", json={"query": QUERY, "texts": ["ok", 1]})
        assert tei.status_code == 422 and tei.json()["error"]["param"] == "texts[1]"
        assert (
            http.post("/rank", json={"query": QUERY, "documents": [{"id": [1], "text": "x"}]}).status_code
            == 422
        )
        assert http.get("/nowhere").status_code == 404
        too_many = http.post("/v1/rerank", json={"query": QUERY, "documents": ["x"] * 1001})
        assert too_many.status_code == 413
        ok = http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 1})
        assert ok.status_code == 200 and len(ok.json()["results"]) == 1
        assert http.get("/v1/models").json()["data"][0]["id"]


def test_ray_answers_metrics_a_stalled_upload_and_an_over_budget_request(
    ray_url: str, reranker: Reranker
) -> None:
    """The replicas run the plain service's app: its metrics, body timeout and token budget."""
    with httpx.Client(base_url=ray_url, timeout=60) as http:
        assert http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS}).status_code == 200
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "text/plain" in metrics.headers["content-type"]
        assert "qwen3_rerank_model_loaded 1.0" in metrics.text
        assert "qwen3_rerank_requests_total" in metrics.text

        long_docs = [DOCS[0] * 8] * 40
        tokens = reranker.count_tokens(QUERY, long_docs)
        assert tokens > MAX_REQUEST_TOKENS  # what the replica will count
        over = http.post("/v1/rerank", json={"query": QUERY, "documents": long_docs})
        assert over.status_code == 413, over.text
        error = over.json()["error"]
        assert (error["type"], error["param"]) == ("too_many_tokens", "documents")
        assert f"at most {MAX_REQUEST_TOKENS} per request" in error["message"]

    host, port = ray_url.removeprefix("http://").split(":")
    body = json.dumps({"query": QUERY, "documents": DOCS}).encode()
    head = (
        "POST /v1/rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=BODY_TIMEOUT_S + 60) as sock:
        sock.sendall(head + body[:10])  # then nothing more
        start = time.monotonic()
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        waited = time.monotonic() - start
        head_part, answer = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"(?i)content-length:\s*(\d+)", head_part).group(1))
        while len(answer) < length and (chunk := sock.recv(65536)):
            answer += chunk
    assert head_part.split()[1] == b"408", data
    assert json.loads(answer)["error"]["type"] == "body_timeout"
    assert BODY_TIMEOUT_S - 0.5 <= waited < BODY_TIMEOUT_S + 30


def test_ray_replicas_apply_the_overload_policy(ray_url: str, reranker: Reranker) -> None:
    """Admission by time is the app's, so each replica has it: /ready, client deadlines and the
    Python client's X-Request-Timeout all pass through Ray's proxy."""
    with httpx.Client(base_url=ray_url, timeout=60) as http:
        http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS})  # a measured speed
        ready = http.get("/ready")
        assert ready.status_code == 200, ready.text
        assert ready.json()["ready"] is True and ready.json()["max_queue_wait_s"] == 10.0
        assert {"estimated_wait_s", "estimate_margin_s", "queue"} <= set(ready.json())
        # New documents: a request the score cache holds whole is answered before any load check.
        late = http.post(
            "/v1/rerank",
            json={"query": QUERY, "documents": [*DOCS, "deadline"]},
            headers={"X-Request-Timeout": "0.000001"},
        )
        assert late.status_code == 503, late.text
        assert late.json()["error"]["type"] == "deadline_exceeded"
        assert 1 <= int(late.headers["retry-after"]) <= 60
        bad = http.post(
            "/v1/rerank", json={"query": QUERY, "documents": DOCS}, headers={"X-Request-Timeout": "x"}
        )
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "X-Request-Timeout"
    with RemoteReranker(ray_url, timeout=30) as remote:  # sends what is left of its 30 s
        got = remote.rerank(QUERY, DOCS)
    expected = reranker.rerank(QUERY, DOCS)
    assert [r.score for r in got] == pytest.approx([r.score for r in expected], abs=TOL)


# -- without a cluster --------------------------------------------------------------------------


def test_merged_batches_score_exactly_and_isolate_failures(reranker: Reranker) -> None:
    """What a replica's ``@serve.batch`` runs (the plain service's batcher runs the same)."""
    requests = [
        ScoreRequest(QUERY, DOCS, None),
        ScoreRequest("发票怎么开", DOCS[:2], "customer_service_faq"),
        ScoreRequest("发票怎么开", DOCS[2:], None, count_tokens=False),
        ScoreRequest(None, DOCS[:1], None),  # fails the merged call of its instruction; scored alone
        ScoreRequest(QUERY, DOCS[:1], "   "),  # the engine refuses a blank instruction
    ]
    out = score_requests(reranker, requests)
    assert out[0].logits == pytest.approx(reranker.score(QUERY, DOCS, return_logits=True), abs=1e-5)
    assert out[0].total_tokens == reranker.count_tokens(QUERY, DOCS)
    assert out[1].logits == pytest.approx(
        reranker.score("发票怎么开", DOCS[:2], "customer_service_faq", return_logits=True), abs=1e-5
    )
    assert out[2].logits == pytest.approx(
        reranker.score("发票怎么开", DOCS[2:], return_logits=True), abs=1e-5
    )
    assert out[2].total_tokens is None
    assert isinstance(out[3], TypeError)
    assert isinstance(out[4], ValueError)


def test_app_builder_reads_serve_run_arguments(tiny_model_dir: Path) -> None:
    assert app_builder({"model": str(tiny_model_dir), "replicas": "2", "device": "cpu"}) is not None
    with pytest.raises(ValueError, match="replicas must be an integer, got 'two'"):
        app_builder({"model": str(tiny_model_dir), "replicas": "two"})
    with pytest.raises(ValueError, match="app_builder needs model="):
        app_builder({"replicas": "2"})
    with pytest.raises(ValueError, match=r"max_replicas must be an int >= replicas \(3\)"):
        build_app(str(tiny_model_dir), replicas=3, max_replicas=2, num_gpus_per_replica=0)


def test_serve_options_reach_the_deployment_config(tiny_model_dir: Path) -> None:
    """``--max-queue``, ``--graceful-timeout`` and ``--no-access-log`` of ``serve --ray``."""
    app = build_app(
        str(tiny_model_dir),
        num_gpus_per_replica=0,
        max_queued_requests=7,
        graceful_shutdown_timeout_s=12.5,
        access_log=False,
    )
    config = app._bound_deployment._deployment_config
    assert config.max_queued_requests == 7
    assert config.graceful_shutdown_timeout_s == 12.5
    assert config.logging_config["enable_access_log"] is False


# -- the Kubernetes examples --------------------------------------------------------------------


def _manifest(name: str) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "k8s" / name).read_text())


def test_rayservice_manifest_builds_the_application(tiny_model_dir: Path) -> None:
    yaml = pytest.importorskip("yaml")
    (application,) = yaml.safe_load(_manifest("rayservice.yaml")["spec"]["serveConfigV2"])["applications"]
    module, _, function = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), function)
    args = {**application["args"], "model": str(tiny_model_dir), "num_gpus_per_replica": "0", "device": "cpu"}
    assert builder(args) is not None


def test_plain_server_manifests_agree_with_each_other_and_the_cli() -> None:
    deployment, service, hpa = (_manifest(f) for f in ("deployment.yaml", "service.yaml", "hpa.yaml"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = build_parser().parse_args(container["args"])  # every flag exists in `qwen3-rerank serve`
    assert args.func.__name__ == "_cmd_serve" and args.host == "0.0.0.0"
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
