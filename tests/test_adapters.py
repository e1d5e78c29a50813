"""What the LlamaIndex and LangChain adapters share: settings, async behaviour, packaging."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from langchain_core.documents import Document
from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.llms import MockLLM
from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode
from pydantic import ValidationError

from qwen3_rerank_plugins import ConfidenceBands, Reranker
from qwen3_rerank_plugins.langchain import Qwen3CrossEncoder, Qwen3RerankCompressor
from qwen3_rerank_plugins.llama_index import Qwen3Rerank

FILLER = "居民反映情况属实，需要尽快处理。" * 12
TEXTS = [
    f"{text} 第{i}条补充说明：{FILLER}"
    for i in range(4)
    for text in (
        "建国路88号小区3号楼电梯故障，居民被困二十分钟",
        "朝阳区建国路某小区电梯多次停运，物业一直未维修",
        "海淀区中关村大街路灯不亮，夜间出行不便",
        "[FAQ] Elevator outages: report to the property manager, then call 12345.",
        "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
        "小区供暖温度不达标，室内只有16度",
    )
]
QUERIES = ("朝阳区建国路电梯又坏了", "建国路噪音扰民")

ENGINE_FIELD_ERRORS = [
    ({"max_length": 0}, "max_length"),
    ({"batch_tokens": 0}, "batch_tokens"),
    ({"instruction": "  "}, "instruction must not be empty"),
    ({"topn": 3}, "Extra inputs are not permitted"),
    ({"model": "other/model"}, "not both"),
    ({"device": "cpu"}, "not both"),
    ({"dtype": "float16"}, "not both"),
]
SELECTION_ERRORS = [
    ({"top_n": 0}, "top_n"),
    ({"top_n": -1}, "top_n"),
    ({"threshold": 1.5}, "threshold"),
    ({"threshold": -0.1}, "threshold"),
]


INVALID_SETTINGS = [
    *[
        (cls, *case)
        for cls in (Qwen3Rerank, Qwen3RerankCompressor)
        for case in ENGINE_FIELD_ERRORS + SELECTION_ERRORS
    ],
    *[(Qwen3CrossEncoder, *case) for case in [*ENGINE_FIELD_ERRORS, ({"top_n": 3}, "Extra inputs")]],
]


@pytest.mark.parametrize(("cls", "kwargs", "match"), INVALID_SETTINGS)
def test_invalid_settings(reranker, cls, kwargs, match):
    with pytest.raises(ValidationError, match=match):
        cls(reranker=reranker, **kwargs)


def test_model_none_needs_an_engine():
    for cls in (Qwen3Rerank, Qwen3RerankCompressor, Qwen3CrossEncoder):
        with pytest.raises(ValidationError, match="pass that engine again as reranker="):
            cls(model=None)


# ------------------------------------------------------------------ async really concurrent


class _CompressorWithoutSyncPath(Qwen3RerankCompressor):
    """The async path must not fall back on the sync one (LangChain's run_in_executor default)."""

    def compress_documents(self, documents, query, callbacks=None):
        raise AssertionError("acompress_documents called the sync path")


class _PostprocessorWithoutSyncPath(Qwen3Rerank):
    """The async path must use the engine's async call, not LlamaIndex's thread around the sync one."""

    def _postprocess_nodes(self, nodes, query_bundle=None):
        raise AssertionError("aquery went through the sync path")


def _langchain_call(reranker: Reranker) -> tuple[Callable[[str], Awaitable[list[str]]], list[str]]:
    compressor = _CompressorWithoutSyncPath(reranker=reranker, top_n=None)
    docs = [Document(text, id=f"d{i}") for i, text in enumerate(TEXTS)]

    async def call(query: str) -> list[str]:
        return [d.page_content for d in await compressor.acompress_documents(docs, query)]

    return call, TEXTS


def _llama_index_call(reranker: Reranker) -> tuple[Callable[[str], Awaitable[list[str]]], list[str]]:
    nodes = [TextNode(id_=f"n{i}", text=text, metadata={"title": "工单"}) for i, text in enumerate(TEXTS)]
    engine = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8)).as_query_engine(
        llm=MockLLM(max_tokens=8),  # a short answer: echoing every prompt would outgrow the context
        similarity_top_k=len(nodes),
        node_postprocessors=[_PostprocessorWithoutSyncPath(reranker=reranker, top_n=None)],
    )

    async def call(query: str) -> list[str]:
        response = await engine.aquery(query)
        return [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in response.source_nodes]

    return call, [n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]


@pytest.mark.parametrize("make_call", [_langchain_call, _llama_index_call], ids=["langchain", "llama-index"])
async def test_async_reranking_does_not_block_the_event_loop(reranker, make_call):
    call, texts = make_call(reranker)
    in_flight = 0
    starts: list[float] = []
    ends: list[float] = []
    ticks_while_reranking = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks_while_reranking
        while not done:
            if in_flight:
                ticks_while_reranking += 1
            await asyncio.sleep(0.001)

    async def rerank(query: str) -> list[str]:
        nonlocal in_flight
        in_flight += 1
        starts.append(time.perf_counter())
        try:
            return await call(query)
        finally:
            ends.append(time.perf_counter())
            in_flight -= 1

    tick_task = asyncio.create_task(ticker())
    try:
        results = await asyncio.gather(*(rerank(q) for q in QUERIES))
    finally:
        done = True
        await tick_task

    assert max(starts) < min(ends), "the two calls did not overlap"
    assert ticks_while_reranking >= 2, "the event loop was blocked while reranking"
    for query, ranked in zip(QUERIES, results, strict=True):
        scores = dict(zip(texts, reranker.score(query, texts), strict=True))
        assert ranked == sorted(texts, key=lambda t: -scores[t])


# ------------------------------------------------------------------ packaging


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [("llama_index", "llama_index", "llama-index"), ("langchain", "langchain_core", "langchain")],
)
def test_import_error_names_the_extra(module: str, blocked: str, extra: str):
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules[{blocked!r}] = None  # as if the framework were not installed
        import qwen3_rerank_plugins  # the core package does not need it
        try:
            import qwen3_rerank_plugins.{module}
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("imported without {blocked}")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"pip install 'qwen3-rerank-plugins[{extra}]'" in proc.stdout
    assert f"qwen3_rerank_plugins.{module}" in proc.stdout


def test_adapters_share_one_definition_of_their_engine_fields():
    shared = {"model", "reranker", "instruction", "device", "dtype", "source", "max_length", "batch_tokens"}
    fields: dict[str, Any] = {}
    for cls in (Qwen3Rerank, Qwen3RerankCompressor, Qwen3CrossEncoder):
        for name in shared:
            fields.setdefault(name, cls.model_fields[name])
            assert cls.model_fields[name].description == fields[name].description
            assert cls.model_fields[name].default == fields[name].default


# ------------------------------------------------------------------ pickling


@pytest.mark.parametrize("cls", [Qwen3Rerank, Qwen3RerankCompressor, Qwen3CrossEncoder])
def test_pickle_carries_the_configuration_not_the_model(reranker, tiny_model_dir, hf_model, cls):
    from_arguments = cls(model=tiny_model_dir, device="cpu", instruction="similar_ticket")
    data = pickle.dumps(from_arguments)
    assert len(data) < 10_000  # the weights are not in it
    loaded = pickle.loads(data)
    assert type(loaded) is cls and loaded.engine is reranker and loaded.instruction == "similar_ticket"

    tuned = reranker.with_settings(max_length=1024, instruction="customer_service_faq")
    loaded = pickle.loads(pickle.dumps(cls(reranker=tuned)))
    assert loaded.reranker is None and loaded.engine.shares_model_with(reranker)
    assert loaded.engine.max_length == 1024
    # The engine's own instruction became the adapter's, so the scores stay the same.
    assert loaded.instruction == tuned.instruction
    expected = tuned.score_pairs([QUERIES])
    assert loaded.engine.score_pairs([QUERIES], instruction=loaded.instruction) == expected

    by_hand = pickle.dumps(cls(reranker=Reranker(*hf_model)))
    with pytest.raises(ValidationError, match="pass that engine again as reranker="):
        pickle.loads(by_hand)


# -- remote backend: base_url on both adapters and get_reranker ----------------------------------

REMOTE_QUERY = "朝阳区建国路电梯又坏了"
REMOTE_TEXTS = TEXTS[:6]


@pytest.fixture(scope="module")
def service_url(reranker: Reranker):
    from helpers import live_server
    from qwen3_rerank_plugins.server import create_app

    with live_server(create_app(reranker)) as url:
        yield url


def _nodes(texts: list[str]) -> list[NodeWithScore]:
    return [NodeWithScore(node=TextNode(text=t, id_=f"T-{i}"), score=0.5) for i, t in enumerate(texts)]


def test_get_reranker_with_base_url_is_a_shared_remote_engine(service_url, reranker):
    from qwen3_rerank_plugins import get_reranker
    from qwen3_rerank_plugins.remote import RemoteReranker

    remote = get_reranker(base_url=service_url)
    assert isinstance(remote, RemoteReranker)
    assert get_reranker(base_url=service_url + "/") is remote
    assert remote.score(REMOTE_QUERY, REMOTE_TEXTS) == pytest.approx(
        reranker.score(REMOTE_QUERY, REMOTE_TEXTS), abs=1e-6
    )
    with pytest.raises(TypeError, match="max_length"):
        get_reranker(base_url=service_url, max_length=512)


def test_both_adapters_score_on_a_remote_service(service_url, reranker):
    expected = reranker.rerank(REMOTE_QUERY, REMOTE_TEXTS, top_n=3)

    compressor = Qwen3RerankCompressor(base_url=service_url, top_n=3)
    docs = [Document(text, id=f"T-{i}") for i, text in enumerate(REMOTE_TEXTS)]
    got = compressor.compress_documents(docs, REMOTE_QUERY)
    assert [d.id for d in got] == [f"T-{r.index}" for r in expected]
    assert [d.metadata["relevance_score"] for d in got] == pytest.approx(
        [r.score for r in expected], abs=1e-6
    )

    postprocessor = Qwen3Rerank(base_url=service_url, top_n=3)
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=f"T-{i}"), score=0.5) for i, t in enumerate(REMOTE_TEXTS)
    ]
    ranked = postprocessor.postprocess_nodes(nodes, query_str=REMOTE_QUERY)
    assert [n.node.node_id for n in ranked] == [f"T-{r.index}" for r in expected]
    assert [n.score for n in ranked] == pytest.approx([r.score for r in expected], abs=1e-6)
    assert compressor.engine is postprocessor.engine  # one pooled client per service

    saved = postprocessor.to_dict()
    assert saved["base_url"] == service_url and "api_key" not in saved
    assert Qwen3Rerank.from_dict(saved).engine is postprocessor.engine


def test_base_url_rejects_settings_that_belong_to_the_server(service_url, reranker):
    with pytest.raises(ValidationError, match="max_length"):
        Qwen3RerankCompressor(base_url=service_url, max_length=512)
    with pytest.raises(ValidationError, match="reranker"):
        Qwen3Rerank(base_url=service_url, reranker=reranker)


def test_unreachable_service_is_a_clear_error():
    from helpers import closed_port_url
    from qwen3_rerank_plugins.client import RerankServiceError

    compressor = Qwen3RerankCompressor(base_url=closed_port_url(), top_n=1)
    with pytest.raises(RerankServiceError, match="could not reach"):
        compressor.compress_documents([Document("x")], "q")


_NO_TORCH_CLIENTS = {
    "llama_index": """
        from llama_index.core.schema import NodeWithScore, TextNode
        from qwen3_rerank_plugins.llama_index import Qwen3Rerank
        post = Qwen3Rerank(base_url=URL, top_n=2, timeout=30)
        nodes = [NodeWithScore(node=TextNode(text=t), score=0.5) for t in TEXTS]
        ranked = post.postprocess_nodes(nodes, query_str=QUERY)
        print(len(ranked), ranked[0].score > 0)
    """,
    "langchain": """
        from langchain_core.documents import Document
        from qwen3_rerank_plugins.langchain import Qwen3RerankCompressor
        compressor = Qwen3RerankCompressor(base_url=URL, top_n=2, timeout=30)
        ranked = compressor.compress_documents([Document(t) for t in TEXTS], QUERY)
        print(len(ranked), ranked[0].metadata["relevance_score"] > 0)
    """,
    "get_reranker": """
        from qwen3_rerank_plugins import get_reranker
        ranked = get_reranker(base_url=URL, timeout=30).rerank(QUERY, TEXTS, top_n=2)
        print(len(ranked), ranked[0].score > 0)
    """,
}


@pytest.mark.parametrize("client", sorted(_NO_TORCH_CLIENTS))
def test_the_remote_path_loads_no_torch(service_url, client):
    """A thin client process (adapters or get_reranker with base_url=) scores on the service without torch."""
    code = f"import sys\nURL, QUERY, TEXTS = {service_url!r}, {REMOTE_QUERY!r}, {REMOTE_TEXTS!r}\n"
    code += textwrap.dedent(_NO_TORCH_CLIENTS[client])
    code += "print('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "True", "False"], out.stderr


def test_base_url_takes_the_caps_the_service_accepts(service_url, reranker):
    """max_doc_tokens / max_query_tokens / long_documents ride on each request; timeout reaches the client."""
    compressor = Qwen3RerankCompressor(base_url=service_url, top_n=None, max_doc_tokens=3, timeout=7.5)
    assert compressor.engine.settings()["max_doc_tokens"] == 3
    assert compressor.engine._conn.sync.timeout == 7.5
    docs = [Document(text) for text in REMOTE_TEXTS]
    ranked = compressor.compress_documents(docs, REMOTE_QUERY)
    got = {d.page_content: d.metadata["relevance_score"] for d in ranked}
    expected = reranker.with_settings(max_doc_tokens=3).score(REMOTE_QUERY, REMOTE_TEXTS)
    assert [got[t] for t in REMOTE_TEXTS] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValidationError, match="timeout= applies to a base_url= service"):
        Qwen3RerankCompressor(reranker=reranker, timeout=5)
    with pytest.raises(ValidationError, match="on_overload"):
        Qwen3Rerank(base_url=service_url, on_overload="ignore")


# -- low-confidence fallback from the adapters' settings -----------------------------------------


@pytest.fixture()
def always_low(reranker: Reranker) -> Reranker:
    """The tiny engine with cut-offs that put every random score in the low band."""
    return reranker.with_settings(bands=ConfidenceBands(high=1.0, medium=1.0))


FALLBACK_QUERY = "朝阳区建国路88号3号楼电梯昨晚十一点又坏了"


def test_langchain_fallback_retries_with_the_generalized_query(always_low):
    outcome = always_low.rerank_with_fallback(FALLBACK_QUERY, REMOTE_TEXTS, top_n=2)
    assert outcome.fell_back and outcome.needs_review
    compressor = Qwen3RerankCompressor(reranker=always_low, top_n=2, fallback=True)
    docs = [Document(text, id=f"T-{i}") for i, text in enumerate(REMOTE_TEXTS)]
    got = compressor.compress_documents(docs, FALLBACK_QUERY)
    assert [d.id for d in got] == [f"T-{r.index}" for r in outcome.results]
    assert all(d.metadata["needs_review"] is True for d in got)
    assert {d.metadata["reranked_query"] for d in got} == {outcome.final.query}
    assert all("needs_review" not in d.metadata for d in docs)

    custom = Qwen3RerankCompressor(reranker=always_low, top_n=2, fallback=lambda q: "电梯坏了")
    assert {d.metadata["reranked_query"] for d in custom.compress_documents(docs, FALLBACK_QUERY)} <= {
        FALLBACK_QUERY,
        "电梯坏了",
    }
    plain = Qwen3RerankCompressor(reranker=always_low, top_n=2)
    assert all("needs_review" not in d.metadata for d in plain.compress_documents(docs, FALLBACK_QUERY))


async def test_llama_index_fallback_sync_and_async(always_low):
    outcome = always_low.rerank_with_fallback(FALLBACK_QUERY, REMOTE_TEXTS, top_n=3)
    postprocessor = Qwen3Rerank(reranker=always_low, top_n=3, fallback=True)
    nodes = [
        NodeWithScore(node=TextNode(text=t, id_=f"T-{i}"), score=0.5) for i, t in enumerate(REMOTE_TEXTS)
    ]
    expected = [f"T-{r.index}" for r in outcome.results]
    ranked = postprocessor.postprocess_nodes(nodes, query_str=FALLBACK_QUERY)
    assert [n.node.node_id for n in ranked] == expected
    assert [n.score for n in ranked] == pytest.approx([r.score for r in outcome.results], abs=1e-6)
    aranked = await postprocessor.apostprocess_nodes(nodes, query_str=FALLBACK_QUERY)
    assert [n.node.node_id for n in aranked] == expected


class _LoopWatch:
    """ASGI front that answers each request only once the client's event loop has ticked.

    The client's ticker bumps ``ticks`` from its loop; a request that arrives while that loop is
    blocked (a blocking call made on it) sees no tick and is recorded in ``blocked`` (after a
    bounded wait), then answered anyway.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.ticks = 0
        self.paths: list[str] = []
        self.blocked: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.paths.append(f"{scope['method']} {scope['path']}")
            seen, deadline = self.ticks, time.monotonic() + 5
            while self.ticks < seen + 2:
                if time.monotonic() > deadline:
                    self.blocked.append(f"{scope['method']} {scope['path']}")
                    break
                await asyncio.sleep(0.001)
        await self.app(scope, receive, send)


async def test_async_reranking_on_a_remote_service_does_not_block_the_event_loop(reranker):
    from helpers import live_server
    from qwen3_rerank_plugins.server import create_app

    watch = _LoopWatch(create_app(reranker))
    done = False

    async def ticker() -> None:
        while not done:
            watch.ticks += 1
            await asyncio.sleep(0.001)

    with live_server(watch) as url:
        postprocessor = _PostprocessorWithoutSyncPath(base_url=url, top_n=None)
        nodes = _nodes(REMOTE_TEXTS)
        tick_task = asyncio.create_task(ticker())
        try:
            ranked = await asyncio.gather(
                *(postprocessor.apostprocess_nodes(nodes, query_str=q) for q in QUERIES)
            )
        finally:
            done = True
            await tick_task

    assert watch.blocked == [], "the event loop was blocked during a request"
    assert watch.paths == ["POST /v1/rerank"] * len(QUERIES)  # model_name asked the server nothing
    for query, got in zip(QUERIES, ranked, strict=True):
        expected = reranker.rerank(query, REMOTE_TEXTS)
        assert [n.node.node_id for n in got] == [f"T-{r.index}" for r in expected]
        assert [n.score for n in got] == pytest.approx([r.score for r in expected], abs=1e-6)
    assert postprocessor.engine.model_name == reranker.model_name  # learned from the answers


def test_a_cache_url_with_a_password_stays_out_of_repr_and_serialisation(tiny_model_dir) -> None:
    from qwen3_rerank_plugins.langchain import Qwen3RerankCompressor

    url = "redis://:s3cret-pass@127.0.0.1:1/0"  # nothing listens there: the tier is skipped
    compressor = Qwen3RerankCompressor(model=str(tiny_model_dir), device="cpu", cache=10, cache_url=url)
    assert "s3cret-pass" not in repr(compressor)
    assert "s3cret-pass" not in str(compressor.model_dump())
