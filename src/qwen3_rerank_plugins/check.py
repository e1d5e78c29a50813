"""Check a ``/v1/rerank`` server against the exact recipe: ``qwen3-rerank check URL --model DIR``.

A fixed battery of cases (package data ``data/check_battery.json``: Chinese and English, with
and without an instruction, control-token strings in documents, empty and whitespace documents,
documents past ``max_length``, duplicates) is sent to any server that speaks the de-facto rerank
API (this project's service, vLLM, llama.cpp's server, Xinference, Infinity). The same cases are
scored by the local exact engine on the same weights. Per case class the report gives the
largest difference in probability and in log-odds, and the rank agreement.

When the server disagrees, the checker scores the same cases the ways known serving bugs do and
names the one that reproduces the server's scores: the chat template missing, the instruction
ignored, the template's suffix truncated, control tokens read from user text, the sigmoid
applied twice, or the other published prompt format.

Example:
    >>> from qwen3_rerank_plugins import get_reranker
    >>> from qwen3_rerank_plugins.check import check_server
    >>> engine = get_reranker("/models/Qwen3-Reranker-0.6B", max_length=8192)  # doctest: +SKIP
    >>> report = check_server("http://127.0.0.1:8000", engine)  # doctest: +SKIP
    >>> print(report.format()); report.passed  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from ._optional import require
from .evaluate import spearman
from .protocol import ScoreGroup, Scorer
from .results import sigmoid
from .templates import DEFAULT_INSTRUCTION, format_body

__all__ = [
    "DEFAULT_TOLERANCE",
    "EXIT_MISMATCH",
    "OTHER_PROMPT_INSTRUCTION",
    "CaseResult",
    "CheckReport",
    "ClassSummary",
    "check_server",
    "load_battery",
    "other_prompt_body",
]

logger = logging.getLogger(__name__)

#: Largest |Δ log-odds| accepted (llama.cpp's server with its default f16 KV cache is ~2e-3 off).
DEFAULT_TOLERANCE = 0.01
#: Exit status of ``qwen3-rerank check`` when the server's scores are beyond the tolerance.
EXIT_MISMATCH = 3
#: The instruction of the other published prompt (Qwen's evaluation scripts).
OTHER_PROMPT_INSTRUCTION = "Given the user query, retrieval the relevant passages"
_P_FLOOR = 1e-12


def other_prompt_body(query: str, document: str) -> str:
    """The other published prompt's user turn: blank lines between the parts, its own instruction."""
    return f"<Instruct>: {OTHER_PROMPT_INSTRUCTION}\n\n<Query>: {query}\n\n<Document>: {document}"


# ---------------------------------------------------------------------------------------------
# The battery
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One request of the battery."""

    id: str
    cls: str
    query: str
    documents: tuple[str, ...]
    instruction: str | None = None


def load_battery(
    max_length: int, count_tokens: Callable[[str], int], path: str | None = None
) -> tuple[dict[str, str], list[Case]]:
    """The battery's classes and its cases, long documents grown past ``max_length`` tokens.

    Args:
        max_length: The prompt budget of the server (and of the local engine).
        count_tokens: Tokens of a text (the local tokenizer).
        path: Another battery file of the same format (default: the packaged one).

    Returns:
        ``(classes, cases)``: class name -> description, and the cases in file order.
    """
    if path is None:
        text = resources.files("qwen3_rerank_plugins").joinpath("data/check_battery.json").read_text("utf-8")
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    data = json.loads(text)
    classes = dict(data["classes"])
    cases = []
    for raw in data["cases"]:
        if raw["class"] not in classes:
            raise ValueError(f"battery case {raw['id']!r} has an unknown class {raw['class']!r}")
        documents = []
        for doc in raw["documents"]:
            if isinstance(doc, Mapping):
                unit = doc["repeat"]
                times = math.ceil(1.25 * max_length / max(1, count_tokens(unit))) + 1
                doc = unit * times
            documents.append(doc)
        cases.append(Case(raw["id"], raw["class"], raw["query"], tuple(documents), raw.get("instruction")))
    return classes, cases


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    """One case: the local exact log-odds and what the server answered.

    Attributes:
        case: The case id.
        cls: Its class.
        expected: The exact engine's log-odds per document (input order).
        got: The server's ``relevance_score`` per document, or ``None`` when it refused the case.
        error: Why the server refused (status and message), else ``None``.
    """

    case: str
    cls: str
    expected: list[float]
    got: list[float] | None
    error: str | None = None

    @property
    def got_logits(self) -> list[float] | None:
        """The server's scores as log-odds (probabilities clamped to [1e-12, 1 - 1e-12])."""
        if self.got is None:
            return None
        return [_logit(p) for p in self.got]


@dataclass(frozen=True)
class ClassSummary:
    """Agreement of one case class."""

    cls: str
    cases: int
    documents: int
    refused: int
    max_abs_prob: float
    max_abs_logit: float
    spearman: float | None
    top1_agreement: float | None
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class CheckReport:
    """What :func:`check_server` found.

    Attributes:
        url: The endpoint checked.
        model: The local model's name, device and dtype.
        max_length: The prompt budget the local engine used.
        tolerance: Largest |Δ log-odds| accepted.
        classes: One summary per case class (battery order).
        passed: Every class within the tolerance (refused cases are listed, not failed).
        cause: The known failure that reproduces the server's scores, or a description of the
            pattern; ``None`` when the check passed.
        hypotheses: Per known failure, the largest |Δ log-odds| between the server and that
            failure simulated locally (only computed when the check failed).
        cases: Every case's numbers.
    """

    url: str
    model: str
    max_length: int
    tolerance: float
    classes: list[ClassSummary]
    passed: bool
    cause: str | None
    hypotheses: dict[str, float] = field(default_factory=dict)
    cases: list[CaseResult] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (per-case numbers included)."""
        return {
            "url": self.url,
            "model": self.model,
            "max_length": self.max_length,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "cause": self.cause,
            "classes": [c.to_dict() for c in self.classes],
            "hypotheses": self.hypotheses,
            "cases": [
                {
                    "case": c.case,
                    "class": c.cls,
                    "expected_logits": c.expected,
                    "got": c.got,
                    "error": c.error,
                }
                for c in self.cases
            ],
        }

    def format(self) -> str:
        """The report as a table, for a terminal."""
        docs = sum(c.documents for c in self.classes)
        lines = [
            f"Server: {self.url}",
            f"Exact engine: {self.model}, max_length {self.max_length}",
            f"Battery: {len(self.cases)} cases, {docs} documents; tolerance {self.tolerance:g} in log-odds",
            "",
            f"{'class':<18}{'cases':>6}{'docs':>6}{'max|Δp|':>11}{'max|Δlog-odds|':>16}"
            f"{'spearman':>10}{'top-1':>7}  status",
        ]
        for c in self.classes:
            rho = "-" if c.spearman is None else f"{c.spearman:.3f}"
            top1 = "-" if c.top1_agreement is None else f"{c.top1_agreement:.2f}"
            status = "ok" if c.passed else "DIFFERS"
            if c.refused:
                status += f" ({c.refused} refused)"
            lines.append(
                f"{c.cls:<18}{c.cases:>6}{c.documents:>6}{c.max_abs_prob:>11.2e}{c.max_abs_logit:>16.2e}"
                f"{rho:>10}{top1:>7}  {status}"
            )
        refused = [c for c in self.cases if c.error]
        if refused:
            lines.append("")
            lines += [f"refused: {c.case}: {c.error}" for c in refused]
        lines.append("")
        if self.passed:
            lines.append("PASS: the server scores every class like the model card's recipe.")
        else:
            lines.append(f"FAIL: the server differs from the model card's recipe. Likely cause: {self.cause}")
            if self.hypotheses:
                tried = ", ".join(f"{name} {delta:.2e}" for name, delta in self.hypotheses.items())
                lines.append(f"Known failures simulated locally (max |Δ log-odds| to the server): {tried}")
        return "\n".join(lines)


def _logit(p: float) -> float:
    p = min(max(float(p), _P_FLOOR), 1 - _P_FLOOR)
    return math.log(p / (1 - p))


# ---------------------------------------------------------------------------------------------
# Talking to the server
# ---------------------------------------------------------------------------------------------


def _endpoint(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"url must start with http:// or https://, got {url!r}")
    return url if url.endswith("/rerank") else f"{url}/v1/rerank"


def _parse_scores(payload: Any, n: int) -> list[float]:
    """Scores by input index from ``{results: [{index, relevance_score}]}`` or a bare list."""
    results = payload.get("results") if isinstance(payload, Mapping) else payload
    if not isinstance(results, list):
        raise ValueError("the response has no 'results' list")
    scores: list[float | None] = [None] * n
    for item in results:
        index = item.get("index")
        value = item.get("relevance_score", item.get("score"))
        if not isinstance(index, int) or not 0 <= index < n or not isinstance(value, (int, float)):
            raise ValueError(f"malformed result {item!r}")
        scores[index] = float(value)
    if any(s is None for s in scores):
        raise ValueError(f"the response scored {sum(s is not None for s in scores)} of {n} documents")
    return [float(s) for s in scores if s is not None]


def _ask_server(
    client: Any, endpoint: str, case: Case, model: str | None
) -> tuple[list[float] | None, str | None]:
    body: dict[str, Any] = {
        "query": case.query,
        "documents": list(case.documents),
        "top_n": len(case.documents),
    }
    if model is not None:
        body["model"] = model
    if case.instruction is not None:
        body["instruction"] = case.instruction
    deadline = time.monotonic() + client.timeout.read if client.timeout.read else time.monotonic()
    response = client.post(endpoint, json=body)
    while response.status_code == 503 and time.monotonic() < deadline:
        time.sleep(1.0)  # a server that is still loading its model says so with 503
        response = client.post(endpoint, json=body)
    if 400 <= response.status_code < 500:
        detail = response.text.strip().replace("\n", " ")[:200]
        return None, f"HTTP {response.status_code}: {detail}"
    response.raise_for_status()
    return _parse_scores(response.json(), len(case.documents)), None


# ---------------------------------------------------------------------------------------------
# Known failures, simulated on the local weights
# ---------------------------------------------------------------------------------------------


def _raw_scorer(reranker: Any) -> Callable[[list[list[int]]], list[float]] | None:
    """Log-odds of whole token-id prompts on the reranker's own model, or ``None`` when the
    reranker is not a local engine."""
    core = getattr(reranker, "_core", None)
    if core is None:
        return None
    from .backend import Row, score_rows

    def run(prompts: list[list[int]]) -> list[float]:
        rows = [Row(ids, -1, i) for i, ids in enumerate(prompts)]
        logits, _ = score_rows(
            core,
            [],
            rows,
            len(rows),
            batch_tokens=reranker.batch_tokens,
            max_batch_size=reranker.max_batch_size,
        )
        return logits

    return run


def _hypotheses(
    reranker: Any, cases: Sequence[Case], expected: Sequence[list[float]]
) -> dict[str, list[list[float]]]:
    """Per known failure, the log-odds a server with that failure would return, per case."""
    out: dict[str, list[list[float]]] = {}
    out["sigmoid applied twice"] = [[_logit(sigmoid(sigmoid(z))) for z in zs] for zs in expected]
    ignored = reranker.score_groups(
        [ScoreGroup(c.query, list(c.documents), DEFAULT_INSTRUCTION) for c in cases]
    )
    out["instruction ignored"] = [g.logits for g in ignored]
    raw = _raw_scorer(reranker)
    if raw is None:
        logger.info("not a local engine: the prompt-level failures are not simulated")
        return out
    core, max_length = reranker._core, reranker.max_length
    tokenizer = reranker.tokenizer
    prefix, suffix = core.prefix_ids, core.suffix_ids
    budget = max_length - len(prefix) - len(suffix)

    def prompts(build: Callable[[Case, str], list[int]]) -> list[list[float]]:
        flat = [build(c, d) for c in cases for d in c.documents]
        scores = raw(flat)
        result, start = [], 0
        for c in cases:
            result.append(scores[start : start + len(c.documents)])
            start += len(c.documents)
        return result

    def instruction(c: Case) -> str:
        return c.instruction if c.instruction is not None else reranker.instruction or DEFAULT_INSTRUCTION

    def body_ids(c: Case, d: str) -> list[int]:
        return core.encode_plain([format_body(instruction(c), c.query, d)])[0]

    out["template missing"] = prompts(lambda c, d: body_ids(c, d)[:max_length])
    out["suffix truncated"] = prompts(lambda c, d: (prefix + body_ids(c, d) + suffix)[:max_length])
    out["control tokens read from user text"] = prompts(
        lambda c, d: (
            prefix
            + tokenizer.encode(format_body(instruction(c), c.query, d), add_special_tokens=False)[:budget]
            + suffix
        )
    )
    out["the other published prompt format"] = prompts(
        lambda c, d: prefix + core.encode_plain([other_prompt_body(c.query, d)])[0][:budget] + suffix
    )
    return out


def _pattern(classes: Sequence[ClassSummary], results: Sequence[CaseResult]) -> str:
    """A description of how the server differs when no known failure reproduces it."""
    got = [p for r in results if r.got for p in r.got]
    if got and max(got) - min(got) < 1e-9:
        return (
            f"every score is {got[0]:.4g}: the server does not read the yes/no logits (model loaded wrongly?)"
        )
    failing = {c.cls for c in classes if not c.passed}
    only = {
        "past_max_length": "only documents past max_length differ: the server truncates differently "
        "(the template's suffix cut, or another max_length: pass the server's with --max-length)",
        "special_tokens": "only documents with control-token strings differ: "
        "control tokens read from user text",
        "instruction_given": "only cases with an instruction differ: "
        "the instruction is ignored or placed differently",
        "empty_whitespace": "only empty or whitespace documents differ: the server rewrites them",
    }
    if len(failing) == 1 and next(iter(failing)) in only:
        return only[next(iter(failing))]
    rhos = [c.spearman for c in classes if c.spearman is not None]
    if rhos and min(rhos) > 0.99:
        return (
            "every class differs but the order agrees: a monotone change of the scores "
            "(another dtype or quantisation, a calibration, or a different model revision)"
        )
    return (
        "every class differs and no known failure reproduces it: another model or weights, "
        "or another prompt (template missing or a different format)"
    )


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------


def check_server(
    url: str,
    reranker: Scorer,
    *,
    model: str | None = None,
    api_key: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    timeout: float = 120.0,
    battery: str | None = None,
) -> CheckReport:
    """Send the battery to ``url`` and compare with the exact local engine on the same weights.

    Args:
        url: The server's base URL (``/v1/rerank`` is added) or its full rerank endpoint.
        reranker: The local exact engine, loaded from the same weights the server serves and with
            the server's ``max_length``.
        model: The ``model`` field to send (some servers require their served name).
        api_key: Sent as ``Authorization: Bearer <api_key>``.
        tolerance: Largest |Δ log-odds| accepted in any class.
        timeout: Seconds per request.
        battery: Another battery file (default: the packaged one).

    Returns:
        A :class:`CheckReport`; ``passed`` is false beyond the tolerance, and ``cause`` then
        names the likely cause.

    Raises:
        ValueError: A malformed URL or response, or a bad tolerance.
        httpx.HTTPError: The server cannot be reached or answers 5xx.
    """
    httpx = require("httpx", "server", "The server checker")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a number > 0, got {tolerance!r}")
    endpoint = _endpoint(url)
    max_length = int(getattr(reranker, "max_length", 8192))
    tokenizer = getattr(reranker, "tokenizer", None)

    def count_tokens(text: str) -> int:
        if tokenizer is None:
            return len(text)  # at least one token per character is never less than needed
        return len(tokenizer.encode(text, add_special_tokens=False))

    classes, cases = load_battery(max_length, count_tokens, battery)
    scored = reranker.score_groups([ScoreGroup(c.query, list(c.documents), c.instruction) for c in cases])
    expected = [g.logits for g in scored]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    results = []
    with httpx.Client(timeout=timeout, headers=headers) as client:
        for case, exp in zip(cases, expected, strict=True):
            got, error = _ask_server(client, endpoint, case, model)
            results.append(CaseResult(case.id, case.cls, exp, got, error))
            logger.debug("case %s: expected %s, got %s", case.id, exp, got)

    summaries = [_summary(cls, [r for r in results if r.cls == cls], tolerance) for cls in classes]
    passed = all(s.passed for s in summaries)
    cause, tried = None, {}
    if not passed:
        simulated = _hypotheses(reranker, cases, expected)
        for name, logits in simulated.items():
            deltas = [
                abs(g - h)
                for r, hyp in zip(results, logits, strict=True)
                if r.got_logits is not None
                for g, h in zip(r.got_logits, hyp, strict=True)
            ]
            tried[name] = max(deltas, default=math.inf)
        matches = sorted((delta, name) for name, delta in tried.items() if delta <= tolerance)
        if matches:
            delta, name = matches[0]
            cause = f"{name} (the server's scores match that failure simulated locally within {delta:.1e})"
        else:
            cause = _pattern(summaries, results)
    return CheckReport(
        url=endpoint,
        model=f"{reranker.model_name} on {reranker.device} ({str(reranker.dtype).removeprefix('torch.')})",
        max_length=max_length,
        tolerance=float(tolerance),
        classes=summaries,
        passed=passed,
        cause=cause,
        hypotheses=tried,
        cases=results,
    )


def _summary(cls: str, results: Sequence[CaseResult], tolerance: float) -> ClassSummary:
    answered = [r for r in results if r.got is not None]
    dp = [abs(sigmoid(e) - g) for r in answered for e, g in zip(r.expected, r.got or [], strict=True)]
    dz = [abs(e - g) for r in answered for e, g in zip(r.expected, r.got_logits or [], strict=True)]
    rhos, tops = [], []
    for r in answered:
        got = r.got_logits or []
        rho = spearman(r.expected, got)
        if rho is not None:
            rhos.append(rho)
        if len(r.expected) > 1:
            best = max(range(len(got)), key=lambda i: (got[i], -i))
            tops.append(1.0 if r.expected[best] == max(r.expected) else 0.0)
    max_dz = max(dz, default=0.0)
    return ClassSummary(
        cls=cls,
        cases=len(results),
        documents=sum(len(r.expected) for r in results),
        refused=len(results) - len(answered),
        max_abs_prob=max(dp, default=0.0),
        max_abs_logit=max_dz,
        spearman=statistics.fmean(rhos) if rhos else None,
        top1_agreement=statistics.fmean(tops) if tops else None,
        passed=max_dz <= tolerance,
    )


# ---------------------------------------------------------------------------------------------
# Command line (registered by cli.py)
# ---------------------------------------------------------------------------------------------


def add_check_arguments(parser: Any) -> None:
    """The ``check`` command's own options (the model options come from the shared group)."""
    parser.add_argument("url", help="the server's base URL (/v1/rerank is added) or its rerank endpoint")
    parser.add_argument("--server-model", help="the 'model' field to send (the server's served name)")
    parser.add_argument("--api-key", help="bearer key of the server")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"largest |Δ log-odds| accepted (default: {DEFAULT_TOLERANCE})",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    parser.add_argument("--battery", help="another battery file of the packaged format")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run_check(args: Any, reranker: Scorer) -> int:
    """Run the ``check`` command on a loaded reranker; returns the exit status (0 or
    :data:`EXIT_MISMATCH`)."""
    report = check_server(
        args.url,
        reranker,
        model=args.server_model,
        api_key=args.api_key,
        tolerance=args.tolerance,
        timeout=args.timeout,
        battery=args.battery,
    )
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2))
    else:
        print(report.format())
    return 0 if report.passed else EXIT_MISMATCH
