#!/usr/bin/env python
"""What the exact score cache buys the HTTP service on repeating FAQ traffic, and what it costs.

Starts two ``qwen3-rerank serve`` processes on 127.0.0.1 over the same model, one with the score
cache off (``--cache-size 0``) and one with it on (``--cache-size 100000``), and replays through
each, from ``--clients`` concurrent clients:

* a **repeating FAQ trace**: ``--requests`` requests of ``--docs`` FAQ entries, of which a share
  ``--repeat-rate`` (default 50 %) are exact repeats of an earlier request of the trace (the same
  question with the same retrieved candidates, as chatbot traffic repeats), the rest new;
* an **all-miss trace** of as many requests, none repeated: the cache's cost when it never hits.

Each round uses new texts (a round tag in every document), so no round is helped by an earlier
one; rounds alternate between the two services and each phase keeps its best round. Printed:
pairs/s, p50/p95 latency, the hit rate read from the cached service's ``/metrics``, the
with/without throughput ratio on each trace, and the largest score difference between the two
services' answers to the same request (a hit must equal a computation), and per phase the
service's engine time (its /metrics): the share of the wall time its engine was busy, its engine
calls and the requests merged per call (what tells client-bound from compute-bound).

Usage (run it under the benchmark lock on a shared machine)::

    flock /tmp/bench.lock python benchmarks/cache_throughput.py                 # 0.6B shape, CPU
    flock /tmp/bench.lock python benchmarks/cache_throughput.py --demo-size tiny --requests 200
    flock /tmp/bench.lock python benchmarks/cache_throughput.py --layers 6 --rounds 3   # 0.6B shape, 6 layers
    python benchmarks/cache_throughput.py --model Qwen/Qwen3-Reranker-0.6B --device cuda

Without ``--model`` the services run a random-weight demo model of the real 0.6B shape
(``--demo-size``): the HTTP, batching, forward-pass and cache costs are real, **the scores are
meaningless**.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_throughput import _free_port, run_concurrent, serve_env, wait_until_healthy

QUERIES = [
    "发票怎么开",
    "订单还没发货，能查一下吗？",
    "my coupon doesn't work",
    "退货和退款有什么区别",
    "How do I reset my password?",
    "where is my order",
    "会员积分怎么用",
    "Can I change my delivery address?",
]
ENTRIES = [
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号，电子发票1个工作日内发到邮箱。",
    "[FAQ] 订单发货查询：付款后48小时内发货。进入“我的订单”，点击订单即可查看物流单号和进度。",
    "[Policy] 退货政策：签收后7天内可申请无理由退货，商品及包装需保持完好，运费由买家承担。",
    "[Policy] Refunds are issued to the original payment method within 7 business days of approval.",
    "[FAQ] Coupons apply only before their expiry date and cannot be combined with items on sale.",
    "How do I reset my password? Open Settings, choose Security, then Reset password.",
    "【会员积分】积分可在结算页抵扣现金，100积分抵1元，积分有效期为一年。",
    "[FAQ] The delivery address can be changed until the parcel leaves the warehouse.",
    "【优惠券使用说明】优惠券需在有效期内使用，部分特价商品不可叠加，退款后优惠券不退回。",
    "[Official Notice] Customer service hours change to 9:00-21:00 from next Monday.",
]


def faq_trace(requests: int, docs: int, repeat_rate: float, tag: str, seed: int, gap: int) -> list[dict]:
    """``requests`` bodies; a share ``repeat_rate`` repeat an earlier body exactly.

    A repeat copies a request at least ``gap`` positions earlier (so that, with fewer than
    ``gap`` clients, the original has been answered before the repeat is sent).
    """
    rng = random.Random(seed)
    repeats = set(rng.sample(range(gap, requests), round(repeat_rate * requests)))
    out: list[dict] = []
    for i in range(requests):
        if i in repeats:
            out.append(out[rng.randrange(0, i - gap + 1)])
            continue
        picks = rng.sample(range(len(ENTRIES)), docs)
        documents = [f"{ENTRIES[p]} ({tag}-{i}-{j})" for j, p in enumerate(picks)]
        out.append({"query": f"{rng.choice(QUERIES)} ({tag}-{i})", "documents": documents})
    return out


@dataclass
class Phase:
    seconds: float
    latencies: list[float]
    pairs: int
    engine_seconds: float = 0.0  # the service's engine time in the phase (its /metrics)
    engine_calls: float = 0.0
    merged_requests: float = 0.0

    @property
    def pairs_per_s(self) -> float:
        return self.pairs / self.seconds

    def percentile(self, q: float) -> float:
        lat = sorted(self.latencies)
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000


async def replay(url: str, trace: list[dict], clients: int) -> tuple[Phase, list[list[float]]]:
    """Send the trace in order from ``clients`` workers; the scores of each request, in order."""
    seconds, latencies, answers = await run_concurrent(url, trace, clients)
    scores = [[by_index[k] for k in sorted(by_index)] for by_index in answers]
    return Phase(seconds, latencies, sum(len(b["documents"]) for b in trace)), scores


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name + "".join(f"{{{k}={v}}}" for k, v in sorted(sample.labels.items()))
            out[name] = sample.value
    return out


class Service:
    def __init__(self, model: str, device: str, cache_size: int, threads: int | None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            "w+", prefix="qwen3-rerank-cache-", suffix=".log", delete=False
        )
        command = [
            sys.executable, "-m", "qwen3_rerank_plugins", "serve", "--model", model, "--device", device,
            "--port", str(self.port), "--no-access-log", "--cache-size", str(cache_size),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=serve_env(threads)
        )

    def wait_ready(self) -> dict:
        health = wait_until_healthy(self.url, self.proc, self.log, poll_s=0.3)
        if health is None:
            raise RuntimeError("the service exited (its log is above)")
        return health

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="hub id or directory (default: a random-weight demo model)")
    parser.add_argument("--demo-size", default="0.6b", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument(
        "--layers", type=int, default=0, help="layers of the random model (0: the shape's; 6: a quick run)"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=24, help="requests per trace (default: 24)")
    parser.add_argument("--docs", type=int, default=5, help="documents per request (default: 5)")
    parser.add_argument("--repeat-rate", type=float, default=0.5, help="share of repeated requests")
    parser.add_argument("--clients", type=int, default=2, help="concurrent clients (default: 2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each phase keeps its best")
    parser.add_argument("--threads", type=int, help="torch threads of each service (default: torch's)")
    args = parser.parse_args()

    model = args.model
    if model is None and args.layers:
        import run  # benchmarks/run.py: builds and caches random-weight real-shape models

        model = str(run._reduced_model_dir(args.demo_size, args.layers))
        print(
            f"model: random-weight {args.demo_size} shape with {args.layers} layers at {model}: "
            "scores are meaningless"
        )
    elif model is None:
        from qwen3_rerank_plugins.demo import demo_model_dir

        model = str(demo_model_dir(args.demo_size))
        print(f"model: random-weight demo model ({args.demo_size}) at {model}: scores are meaningless")
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    services = {"off": Service(model, args.device, 0, args.threads)}
    services["on"] = Service(model, args.device, 100_000, args.threads)
    best: dict[tuple[str, str], Phase] = {}
    hits = misses = 0.0
    worst = 0.0
    try:
        info = {name: s.wait_ready() for name, s in services.items()}
        warm = faq_trace(4, args.docs, 0.0, "warm-up", 0, 1)
        for s in services.values():
            asyncio.run(replay(s.url, warm, 1))
        for r in range(args.rounds):
            traces = {
                "repeating": faq_trace(
                    args.requests, args.docs, args.repeat_rate, f"r{r}", r, 2 * args.clients
                ),
                "all-miss": faq_trace(args.requests, args.docs, 0.0, f"m{r}", 100 + r, 1),
            }
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            for trace_name, trace in traces.items():
                answers = {}
                for name in order:
                    before = _metrics(services[name].url)
                    phase, answers[name] = asyncio.run(replay(services[name].url, trace, args.clients))
                    engine = _metrics(services[name].url)
                    phase.engine_seconds = _delta(engine, before, "qwen3_rerank_batch_duration_seconds_sum")
                    phase.engine_calls = _delta(engine, before, "qwen3_rerank_batch_requests_count")
                    phase.merged_requests = _delta(engine, before, "qwen3_rerank_batch_requests_sum")
                    key = (trace_name, name)
                    if key not in best or phase.seconds < best[key].seconds:
                        best[key] = phase
                    if name == "on" and trace_name == "repeating":
                        after = _metrics(services[name].url)
                        hits += sum(
                            after[k] - before.get(k, 0.0)
                            for k in after
                            if k.startswith("qwen3_rerank_cache_hits_total")
                        )
                        misses += after["qwen3_rerank_cache_misses_total"] - before.get(
                            "qwen3_rerank_cache_misses_total", 0.0
                        )
                for got, want in zip(answers["on"], answers["off"], strict=True):
                    worst = max(worst, max(abs(a - b) for a, b in zip(got, want, strict=True)))
    finally:
        for s in services.values():
            s.stop()

    on = info["on"]
    print(
        f"service: {on['model']} on {on['device']} ({on['dtype']}), python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, torch CPU capability {capability}, "
        f"torch threads: {args.threads or 'default'}"
    )
    print(
        f"traces: {args.requests} requests x {args.docs} FAQ entries, "
        f"{args.clients} concurrent clients; "
        f"repeating trace: {args.repeat_rate:.0%} of requests repeat an earlier one exactly; "
        f"best of {args.rounds} alternating rounds, new texts every round\n"
    )
    print(
        "| trace | cache | pairs/s | p50 ms | p95 ms | engine busy | engine s | engine calls "
        "| requests/call |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for trace_name in ("repeating", "all-miss"):
        for name in ("off", "on"):
            p = best[(trace_name, name)]
            per_call = p.merged_requests / p.engine_calls if p.engine_calls else float("nan")
            print(
                f"| {trace_name} | {name} | {p.pairs_per_s:.2f} | {p.percentile(0.5):.0f} "
                f"| {p.percentile(0.95):.0f} "
                f"| {p.engine_seconds / p.seconds:.0%} | {p.engine_seconds:.1f} | {p.engine_calls:.0f} "
                f"| {per_call:.2f} |"
            )
    rate = hits / (hits + misses) if hits + misses else float("nan")
    speedup = best[("repeating", "on")].pairs_per_s / best[("repeating", "off")].pairs_per_s
    overhead = best[("all-miss", "on")].pairs_per_s / best[("all-miss", "off")].pairs_per_s
    print()
    print(f"hit rate on the repeating trace (cached service's /metrics, all rounds): {rate:.1%}")
    print(f"repeating trace, cache on / off: throughput {speedup:.2f}x")
    print(f"all-miss trace, cache on / off: throughput {overhead:.3f}x")
    print(f"max |score difference| between the two services' answers to the same request: {worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
