"""The ``qwen3-rerank`` command line (also ``python -m qwen3_rerank_plugins``).

Commands:

* ``rank``: rank documents (one per line, from a file or stdin) for a query; table or JSON.
* ``batch``: rank many queries (JSONL records from a file or stdin), one JSONL ranking per record
  (the job is :func:`qwen3_rerank_plugins.batch.rank_jsonl`, callable from Python).
* ``serve``: the HTTP rerank service (extra ``[server]``).
* ``ui``: the web page (extra ``[ui]``).
* ``templates``: list the named instruction templates.
* ``evaluate``: hit@k, MRR@10 and nDCG@10 before and after reranking, or several instructions,
  dtypes or models compared with bootstrap intervals
  (:mod:`qwen3_rerank_plugins.evaluate` holds the evaluation itself).
* ``check``: a ``/v1/rerank`` server against the exact recipe (:mod:`qwen3_rerank_plugins.check`).

This module only parses and dispatches: each command is an ``_add_<name>(subparsers, shared)``
function listed in :data:`COMMANDS` (add a command by adding one there) whose ``func`` calls
library functions a Python user can call too; logging setup and the model-not-found advice live
in :mod:`qwen3_rerank_plugins.console`. The option groups several commands share (model,
confidence bands, logging) are built once as parent parsers; each command adds only its own
options.

Errors end the command with ``error: <one line>`` on stderr and exit status 1 (2 for usage
errors, 130 when interrupted, 141 when the reader of stdout went away); a model that cannot be
found is followed by the command lines to type instead. ``--verbose`` adds the traceback to the log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .batch import DEFAULT_CHUNK_PAIRS
from .cache import DEFAULT_CACHE_TTL_S
from .console import command_logging, model_not_found_advice, one_line
from .evaluate import FIRST_STAGES
from .notices import notices_logged_only
from .results import ConfidenceBands
from .server_defaults import (
    API_KEY_ENV,
    DEFAULT_BATCH_WAIT_MS,
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_CACHE_SIZE,
    DEFAULT_GRACEFUL_TIMEOUT_S,
    DEFAULT_HOST,
    DEFAULT_MAX_BATCH_PAIRS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_DOCUMENTS,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_QUEUE_WAIT_S,
    DEFAULT_MAX_REQUEST_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_PORT,
    DEFAULT_UI_PORT,
    ServiceConfig,
    api_key_from_env,
)
from .settings import DEFAULT_MAX_LENGTH
from .sources import ModelSourceError
from .templates import list_instruction_templates, resolve_instruction

__all__ = ["DEFAULT_MODEL", "CommandError", "add_model_arguments", "build_parser", "load_reranker", "main"]

logger = logging.getLogger("qwen3_rerank_plugins.cli")

_DEMO_WARNING = (
    "Using the local demo model with RANDOM weights: the pipeline is real, the scores are meaningless. "
    "Pass --model for real scores."
)


class CommandError(Exception):
    """A user error the command reports as ``error: <message>`` (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors take one line (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- shared options and model loading --------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` or ``--demo``, ``--device``, ``--dtype``, ``--source``, ``--max-length``.

    ``--model`` and ``--demo`` exclude each other (checked by :func:`main` after parsing: an
    argparse mutually exclusive group would lose its place in the help of the commands that
    inherit it); ``--model`` is ``None`` when not given.
    """
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        help=f"hub id (Hugging Face / ModelScope) or local directory (default: {DEFAULT_MODEL})",
    )
    group.add_argument(
        "--demo",
        action="store_true",
        help="use a tiny demo model built locally with random weights (offline; scores are meaningless)",
    )
    group.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps"
    )
    group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 or int8 (CPU)")
    group.add_argument(
        "--source",
        default="auto",
        choices=["auto", "local", "huggingface", "modelscope"],
        help="where to get the model (default: a local directory, else Hugging Face, else ModelScope)",
    )
    group.add_argument(
        "--max-length",
        type=_positive_int,
        default=DEFAULT_MAX_LENGTH,
        help=f"prompt tokens per pair (default: {DEFAULT_MAX_LENGTH})",
    )
    group.add_argument(
        "--long-documents",
        action="store_true",
        help="read a document longer than --max-length in overlapping windows and score it by its best one"
        " (default: cut it where the budget ends, as the model card does)",
    )


def _verbosity_arguments(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``-v/--verbose`` and ``--quiet``, accepted before and after the command name."""
    # A command's own copy must not reset what was given before the command name.
    default = False if top_level else argparse.SUPPRESS
    group = parser.add_argument_group("logging") if not top_level else parser
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logging, tracebacks on errors"
    )
    group.add_argument("--quiet", action="store_true", default=default, help="log warnings and errors only")


def _bands_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("confidence bands")
    group.add_argument(
        "--band-high", type=_probability, default=0.85, help="score for the high band (default: 0.85)"
    )
    group.add_argument(
        "--band-medium", type=_probability, default=0.70, help="score for the medium band (default: 0.70)"
    )


#: Options that exclude each other, as (dest, dest); checked after parsing.
_EXCLUSIVE = (("model", "demo"), ("verbose", "quiet"))


@dataclass(frozen=True)
class _SharedOptions:
    """The option groups several commands inherit, each built once (argparse parent parsers)."""

    model: argparse.ArgumentParser
    bands: argparse.ArgumentParser
    logging: argparse.ArgumentParser

    @classmethod
    def build(cls) -> _SharedOptions:
        def parent(add: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
            parser = argparse.ArgumentParser(add_help=False)
            add(parser)
            return parser

        return cls(
            model=parent(add_model_arguments),
            bands=parent(_bands_arguments),
            logging=parent(_verbosity_arguments),
        )


def _listen_arguments(parser: argparse.ArgumentParser, *, port: int, host_help: str) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"{host_help} (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=_port, default=port, help=f"TCP port (default: {port})")


def _bands(args: argparse.Namespace) -> ConfidenceBands:
    try:
        return ConfidenceBands(high=args.band_high, medium=args.band_medium)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc


def load_reranker(args: argparse.Namespace, *, model: Any = None, **settings: Any) -> Any:
    """Load the reranker the model options ask for, and log what it runs on.

    Args:
        args: Parsed arguments with the options of :func:`add_model_arguments`.
        model: Load this model instead of the one ``--model`` / ``--demo`` names.
        **settings: Further :class:`~qwen3_rerank_plugins.Reranker` settings.
    """
    from . import get_reranker

    if model is None:
        model = _model_path(args)
    start = time.perf_counter()
    reranker = get_reranker(
        model,
        device=args.device,
        dtype=args.dtype,
        source=args.source,
        max_length=args.max_length,
        **({"long_documents": True} if getattr(args, "long_documents", False) else {}),
        **settings,
    )
    logger.info(
        "Model %s on %s (%s), loaded in %.1f s",
        reranker.model_name,
        reranker.device,
        str(reranker.dtype).removeprefix("torch."),
        time.perf_counter() - start,
    )
    return reranker


def _model_path(args: argparse.Namespace) -> Any:
    if getattr(args, "demo", False):
        from .demo import demo_model_dir

        logger.warning(_DEMO_WARNING)
        return demo_model_dir("tiny")
    return args.model if args.model is not None else DEFAULT_MODEL


def _check_options(args: argparse.Namespace) -> None:
    """Fail before any loading (or before a server starts) on a bad device, dtype or instruction."""
    from .device import resolve_device, resolve_dtype

    resolve_dtype(args.dtype, resolve_device(args.device))
    if getattr(args, "instruction", None) is not None:
        resolve_instruction(args.instruction)


def _check_port_free(host: str, port: int) -> None:
    """Fail at once, before a model loads, when ``host:port`` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        # As uvicorn binds: a port left in TIME_WAIT by a previous run is free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CommandError(_port_taken(host, port, exc.strerror or str(exc))) from exc


def _port_taken(host: str, port: int, reason: str) -> str:
    return f"cannot listen on {host}:{port}: {reason} (choose another port with --port)"


# -- rank ----------------------------------------------------------------------------------------


def _read_documents(source: str | None) -> list[str]:
    if source is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise CommandError("no documents: pass --docs FILE (one document per line) or pipe them on stdin")
        source = "-"
    if source == "-":
        text = sys.stdin.read()
        where = "stdin"
    else:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError as exc:
            raise CommandError(f"documents file not found: {source}") from exc
        except IsADirectoryError as exc:
            raise CommandError(f"documents file is a directory: {source}") from exc
        except UnicodeDecodeError as exc:
            raise CommandError(f"documents file {source} is not UTF-8 text: {exc}") from exc
        where = source
    docs = [line.strip() for line in text.splitlines() if line.strip()]
    if not docs:
        raise CommandError(f"no documents in {where}: expected one document per line")
    return docs


def _display_width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _clip(text: str, width: int) -> str:
    if _display_width(text) <= width:
        return text
    out, used = [], 0
    for ch in text:
        w = 2 if unicodedata.east_asian_width(ch) in "WF" else 1
        if used + w > width - 1:
            break
        out.append(ch)
        used += w
    return "".join(out) + "…"


def _cmd_rank(args: argparse.Namespace) -> int:
    if not args.query.strip():
        raise CommandError("--query must not be empty")
    docs = _read_documents(args.docs)
    _check_options(args)
    reranker = load_reranker(args, bands=_bands(args), cache=_score_cache(args))
    start = time.perf_counter()
    results = reranker.rerank(args.query, docs, top_n=args.top_n, instruction=args.instruction)
    seconds = time.perf_counter() - start
    logger.info("Ranked %d documents in %.1f ms", len(docs), seconds * 1000)
    _log_cache(reranker)
    if args.json:
        payload = {
            "model": reranker.model_name,
            "query": args.query,
            "instruction": args.instruction,
            "results": [{"rank": rank, **r.to_dict()} for rank, r in enumerate(results, start=1)],
        }
        print(json.dumps(payload, ensure_ascii=False, indent=2))
        return 0
    width = max(20, _terminal_width() - 26)
    print(f"{'rank':>4}  {'score':>6}  {'band':<6}  document")
    for rank, r in enumerate(results, start=1):
        print(f"{rank:>4}  {r.score:6.4f}  {r.band:<6}  {_clip(r.text, width)}")
    return 0


def _terminal_width() -> int:
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):
        return 120


# -- batch ---------------------------------------------------------------------------------------


def _batch_source(path: str | None) -> tuple[Any, str]:
    """The input of ``batch``: a checked file path, or stdin when piped."""
    if path is None or path == "-":
        if path is None and (sys.stdin is None or sys.stdin.isatty()):
            raise CommandError("no input: pass a JSONL file or pipe records on stdin")
        return sys.stdin, "stdin"
    if not os.path.exists(path):
        raise CommandError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise CommandError(f"input file is a directory: {path}")
    return path, path


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import BatchError, finished_records, rank_jsonl

    if args.resume and args.output is None:
        raise CommandError("--resume needs --output FILE: the file to continue")
    same = args.output is not None and args.input not in (None, "-")
    if same and Path(args.output).resolve() == Path(args.input).resolve():
        raise CommandError("--output must not be the input file")
    _check_options(args)
    bands = _bands(args)
    source, where = _batch_source(args.input)
    if args.resume:  # a file that is not this job's fails before the model loads
        try:
            finished_records(args.output)
        except BatchError as exc:
            raise CommandError(f"--resume: {exc}") from exc
    show = args.progress if args.progress is not None else not args.quiet and sys.stderr.isatty()
    reranker = load_reranker(args, bands=bands, cache=_score_cache(args))
    summary = rank_jsonl(
        reranker,
        source,
        args.output if args.output is not None else sys.stdout,
        instruction=args.instruction,
        top_n=args.top_n,
        chunk_pairs=args.chunk_pairs,
        on_error=args.on_error,
        resume=args.resume,
        progress=show,
        name=where,
    )
    _log_cache(reranker)
    if summary.bad:
        shown = ", ".join(map(str, summary.bad[:10])) + (", ..." if len(summary.bad) > 10 else "")
        raise CommandError(f"{len(summary.bad)} bad record(s) skipped: {where} line {shown}")
    if not (summary.records or summary.skipped):
        raise CommandError(f"no records in {where}: expected one JSON object per line")
    return 0


# -- serve ---------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    _check_options(args)
    if args.api_key is not None and not args.api_key.strip():
        raise CommandError("--api-key must not be empty")
    config = _service_config(args)
    if args.ray:
        return _serve_on_ray(args, config)
    ray_only = [f"--{name.replace('_', '-')}" for name in _RAY_OPTIONS if getattr(args, name) is not None]
    if ray_only:
        raise CommandError(f"{', '.join(ray_only)} only apply with --ray")
    _check_port_free(args.host, args.port)
    settings: dict[str, Any] = {}
    if args.instruction is not None:
        settings["instruction"] = args.instruction
    # Resolve the demo model before the server starts, so its warning comes first.
    model = _model_path(args)

    def factory() -> Any:
        return load_reranker(args, model=model, **settings)

    logger.info(
        "Starting the rerank service on http://%s:%d (API key %s)",
        args.host,
        args.port,
        "required" if config.api_key else "not required",
    )
    try:
        serve(
            factory,
            config,
            host=args.host,
            port=args.port,
            graceful_timeout=args.graceful_timeout,
            access_log=not args.no_access_log,
        )
    except SystemExit as exc:  # uvicorn exits this way when it cannot start
        if exc.code not in (0, None):
            raise CommandError(
                f"could not start the server on {args.host}:{args.port} (see the log above)"
            ) from exc
    return 0


def _service_config(args: argparse.Namespace) -> ServiceConfig:
    """The one service configuration of ``serve`` (plain or ``--ray``), from its flags."""
    try:
        return ServiceConfig(
            api_key=args.api_key if args.api_key is not None else api_key_from_env(),
            max_documents=args.max_documents,
            max_body_bytes=args.max_body_bytes,
            body_timeout=args.body_timeout or None,
            max_request_tokens=args.max_request_tokens or None,
            bands=_bands(args),
            batch_wait_ms=args.batch_wait_ms,
            max_batch_pairs=DEFAULT_MAX_BATCH_PAIRS if args.max_batch_pairs is None else args.max_batch_pairs,
            max_queue=args.max_queue,
            max_queue_wait=args.max_queue_wait or None,
            model_name=args.served_model_name,
            cache_size=args.cache_size,
            cache_url=args.cache_url,
            cache_ttl=args.cache_ttl or None,
        )
    except (ValueError, ImportError) as exc:  # ImportError: --cache-url without the [cache] extra
        raise CommandError(str(exc)) from exc


_RAY_OPTIONS = ("replicas", "max_replicas", "cpus_per_replica", "gpus_per_replica", "ray_address")


def _serve_on_ray(args: argparse.Namespace, config: ServiceConfig) -> int:
    from .ray_serve import serve_ray

    replicas = args.replicas or 1
    if args.max_replicas is not None and args.max_replicas < replicas:
        raise CommandError(f"--max-replicas ({args.max_replicas}) must be at least --replicas ({replicas})")
    model = _model_path(args)
    logger.info(
        "Starting the rerank service on Ray Serve at http://%s:%d (API key %s)",
        args.host,
        args.port,
        "required" if config.api_key else "not required",
    )
    engine: dict[str, Any] = {"long_documents": True} if args.long_documents else {}
    if args.instruction is not None:
        engine["instruction"] = args.instruction
    serve_ray(
        os.fspath(model),
        host=args.host,
        port=args.port,
        address=args.ray_address,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        num_cpus_per_replica=args.cpus_per_replica,
        num_gpus_per_replica=args.gpus_per_replica,
        config=config,
        device=args.device,
        dtype=args.dtype,
        source=args.source,
        max_length=args.max_length,
        max_queued_requests=args.max_queue,
        graceful_shutdown_timeout_s=args.graceful_timeout,
        access_log=not args.no_access_log,
        **engine,
    )
    return 0


# -- ui --------------------------------------------------------------------------------------------


def _cmd_ui(args: argparse.Namespace) -> int:
    from .ui import launch_ui

    _check_options(args)
    bands = _bands(args)
    _check_port_free(args.host, args.port)  # before the model loads, as serve does
    reranker = load_reranker(args, bands=bands)
    logger.info("Web page on http://%s:%d", args.host, args.port)
    try:
        launch_ui(reranker, host=args.host, port=args.port, demo_model=args.demo, bands=bands)
    except OSError as exc:  # taken while the model loaded; Gradio's advice speaks of launch()
        if "port" not in str(exc).lower():
            raise
        raise CommandError(_port_taken(args.host, args.port, "taken while the model loaded")) from exc
    return 0


# -- templates ------------------------------------------------------------------------------------


def _cmd_templates(args: argparse.Namespace) -> int:
    templates = list_instruction_templates()
    if args.json:
        rows = [{"name": t.name, "text": t.text, "description": t.description} for t in templates]
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    for t in templates:
        print(t.name)
        if t.description:
            print(f"    {t.description}")
        print(f"    instruction: {t.text}")
    return 0


# -- evaluate -------------------------------------------------------------------------------------


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, load_dataset, plot_report

    _check_options(args)
    if args.plot and not Path(args.plot).expanduser().resolve().parent.is_dir():
        raise CommandError(f"--plot: the folder of {args.plot} does not exist")
    try:
        dataset = load_dataset(args.data, args.split)
    except FileNotFoundError as exc:
        raise CommandError(str(exc).strip("'\"")) from exc
    instructions = _evaluate_instructions(args, dataset)
    if len(instructions) > 1 or "data" in instructions or args.compare_dtype or args.compare_model:
        return _evaluate_comparison(args, dataset, instructions)
    reranker = load_reranker(args)
    report = evaluate(
        reranker,
        dataset,
        first_stage=args.first_stage,
        ks=args.k,
        candidates=args.candidates,
        instruction=instructions[0] if instructions else None,
        seed=args.seed,
        show_progress=args.progress,
    )
    _print_report(args, report)
    if args.plot:
        title = None
        if args.demo:
            title = f"{report.dataset}: DEMO MODEL, RANDOM WEIGHTS: the after-reranking bars are meaningless"
        out = plot_report(report, args.plot, title=title)
        logger.info("Wrote the chart to %s", out)
    return 0


def _print_report(args: argparse.Namespace, report: Any) -> None:
    """An evaluation or comparison report as JSON or a table, with the demo model's warning."""
    if args.json:
        print(json.dumps({**report.to_dict(), "demo_model": bool(args.demo)}, ensure_ascii=False, indent=2))
        return
    if args.demo:
        print("NOTE: demo model with random weights; these numbers are meaningless.\n")
    print(report.format())


def _evaluate_instructions(args: argparse.Namespace, dataset: Any) -> list[str | None]:
    """The instructions ``-i`` (repeatable) and ``--instructions`` ask for, checked before loading."""
    from .evaluate import ALL_INSTRUCTIONS, DATA_INSTRUCTION, DEFAULT_LABEL, instruction_arms

    given: list[str | None] = list(args.instruction_list or [])
    if args.instructions:
        given += [part.strip() for part in args.instructions.split(",") if part.strip()]
    has_own = any(q.instruction for q in dataset.queries)
    for item in given:
        if item == DATA_INSTRUCTION and not has_own:
            raise CommandError(f"-i data: {dataset.name} gives no query an 'instruction'")
        if item not in (None, ALL_INSTRUCTIONS, DEFAULT_LABEL, DATA_INSTRUCTION):
            resolve_instruction(item)
    given = [None if i == DEFAULT_LABEL else i for i in given]
    return instruction_arms(given, data=has_own) if given else []


def _evaluate_comparison(args: argparse.Namespace, dataset: Any, instructions: list[str | None]) -> int:
    """Several instructions, dtypes or models on the same candidates, with bootstrap intervals."""
    from .evaluate import Variant, compare, instruction_label, plot_comparison

    scorers: list[tuple[str, Any]] = []
    if args.compare_dtype:
        base_dtype = args.dtype if args.dtype != "auto" else "float32"
        scorers.append((base_dtype, load_reranker(argparse.Namespace(**{**vars(args), "dtype": base_dtype}))))
        for dtype in args.compare_dtype:
            scorers.append((dtype, load_reranker(argparse.Namespace(**{**vars(args), "dtype": dtype}))))
    else:
        reranker = load_reranker(args)
        scorers.append((reranker.model_name, reranker))
    for model in args.compare_model or []:
        other = load_reranker(args, model=model)
        scorers.append((Path(str(model)).name or other.model_name, other))
    arms = []
    for scorer_label, scorer in scorers:
        for instruction in instructions or [None]:
            if len(scorers) > 1 and len(instructions) > 1:
                label = f"{scorer_label}/{instruction_label(instruction)}"
            else:
                label = scorer_label if len(scorers) > 1 else instruction_label(instruction)
            arms.append(Variant(label, scorer, instruction))
    report = compare(
        arms,
        dataset,
        baseline=args.baseline,
        first_stage=args.first_stage,
        ks=args.k,
        candidates=args.candidates,
        seed=args.seed,
        resamples=args.resamples,
        bootstrap_seed=args.bootstrap_seed,
        show_progress=args.progress,
    )
    _print_report(args, report)
    if args.plot:
        title = f"{report.dataset}: DEMO MODEL, RANDOM WEIGHTS: meaningless numbers" if args.demo else None
        logger.info("Wrote the chart to %s", plot_comparison(report, args.plot, title=title))
    return 0


# -- check ------------------------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import run_check

    _check_options(args)
    return run_check(args, load_reranker(args))


# -- parser ----------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port (1-65535), got {value}")
    return value


def _ks(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _cache_arguments(parser: argparse.ArgumentParser, default_size: int, where: str) -> None:
    """``--cache-size``, ``--cache-url`` and ``--cache-ttl``: the score cache, as ``serve`` has them."""
    cache = parser.add_argument_group(f"score cache (repeated pairs are not scored again; {where})")
    cache.add_argument(
        "--cache-size",
        type=_non_negative_int,
        default=default_size,
        help=f"entries kept in process, about 240 bytes each (0: off; default: {default_size})",
    )
    cache.add_argument(
        "--cache-url",
        help="redis://HOST:PORT/DB: a tier shared by every process and replica (needs the [cache] extra)",
    )
    cache.add_argument(
        "--cache-ttl",
        type=_non_negative_float,
        default=DEFAULT_CACHE_TTL_S,
        help=f"seconds a Redis entry lives (0: until Redis evicts it; default: {DEFAULT_CACHE_TTL_S})",
    )


def _score_cache(args: argparse.Namespace) -> Any:
    """The score cache that ``--cache-size`` / ``--cache-url`` / ``--cache-ttl`` ask for, or ``None``."""
    if not args.cache_size and args.cache_url is None:
        return None
    from .cache import ScoreCache

    try:
        return ScoreCache(args.cache_size, url=args.cache_url, ttl=args.cache_ttl or None)
    except (ValueError, ImportError) as exc:  # ImportError: --cache-url without the [cache] extra
        raise CommandError(str(exc)) from exc


def _log_cache(reranker: Any) -> None:
    """Log what the score cache answered (nothing without one)."""
    cache = getattr(reranker, "cache", None)
    if cache is None:
        return
    stats = cache.stats()
    hits = sum(stats["hits"].values())
    logger.info(
        "Score cache: %d hit(s) (%s), %d miss(es), %d prompt tokens not computed",
        hits,
        ", ".join(f"{tier} {n}" for tier, n in stats["hits"].items()),
        stats["misses"],
        stats["tokens_saved"],
    )


def _add_rank(subparsers: Any, shared: _SharedOptions) -> None:
    p = subparsers.add_parser(
        "rank",
        parents=[shared.model, shared.bands, shared.logging],
        help="rank documents for a query",
        description="Rank documents (one per line, from a file or stdin) for a query, best first.",
        epilog='example: qwen3-rerank rank --query "发票怎么开" --docs faq.txt --top-n 3',
    )
    p.add_argument("--query", "-q", required=True, help="the query")
    p.add_argument("--docs", "-d", help="file with one document per line; '-' or omitted with a pipe: stdin")
    p.add_argument("--instruction", "-i", help="template name (see 'qwen3-rerank templates') or free text")
    p.add_argument("--top-n", "-n", type=_positive_int, help="print only the best N")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _cache_arguments(p, 0, "useful with --cache-url: shared by every run")
    p.set_defaults(func=_cmd_rank)


def _add_batch(subparsers: Any, shared: _SharedOptions) -> None:
    p = subparsers.add_parser(
        "batch",
        parents=[shared.model, shared.bands, shared.logging],
        help="rank many queries from a JSONL file, one JSONL ranking per record",
        description=(
            'Rank JSONL records {"query", "documents" | "candidates", "id"?, "instruction"?, "top_n"?} '
            "from a file or stdin; write one JSONL line per record, in input order: "
            '{"id", "line", "results": [{"index", "id"?, "score", "band"}, ...]} best first. '
            "Records are scored in chunks of many queries per model call; each chunk's lines are "
            "written and flushed as soon as it is scored."
        ),
        epilog="example: qwen3-rerank batch tickets.jsonl -o ranked.jsonl -i similar_ticket --resume",
    )
    p.add_argument("input", nargs="?", help="JSONL file; '-' or omitted with a pipe: stdin")
    p.add_argument("--output", "-o", help="write the rankings to this file (default: stdout)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="append to --output, skipping records already in it (by id; records without one by line)",
    )
    p.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="skip",
        help="a bad record: report it with its line number and go on (skip; exit status 1 at the end) "
        "or stop there (default: skip)",
    )
    p.add_argument(
        "--instruction", "-i", help="instruction of records that give none (template name or free text)"
    )
    p.add_argument("--top-n", "-n", type=_positive_int, help="keep the best N of records that give no top_n")
    p.add_argument(
        "--chunk-pairs",
        type=_positive_int,
        default=DEFAULT_CHUNK_PAIRS,
        help=f"(query, document) pairs scored per model call, whole records (default: {DEFAULT_CHUNK_PAIRS})",
    )
    progress = p.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        action="store_true",
        default=None,
        help="progress bar on stderr (default: on a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _cache_arguments(p, 0, "repeated queries in the file, or with --cache-url across runs")
    p.set_defaults(func=_cmd_batch)


def _add_serve(subparsers: Any, shared: _SharedOptions) -> None:
    p = subparsers.add_parser(
        "serve",
        parents=[shared.model, shared.bands, shared.logging],
        help="run the HTTP rerank service",
        description=(
            "Serve POST /v1/rerank (Cohere/Jina/vLLM shape), POST /rank ({id, text} records with bands), "
            "GET /health, GET /v1/models and GET /metrics. Needs the [server] extra."
        ),
        epilog="example: qwen3-rerank serve --model Qwen/Qwen3-Reranker-0.6B --host 0.0.0.0 --port 8000",
    )
    _listen_arguments(p, port=DEFAULT_PORT, host_help="interface to bind; 0.0.0.0 for all")
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV} if set)",
    )
    p.add_argument("--instruction", "-i", help="default instruction for requests that send none")
    p.add_argument(
        "--max-documents",
        type=_positive_int,
        default=DEFAULT_MAX_DOCUMENTS,
        help=f"most documents per request (default: {DEFAULT_MAX_DOCUMENTS})",
    )
    p.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    p.add_argument(
        "--batch-wait-ms",
        type=_non_negative_float,
        default=DEFAULT_BATCH_WAIT_MS,
        help="how long an idle batcher waits for concurrent requests to merge"
        f" (default: {DEFAULT_BATCH_WAIT_MS:g})",
    )
    p.add_argument(
        "--max-batch-pairs",
        type=_positive_int,
        help=f"most (query, document) pairs merged into one model call (default: {DEFAULT_MAX_BATCH_PAIRS};"
        " per replica with --ray)",
    )
    p.add_argument(
        "--max-queue",
        type=_positive_int,
        default=DEFAULT_MAX_QUEUE,
        help=f"most waiting requests before 503 (default: {DEFAULT_MAX_QUEUE})",
    )
    p.add_argument(
        "--max-queue-wait",
        type=_non_negative_float,
        default=DEFAULT_MAX_QUEUE_WAIT_S,
        metavar="SECONDS",
        help="refuse (503 + Retry-After) a request whose estimated wait to be scored is longer, and"
        f" drop unscored one that waited longer (0: no limit; default: {DEFAULT_MAX_QUEUE_WAIT_S:g})",
    )
    p.add_argument(
        "--body-timeout",
        type=_non_negative_float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="seconds a request's body may take to arrive before a 408 (0: no limit;"
        f" default: {DEFAULT_BODY_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--max-request-tokens",
        type=_non_negative_int,
        default=DEFAULT_MAX_REQUEST_TOKENS,
        help="most prompt tokens one request may make the model read, else 413 (0: no limit;"
        f" default: {DEFAULT_MAX_REQUEST_TOKENS})",
    )
    p.add_argument("--served-model-name", help="model name reported by the API (default: the model's)")
    p.add_argument(
        "--graceful-timeout",
        type=_non_negative_float,
        default=DEFAULT_GRACEFUL_TIMEOUT_S,
        help="seconds to let in-flight requests finish on shutdown"
        f" (default: {DEFAULT_GRACEFUL_TIMEOUT_S:g})",
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    _cache_arguments(p, DEFAULT_CACHE_SIZE, "also with --ray")
    ray = p.add_argument_group("Ray Serve (extra [ray])")
    ray.add_argument(
        "--ray", action="store_true", help="serve on Ray Serve: replicas of the model behind one endpoint"
    )
    ray.add_argument("--replicas", type=_positive_int, help="replicas (default: one per GPU, else 1)")
    ray.add_argument("--max-replicas", type=_positive_int, help="autoscale between --replicas and this")
    ray.add_argument(
        "--cpus-per-replica", type=_non_negative_float, help="CPUs reserved per replica (default: 1)"
    )
    ray.add_argument(
        "--gpus-per-replica",
        type=_non_negative_float,
        help="GPUs per replica (default: 1 when CUDA is present and --device is not cpu, else 0)",
    )
    ray.add_argument("--ray-address", help="Ray cluster to join ('auto': the local one; default: start one)")
    p.set_defaults(func=_cmd_serve)


def _add_ui(subparsers: Any, shared: _SharedOptions) -> None:
    p = subparsers.add_parser(
        "ui",
        parents=[shared.model, shared.bands, shared.logging],
        help="open the web page",
        description="Serve a web page to try the reranker. Needs the [ui] extra.",
    )
    _listen_arguments(p, port=DEFAULT_UI_PORT, host_help="interface to bind")
    p.set_defaults(func=_cmd_ui)


def _add_templates(subparsers: Any, shared: _SharedOptions) -> None:
    p = subparsers.add_parser(
        "templates",
        parents=[shared.logging],
        help="list the named instruction templates",
        description='Named instruction templates, usable as --instruction NAME or "instruction": NAME.',
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_templates)


def _add_evaluate(subparsers: Any, shared: _SharedOptions) -> None:
    p = subparsers.add_parser(
        "evaluate",
        parents=[shared.model, shared.logging],
        help="measure hit@k, MRR@10 and nDCG@10 before and after reranking",
        description=(
            "Evaluate reranking on labelled data: a JSONL file of {query, positives, negatives} or a "
            "BEIR/MTEB directory (corpus.jsonl, queries.jsonl, qrels/<split>.tsv). Prints hit@k, MRR@10 "
            "and nDCG@10 before and after reranking, latency per query and pairs/s."
        ),
        epilog="example: qwen3-rerank evaluate faq_eval.jsonl -i customer_service_faq --plot out.png",
    )
    p.add_argument("data", help="JSONL file or BEIR/MTEB directory")
    p.add_argument(
        "--first-stage",
        choices=FIRST_STAGES,
        default="bm25",
        help="bm25: BM25 over all documents (jieba words), top --candidates; "
        "none: each query's own candidates in random order (default: bm25)",
    )
    p.add_argument(
        "--k", type=_ks, default=[1, 3, 10], help="comma-separated hit@k cut-offs (default: 1,3,10)"
    )
    p.add_argument(
        "--candidates",
        type=_positive_int,
        default=50,
        help="BM25 candidates per query to rerank (default: 50)",
    )
    p.add_argument(
        "--instruction",
        "-i",
        dest="instruction_list",
        action="append",
        help="template name (see 'qwen3-rerank templates'), free text, 'default' or 'data' (each query's "
        "own 'instruction' from the data); repeat it to compare instructions on the same candidates",
    )
    _comparison_arguments(p)
    p.add_argument("--plot", metavar="OUT.png", help="write a before/after bar chart to this file")
    p.add_argument("--split", default="test", help="qrels split of a BEIR directory (default: test)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random order for --first-stage none")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(func=_cmd_evaluate)


def _comparison_arguments(parser: argparse.ArgumentParser) -> None:
    from .evaluate import BOOTSTRAP_RESAMPLES

    group = parser.add_argument_group("comparison (paired bootstrap over queries)")
    group.add_argument(
        "--instructions",
        metavar="all|NAME,...",
        help="compare these instructions: 'all' (every template, the default and the data's own) "
        "or comma-separated names",
    )
    group.add_argument(
        "--baseline", help="label of the arm the others are compared with (default: the first)"
    )
    group.add_argument(
        "--compare-dtype",
        action="append",
        metavar="DTYPE",
        help="also score in this dtype and compare with float32 (or --dtype): metrics and rank agreement",
    )
    group.add_argument(
        "--compare-model", action="append", metavar="ID_OR_DIR", help="also score with this model and compare"
    )
    group.add_argument(
        "--resamples",
        type=_positive_int,
        default=BOOTSTRAP_RESAMPLES,
        help=f"bootstrap resamples (default: {BOOTSTRAP_RESAMPLES})",
    )
    group.add_argument("--bootstrap-seed", type=int, default=0, help="bootstrap seed (default: 0)")


def _add_check(subparsers: Any, shared: _SharedOptions) -> None:
    from .check import EXIT_MISMATCH, add_check_arguments

    p = subparsers.add_parser(
        "check",
        parents=[shared.model, shared.logging],
        help="check a /v1/rerank server against the exact recipe on the same weights",
        description=(
            "Send a fixed battery of cases to a server speaking /v1/rerank (this service, vLLM, llama.cpp, "
            "Xinference, Infinity), score them with the local exact engine on the same weights (--model, "
            "--max-length as the server's), report per case class the largest differences and the rank "
            f"agreement, and name the likely cause. Exit status {EXIT_MISMATCH} beyond --tolerance."
        ),
        epilog="example: qwen3-rerank check http://127.0.0.1:8000 --model /models/Qwen3-Reranker-0.6B",
    )
    add_check_arguments(p)
    p.set_defaults(func=_cmd_check)


#: The subcommands, in help order: each adds its subparser and sets ``func``.
COMMANDS: list[Callable[[Any, _SharedOptions], None]] = [
    _add_rank,
    _add_batch,
    _add_serve,
    _add_ui,
    _add_templates,
    _add_evaluate,
    _add_check,
]


def build_parser() -> argparse.ArgumentParser:
    """The full ``qwen3-rerank`` argument parser."""
    parser = _Parser(
        prog="qwen3-rerank",
        description="Qwen3-Reranker from the command line: rank, batch, serve over HTTP, web page, evaluate.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _verbosity_arguments(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    shared = _SharedOptions.build()
    for add in COMMANDS:
        add(subparsers, shared)
    return parser


def _check_exclusive(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for first, second in _EXCLUSIVE:
        if all(getattr(args, dest, None) not in (None, False) for dest in (first, second)):
            prog = f"{parser.prog} {args.command}"
            message = f"--{first} and --{second} exclude each other"
            parser.exit(2, f"{prog}: error: {message} (see '{prog} --help')\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_exclusive(parser, args)
    func: Callable[[argparse.Namespace], int] = args.func
    with command_logging(verbose=args.verbose, quiet=args.quiet), notices_logged_only():  # log shows them
        try:
            return int(func(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:
            # The reader went away (`... | head`): stop quietly, as a Unix tool killed by SIGPIPE does,
            # and keep Python from complaining again when it flushes stdout at exit.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except ModelSourceError as exc:
            logger.debug("command failed", exc_info=True)
            model = str(getattr(args, "model", None) or DEFAULT_MODEL)
            advice = model_not_found_advice(exc, argv, model=model, source=getattr(args, "source", None))
            print(advice, file=sys.stderr)
            return 1
        except (CommandError, ImportError, OSError, ValueError, TypeError, RuntimeError) as exc:
            logger.debug("command failed", exc_info=True)
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
