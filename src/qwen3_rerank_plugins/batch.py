"""Rank many queries from JSONL records, one JSONL ranking per record, with resume.

The job behind ``qwen3-rerank batch``, callable from Python: :func:`rank_jsonl` reads records
``{"query", "documents" | "candidates", "id"?, "instruction"?, "top_n"?}`` (a document is a
string or an object with a ``text`` string: :func:`~qwen3_rerank_plugins.validation.document_text`)
and writes, in input order, one line per record::

    {"id": ..., "line": N, "results": [{"index", "id"?, "score", "band"}, ...]}

best first. Records are scored in chunks of whole records, many queries per engine call (the
engine batches across queries and encodes each query's prefix once); each chunk's lines are
written and flushed as soon as it is scored, so a killed run loses at most one chunk and
``resume=True`` goes on where it stopped. Plain Python over the
:class:`~qwen3_rerank_plugins.protocol.Scorer` protocol: a local engine or a
:class:`~qwen3_rerank_plugins.remote.RemoteReranker` both work.

Example:
    >>> from qwen3_rerank_plugins import get_reranker
    >>> from qwen3_rerank_plugins.batch import rank_jsonl
    >>> summary = rank_jsonl(get_reranker(), "tickets.jsonl", "ranked.jsonl", resume=True)  # doctest: +SKIP
    >>> summary.records, summary.skipped, summary.bad  # doctest: +SKIP
    (120, 80, [])
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from .protocol import ScoreGroup, Scorer
from .results import ConfidenceBands, rank_results
from .templates import InstructionTemplate, resolve_instruction
from .validation import check_positive_int, check_top_n, document_text

__all__ = ["DEFAULT_CHUNK_PAIRS", "BatchError", "BatchSummary", "finished_records", "rank_jsonl"]

logger = logging.getLogger(__name__)

#: Pairs scored in one engine call (records are never split).
DEFAULT_CHUNK_PAIRS = 512

_RECORD_FIELDS = frozenset({"id", "query", "documents", "candidates", "instruction", "top_n"})

#: What a resumed run matches finished records by: ``("id", id)``, else ``("line", number)``.
RecordKey = tuple[str, Any]


class BatchError(ValueError):
    """The job cannot go on: a bad record with ``on_error="stop"``, unreadable input, or an
    output to resume that this job did not write. The message names the file and line."""


@dataclass
class BatchSummary:
    """What :func:`rank_jsonl` did.

    Attributes:
        records: Records ranked and written by this run.
        pairs: (query, document) pairs scored.
        skipped: Records already in the output (``resume=True``), not scored again.
        seconds: Time spent scoring (reading and writing excluded).
        bad: Line numbers of the bad records skipped (``on_error="skip"``); each was logged as
            an ERROR naming what is wrong with it.
    """

    records: int = 0
    pairs: int = 0
    skipped: int = 0
    seconds: float = 0.0
    bad: list[int] = field(default_factory=list)


class _BadRecord(ValueError):
    """An input line that is not a batch record; the message says what is wrong with it."""


@dataclass(frozen=True)
class _BatchRecord:
    line: int
    id: str | int | None
    query: str
    documents: list[Any]
    texts: list[str]
    instruction: str | None
    top_n: int | None

    @property
    def key(self) -> RecordKey:
        return ("id", self.id) if self.id is not None else ("line", self.line)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _parse_record(line: int, text: str, checked_instructions: set[str]) -> _BatchRecord:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadRecord(f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {_json_type(record)}")
    unknown = sorted(set(record) - _RECORD_FIELDS)
    if unknown:
        raise _BadRecord(
            f"unknown field {unknown[0]!r}"
            " (a record has query, documents or candidates, id, instruction, top_n)"
        )
    rid = record.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise _BadRecord(f"'id' must be a string or an integer, got {_json_type(rid)}")
    query = record.get("query")
    if not isinstance(query, str) or not query.strip():
        raise _BadRecord("'query' must be a non-empty string" if "query" in record else "no 'query'")
    if "documents" in record and "candidates" in record:
        raise _BadRecord("give 'documents' or 'candidates', not both")
    key = "candidates" if "candidates" in record else "documents"
    if key not in record:
        raise _BadRecord("no 'documents' (or 'candidates'): a list of strings or {\"text\": ...} objects")
    docs = record[key]
    if not isinstance(docs, list) or not docs:
        raise _BadRecord(f"'{key}' must be a non-empty list of strings or {{\"text\": ...}} objects")
    texts = []
    for i, doc in enumerate(docs):
        try:
            texts.append(document_text(doc, f"{key}[{i}]"))  # the one document rule
        except (TypeError, ValueError):
            raise _BadRecord(f"'{key}[{i}]' must be a string or an object with a string 'text'") from None
    instruction = record.get("instruction")
    if instruction is not None:
        if not isinstance(instruction, str):
            raise _BadRecord(f"'instruction' must be a string, got {_json_type(instruction)}")
        if instruction not in checked_instructions:  # checked, and any typo warning logged, once
            try:
                resolve_instruction(instruction)
            except ValueError as exc:
                raise _BadRecord(f"'instruction': {exc}") from None
            checked_instructions.add(instruction)
    top_n = record.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n <= 0):
        raise _BadRecord(f"'top_n' must be a positive integer, got {json.dumps(top_n)}")
    return _BatchRecord(line, rid, query, docs, texts, instruction, top_n)


def finished_records(path: str | os.PathLike[str]) -> set[RecordKey]:
    """Keys of the records a previous run wrote to ``path`` (empty when it does not exist).

    A half-written last line (a run killed while writing it) is cut off the file and logged
    as a WARNING; that record is redone.

    Raises:
        BatchError: A line of ``path`` is not a ranking written by this job.
    """
    path = Path(path)
    done: set[RecordKey] = set()
    if not path.is_file():
        return done
    end = 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.endswith(b"\n"):
                logger.warning("%s: line %d was left half-written; it is dropped and redone", path, number)
                break
            try:
                row = json.loads(raw)
                key = ("id", row["id"]) if row["id"] is not None else ("line", int(row["line"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise BatchError(
                    f"{path} line {number} is not a ranking written by 'qwen3-rerank batch' ({exc})"
                ) from exc
            done.add(key)
            end += len(raw)
    if end < path.stat().st_size:
        with path.open("rb+") as fh:
            fh.truncate(end)
    return done


def _score_records(reranker: Any, chunk: list[_BatchRecord], instruction: str | None) -> list[list[float]]:
    """Log-odds of every record's documents, the whole chunk in one engine call."""
    score_groups = getattr(reranker, "score_groups", None)
    if score_groups is not None:
        texts: dict[str, str] = {}  # each distinct instruction resolved once
        groups = []
        for r in chunk:
            name = r.instruction or instruction
            if name is not None and name not in texts:
                texts[name] = resolve_instruction(name)
            groups.append(ScoreGroup(r.query, r.texts, None if name is None else texts[name]))
        return [list(scores.logits) for scores in score_groups(groups, show_progress=False)]
    # A scorer without the group primitive: one score_pairs call per instruction in the chunk.
    by_instruction: dict[str | None, list[int]] = {}
    for k, record in enumerate(chunk):
        by_instruction.setdefault(record.instruction or instruction, []).append(k)
    logits: list[list[float]] = [[] for _ in chunk]
    for instr, members in by_instruction.items():
        pairs = [(chunk[k].query, text) for k in members for text in chunk[k].texts]
        flat = reranker.score_pairs(pairs, instr, return_logits=True, show_progress=False)
        start = 0
        for k in members:
            logits[k] = flat[start : start + len(chunk[k].texts)]
            start += len(chunk[k].texts)
    return logits


def _ranking_line(
    record: _BatchRecord, logits: list[float], bands: ConfidenceBands, top_n: int | None
) -> str:
    results = []
    for r in rank_results(logits, record.documents, bands=bands, top_n=record.top_n or top_n):
        item: dict[str, Any] = {"index": r.index}
        if isinstance(r.document, dict) and "id" in r.document:
            item["id"] = r.document["id"]
        item["score"] = r.score
        item["band"] = r.band
        results.append(item)
    return json.dumps({"id": record.id, "line": record.line, "results": results}, ensure_ascii=False)


def _numbered_lines(source: Iterable[str], where: str) -> Iterator[tuple[int, str]]:
    number = 0
    try:
        for number, text in enumerate(source, start=1):
            yield number, text
    except UnicodeDecodeError as exc:
        raise BatchError(f"{where} is not UTF-8 text (after line {number}): {exc.reason}") from exc


def _count_records(path: Path) -> int | None:
    try:
        with path.open("rb") as fh:
            return sum(1 for raw in fh if raw.strip())
    except OSError:
        return None


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike))


def rank_jsonl(
    reranker: Scorer,
    source: str | os.PathLike[str] | Iterable[str],
    output: str | os.PathLike[str] | IO[str],
    *,
    instruction: str | InstructionTemplate | None = None,
    top_n: int | None = None,
    chunk_pairs: int = DEFAULT_CHUNK_PAIRS,
    on_error: Literal["skip", "stop"] = "skip",
    resume: bool = False,
    progress: bool = False,
    name: str | None = None,
) -> BatchSummary:
    """Rank every JSONL record of ``source`` and write one JSONL ranking per record to ``output``.

    Args:
        reranker: Any :class:`~qwen3_rerank_plugins.protocol.Scorer` (local engine or remote);
            its ``bands`` label the results.
        source: A JSONL file (path), or an open text stream / any iterable of lines. Blank lines
            are skipped but counted: ``line`` in the output is the record's line number.
        output: A file path (written, or appended to with ``resume``) or an open text stream.
        instruction: Instruction of records that give none (template name or free text).
        top_n: Keep the best N of records that give no ``top_n`` (``None``: all).
        chunk_pairs: (query, document) pairs scored per engine call, in whole records.
        on_error: A bad record: ``"skip"`` logs it as an ERROR with its line number and goes on
            (its line lands in :attr:`BatchSummary.bad`); ``"stop"`` writes what came before it
            and raises :class:`BatchError`.
        resume: Append to ``output`` (a path), skipping the records already in it (by ``id``;
            records without one by line number); a half-written last line is redone.
        progress: Show a progress bar (tqdm) on stderr.
        name: What to call ``source`` in messages (default: its path, or ``"stdin"``).

    Returns:
        A :class:`BatchSummary`; the totals are also logged at INFO.

    Raises:
        BatchError: A bad record with ``on_error="stop"``, input that is not UTF-8, or an
            ``output`` to resume that is not this job's.
        TypeError, ValueError: A malformed argument (before anything is read).
        OSError: ``source`` or ``output`` cannot be opened.

    Example:
        >>> summary = rank_jsonl(reranker, "tickets.jsonl", "ranked.jsonl", top_n=5)  # doctest: +SKIP
    """
    check_top_n(top_n)
    check_positive_int(chunk_pairs, "chunk_pairs")
    if on_error not in ("skip", "stop"):
        raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
    if instruction is not None:
        instruction = resolve_instruction(instruction)
    if resume and not _is_path(output):
        raise ValueError("resume=True needs output to be a file path: the file to continue")
    where = name or (os.fspath(source) if _is_path(source) else "stdin")
    done = finished_records(output) if resume else set()  # type: ignore[arg-type]
    with contextlib.ExitStack() as stack:
        if _is_path(source):
            lines: Iterable[str] = stack.enter_context(open(source, encoding="utf-8"))
        else:
            lines = source  # type: ignore[assignment]
        if _is_path(output):
            sink: IO[str] = stack.enter_context(open(output, "a" if resume else "w", encoding="utf-8"))
        else:
            sink = output  # type: ignore[assignment]
        total = _count_records(Path(source)) if progress and _is_path(source) else None  # type: ignore[arg-type]
        bar = _progress_bar(stack, progress, total)
        summary = BatchSummary()
        _run(
            reranker,
            _numbered_lines(lines, where),
            where,
            done,
            sink,
            bar,
            summary,
            instruction=instruction,
            top_n=top_n,
            chunk_pairs=chunk_pairs,
            on_error=on_error,
        )
    logger.info(
        "Ranked %d records (%d pairs) in %.1f s (%.0f pairs/s)%s",
        summary.records,
        summary.pairs,
        summary.seconds,
        summary.pairs / summary.seconds if summary.seconds > 0 else 0.0,
        f"; {summary.skipped} were already in {os.fspath(output)}" if resume else "",  # type: ignore[arg-type]
    )
    return summary


def _progress_bar(stack: contextlib.ExitStack, show: bool, total: int | None) -> Any:
    from tqdm.auto import tqdm

    options = {"unit": "record", "desc": "Ranking", "file": sys.stderr, "dynamic_ncols": True}
    bar = stack.enter_context(tqdm(total=total, disable=not show, **options))
    if show:
        from tqdm.contrib.logging import logging_redirect_tqdm

        stack.enter_context(logging_redirect_tqdm())
    return bar


def _run(
    reranker: Any,
    lines: Iterable[tuple[int, str]],
    where: str,
    done: set[RecordKey],
    sink: IO[str],
    bar: Any,
    summary: BatchSummary,
    *,
    instruction: str | None,
    top_n: int | None,
    chunk_pairs: int,
    on_error: str,
) -> None:
    chunk: list[_BatchRecord] = []
    pending_pairs = 0
    checked_instructions: set[str] = set()

    def flush() -> None:
        nonlocal chunk, pending_pairs
        if not chunk:
            return
        start = time.perf_counter()
        logits = _score_records(reranker, chunk, instruction)
        summary.seconds += time.perf_counter() - start
        lines = [_ranking_line(r, lg, reranker.bands, top_n) for r, lg in zip(chunk, logits, strict=True)]
        sink.write("".join(line + "\n" for line in lines))
        sink.flush()
        summary.records += len(chunk)
        summary.pairs += pending_pairs
        bar.update(len(chunk))
        chunk, pending_pairs = [], 0

    for number, text in lines:
        if not text.strip():
            continue
        try:
            record = _parse_record(number, text, checked_instructions)
        except _BadRecord as exc:
            if on_error == "stop":
                flush()
                raise BatchError(f"{where} line {number}: {exc}") from None
            logger.error("%s line %d: %s (skipped)", where, number, exc)
            summary.bad.append(number)
            bar.update(1)
            continue
        if record.key in done:
            summary.skipped += 1
            bar.update(1)
            continue
        chunk.append(record)
        pending_pairs += len(record.texts)
        if pending_pairs >= chunk_pairs:
            flush()
    flush()
