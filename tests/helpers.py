"""Helpers shared by the test modules: free ports, a live uvicorn server on a thread, waiting.

Test modules import these as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``);
they never import from one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from qwen3_rerank_plugins.client import RetryPolicy

HOST = "127.0.0.1"
SERVER_START_TIMEOUT = 30.0

# Hotline tickets with mixed id types, shared by the service and Ray Serve tests.
TICKETS = [
    {"id": "T-1021", "text": "建国路88号小区3号楼电梯故障，居民被困二十分钟"},
    {"id": 877, "text": "朝阳区建国路某小区电梯多次停运，物业一直未维修"},
    {"id": "T-0932", "text": "海淀区中关村大街路灯不亮，夜间出行不便"},
    {"id": "T-1102", "text": "建国路施工噪音扰民，晚上十一点后仍在作业"},
]
# A retry policy quick enough for tests.
FAST = RetryPolicy(max_retries=3, backoff=0.01, max_backoff=0.05)


class approx_ranking:
    """``got == approx_ranking(expected)``: the same ``(index, score)`` pairs in the same order,
    indices exact and scores within ``pytest.approx``'s tolerance (which compares flat
    sequences only)."""

    def __init__(self, expected: Any, **tolerance: float) -> None:
        self.expected = [tuple(pair) for pair in expected]
        self.tolerance = tolerance

    def __eq__(self, got: object) -> bool:
        pairs = [tuple(pair) for pair in got]  # type: ignore[attr-defined]
        return [p[0] for p in pairs] == [p[0] for p in self.expected] and [
            p[1] for p in pairs
        ] == pytest.approx([p[1] for p in self.expected], **self.tolerance)

    def __repr__(self) -> str:
        return f"approx_ranking({self.expected!r})"


def free_port() -> int:
    """A port of 127.0.0.1 that nobody listened on a moment ago (for a server started elsewhere)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def closed_port_url() -> str:
    """The URL of a port of 127.0.0.1 that nobody listens on: an unreachable server."""
    return f"http://{HOST}:{free_port()}"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


class ServerThread:
    """uvicorn serving ``app`` on its own thread, on a pre-bound free port of 127.0.0.1 (no port race).

    Use as a context manager; ``.url`` and ``.port`` say where it listens.
    """

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        try:
            wait_for(
                lambda: self.server.started or not self.thread.is_alive(),
                SERVER_START_TIMEOUT,
                "the test server to start",
            )
        except AssertionError:
            self.__exit__()
            raise
        if not self.server.started:
            self.sock.close()
            raise RuntimeError("the test server did not start")
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve ``app`` on a :class:`ServerThread`; yield its URL."""
    with ServerThread(app) as server:
        yield server.url


class Front:
    """ASGI front: records every request, fails the first POSTs as told, then passes them on.

    Args:
        app: The real service.
        failures: Statuses to answer the first POSTs with, in order.
        retry_after: ``Retry-After`` header sent with each failure, if any.
        delay: Seconds to wait before answering a POST (a slow server).
    """

    def __init__(
        self, app: Any, failures: tuple[int, ...] = (), retry_after: str | None = None, delay: float = 0.0
    ) -> None:
        self.app = app
        self.failures = list(failures)
        self.retry_after = retry_after
        self.delay = delay
        self.posts: list[tuple[float, str, int]] = []  # (arrival, path, documents in the body)
        self.client_ports: set[int] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.client_ports.add(scope["client"][1])
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.posts.append((time.monotonic(), scope["path"], len(json.loads(raw).get("documents", []))))
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures:
            status = self.failures.pop(0)
            headers = [(b"content-type", b"application/json")]
            if self.retry_after is not None:
                headers.append((b"retry-after", self.retry_after.encode()))
            body = {"error": {"message": f"injected {status}", "type": "injected", "param": None}}
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps(body).encode()})
            return
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": raw, "more_body": False}

        await self.app(scope, replay, send)


# -- headless Chromium (Debian's package; .ci/run installs it) --------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
#: Flags for a headless run on a machine with no network: no background or first-run traffic.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
]


# -- exact answers over HTTP ----------------------------------------------------------------------


def expected_scores(reranker: Any, query: str, docs: list[str]) -> dict[int, float]:
    """The engine's own scores of ``docs`` for ``query``, by document index."""
    return {r.index: r.score for r in reranker.rerank(query, docs)}


def check_exact_answer(response: httpx.Response, expected: dict[int, float]) -> None:
    """A 200 ``/v1/rerank`` answer carrying exactly the ``expected`` scores (float tolerance)."""
    assert response.status_code == 200, response.text
    got = {r["index"]: r["relevance_score"] for r in response.json()["results"]}
    assert got.keys() == expected.keys()
    for i, score in expected.items():
        assert got[i] == pytest.approx(score, abs=1e-5)


def scrape_metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The service's ``/metrics`` as ``{(sample name, sorted labels): value}``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
