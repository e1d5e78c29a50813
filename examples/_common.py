"""Shared by the example scripts: model options, loading with an offline fallback, bundled data.

Not an example itself. Every example accepts ``--model`` (hub id or local directory), ``--demo``
(a tiny model built locally with random weights) and ``--device``; when the model cannot be
fetched because no hub is reachable, the examples say so and continue on the demo model.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from qwen3_rerank_plugins import ModelSourceError, Reranker, get_reranker

DATA = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL = "Qwen/Qwen3-Reranker-0.6B"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
DEMO_WARNING = (
    "Using a tiny demo model built locally with RANDOM weights.\n"
    "The pipeline is real, but THE SCORES BELOW ARE MEANINGLESS."
)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--model``, ``--demo`` and ``--device``."""
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local directory ({DEFAULT_MODEL})")
    which.add_argument(
        "--demo",
        action="store_true",
        help="offline: tiny demo model with random weights (meaningless scores)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 or mps")


def load_reranker(args: argparse.Namespace, **settings: Any) -> tuple[Reranker, bool]:
    """The shared engine for ``args``; returns ``(reranker, is_demo)``.

    Falls back to the demo model when the hub id ``--model`` cannot be fetched (no hub
    reachable); a local directory that cannot be loaded ends the script with an error.
    """
    if not args.demo:
        try:
            return get_reranker(args.model, device=args.device, **settings), False
        except ModelSourceError as exc:
            if not HUB_ID.match(args.model) or Path(args.model).exists():
                # A local model that cannot be loaded is the user's to fix, not a reason for random weights.
                raise SystemExit(f"error: {str(exc).splitlines()[0]}") from exc
            print(f"Could not load {args.model!r}: no model hub is reachable from this machine.")
    from qwen3_rerank_plugins.demo import demo_model_dir

    print(DEMO_WARNING + "\n")
    return get_reranker(demo_model_dir("tiny"), device=args.device, **settings), True


def read_jsonl(name: str) -> list[dict[str, Any]]:
    """Records of a bundled data file, e.g. ``read_jsonl("faq_kb.jsonl")``."""
    with (DATA / name).open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def demo_reminder(is_demo: bool) -> None:
    """Repeat the warning at the end of the output, where it is seen."""
    if is_demo:
        print(
            "\nReminder: demo model with random weights; "
            "run with network access or --model PATH for real scores."
        )
