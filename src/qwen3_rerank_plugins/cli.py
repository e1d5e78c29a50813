"""The ``qwen3-rerank`` command line (also ``python -m qwen3_rerank_plugins``).

Commands:

* ``rank``: rank documents (one per line, from a file or stdin) for a query; table or JSON.
* ``serve``: the HTTP rerank service (extra ``[server]``).
* ``ui``: the web page (extra ``[ui]``).
* ``templates``: list the named instruction templates.
* ``evaluate``: registered by :mod:`qwen3_rerank_plugins.evaluate` when that module exists.

Other modules add commands the same way ``evaluate`` does: a function ``add_parser(subparsers)``
that calls ``subparsers.add_parser(...)``, may reuse :func:`add_model_arguments` and
:func:`load_reranker`, and sets ``func`` (``args -> exit code``) with ``set_defaults``.

Errors end the command with ``error: <one line>`` on stderr and exit status 1 (2 for usage
errors, 130 when interrupted); ``--verbose`` adds the traceback to the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__
from .results import ConfidenceBands
from .sources import ModelSourceError
from .templates import list_instruction_templates, resolve_instruction

__all__ = ["DEFAULT_MODEL", "CommandError", "add_model_arguments", "build_parser", "load_reranker", "main"]

logger = logging.getLogger("qwen3_rerank_plugins.cli")

DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"
API_KEY_ENV = "QWEN3_RERANK_API_KEY"
#: Same as ``server.DEFAULT_MAX_BODY_BYTES``; repeated so the parser builds without the [server] extra.
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
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
    """Add ``--model | --demo``, ``--device``, ``--dtype``, ``--source``, ``--max-length``."""
    group = parser.add_argument_group("model")
    which = group.add_mutually_exclusive_group()
    which.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"hub id (Hugging Face / ModelScope) or local directory (default: {DEFAULT_MODEL})",
    )
    which.add_argument(
        "--demo",
        action="store_true",
        help="use a tiny demo model built locally with random weights (offline; scores are meaningless)",
    )
    group.add_argument(
        "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps"
    )
    group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    group.add_argument(
        "--source",
        default="auto",
        choices=["auto", "local", "huggingface", "modelscope"],
        help="where to get the model (default: a local directory, else Hugging Face, else ModelScope)",
    )
    group.add_argument(
        "--max-length", type=_positive_int, default=8192, help="prompt tokens per pair (default: 8192)"
    )


def _verbosity_arguments(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """``-v/--verbose`` and ``--quiet``, accepted before and after the command name."""
    # A command's own copy must not reset what was given before the command name.
    default = False if top_level else argparse.SUPPRESS
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logging, tracebacks on errors"
    )
    group.add_argument("--quiet", action="store_true", default=default, help="log warnings and errors only")


def _bands_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--band-high", type=_probability, default=0.85, help="score for the high band (default: 0.85)"
    )
    parser.add_argument(
        "--band-medium", type=_probability, default=0.70, help="score for the medium band (default: 0.70)"
    )


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
    from .engine import get_reranker

    if model is None:
        model = _model_path(args)
    start = time.perf_counter()
    reranker = get_reranker(
        model,
        device=args.device,
        dtype=args.dtype,
        source=args.source,
        max_length=args.max_length,
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
    return args.model


def _check_options(args: argparse.Namespace) -> None:
    """Fail before any loading (or before a server starts) on a bad device, dtype or instruction."""
    from .device import resolve_device, resolve_dtype

    resolve_dtype(args.dtype, resolve_device(args.device))
    if getattr(args, "instruction", None) is not None:
        resolve_instruction(args.instruction)


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
    reranker = load_reranker(args, bands=_bands(args))
    start = time.perf_counter()
    results = reranker.rerank(args.query, docs, top_n=args.top_n, instruction=args.instruction)
    seconds = time.perf_counter() - start
    logger.info("Ranked %d documents in %.1f ms", len(docs), seconds * 1000)
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


# -- serve ---------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    _check_options(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.api_key is not None and not args.api_key.strip():
        raise CommandError("--api-key must not be empty")
    bands = _bands(args)
    if args.ray:
        return _serve_on_ray(args, api_key, bands)
    ray_only = [f"--{name.replace('_', '-')}" for name in _RAY_OPTIONS if getattr(args, name) is not None]
    if ray_only:
        raise CommandError(f"{', '.join(ray_only)} only apply with --ray")
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
        "required" if api_key else "not required",
    )
    try:
        serve(
            factory,
            host=args.host,
            port=args.port,
            api_key=api_key,
            max_documents=args.max_documents,
            max_body_bytes=args.max_body_bytes,
            bands=bands,
            batch_wait_ms=args.batch_wait_ms,
            max_batch_pairs=args.max_batch_pairs,
            max_queue=args.max_queue,
            model_name=args.served_model_name,
            graceful_timeout=args.graceful_timeout,
            access_log=not args.no_access_log,
        )
    except SystemExit as exc:  # uvicorn exits this way when it cannot start
        if exc.code not in (0, None):
            raise CommandError(
                f"could not start the server on {args.host}:{args.port} (see the log above)"
            ) from exc
    return 0


_MAX_BATCH_PAIRS = 256
_RAY_OPTIONS = ("replicas", "max_replicas", "cpus_per_replica", "gpus_per_replica", "ray_address")


def _serve_on_ray(args: argparse.Namespace, api_key: str | None, bands: ConfidenceBands) -> int:
    if args.max_batch_pairs != _MAX_BATCH_PAIRS:
        raise CommandError(
            "--max-batch-pairs does not apply with --ray: Ray Serve merges whole requests"
            " (at most 16 per model call)"
        )
    from .ray_serve import serve_ray

    replicas = args.replicas or 1
    if args.max_replicas is not None and args.max_replicas < replicas:
        raise CommandError(f"--max-replicas ({args.max_replicas}) must be at least --replicas ({replicas})")
    model = _model_path(args)
    logger.info(
        "Starting the rerank service on Ray Serve at http://%s:%d (API key %s)",
        args.host,
        args.port,
        "required" if api_key else "not required",
    )
    serve_ray(
        os.fspath(model),
        host=args.host,
        port=args.port,
        address=args.ray_address,
        replicas=args.replicas,
        max_replicas=args.max_replicas,
        num_cpus_per_replica=args.cpus_per_replica,
        num_gpus_per_replica=args.gpus_per_replica,
        device=args.device,
        dtype=args.dtype,
        source=args.source,
        max_length=args.max_length,
        instruction=args.instruction,
        bands=(bands.high, bands.medium),
        api_key=api_key,
        max_documents=args.max_documents,
        max_body_bytes=args.max_body_bytes,
        batch_wait_ms=args.batch_wait_ms,
        model_name=args.served_model_name,
        max_queued_requests=args.max_queue,
        graceful_shutdown_timeout_s=args.graceful_timeout,
        access_log=not args.no_access_log,
    )
    return 0


# -- ui --------------------------------------------------------------------------------------------


def _cmd_ui(args: argparse.Namespace) -> int:
    from .ui import launch_ui

    _check_options(args)
    bands = _bands(args)
    reranker = load_reranker(args, bands=bands)
    logger.info("Web page on http://%s:%d", args.host, args.port)
    launch_ui(reranker, host=args.host, port=args.port, demo_model=args.demo, bands=bands)
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


# -- parser ----------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
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


def _add_rank(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "rank",
        help="rank documents for a query",
        description="Rank documents (one per line, from a file or stdin) for a query, best first.",
        epilog='example: qwen3-rerank rank --query "发票怎么开" --docs faq.txt --top-n 3',
    )
    p.add_argument("--query", "-q", required=True, help="the query")
    p.add_argument("--docs", "-d", help="file with one document per line; '-' or omitted with a pipe: stdin")
    p.add_argument("--instruction", "-i", help="template name (see 'qwen3-rerank templates') or free text")
    p.add_argument("--top-n", "-n", type=_positive_int, help="print only the best N")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _bands_arguments(p)
    add_model_arguments(p)
    _verbosity_arguments(p)
    p.set_defaults(func=_cmd_rank)


def _add_serve(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP rerank service",
        description=(
            "Serve POST /v1/rerank (Cohere/Jina/vLLM shape), POST /rank ({id, text} records with bands), "
            "GET /health, GET /v1/models and GET /metrics. Needs the [server] extra."
        ),
        epilog="example: qwen3-rerank serve --model Qwen/Qwen3-Reranker-0.6B --host 0.0.0.0 --port 8000",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; 0.0.0.0 for all)"
    )
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default: 8000)")
    p.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer <key>' (default: ${API_KEY_ENV} if set)",
    )
    p.add_argument("--instruction", "-i", help="default instruction for requests that send none")
    p.add_argument(
        "--max-documents", type=_positive_int, default=1000, help="most documents per request (default: 1000)"
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
        default=2.0,
        help="how long an idle batcher waits for concurrent requests to merge (default: 2)",
    )
    p.add_argument(
        "--max-batch-pairs",
        type=_positive_int,
        default=_MAX_BATCH_PAIRS,
        help=f"most (query, document) pairs merged into one model call (default: {_MAX_BATCH_PAIRS};"
        " not with --ray)",
    )
    p.add_argument(
        "--max-queue",
        type=_positive_int,
        default=1024,
        help="most waiting requests before 503 (default: 1024)",
    )
    p.add_argument("--served-model-name", help="model name reported by the API (default: the model's)")
    p.add_argument(
        "--graceful-timeout",
        type=_non_negative_float,
        default=30.0,
        help="seconds to let in-flight requests finish on shutdown (default: 30)",
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
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
    _bands_arguments(p)
    add_model_arguments(p)
    _verbosity_arguments(p)
    p.set_defaults(func=_cmd_serve)


def _add_ui(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "ui",
        help="open the web page",
        description="Serve a web page to try the reranker. Needs the [ui] extra.",
    )
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=_port, default=7860, help="TCP port (default: 7860)")
    _bands_arguments(p)
    add_model_arguments(p)
    _verbosity_arguments(p)
    p.set_defaults(func=_cmd_ui)


def _add_templates(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "templates",
        help="list the named instruction templates",
        description='Named instruction templates, usable as --instruction NAME or "instruction": NAME.',
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _verbosity_arguments(p)
    p.set_defaults(func=_cmd_templates)


def _add_evaluate(subparsers: Any) -> None:
    """Register ``evaluate`` from :mod:`qwen3_rerank_plugins.evaluate` when that module exists."""
    try:
        from . import evaluate
    except ModuleNotFoundError as exc:
        if exc.name == f"{__package__}.evaluate":
            return
        _add_unavailable(subparsers, "evaluate", exc)
        return
    except ImportError as exc:
        _add_unavailable(subparsers, "evaluate", exc)
        return
    evaluate.add_parser(subparsers)


def _add_unavailable(subparsers: Any, name: str, exc: BaseException) -> None:
    """A command whose module cannot be imported still shows up, and says why when run."""
    p = subparsers.add_parser(name, help=f"(unavailable: {exc})", add_help=True)

    def fail(args: argparse.Namespace) -> int:
        raise CommandError(f"the {name} command is unavailable: {exc}")

    p.set_defaults(func=fail)


def build_parser() -> argparse.ArgumentParser:
    """The full ``qwen3-rerank`` argument parser."""
    parser = _Parser(
        prog="qwen3-rerank",
        description="Qwen3-Reranker from the command line: rank, serve over HTTP, web page.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _verbosity_arguments(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_rank(subparsers)
    _add_serve(subparsers)
    _add_ui(subparsers)
    _add_templates(subparsers)
    _add_evaluate(subparsers)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    if not args.verbose:
        for noisy in (
            "httpx",
            "httpcore",
            "urllib3",
            "filelock",
            "transformers",
            "huggingface_hub",
            "modelscope",
        ):
            logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if args.quiet:
        # Download and weight-loading progress bars too.
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): stop quietly, as a Unix tool killed by SIGPIPE does,
        # and keep Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CommandError, ModelSourceError, ImportError, OSError, ValueError, TypeError, RuntimeError) as exc:
        logger.debug("command failed", exc_info=True)
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
