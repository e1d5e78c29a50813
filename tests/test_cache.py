"""The exact score cache: hits equal fresh computations, the key misses on every change that matters,
the Redis tier is shared, survives Redis dying or stalling, and never holds the request's text.

Redis tests start their own Debian ``redis-server`` on a free loopback port (no persistence); they
are skipped, saying why, only where ``redis-server`` is not installed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import FAQ_DOCS, FAQ_QUERY
from helpers import HOST, free_port, wait_for
from qwen3_rerank_plugins import Reranker, ScoreGroup, get_reranker
from qwen3_rerank_plugins.cache import ENTRY_BYTES, CachedScore, MemoryTier, ScoreCache
from qwen3_rerank_plugins.demo import create_random_reranker

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (Debian: apt-get install redis-server; .ci/run installs it)",
)

# Text that must never reach Redis: personal data from a hotline ticket.
SECRET_QUERY = "张三 13800138000 投诉建国路88号电梯故障"
SECRET_DOCS = [
    "工单T-1021：张三（身份证110101199003077777）反映电梯困人",
    "Ticket T-0932: Jane Doe, jane.doe@example.com, street light broken on Zhongguancun St.",
    "退货政策：签收后7天内可无理由退货，商品需保持完好。",
]
LONG_DOC = " ".join(f"段落{i}：电梯维修记录与物业回复，第{i}次报修。" for i in range(60))


class RedisServer:
    """A real redis-server on a free port of 127.0.0.1, without persistence."""

    def __init__(self, tmp: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.tmp = tmp
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", HOST,
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.tmp),
                "--enable-debug-command", "local",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client()
        wait_for(lambda: self._pings(client), 15, f"redis-server on port {self.port}", interval=0.05)
        return self

    def _pings(self, client) -> bool:
        import redis

        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)")
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def contents(self) -> dict[bytes, bytes]:
        client = self.client()
        return {key: client.get(key) for key in client.scan_iter(count=1000)}


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def bf16_reranker(tiny_model_dir: Path) -> Reranker:
    return get_reranker(tiny_model_dir, device="cpu", dtype="bfloat16")


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Reranker:
    """Another tiny model with the same name and shapes, other weights (seed 1)."""
    path = tmp_path_factory.mktemp("other") / tiny_model_dir.name
    return get_reranker(create_random_reranker(path, "tiny", tokenizer="qwen", seed=1), device="cpu")


def _logits(rr: Reranker, query: str = FAQ_QUERY, docs: list[str] = FAQ_DOCS, **kw) -> list[float]:
    return rr.score(query, docs, return_logits=True, **kw)


# ------------------------------------------------------------------ hits equal computations


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_a_hit_equals_a_fresh_computation(request, dtype, tol):
    plain = request.getfixturevalue("reranker" if dtype == "float32" else "bf16_reranker")
    cached = plain.with_cache(ScoreCache(1000))
    first = cached.score_groups([ScoreGroup(FAQ_QUERY, FAQ_DOCS)])[0]
    second = cached.score_groups([ScoreGroup(FAQ_QUERY, FAQ_DOCS)])[0]
    fresh = plain.score_groups([ScoreGroup(FAQ_QUERY, FAQ_DOCS)])[0]
    assert second.logits == first.logits  # the very values computed
    assert second.logits == pytest.approx(fresh.logits, abs=tol)
    # The same tokens are reported, as cached rather than computed.
    assert first.tokens == second.tokens == fresh.tokens
    assert fresh.cached_tokens == 0
    assert second.cached_tokens == second.tokens
    stats = cached.cache.stats()
    assert stats["hits"]["memory"] == len(set(FAQ_DOCS))
    assert stats["misses"] == len(set(FAQ_DOCS))
    assert stats["tokens_saved"] >= second.tokens


def test_a_hit_keeps_the_window_span(reranker):
    windows = dict(long_documents=True, window_tokens=40, window_overlap=8)
    plain = reranker.with_settings(**windows)
    cached = plain.with_cache(100)
    docs = ["电梯故障", LONG_DOC]
    first = cached.rerank(SECRET_QUERY, docs)
    again = cached.rerank(SECRET_QUERY, docs)
    fresh = plain.rerank(SECRET_QUERY, docs)
    assert [(r.index, r.span) for r in again] == [(r.index, r.span) for r in fresh]
    assert [r.logit for r in again] == [r.logit for r in first]
    assert [r.logit for r in again] == pytest.approx([r.logit for r in fresh], abs=1e-5)
    assert any(r.span is not None for r in again)
    assert cached.cache.stats()["hits"]["memory"] == 2


def test_only_misses_are_computed_and_still_batched_across_queries(reranker):
    cached = reranker.with_cache(1000)
    cached.score(FAQ_QUERY, FAQ_DOCS[:3])
    before = cached.cache.stats()
    groups = [ScoreGroup(FAQ_QUERY, FAQ_DOCS), ScoreGroup(SECRET_QUERY, SECRET_DOCS)]
    got = cached.score_groups(groups)
    stats = cached.cache.stats()
    assert stats["hits"]["memory"] - before["hits"]["memory"] == 3
    assert stats["stores"] - before["stores"] == len(set(FAQ_DOCS[3:])) + len(SECRET_DOCS)
    fresh = reranker.score_groups(groups)
    for a, b in zip(got, fresh, strict=True):
        assert a.logits == pytest.approx(b.logits, abs=1e-5)
    assert 0 < got[0].cached_tokens < got[0].tokens and got[1].cached_tokens == 0


def test_a_pair_asked_twice_in_one_call_is_computed_once(reranker):
    cached = reranker.with_cache(1000)
    docs = ["发票怎么开", "where is my order", "发票怎么开"]
    got = cached.score_groups([ScoreGroup("invoice", docs), ScoreGroup("invoice", docs[:1])])
    stats = cached.cache.stats()
    assert stats["stores"] == 2 and stats["misses"] == 2 and stats["pairs_saved"] == 2
    assert got[0].logits[0] == got[0].logits[2] == got[1].logits[0]
    assert got[1].cached_tokens == got[1].tokens > 0


def test_a_group_can_opt_out(reranker):
    cached = reranker.with_cache(1000)
    out = cached.score_groups([ScoreGroup(FAQ_QUERY, FAQ_DOCS, cache=False)])[0]
    assert cached.cache.stats()["stores"] == 0 and len(cached.cache.memory) == 0
    cached.score(FAQ_QUERY, FAQ_DOCS)
    again = cached.score_groups([ScoreGroup(FAQ_QUERY, FAQ_DOCS, cache=False)])[0]
    assert again.cached_tokens == 0 and cached.cache.stats()["hits"]["memory"] == 0
    assert again.logits == pytest.approx(out.logits, abs=1e-6)
    with pytest.raises(TypeError, match=r"groups\[0\]\.cache"):
        cached.score_groups([ScoreGroup(FAQ_QUERY, FAQ_DOCS, cache="no")])  # type: ignore[arg-type]


def test_lookup_answers_a_fully_cached_group_and_counts_nothing_otherwise(reranker):
    cached = reranker.with_cache(1000)
    group = ScoreGroup(FAQ_QUERY, FAQ_DOCS)
    assert cached.lookup(group)[1] is None  # nothing cached yet
    assert reranker.lookup(group)[1] is None  # no cache at all
    assert cached.cache.stats()["misses"] == 0  # a miss of the all-or-nothing lookup is not counted
    computed = cached.score_groups([group])[0]
    before = cached.cache.stats()
    answer = cached.lookup(group)[1]
    assert answer is not None
    assert answer.logits == computed.logits and answer.tokens == computed.tokens
    assert answer.cached_tokens == answer.tokens  # every token answered from the cache
    assert cached.lookup(ScoreGroup(FAQ_QUERY, FAQ_DOCS, cache=False))[1] is None
    assert cached.lookup(ScoreGroup(FAQ_QUERY, [*FAQ_DOCS, "新的问题"]))[1] is None  # one miss
    stats = cached.cache.stats()
    assert stats["hits"]["memory"] - before["hits"]["memory"] == len(set(FAQ_DOCS))
    assert stats["misses"] == before["misses"]
    assert stats["pairs_saved"] - before["pairs_saved"] == len(FAQ_DOCS)
    with pytest.raises(ValueError, match="max_doc_tokens"):
        cached.lookup(ScoreGroup(FAQ_QUERY, FAQ_DOCS, max_doc_tokens=-1))[1]
    # lookup: the tokens count_tokens gives, and the same answer, from one tokenisation.
    more = [*FAQ_DOCS, "新的问题"]
    assert cached.lookup(ScoreGroup(FAQ_QUERY, more)) == (reranker.count_tokens(FAQ_QUERY, more), None)
    assert cached.lookup(group) == (computed.tokens, answer)


# ------------------------------------------------------------------ the key


def test_changing_model_dtype_instruction_or_max_length_misses(reranker, bf16_reranker, other_weights):
    cache = ScoreCache(10_000)
    base = reranker.with_cache(cache)
    assert other_weights.model_name == reranker.model_name  # same name, other weights
    variants = {
        "model": other_weights.with_cache(cache),
        "dtype": bf16_reranker.with_cache(cache),
        "instruction": base.with_settings(instruction="Given a question, retrieve FAQ answers"),
        "max_length": base.with_settings(max_length=4096),  # cuts nothing here, still another key
        "window": base.with_settings(long_documents=True),
        "max_doc_tokens": base.with_settings(max_doc_tokens=5000),
    }
    base.score(FAQ_QUERY, FAQ_DOCS)
    hits = cache.stats()["hits"]["memory"]
    for what, rr in variants.items():
        rr.score(FAQ_QUERY, FAQ_DOCS)
        now = cache.stats()["hits"]["memory"]
        assert now == hits, f"changing the {what} hit the cache"
    # Speed settings share entries: batching never changes a pair's log-odds beyond float noise.
    base.with_settings(batch_tokens=512, max_batch_size=2, prefix_cache=False).score(FAQ_QUERY, FAQ_DOCS)
    assert cache.stats()["hits"]["memory"] == hits + len(set(FAQ_DOCS))


def test_int8_models_with_other_quantized_weights_miss(tiny_model_dir):
    """An int8 layer keeps its weights in buffers: the weights fingerprint must read them too."""
    cache = ScoreCache(10_000)
    first = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="int8").with_cache(cache)
    other = Reranker.from_pretrained(tiny_model_dir, device="cpu", dtype="int8")
    for name, buffer in other._core.backbone.named_buffers():
        if name.endswith("weight_t"):
            buffer.add_(1)  # other int8 weights, the same name, shapes and parameters
    first.score(FAQ_QUERY, FAQ_DOCS)
    hits = cache.stats()["hits"]["memory"]
    other.with_cache(cache).score(FAQ_QUERY, FAQ_DOCS)
    assert cache.stats()["hits"]["memory"] == hits


def test_the_query_and_document_as_read_decide_the_key(reranker):
    cached = reranker.with_settings(max_doc_tokens=8).with_cache(100)
    cached.score("q", ["one two three four five six seven eight nine ten"])
    # The same first 8 tokens: the model reads the same pair.
    cached.score("q", ["one two three four five six seven eight and more"])
    assert cached.cache.stats()["hits"]["memory"] == 1
    cached.score("q ", ["one two three four five six seven eight nine ten"])
    assert cached.cache.stats()["hits"]["memory"] == 1


# ------------------------------------------------------------------ the in-process tier


def test_memory_tier_is_an_lru_bounded_in_entries_or_bytes():
    tier = MemoryTier(max_entries=2)
    tier.put_many({b"a": CachedScore(1.0), b"b": CachedScore(2.0)})
    assert tier.get_many([b"a"]) == {b"a": CachedScore(1.0)}  # a is now the most recent
    tier.put_many({b"c": CachedScore(3.0)})
    assert set(tier.get_many([b"a", b"b", b"c"])) == {b"a", b"c"} and tier.evictions == 1
    by_bytes = MemoryTier(max_bytes=3 * ENTRY_BYTES)
    by_bytes.put_many({bytes([i]): CachedScore(float(i)) for i in range(5)})
    assert len(by_bytes) == 3 and by_bytes.bytes <= 3 * ENTRY_BYTES
    by_bytes.put_many({b"s": CachedScore(0.5, (3, 9))})  # a span costs more
    assert len(by_bytes) == 2


def test_cache_arguments_are_checked(reranker):
    assert ScoreCache.build(None) is None and ScoreCache.build(0) is None
    with pytest.raises(TypeError, match="cache must be"):
        reranker.with_cache("big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_url must be a Redis URL"):
        reranker.with_cache(10, cache_url="http://localhost:6379")
    with pytest.raises(ValueError, match="max_entries"):
        ScoreCache(-1)
    with pytest.raises(ValueError, match="needs max_entries"):
        ScoreCache(0)
    with pytest.raises(ValueError, match="cache_ttl"):
        ScoreCache(url="redis://127.0.0.1:1/0", ttl=0)
    assert reranker.cache is None and reranker.with_cache(5).with_settings(max_length=512).cache is not None


def test_from_pretrained_takes_a_cache(tiny_model_dir):
    rr = Reranker.from_pretrained(tiny_model_dir, device="cpu", cache=50)
    assert rr.cache is not None and rr.cache.memory is not None and rr.cache.memory.max_entries == 50
    rr.score(FAQ_QUERY, FAQ_DOCS[:2])
    rr.score(FAQ_QUERY, FAQ_DOCS[:2])
    assert rr.cache.stats()["hits"]["memory"] == 2
    assert rr.cache.clear() == {"memory": 2}
    rr.score(FAQ_QUERY, FAQ_DOCS[:2])
    assert rr.cache.stats()["hits"]["memory"] == 2


def test_the_service_reports_cached_tokens_in_usage(reranker):
    """/v1/rerank over real HTTP: the same prompt tokens, of which the cached part is reported as
    ``usage.prompt_tokens_details.cached_tokens`` (OpenAI's and vLLM's field)."""
    import httpx

    from helpers import ServerThread
    from qwen3_rerank_plugins.server import create_app

    query, docs = "发票抬头写错了怎么改", ["【发票更正】在订单页申请重开。", "退货政策：7天无理由。"]
    body = {"query": query, "documents": docs}
    tokens = reranker.count_tokens(query, docs)
    with ServerThread(create_app(reranker)) as server:  # the service caches by default

        def usage(payload: dict, path: str = "/v1/rerank") -> dict:
            answer = httpx.post(f"{server.url}{path}", json=payload, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["usage"]

        first = usage(body)
        assert first == {
            "prompt_tokens": tokens,
            "total_tokens": tokens,
            "prompt_tokens_details": {"cached_tokens": 0},
        }
        again = usage(body, "/v2/rerank")
        assert again["prompt_tokens"] == again["total_tokens"] == tokens
        assert again["prompt_tokens_details"] == {"cached_tokens": tokens}  # every pair from the cache
        assert usage({**body, "cache": False})["prompt_tokens_details"] == {"cached_tokens": 0}
        mixed = usage({**body, "documents": [*docs, "发票几天能开好？"]})
        assert mixed["prompt_tokens_details"]["cached_tokens"] == tokens  # the two known pairs only
        assert mixed["prompt_tokens"] == reranker.count_tokens(query, [*docs, "发票几天能开好？"])


def test_get_reranker_takes_a_cache_and_shares_it(reranker, tiny_model_dir):
    cached = get_reranker(tiny_model_dir, device="cpu", cache=100)
    assert cached is get_reranker(tiny_model_dir, device="cpu", cache=100)  # one cache per arguments
    assert cached is not reranker and cached.shares_model_with(reranker) and reranker.cache is None
    assert get_reranker(tiny_model_dir, device="cpu") is reranker  # the plain one stays uncached
    assert get_reranker(tiny_model_dir, device="cpu", cache=0) is reranker  # 0: off
    other = get_reranker(tiny_model_dir, device="cpu", cache=100, max_length=512)
    assert other is not cached and other.cache is not cached.cache
    assert cached.cache is not None and cached.cache.memory.max_entries == 100
    docs = ["get_reranker 的缓存测试一", "get_reranker 的缓存测试二"]
    first = cached.score(FAQ_QUERY, docs)
    before = cached.cache.stats()["hits"]["memory"]
    assert cached.score(FAQ_QUERY, docs) == pytest.approx(first, abs=1e-6)
    assert cached.cache.stats()["hits"]["memory"] == before + 2  # the second call: from the cache
    with pytest.raises(TypeError, match="cache must be"):
        get_reranker(tiny_model_dir, device="cpu", cache="big")
    with pytest.raises(TypeError, match="cache and cache_url apply to a local model"):
        get_reranker(base_url="http://127.0.0.1:9", cache=10)


def test_the_cache_module_loads_no_torch():
    code = "import sys, qwen3_rerank_plugins.cache; print('torch' in sys.modules, 'redis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


# ------------------------------------------------------------------ the Redis tier


@needs_redis
def test_nothing_in_redis_contains_the_request_text(reranker, redis_server):
    cached = reranker.with_settings(long_documents=True, window_tokens=40, window_overlap=8).with_cache(
        ScoreCache(0, url=redis_server.url, ttl=3600)
    )
    cached.score(SECRET_QUERY, [*SECRET_DOCS, LONG_DOC])
    stored = redis_server.contents()
    assert len(stored) == len(SECRET_DOCS) + 1
    texts = [SECRET_QUERY, *SECRET_DOCS, LONG_DOC]
    fragments = {t[i : i + 4] for t in texts for i in range(0, max(len(t) - 3, 1))}
    fragments |= {"13800138000", "jane.doe", "110101199003077777", "电梯"}
    client = redis_server.client()
    for key, value in stored.items():
        match = re.fullmatch(rb"qwen3-rerank:([0-9a-f]{32})", key)
        assert match, key  # a namespace and a hash, nothing else
        assert len(value) == 24  # log-odds and a span, as numbers
        stored_bytes = bytes.fromhex(match.group(1).decode()) + value
        for fragment in fragments:
            for encoding in ("utf-8", "utf-16-le", "gb18030"):
                raw = fragment.encode(encoding, errors="ignore")
                assert len(raw) < 4 or raw not in stored_bytes, (fragment, encoding)
        assert 0 < client.pttl(key) <= 3600 * 1000


def _score_in_subprocess(model_dir: Path, url: str, query: str, docs: list[str]) -> dict:
    code = (
        "import json, sys\n"
        "from qwen3_rerank_plugins import Reranker\n"
        "rr = Reranker.from_pretrained(sys.argv[1], device='cpu', cache=0, cache_url=sys.argv[2])\n"
        "logits = rr.score(sys.argv[3], json.loads(sys.argv[4]), return_logits=True)\n"
        "print(json.dumps({'logits': logits, 'stats': rr.cache.stats()}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir), url, query, json.dumps(docs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_redis
@pytest.mark.slow
def test_two_processes_share_scores_through_redis(reranker, tiny_model_dir, redis_server):
    other = _score_in_subprocess(tiny_model_dir, redis_server.url, SECRET_QUERY, SECRET_DOCS)
    assert other["stats"]["misses"] == len(SECRET_DOCS) and other["stats"]["hits"]["redis"] == 0
    here = reranker.with_cache(ScoreCache(100, url=redis_server.url))
    got = here.score_groups([ScoreGroup(SECRET_QUERY, SECRET_DOCS)])[0]
    assert got.logits == other["logits"]  # computed there, answered here
    assert got.cached_tokens == got.tokens
    stats = here.cache.stats()
    assert stats["hits"] == {"memory": 0, "redis": len(SECRET_DOCS)} and stats["misses"] == 0
    here.score(SECRET_QUERY, SECRET_DOCS)  # now from this process's own memory
    assert here.cache.stats()["hits"]["memory"] == len(SECRET_DOCS)


@needs_redis
def test_redis_killed_mid_run_scoring_goes_on(reranker, redis_server, caplog):
    cache = ScoreCache(0, url=redis_server.url)
    assert cache.redis is not None
    cache.redis.retry_after = 0.3
    cached = reranker.with_cache(cache)
    fresh = reranker.score(SECRET_QUERY, SECRET_DOCS, return_logits=True)
    assert cached.score(SECRET_QUERY, SECRET_DOCS, return_logits=True) == pytest.approx(fresh, abs=1e-5)
    redis_server.kill()
    caplog.set_level(logging.WARNING, logger="qwen3_rerank_plugins.cache")
    for i in range(4):
        got = cached.score(SECRET_QUERY, SECRET_DOCS, return_logits=True)
        assert got == pytest.approx(fresh, abs=1e-5)
        cached.score(f"{FAQ_QUERY} {i}", FAQ_DOCS)
        time.sleep(0.35)
    stats = cache.stats()
    assert stats["errors"]["redis"] >= 2 and stats["hits"]["redis"] == 0
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]  # logged once
    # Back on the same port: used again once the pause is over.
    redis_server.proc = RedisServer(redis_server.tmp, redis_server.port).start().proc
    time.sleep(0.35)
    cached.score(SECRET_QUERY, SECRET_DOCS)
    cached.score(SECRET_QUERY, SECRET_DOCS)
    assert cache.stats()["hits"]["redis"] == len(SECRET_DOCS)
    assert any("reachable again" in r.getMessage() for r in caplog.records)


@needs_redis
def test_a_stalled_redis_costs_one_timeout_not_a_failure(reranker, redis_server):
    cache = ScoreCache(0, url=redis_server.url, timeout=0.1)
    cached = reranker.with_cache(cache)
    cached.score(FAQ_QUERY, FAQ_DOCS)  # connected and warm
    stall = threading.Thread(
        target=lambda: redis_server.client().execute_command("DEBUG", "SLEEP", "2"), daemon=True
    )
    stall.start()
    time.sleep(0.2)
    start = time.monotonic()
    got = cached.score(SECRET_QUERY, SECRET_DOCS, return_logits=True)
    took = time.monotonic() - start
    assert got == pytest.approx(reranker.score(SECRET_QUERY, SECRET_DOCS, return_logits=True), abs=1e-5)
    assert took < 1.5, f"a stalled Redis held scoring for {took:.2f}s"
    assert cache.stats()["errors"]["redis"] == 1
    stall.join(timeout=10)


@needs_redis
def test_clearing_drops_both_tiers_and_only_this_namespace(reranker, redis_server):
    cache = ScoreCache(100, url=redis_server.url)
    redis_server.client().set("someone-else:key", b"kept")
    cached = reranker.with_cache(cache)
    cached.score(FAQ_QUERY, FAQ_DOCS[:3])
    assert cache.clear() == {"memory": 3, "redis": 3}
    assert redis_server.contents() == {b"someone-else:key": b"kept"}
    cached.score(FAQ_QUERY, FAQ_DOCS[:3])
    assert cache.stats()["hits"] == {"memory": 0, "redis": 0}


# ------------------------------------------------------------------ the service


class ServiceProcess:
    """``qwen3-rerank serve`` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, model_dir: Path, log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = log
        self._log = log.open("w")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TOKENIZERS_PARALLELISM": "false"}
        command = [sys.executable, "-m", "qwen3_rerank_plugins", "serve", "--model", str(model_dir),
                   "--device", "cpu", "--port", str(self.port), "--no-access-log", *args]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        def ready() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, f"the service on port {self.port}", interval=0.2)

    def rerank(self, body: dict) -> dict:
        import httpx

        response = httpx.post(f"{self.url}/v1/rerank", json=body, timeout=120)
        assert response.status_code == 200, response.text
        return response.json()

    def metrics(self) -> dict[str, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        out = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def _scores(answer: dict) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in answer["results"]}


@needs_redis
@pytest.mark.slow
def test_two_service_processes_share_one_redis(tiny_model_dir, redis_server, tmp_path):
    services = [
        ServiceProcess(tiny_model_dir, tmp_path / f"serve-{i}.log", "--cache-url", redis_server.url)
        for i in range(2)
    ]
    try:
        for s in services:
            s.wait_ready()
        first, second = services
        body = {"query": SECRET_QUERY, "documents": SECRET_DOCS}
        computed = first.rerank(body)
        assert first.metrics()["qwen3_rerank_cache_misses_total"] == len(SECRET_DOCS)
        answered = second.rerank(body)  # scored on the first process, answered from Redis here
        assert _scores(answered) == pytest.approx(_scores(computed), abs=1e-7)
        m = second.metrics()
        assert m["qwen3_rerank_cache_hits_total{tier=redis}"] == len(SECRET_DOCS)
        assert m["qwen3_rerank_cache_misses_total"] == 0
        assert m["qwen3_rerank_cache_tokens_saved_total"] == answered["usage"]["total_tokens"]
        # Again on the second: now from its own memory.
        second.rerank(body)
        assert second.metrics()["qwen3_rerank_cache_hits_total{tier=memory}"] == len(SECRET_DOCS)
        # A request that opts out is scored afresh and stores nothing.
        fresh = second.rerank({**body, "documents": [*SECRET_DOCS, "新工单"], "cache": False})
        m2 = second.metrics()
        assert _scores(fresh)[0] == pytest.approx(_scores(computed)[0], abs=1e-6)
        assert m2["qwen3_rerank_cache_hits_total{tier=memory}"] == len(SECRET_DOCS)
        assert m2["qwen3_rerank_cache_misses_total"] == 0
        assert m2["qwen3_rerank_cache_entries"] == len(SECRET_DOCS)  # "新工单" was not stored
        # Nothing in Redis holds the text.
        for key, value in redis_server.contents().items():
            assert SECRET_QUERY.encode() not in key + value and len(value) == 24
        # Clearing empties the answering process and the shared tier.
        import httpx

        cleared = httpx.post(f"{second.url}/v1/cache/clear", timeout=30)
        assert cleared.status_code == 200, cleared.text
        assert cleared.json() == {"cleared": {"memory": len(SECRET_DOCS), "redis": len(SECRET_DOCS)}}
        assert redis_server.contents() == {}
        # Redis killed mid-run: both keep answering, and count the errors.
        redis_server.kill()
        for i, s in enumerate(services):
            for j in range(2):  # a new document: past the in-process tier, to Redis
                again = _scores(s.rerank({**body, "documents": [*SECRET_DOCS, f"新工单 {i}-{j}"]}))
                assert [again[k] for k in range(3)] == pytest.approx(
                    [_scores(computed)[k] for k in range(3)], abs=1e-6
                )
        assert first.metrics()["qwen3_rerank_cache_errors_total{tier=redis}"] >= 1
        assert second.metrics()["qwen3_rerank_cache_errors_total{tier=redis}"] >= 1
    finally:
        for s in services:
            s.stop()
    log = services[0].log_path.read_text()
    failures = [line for line in log.splitlines() if "Redis score cache at" in line and "failed" in line]
    assert len(failures) == 1, log  # logged once


def test_an_all_or_nothing_miss_leaves_redis_hits_to_the_lookup_that_follows(reranker, redis_server):
    first = reranker.with_cache(ScoreCache(100, url=redis_server.url, ttl=3600))
    first.score(FAQ_QUERY, FAQ_DOCS[:3])  # now in Redis
    second = reranker.with_cache(ScoreCache(100, url=redis_server.url, ttl=3600))  # empty memory tier
    assert second.lookup(ScoreGroup(FAQ_QUERY, [*FAQ_DOCS[:3], "新的问题"]))[1] is None
    stats = second.cache.stats()
    assert stats["hits"] == {"memory": 0, "redis": 0} and stats["misses"] == 0
    assert len(second.cache.memory) == 0  # nothing copied by the lookup that missed
    second.score(FAQ_QUERY, [*FAQ_DOCS[:3], "新的问题"])
    assert second.cache.stats()["hits"]["redis"] == 3  # counted once, by the lookup that scored
