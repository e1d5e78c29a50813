"""A customer-service FAQ chatbot in LlamaIndex: vector retrieval top-10, Qwen3-Reranker top-3.

Shows the one-line change a RAG team makes: ``node_postprocessors=[Qwen3Rerank(...)]`` on a
``VectorStoreIndex`` query engine, with the ``customer_service_faq`` instruction template. The
knowledge base is ``examples/data/faq_kb.jsonl``: FAQ entries and policy texts tagged
``[FAQ]`` / ``[Policy]`` / ``【…】``, mostly Chinese, some English. For each question it prints
the vector-search order, the reranked top 3 with scores and bands, and the answer.

Offline stand-ins, so the example runs anywhere (swap in your own in a real deployment):

* embeddings: ``CharNgramEmbedding``, hashed character uni- and bigrams (no model download);
  use e.g. ``HuggingFaceEmbedding("BAAI/bge-m3")`` in practice;
* LLM: the LLM configured through ``OPENAI_API_KEY`` (with ``llama-index-llms-openai``
  installed) when there is one, else ``ExtractiveLLM``, which answers with the best context
  chunk verbatim.

Run:
    pip install torch==2.13.0 -e ".[examples]"
    python examples/customer_service_faq.py                       # Qwen/Qwen3-Reranker-0.6B
    python examples/customer_service_faq.py --demo                # offline, meaningless scores
    python examples/customer_service_faq.py --query "发票抬头写错了能改吗"
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import math
import os
import re
import sys
from typing import Any

from _common import add_model_options, demo_reminder, load_reranker, read_jsonl
from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.llms import CompletionResponse, CompletionResponseGen, CustomLLM, LLMMetadata
from llama_index.core.schema import TextNode

from qwen3_rerank_plugins.llama_index import Qwen3Rerank

QUESTIONS = ["订单还没发货，能查一下吗？", "发票怎么开", "my coupon doesn't work", "退款多久到账"]


class CharNgramEmbedding(BaseEmbedding):
    """Hashed character unigrams and bigrams, L2-normalised: a lexical stand-in for a real embedder."""

    dim: int = 1024

    def _vector(self, text: str) -> list[float]:
        chars = [c for c in text.lower() if not c.isspace()]
        grams = chars + [a + b for a, b in itertools.pairwise(chars)]
        vec = [0.0] * self.dim
        for gram in grams:
            vec[int(hashlib.md5(gram.encode()).hexdigest(), 16) % self.dim] += 1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


class ExtractiveLLM(CustomLLM):
    """Answers with the first context chunk of the prompt: stands in when no LLM is configured."""

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(model_name="extractive-echo")

    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        match = re.search(r"-{5,}\n(.*?)\n-{5,}", prompt, re.DOTALL)
        context = match.group(1).strip() if match else prompt
        best = context.split("\n\n")[0].strip()
        return CompletionResponse(text=f"（未配置大模型，直接给出最相关的知识库条目）{best}")

    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        yield self.complete(prompt, formatted, **kwargs)


def configured_llm() -> Any:
    """OpenAI when a key and its integration are present, else :class:`ExtractiveLLM`."""
    if os.environ.get("OPENAI_API_KEY"):
        try:
            from llama_index.llms.openai import OpenAI
        except ImportError:
            print(
                "OPENAI_API_KEY is set but llama-index-llms-openai is not installed; answering extractively."
            )
        else:
            return OpenAI(model=os.environ.get("OPENAI_MODEL", "gpt-4o-mini"))
    return ExtractiveLLM()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query", action="append", help="a question (repeatable; default: four samples)")
    parser.add_argument("--top-k", type=int, default=10, help="vector retrieval depth (default: 10)")
    add_model_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    reranker, is_demo = load_reranker(args)
    nodes = [TextNode(text=r["text"], id_=r["id"]) for r in read_jsonl("faq_kb.jsonl")]
    index = VectorStoreIndex(nodes, embed_model=CharNgramEmbedding())
    rerank = Qwen3Rerank(reranker=reranker, top_n=3, instruction="customer_service_faq")
    llm = configured_llm()
    query_engine = index.as_query_engine(similarity_top_k=args.top_k, node_postprocessors=[rerank], llm=llm)
    retriever = index.as_retriever(similarity_top_k=args.top_k)
    print(f"Knowledge base: {len(nodes)} chunks; vector top {args.top_k} -> {reranker!r} top 3")
    print(f"LLM: {llm.metadata.model_name}\n")

    for question in args.query or QUESTIONS:
        print(f"Q: {question}")
        retrieved = retriever.retrieve(question)
        print("  vector search order: " + ", ".join(n.node.node_id for n in retrieved))
        response = query_engine.query(question)
        for rank, n in enumerate(response.source_nodes, 1):
            band = reranker.bands.classify(n.score)
            print(
                f"  {rank}. {n.node.node_id}  score {n.score:.4f}  [{band:<6}]  {n.node.get_content()[:60]}"
            )
        print(f"A: {response.response}\n")
    demo_reminder(is_demo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
