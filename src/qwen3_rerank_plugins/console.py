"""What a console command needs besides its arguments: logging to stderr, one-line errors, and
the advice printed when a model cannot be found.

Used by :mod:`qwen3_rerank_plugins.cli` (which only parses and dispatches); callable by any other
program that runs the library from a terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .sources import ModelSourceError

__all__ = ["command_logging", "model_not_found_advice", "one_line"]

_NOISY_LOGGERS = ("httpx", "httpcore", "urllib3", "filelock", "transformers", "huggingface_hub", "modelscope")


@contextlib.contextmanager
def command_logging(*, verbose: bool = False, quiet: bool = False) -> Iterator[None]:
    """Log to stderr at the level ``-v`` / ``--quiet`` ask for while a command runs.

    What is changed (root handlers and levels, progress bars) is put back afterwards, so a
    command can run in-process (from tests or another program) any number of times.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name) for name in _NOISY_LOGGERS}
    saved_noisy = {name: lg.level for name, lg in noisy.items()}
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not verbose:
        for lg in noisy.values():
            lg.setLevel(max(level, logging.WARNING))
    restore_bars: Callable[[], None] | None = None
    if quiet:
        restore_bars = _hide_progress_bars()
    try:
        yield
    finally:
        handler.flush()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        for name, lg in noisy.items():
            lg.setLevel(saved_noisy[name])
        if restore_bars is not None:
            restore_bars()


def _hide_progress_bars() -> Callable[[], None]:
    """Hide download and weight-loading progress bars; returns how to show them again."""
    from transformers.utils import logging as transformers_logging

    saved_env = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    was_enabled = transformers_logging.is_progress_bar_enabled()
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    transformers_logging.disable_progress_bar()

    def restore() -> None:
        if saved_env is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = saved_env
        if was_enabled:
            transformers_logging.enable_progress_bar()

    return restore


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its type name when it has none)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- a model that cannot be found: what to type instead -----------------------------------------------

_MODEL_OPTIONS_WITH_VALUE = ("--model", "--source")


def _without_model_options(argv: Sequence[str]) -> list[str]:
    """``argv`` less ``--model X``, ``--source X`` and ``--demo`` (also in ``--opt=X`` form)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _MODEL_OPTIONS_WITH_VALUE:
            skip = True
        elif arg == "--demo" or arg.startswith(tuple(f"{o}=" for o in _MODEL_OPTIONS_WITH_VALUE)):
            continue
        else:
            out.append(arg)
    return out


def model_not_found_advice(
    exc: ModelSourceError,
    argv: Sequence[str],
    *,
    model: str,
    source: str | None,
    program: str = "qwen3-rerank",
) -> str:
    """The error, then on separate lines the command lines that get past it, in shell syntax.

    Args:
        exc: The error loading raised.
        argv: The command's arguments (without the program name); the suggestions repeat them
            with other model options.
        model: The model that was asked for.
        source: The ``--source`` given (``None`` or ``"auto"`` when none).
        program: The command's name.
    """
    text = str(exc).strip()
    text = text.split("\nWhat to do:", 1)[0].rstrip()  # its advice speaks Python; ours follows
    text = re.sub(r"\bsource='(\w+)'", r"--source \1", text)
    base = [program, *_without_model_options(argv)]
    choices = [
        (["--demo"], "offline demo model: random weights, meaningless scores"),
        (["--model", "DIR"], "a model directory on this machine"),
    ]
    if source != "modelscope":
        choices.insert(1, (["--source", "modelscope"], "download from ModelScope (e.g. in mainland China)"))
    commands = [shlex.join([*base, *extra]) for extra, _ in choices]
    width = max(len(c) for c in commands)
    lines = [f"error: {text}", "To go on, type one of:"]
    lines += [f"  {command:<{width}}  # {why}" for command, (_, why) in zip(commands, choices, strict=True)]
    if "/" in model and not Path(model).expanduser().exists():
        download = f"hf download {shlex.quote(model)} --local-dir DIR"
        lines.append(f"To fill DIR once, where the hub is reachable: {download}")
    lines.append("Or check the network or proxy; HF_ENDPOINT=<mirror> uses a Hugging Face mirror.")
    return "\n".join(lines)
