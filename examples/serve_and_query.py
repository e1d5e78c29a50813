"""Start the HTTP rerank service and call it with plain httpx, as an existing backend would.

Shows the two request shapes a backend sends:

* ``POST /v1/rerank``: the Cohere / Jina / vLLM schema (``query``, ``documents``, ``top_n``);
  code written for those services works unchanged against this one;
* ``POST /rank``: ``{id, text}`` records in, ids with scores and confidence bands out.

The script starts ``qwen3-rerank serve`` on a free local port (the same command a process
manager such as systemd or supervisor runs), waits until ``/health`` says the model is loaded,
sends the requests, prints the answers and stops the service. Pass ``--url`` to query a
service that is already running instead.

Run:
    pip install torch==2.13.0 -e ".[examples]"
    python examples/serve_and_query.py                      # serves Qwen/Qwen3-Reranker-0.6B
    python examples/serve_and_query.py --demo               # offline, meaningless scores
    python examples/serve_and_query.py --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
from _common import DEFAULT_MODEL, DEMO_WARNING, demo_reminder

FAQ_QUERY = "发票怎么开"
FAQ_DOCS = [
    "[Policy] 退货政策：签收后7天内可申请无理由退货，商品及包装需保持完好。",
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号，电子发票1个工作日内发送到邮箱。",
    "[FAQ] 发票抬头填错了怎么办：开票后30天内可在“发票管理”中申请换开。",
    "[FAQ] 订单发货查询：付款后48小时内发货。",
]
TICKET = "朝阳区建国路电梯又坏了，居民被困"
PAST_TICKETS = [
    {"id": "H-1001", "text": "建国路88号小区3号楼电梯故障，居民被困二十分钟"},
    {"id": "H-1007", "text": "中关村大街辅路路灯连续一周不亮"},
    {"id": "H-1009", "text": "建国路工地夜间施工，晚上十一点后仍在作业"},
    {"id": "H-1041", "text": "鲁谷小区电梯停运一周，居民多次报修无人处理"},
]


class ModelUnavailable(RuntimeError):
    """The service could not load its model (e.g. no model hub is reachable) and stopped or reports it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(model_args: list[str], timeout: float) -> Iterator[str]:
    """Run ``qwen3-rerank serve`` on a free port until the block ends; yields its base URL."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "qwen3_rerank_plugins",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    print("Starting:", " ".join(["qwen3-rerank", *command[3:], *model_args]))
    proc = subprocess.Popen([*command, *model_args])
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ModelUnavailable(
                    f"the service exited with status {proc.returncode} (see its log above)"
                )
            with contextlib.suppress(httpx.HTTPError, ValueError):
                health = httpx.get(f"{url}/health", timeout=2)
                if health.status_code == 200:
                    break
                if health.json().get("status") == "error":
                    raise ModelUnavailable(health.json().get("error", "unknown error"))
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not become ready within {timeout:.0f} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # graceful: in-flight requests finish
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query_service(url: str) -> None:
    with httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/health").json()
        print(f"\nGET /health -> {health}\n")

        response = client.post(
            "/v1/rerank",
            json={
                "model": "qwen3-reranker",
                "query": FAQ_QUERY,
                "documents": FAQ_DOCS,
                "top_n": 3,
                "return_documents": True,
            },
        )
        response.raise_for_status()
        body = response.json()
        print(f"POST /v1/rerank  query={FAQ_QUERY!r}  ({body['usage']['total_tokens']} tokens)")
        for r in body["results"]:
            print(
                f"  index {r['index']}  relevance_score {r['relevance_score']:.4f}  {r['document']['text']}"
            )

        response = client.post(
            "/rank", json={"query": TICKET, "documents": PAST_TICKETS, "instruction": "similar_ticket"}
        )
        response.raise_for_status()
        print(f"\nPOST /rank  query={TICKET!r}")
        texts = {t["id"]: t["text"] for t in PAST_TICKETS}
        for r in response.json()["results"]:
            print(f"  {r['id']}  score {r['score']:.4f}  [{r['band']:<6}]  {texts[r['id']]}")

        bad = client.post("/v1/rerank", json={"query": FAQ_QUERY, "documents": "not a list"})
        print(f"\nA malformed request gets {bad.status_code}: {bad.json()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--url", help="query this running service instead of starting one")
    which.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model the started service loads ({DEFAULT_MODEL})"
    )
    which.add_argument(
        "--demo", action="store_true", help="serve the offline demo model (meaningless scores)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the model to load")
    args = parser.parse_args(argv)

    if args.url:
        query_service(args.url)
        return 0
    demo = args.demo
    if not demo:
        try:
            with running_service(["--model", args.model], args.timeout) as url:
                query_service(url)
        except ModelUnavailable as exc:
            print(f"\nThe service could not load {args.model!r}: {str(exc).splitlines()[0]}")
            print("(No model hub reachable from this machine?) Starting it on the demo model instead.")
            demo = True
    if demo:
        print(DEMO_WARNING + "\n")
        with running_service(["--demo"], args.timeout) as url:
            query_service(url)
    print("\nService stopped.")
    demo_reminder(demo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
