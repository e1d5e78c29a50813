"""Python client for the rerank service (``qwen3-rerank serve``), sync and async, over httpx.

Example:
    >>> from qwen3_rerank_plugins.client import RerankClient
    >>> with RerankClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     hits = client.rerank("发票怎么开", ["【发票申请指南】在订单页申请开票", "退货流程"], top_n=1)
    ...     hits[0].index, hits[0].relevance_score
    >>> async with AsyncRerankClient("http://127.0.0.1:8000") as client:  # doctest: +SKIP
    ...     ranked = await client.rank("路灯不亮", [{"id": "T-17", "text": "小区路灯坏了"}])

Both clients speak the service's two endpoints: ``/v1/rerank`` (the Cohere / Jina / vLLM shape,
any such server works) and ``/rank`` (``{id, text}`` records with bands, this service only).
Every failure raises :class:`RerankServiceError` carrying the server's message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._optional import require

httpx = require("httpx", "server", "The rerank service client")

__all__ = ["AsyncRerankClient", "RankHit", "RerankClient", "RerankHit", "RerankServiceError"]

DEFAULT_TIMEOUT = 60.0


class RerankServiceError(RuntimeError):
    """The service refused or failed a request, or could not be reached.

    Attributes:
        status_code: HTTP status, or ``None`` when the service could not be reached.
        message: The server's error message (or the connection error).
        param: The request field the server named, if any (e.g. ``"documents[3]"``).
        type: The server's error type (``"invalid_request_error"``, ``"overloaded"``, ...).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        param: str | None = None,
        type: str | None = None,
    ) -> None:
        prefix = f"HTTP {status_code}: " if status_code is not None else ""
        super().__init__(prefix + message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.type = type


@dataclass(frozen=True)
class RerankHit:
    """One ``/v1/rerank`` result: input position, relevance probability, and the text if returned."""

    index: int
    relevance_score: float
    document: str | None = None


@dataclass(frozen=True)
class RankHit:
    """One ``/rank`` result: the document's id, its score and confidence band."""

    id: Any
    score: float
    band: str
    index: int


# -- request building and response parsing, shared by both clients -------------------------------


def _rerank_payload(
    query: str,
    documents: Sequence[str | Mapping[str, Any]],
    top_n: int | None,
    instruction: str | None,
    return_documents: bool,
    model: str | None,
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "query": query,
        "documents": [d if isinstance(d, str) else dict(d) for d in documents],
        "return_documents": return_documents,
    }
    if top_n is not None:
        payload["top_n"] = top_n
    if instruction is not None:
        payload["instruction"] = instruction
    if model is not None:
        payload["model"] = model
    return payload


def _rank_payload(
    query: str, documents: Sequence[str | Mapping[str, Any]], top_n: int | None, instruction: str | None
) -> dict[str, Any]:
    # The server gives a document without an id its position, and names any malformed one.
    docs = [{"id": i, "text": d} if isinstance(d, str) else dict(d) for i, d in enumerate(documents)]
    payload: dict[str, Any] = {"query": query, "documents": docs}
    if top_n is not None:
        payload["top_n"] = top_n
    if instruction is not None:
        payload["instruction"] = instruction
    return payload


def _parse_rerank(body: dict[str, Any]) -> list[RerankHit]:
    hits = []
    for r in body["results"]:
        doc = r.get("document")
        text = doc.get("text") if isinstance(doc, Mapping) else doc
        hits.append(RerankHit(index=r["index"], relevance_score=r["relevance_score"], document=text))
    return hits


def _parse_rank(body: dict[str, Any]) -> list[RankHit]:
    return [RankHit(id=r["id"], score=r["score"], band=r["band"], index=r["index"]) for r in body["results"]]


def _raise_for_status(response: Any) -> Any:
    if response.is_success:
        try:
            return response.json()
        except ValueError as exc:
            raise RerankServiceError(
                f"the service answered with invalid JSON: {response.text[:200]!r}",
                status_code=response.status_code,
            ) from exc
    message, param, kind = response.text.strip() or response.reason_phrase, None, None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, Mapping):
        err = body.get("error")
        if isinstance(err, Mapping):
            message, param, kind = str(err.get("message", message)), err.get("param"), err.get("type")
        elif isinstance(err, str):
            message = err
        elif "message" in body or "detail" in body:
            message = str(body.get("message", body.get("detail")))
    raise RerankServiceError(message, status_code=response.status_code, param=param, type=kind)


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _unreachable(base_url: str, exc: Exception) -> RerankServiceError:
    return RerankServiceError(
        f"could not reach the rerank service at {base_url}: {type(exc).__name__}: {exc}"
    )


class RerankClient:
    """Blocking client for the rerank service.

    Args:
        base_url: Where the service listens, e.g. ``"http://127.0.0.1:8000"``.
        api_key: Sent as ``Authorization: Bearer <api_key>`` when the service requires one.
        timeout: Seconds per request (reranking many long documents on CPU takes a while).
        model: Sent as ``model`` in ``/v1/rerank`` requests (ignored by this service, required by
            some other servers).
        http_client: An ``httpx.Client`` to use instead of creating one (its base URL, headers
            and timeout are then yours to set).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        model: str | None = None,
        http_client: Any = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout
        )

    def _post(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            response = self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _raise_for_status(response)

    def _get(self, path: str) -> Any:
        try:
            response = self._http.get(path)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _raise_for_status(response)

    def rerank(
        self,
        query: str,
        documents: Sequence[str | Mapping[str, Any]],
        top_n: int | None = None,
        instruction: str | None = None,
        return_documents: bool = False,
    ) -> list[RerankHit]:
        """``POST /v1/rerank``: documents best first.

        Args:
            query: The question.
            documents: Texts, or mappings with a ``"text"`` key.
            top_n: Keep the best ``top_n`` (all when ``None``).
            instruction: Template name (see ``qwen3-rerank templates``) or free text.
            return_documents: Have the server echo each document's text in the hits.

        Returns:
            :class:`RerankHit` objects, highest ``relevance_score`` first.

        Raises:
            RerankServiceError: The service refused the request or could not be reached.
        """
        payload = _rerank_payload(query, documents, top_n, instruction, return_documents, self.model)
        return _parse_rerank(self._post("/v1/rerank", payload))

    def rank(
        self,
        query: str,
        documents: Sequence[str | Mapping[str, Any]],
        top_n: int | None = None,
        instruction: str | None = None,
    ) -> list[RankHit]:
        """``POST /rank``: ``{id, text}`` records (or plain texts, ids = positions) best first, with bands."""
        return _parse_rank(self._post("/rank", _rank_payload(query, documents, top_n, instruction)))

    def health(self) -> dict[str, Any]:
        """``GET /health``; raises :class:`RerankServiceError` (503) while the model loads."""
        return self._get("/health")

    def models(self) -> list[str]:
        """Ids of the served models (``GET /v1/models``)."""
        return [m["id"] for m in self._get("/v1/models")["data"]]

    def close(self) -> None:
        """Close the connection pool (when this client created it)."""
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> RerankClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRerankClient:
    """The asyncio twin of :class:`RerankClient`: same arguments, ``await``-able methods."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        *,
        model: str | None = None,
        http_client: Any = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._owns_client = http_client is None
        self._http = http_client or httpx.AsyncClient(
            base_url=self.base_url, headers=_headers(api_key), timeout=timeout
        )

    async def _post(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            response = await self._http.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _raise_for_status(response)

    async def _get(self, path: str) -> Any:
        try:
            response = await self._http.get(path)
        except httpx.HTTPError as exc:
            raise _unreachable(self.base_url, exc) from exc
        return _raise_for_status(response)

    async def rerank(
        self,
        query: str,
        documents: Sequence[str | Mapping[str, Any]],
        top_n: int | None = None,
        instruction: str | None = None,
        return_documents: bool = False,
    ) -> list[RerankHit]:
        """See :meth:`RerankClient.rerank`."""
        payload = _rerank_payload(query, documents, top_n, instruction, return_documents, self.model)
        return _parse_rerank(await self._post("/v1/rerank", payload))

    async def rank(
        self,
        query: str,
        documents: Sequence[str | Mapping[str, Any]],
        top_n: int | None = None,
        instruction: str | None = None,
    ) -> list[RankHit]:
        """See :meth:`RerankClient.rank`."""
        return _parse_rank(await self._post("/rank", _rank_payload(query, documents, top_n, instruction)))

    async def health(self) -> dict[str, Any]:
        """See :meth:`RerankClient.health`."""
        return await self._get("/health")

    async def models(self) -> list[str]:
        """See :meth:`RerankClient.models`."""
        return [m["id"] for m in (await self._get("/v1/models"))["data"]]

    async def aclose(self) -> None:
        """Close the connection pool (when this client created it)."""
        if self._owns_client:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncRerankClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
