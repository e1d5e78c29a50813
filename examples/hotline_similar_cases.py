"""Similar past tickets for a new hotline ticket: BM25 top-50, then Qwen3-Reranker top-3 (LangChain).

Shows a LangChain pipeline a government service hotline can run on CPU servers:

1. a BM25 first stage over the past tickets in ``examples/data/hotline_tickets.jsonl`` (jieba word
   segmentation + rank-bm25; or Elasticsearch, see below) returns the top 50;
2. ``Qwen3RerankCompressor`` with the ``similar_ticket`` instruction keeps the best 3, inside a
   ``Qwen3RerankRetriever`` (langchain-core only);
3. each match is printed with its ticket id, score, confidence band and how it was handled;
4. when even the best match is in the low band, the ticket is generalized (addresses, dates,
   times, numbers and names stripped) and reranked again with
   ``qwen3_rerank_plugins.fallback.rerank_with_fallback``; if it is still low, it is flagged for
   an operator.

Run:
    pip install torch==2.13.0 -e ".[examples]"
    python examples/hotline_similar_cases.py                      # Qwen/Qwen3-Reranker-0.6B
    python examples/hotline_similar_cases.py --demo               # offline, meaningless scores
    python examples/hotline_similar_cases.py --ticket "朝阳区建国路电梯又坏了，被困半小时"

Elasticsearch as the first stage: a hotline that already indexes its tickets in Elasticsearch
(ideally with a Chinese analyzer such as ``ik_smart``) passes ``--es-url http://localhost:9200
--es-index tickets``; ``ElasticsearchRetriever`` below sends a ``match`` query to ``_search`` over
plain HTTP and expects each hit's ``_source`` to hold ``text`` (and optionally ``category``,
``resolution``). ``--es-load`` first indexes the bundled tickets there. The reranking step is
the same either way.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from _common import add_model_options, demo_reminder, load_reranker, read_jsonl
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, Field

from qwen3_rerank_plugins.evaluate import BM25Index
from qwen3_rerank_plugins.fallback import rerank_with_fallback
from qwen3_rerank_plugins.langchain import Qwen3RerankCompressor, Qwen3RerankRetriever

NEW_TICKETS = [
    "朝阳区建国路88号3号楼电梯昨晚十一点又坏了，张女士被困二十分钟",
    "通州区梨园镇云景东路井盖不见了，晚上差点掉进去",
    "楼下饭店油烟太大，窗户都不敢开",
]


class JiebaBM25Retriever(BaseRetriever):
    """BM25 over jieba-segmented text (Chinese and English), returning the top ``k`` documents."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    documents: list[Document]
    k: int = 50
    index: Any = Field(default=None, exclude=True)

    def model_post_init(self, context: Any) -> None:
        self.index = BM25Index([d.page_content for d in self.documents])

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        hits = self.index.search(query, self.k)
        return [
            self.documents[i].model_copy(update={"metadata": {**self.documents[i].metadata, "bm25": score}})
            for i, score in hits
        ]


class ElasticsearchRetriever(BaseRetriever):
    """The top ``k`` hits of an Elasticsearch ``match`` query on ``field`` (plain HTTP via httpx)."""

    url: str
    index_name: str
    field: str = "text"
    k: int = 50

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        import httpx

        body = {"size": self.k, "query": {"match": {self.field: query}}}
        response = httpx.post(f"{self.url.rstrip('/')}/{self.index_name}/_search", json=body, timeout=10)
        response.raise_for_status()
        docs = []
        for hit in response.json()["hits"]["hits"]:
            source = dict(hit["_source"])
            text = source.pop(self.field)
            docs.append(Document(text, id=str(hit["_id"]), metadata={**source, "es_score": hit["_score"]}))
        return docs


def load_into_elasticsearch(url: str, index_name: str, tickets: list[dict[str, Any]]) -> None:
    """Index the bundled tickets (ids kept) with the ``_bulk`` API."""
    import httpx

    lines = []
    for t in tickets:
        lines.append({"index": {"_index": index_name, "_id": t["id"]}})
        lines.append({k: v for k, v in t.items() if k != "id"})
    payload = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    response = httpx.post(
        f"{url.rstrip('/')}/_bulk?refresh=true",
        content=payload.encode(),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=30,
    )
    response.raise_for_status()


def show(ticket: str, retriever: Qwen3RerankRetriever, first_stage: BaseRetriever) -> None:
    print(f"New ticket: {ticket}")
    matches = retriever.invoke(ticket)
    for rank, doc in enumerate(matches, 1):
        m = doc.metadata
        score, band = m["relevance_score"], m["relevance_band"]
        print(f"  {rank}. {doc.id}  score {score:.4f}  [{band:<6}]  {doc.page_content}")
        print(f"       {m.get('category', '')}: {m.get('resolution', '')}")
    if matches and matches[0].metadata["relevance_band"] == "low":
        # Low confidence: rerank the same candidates with a more general ticket.
        candidates = first_stage.invoke(ticket)
        compressor = retriever.compressor
        outcome = rerank_with_fallback(
            compressor.engine,
            ticket,
            [{"id": d.id, "text": d.page_content} for d in candidates],
            top_n=3,
            instruction="similar_ticket",
        )
        if outcome.fell_back:
            retry = outcome.retry
            print(f"  Low confidence; retried as: {retry.query}")
            for rank, r in enumerate(retry.results, 1):
                print(f"  {rank}. {r.id}  score {r.score:.4f}  [{r.band:<6}]  {r.text}")
        if outcome.needs_review:
            print("  -> still low confidence: flagged for an operator to review")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticket", action="append", help="a new ticket (repeatable; default: three samples)")
    parser.add_argument("--candidates", type=int, default=50, help="first-stage depth (default: 50)")
    parser.add_argument("--es-url", help="use Elasticsearch at this URL as the first stage")
    parser.add_argument("--es-index", default="hotline_tickets", help="Elasticsearch index name")
    parser.add_argument(
        "--es-load", action="store_true", help="index the bundled tickets into Elasticsearch first"
    )
    add_model_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    reranker, is_demo = load_reranker(args)
    tickets = read_jsonl("hotline_tickets.jsonl")
    if args.es_url:
        if args.es_load:
            load_into_elasticsearch(args.es_url, args.es_index, tickets)
        first_stage: BaseRetriever = ElasticsearchRetriever(
            url=args.es_url, index_name=args.es_index, k=args.candidates
        )
        print(f"First stage: Elasticsearch {args.es_url}/{args.es_index}, top {args.candidates}")
    else:
        docs = [
            Document(t["text"], id=t["id"], metadata={k: v for k, v in t.items() if k not in ("id", "text")})
            for t in tickets
        ]
        first_stage = JiebaBM25Retriever(documents=docs, k=args.candidates)
        print(f"First stage: BM25 (jieba) over {len(docs)} past tickets, top {args.candidates}")
    compressor = Qwen3RerankCompressor(reranker=reranker, top_n=3, instruction="similar_ticket")
    retriever = Qwen3RerankRetriever(base_retriever=first_stage, compressor=compressor)
    print(f"Reranker: {reranker!r}, instruction 'similar_ticket', top 3\n")

    for ticket in args.ticket or NEW_TICKETS:
        show(ticket, retriever, first_stage)
    demo_reminder(is_demo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
