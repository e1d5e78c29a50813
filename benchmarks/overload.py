#!/usr/bin/env python
"""Bounded latency under overload: ``qwen3-rerank serve --max-queue-wait`` against open-loop arrivals.

Starts ``qwen3-rerank serve --max-queue-wait SECONDS`` in a subprocess on 127.0.0.1, measures
one request alone (``--docs`` FAQ documents, best and median of a few), takes the service's
capacity as one over that time, then sends open-loop arrivals (each request at its scheduled
time, whatever the answers before it):

1. ``--overload`` times capacity (default 2x) for ``--overload-seconds`` (default 45 s);
2. once ``/ready`` says the backlog has cleared, ``--light`` times capacity (default 0.4x) for
   ``--light-seconds`` (default 20 s).

It prints, per phase, how many requests were admitted and refused, the admitted requests'
latency p50/p99/max, the refusals' p95/max, whether every refusal carried ``Retry-After``,
connection errors and other 5xx, and ``/metrics``' refusals by reason; and checks the figures
of issue 22: every request answered (no connection error, no 5xx but 503), admitted p99 at most
the wait limit plus three single-request times, refusals' p95 under 1 s, each refusal with
``Retry-After``, and nothing refused under the light load.

The model is a random-weight one of a real shape (``--shape``, ``--layers``; built once under
``benchmarks/.work``): speeds and the admission are real, **the scores are meaningless**.
Run it under ``flock /tmp/bench.lock`` on a shared machine; it is a script, not a test.

Usage::

    flock /tmp/bench.lock python benchmarks/overload.py --layers 6
    python benchmarks/overload.py --layers 2 --overload-seconds 10 --light-seconds 5   # a quick look
    flock /tmp/bench.lock python benchmarks/overload.py --layers 6 --ray   # the same app under Ray Serve

With ``--ray`` the service is ``qwen3-rerank serve --ray`` with one replica holding the machine's
CPUs (needs the ``[ray]`` extra): the same app, its admission per replica, behind Ray's proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from service_throughput import PASSAGES, QUERIES, _free_port, serve_env, wait_until_healthy  # noqa: E402


@dataclass
class Outcome:
    sent: float
    seconds: float
    status: int | None  # None: no answer (connection error)
    retry_after: str | None = None
    kind: str | None = None
    error: str | None = None


@dataclass
class Phase:
    name: str
    rate: float
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)

    def admitted(self) -> list[float]:
        return sorted(o.seconds for o in self.outcomes if o.status == 200)

    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 503]

    def summary(self) -> dict:
        ok = self.admitted()
        refused = sorted(o.seconds for o in self.refused())
        kinds: dict[str, int] = {}
        for o in self.refused():
            kinds[o.kind or "?"] = kinds.get(o.kind or "?", 0) + 1
        return {
            "phase": self.name,
            "rate_per_s": round(self.rate, 3),
            "seconds": self.seconds,
            "sent": len(self.outcomes),
            "admitted": len(ok),
            "refused_503": len(refused),
            "refused_by_type": kinds,
            "refusals_without_retry_after": sum(1 for o in self.refused() if not o.retry_after),
            "connection_errors": sum(1 for o in self.outcomes if o.status is None),
            "other_errors": sum(1 for o in self.outcomes if o.status not in (None, 200, 503)),
            "admitted_p50_s": _pct(ok, 50),
            "admitted_p99_s": _pct(ok, 99),
            "admitted_max_s": ok[-1] if ok else None,
            "refused_p95_s": _pct(refused, 95),
            "refused_max_s": refused[-1] if refused else None,
        }


def _pct(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    rank = max(1, math.ceil(p / 100 * len(values)))
    return round(values[rank - 1], 3)


def _body(i: int, docs: int) -> dict:
    passages = [PASSAGES[(i + j) % len(PASSAGES)] for j in range(docs)]
    return {"query": QUERIES[i % len(QUERIES)], "documents": passages}


def _gauge(client: httpx.Client, name: str) -> float | None:
    text = client.get("/metrics").text
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]
    return values[0] if values else None


def _refusals(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "qwen3_rerank_refusals_total"
    }


async def open_loop(url: str, name: str, rate: float, seconds: float, docs: int, offset: int) -> Phase:
    """Arrivals at ``rate`` per second for ``seconds`` on a fixed schedule; every answer recorded."""
    phase = Phase(name, rate, seconds)
    count = max(1, int(rate * seconds))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)

    async def one(client: httpx.AsyncClient, at: float, i: int) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        sent = time.monotonic()
        try:
            response = await client.post("/v1/rerank", json=_body(offset + i, docs))
        except httpx.HTTPError as exc:
            phase.outcomes.append(Outcome(sent, time.monotonic() - sent, None, error=repr(exc)))
            return
        took = time.monotonic() - sent
        kind = None
        if response.status_code != 200:
            try:
                kind = response.json()["error"]["type"]
            except (ValueError, KeyError, TypeError):
                kind = "not-json"
        phase.outcomes.append(
            Outcome(sent, took, response.status_code, response.headers.get("retry-after"), kind)
        )

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.monotonic() + 0.1
        await asyncio.gather(*(one(client, start + i / rate, i) for i in range(count)))
    return phase


def _model_dir(shape: str, layers: int | None) -> str:
    import run  # benchmarks/run.py: builds and caches random-weight real-shape models

    if layers:
        return str(run._reduced_model_dir(shape, layers))
    from qwen3_rerank_plugins.demo import demo_model_dir

    return str(demo_model_dir(shape, cache_dir=run.WORK))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="0.6b", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument("--layers", type=int, default=6, help="layers of the random model (0: the shape's)")
    parser.add_argument("--max-queue-wait", type=float, default=3.0, help="the service's limit (default: 3)")
    parser.add_argument("--docs", type=int, default=10, help="FAQ documents per request (default: 10)")
    parser.add_argument("--overload", type=float, default=2.0, help="overload, times capacity (default: 2)")
    parser.add_argument("--overload-seconds", type=float, default=45.0)
    parser.add_argument("--light", type=float, default=0.4, help="light load, times capacity (default: 0.4)")
    parser.add_argument("--light-seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, help="torch threads of the service (default: torch's choice)")
    parser.add_argument("--ray", action="store_true", help="serve through Ray Serve (one replica)")
    parser.add_argument("--out", default=str(HERE / ".work" / "last-overload.json"))
    args = parser.parse_args()

    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    model = _model_dir(args.shape, args.layers or None)
    layers = args.layers or "all"
    print(f"model: random-weight {args.shape} shape, {layers} layers at {model}: scores are meaningless")
    cpu = platform.processor() or platform.machine()
    print(f"cpu: {cpu}, {os.cpu_count()} cores, torch.backends.cpu.get_cpu_capability() = {capability}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix="qwen3-rerank-overload-", suffix=".log", delete=False)  # noqa: SIM115
    command = [
        sys.executable, "-m", "qwen3_rerank_plugins", "serve", "--model", model, "--device", "cpu",
        "--port", str(port), "--no-access-log", "--max-queue-wait", str(args.max_queue_wait),
        # The requests repeat one body: with the score cache on, every request after the first
        # would be a hit and no overload would ever form. The admission is measured on compute.
        "--cache-size", "0",
    ]  # fmt: skip
    if args.ray:
        cpus = str(os.cpu_count() or 1)
        command += ["--ray", "--replicas", "1", "--cpus-per-replica", cpus, "--gpus-per-replica", "0"]
    print("service:", " ".join(command[1:]))
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=serve_env(args.threads))
    try:
        if wait_until_healthy(url, server, log, timeout_s=600) is None:
            return 1
        with httpx.Client(base_url=url, timeout=300) as client:
            client.post("/v1/rerank", json=_body(0, args.docs)).raise_for_status()  # warm-up
            singles = []
            for i in range(4):
                started = time.monotonic()
                client.post("/v1/rerank", json=_body(i, args.docs)).raise_for_status()
                singles.append(time.monotonic() - started)
            single = statistics.median(singles)
            capacity = 1.0 / single
            print(
                f"one request alone ({args.docs} documents): median {single:.3f} s, best {min(singles):.3f} s"
                f" -> capacity {capacity:.3f} requests/s"
            )
            before = _refusals(client)
            heavy = asyncio.run(
                open_loop(url, "overload", args.overload * capacity, args.overload_seconds, args.docs, 100)
            )
            during = _refusals(client)
            margin = _gauge(client, "qwen3_rerank_estimate_margin_seconds")
            cleared = time.monotonic()
            while client.get("/ready").status_code != 200:
                time.sleep(0.2)
            print(f"backlog cleared {time.monotonic() - cleared:.1f} s after the last overload answer")
            light = asyncio.run(
                open_loop(url, "light", args.light * capacity, args.light_seconds, args.docs, 10_000)
            )
            after = _refusals(client)
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    limit = args.max_queue_wait
    h, lt = heavy.summary(), light.summary()
    bound = limit + 3 * single
    checks = {
        "every request answered (no connection error, no 5xx but 503)": all(
            s["connection_errors"] == 0 and s["other_errors"] == 0 for s in (h, lt)
        ),
        f"admitted p99 <= limit + 3 single ({bound:.2f} s)": h["admitted_p99_s"] is not None
        and h["admitted_p99_s"] <= bound,
        "refusals' p95 < 1 s": h["refused_p95_s"] is not None and h["refused_p95_s"] < 1.0,
        "each refusal with Retry-After": h["refusals_without_retry_after"] == 0
        and lt["refusals_without_retry_after"] == 0,
        "light load: nothing refused": lt["refused_503"] == 0,
    }
    report = {
        "capability": capability,
        "cores": os.cpu_count(),
        "model": f"random-weight {args.shape}, {args.layers or 'all'} layers (scores meaningless)",
        "max_queue_wait_s": limit,
        "served_by": "ray serve (1 replica)" if args.ray else "qwen3-rerank serve",
        "estimate_margin_s_after_overload": None if margin is None else round(margin, 3),
        "docs_per_request": args.docs,
        "single_request_s": {"median": round(single, 3), "all": [round(s, 3) for s in singles]},
        "phases": [h, lt],
        "metrics_refusals": {
            "overload": {k: v - before.get(k, 0) for k, v in during.items()},
            "light": {k: v - during.get(k, 0) for k, v in after.items()},
        },
        "checks": checks,
    }
    print(json.dumps(report, indent=2, ensure_ascii=False))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
