"""LlamaIndex glue: a node postprocessor over the shared engine.

:class:`Qwen3Rerank` is a ``BaseNodePostprocessor``: add it to a query engine's
``node_postprocessors`` and the retrieved nodes come back reranked by Qwen3-Reranker, best first,
with the new score in ``NodeWithScore.score``.

It obtains its engine from :func:`~qwen3_rerank_plugins.get_reranker`, so in one process it
shares one loaded model with other postprocessors and with the LangChain compressor built with
the same model arguments, or it takes an existing :class:`~qwen3_rerank_plugins.Reranker` as
``reranker=``. All model logic lives in the engine; this module only converts between nodes and
engine results and reports to LlamaIndex's instrumentation.

Example:
    >>> from qwen3_rerank_plugins.llama_index import Qwen3Rerank
    >>> query_engine = index.as_query_engine(  # doctest: +SKIP
    ...     similarity_top_k=20,
    ...     node_postprocessors=[Qwen3Rerank(top_n=5, instruction="customer_service_faq")],
    ... )
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ._optional import require

try:
    from llama_index.core.bridge.pydantic import Field
    from llama_index.core.callbacks import CBEventType, EventPayload
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError:
    # Names the extra to install when llama-index-core is missing; otherwise re-raise as is.
    require(
        "llama_index.core", "llama-index", "The LlamaIndex postprocessor (qwen3_rerank_plugins.llama_index)"
    )
    raise

# After the guard: without the extra, the ImportError above names it (not pydantic, which
# llama-index-core brings along).
from ._adapters import LOAD_FIELDS, RERANKED_KEY, FallbackSetting, span_metadata
from .results import RerankResult

__all__ = ["Qwen3Rerank"]

logger = logging.getLogger(__name__)
dispatcher = get_dispatcher(__name__)

RETRIEVAL_SCORE_KEY = "retrieval_score"


class Qwen3Rerank(FallbackSetting, BaseNodePostprocessor):
    """Rerank retrieved nodes with Qwen3-Reranker (a LlamaIndex node postprocessor).

    Each node is scored on ``node.get_content(metadata_mode=MetadataMode.EMBED)``, so titles and
    tags kept in metadata reach the reranker as they reached the embedding model. The result is
    new ``NodeWithScore`` objects, highest score first, with the relevance probability in
    ``score``; the nodes passed in are never modified. With ``keep_retrieval_score=True`` each
    returned node is a copy whose ``metadata["retrieval_score"]`` holds the retriever's score
    (kept out of the text the LLM and the embedding model see).

    The engine comes from :func:`~qwen3_rerank_plugins.get_reranker`, so postprocessors and
    LangChain compressors built with the same model arguments share one loaded model; pass
    ``reranker=`` to use an engine you already have. The async path (``aquery``) runs the model
    in a worker thread and never blocks the event loop. ``ReRankStartEvent`` / ``ReRankEndEvent``
    and the ``RERANKING`` callback event are emitted as by LlamaIndex's own rerankers.

    ``to_dict`` / ``to_json`` save the configuration without the model; ``from_dict`` loads it
    back through ``get_reranker`` (sharing the model if it is loaded already).

    With ``base_url=`` the scoring runs on a rerank service and no torch is loaded in this
    process; ``timeout`` bounds each call, and ``on_overload="keep_order"`` turns an overloaded
    service into the retrieved nodes in their input order, cut to ``top_n``, each a copy with
    ``metadata["reranked"] = False`` and the retriever's score, plus a WARNING in the log.

    Example:
        >>> from qwen3_rerank_plugins.llama_index import Qwen3Rerank
        >>> rerank = Qwen3Rerank(model="Qwen/Qwen3-Reranker-0.6B", top_n=5)  # doctest: +SKIP
        >>> query_engine = index.as_query_engine(  # doctest: +SKIP
        ...     similarity_top_k=20, node_postprocessors=[rerank]
        ... )
        >>> [n.score for n in query_engine.query("发票怎么开").source_nodes]  # doctest: +SKIP
        [0.97, 0.64, 0.12, 0.05, 0.01]
    """

    top_n: int | None = Field(
        default=5, gt=0, description="Return at most this many nodes, best first; None returns all."
    )
    threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Drop nodes whose relevance score (a probability) is below this; None keeps all.",
    )
    keep_retrieval_score: bool = Field(
        default=False,
        description='Keep the retriever\'s score in metadata["retrieval_score"] of the returned copies.',
    )

    @classmethod
    def class_name(cls) -> str:
        """Name under which LlamaIndex serialises this postprocessor."""
        return "Qwen3Rerank"

    # -- serialisation ------------------------------------------------------------------------

    def to_dict(self, **kwargs: Any) -> dict[str, Any]:
        """The configuration as a JSON-ready dict; the model itself is never included.

        A postprocessor built on ``reranker=`` is saved as the arguments that loaded that
        engine's weights (``model`` is ``None`` if they are unknown: pass the engine again to
        :meth:`from_dict`).
        """
        return {**super().to_dict(**kwargs), **self.saved_fields()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], **kwargs: Any) -> Qwen3Rerank:
        """A postprocessor from :meth:`to_dict` output; the engine comes from ``get_reranker``.

        Args:
            data: A dict from :meth:`to_dict` (or parsed :meth:`to_json`).
            **kwargs: Fields to override, e.g. ``reranker=engine`` to score with an engine you
                already have (the saved ``model``, ``device``, ``dtype`` and ``source`` are then
                ignored).

        Returns:
            The postprocessor.
        """
        if kwargs.get("reranker") is not None:
            data = {key: value for key, value in data.items() if key not in LOAD_FIELDS}
        return super().from_dict(data, **kwargs)

    # -- reranking ----------------------------------------------------------------------------

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        query = _query_text(query_bundle)
        if not nodes:
            return []
        with self._reranking(nodes, query_bundle) as finish:
            return finish(self._rerank(query, _node_texts(nodes), **self._rerank_kwargs())[0])

    @dispatcher.span
    async def _apostprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        query = _query_text(query_bundle)
        if not nodes:
            return []
        with self._reranking(nodes, query_bundle) as finish:
            return finish((await self._arerank(query, _node_texts(nodes), **self._rerank_kwargs()))[0])

    def _rerank_kwargs(self) -> dict[str, Any]:
        return {"top_n": self.top_n, "threshold": self.threshold, "instruction": self.instruction}

    @property
    def _model_name(self) -> str:
        local = self.reranker is None and self.base_url is None and self.model is not None
        return self.model if local else self._engine.model_name

    @contextmanager
    def _reranking(
        self, nodes: list[NodeWithScore], query_bundle: QueryBundle
    ) -> Iterator[Callable[[list[RerankResult]], list[NodeWithScore]]]:
        """Emit the start events; yield the function that turns results into nodes and ends them."""
        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle,
                nodes=nodes,
                top_n=self.top_n or len(nodes),
                model_name=self._model_name,
            )
        )
        payload = {
            EventPayload.NODES: nodes,
            EventPayload.MODEL_NAME: self._model_name,
            EventPayload.QUERY_STR: query_bundle.query_str,
            EventPayload.TOP_K: self.top_n,
        }
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:

            def finish(results: list[RerankResult]) -> list[NodeWithScore]:
                reranked = [self._reranked_node(nodes[r.index], r) for r in results]
                event.on_end(payload={EventPayload.NODES: reranked})
                dispatcher.event(ReRankEndEvent(nodes=reranked))
                return reranked

            yield finish

    def _reranked_node(self, original: NodeWithScore, result: RerankResult) -> NodeWithScore:
        """A new ``NodeWithScore``; with ``keep_retrieval_score``, a matching span, or no reranking
        (an overloaded service with ``on_overload="keep_order"``: the retriever's score is kept)
        its node is a copy."""
        node = original.node
        added = span_metadata(result)
        if self.keep_retrieval_score:
            added[RETRIEVAL_SCORE_KEY] = original.score
        if not result.reranked:
            added[RERANKED_KEY] = False
        if added:
            node = node.model_copy(
                update={
                    "metadata": {**node.metadata, **added},
                    "excluded_embed_metadata_keys": _with_keys(node.excluded_embed_metadata_keys, added),
                    "excluded_llm_metadata_keys": _with_keys(node.excluded_llm_metadata_keys, added),
                }
            )
        return NodeWithScore(node=node, score=result.score if result.reranked else original.score)


def _query_text(query_bundle: QueryBundle | None) -> str:
    if query_bundle is None:
        raise ValueError(
            "Qwen3Rerank needs the query: call postprocess_nodes(nodes, query_bundle=QueryBundle(query)) "
            "or postprocess_nodes(nodes, query_str=query)"
        )
    return query_bundle.query_str


def _node_texts(nodes: Sequence[NodeWithScore]) -> list[str]:
    return [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]


def _with_keys(keys: list[str], added: dict[str, Any]) -> list[str]:
    # The reranker's own keys are not read again by embedding models or LLMs.
    return [*keys, *(k for k in added if k not in keys)]
