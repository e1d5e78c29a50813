"""The ``qwen3-rerank`` command line.

Usage is tested in-process through ``main(argv)`` (stdout and stderr captured, stdin replaced);
a few tests run the real console script and ``python -m qwen3_rerank_plugins`` in subprocesses
(marked slow). Every command runs on the tiny random model (or the demo model, built from the
same recipe) on CPU.
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import getpass
import io
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

import qwen3_rerank_plugins
from helpers import free_port
from qwen3_rerank_plugins import ConfidenceBands, Reranker, list_instruction_templates
from qwen3_rerank_plugins import server_defaults as defaults
from qwen3_rerank_plugins.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
QUERY = "发票怎么开"
DOCS = [
    "【发票申请指南】在订单详情页点击“申请开票”，填写抬头和税号即可。",
    "[FAQ] 订单发货时间：付款后48小时内发货。",
    "[Policy] Refunds are issued to the original payment method within 7 business days.",
    "退货政策：签收后7天内可无理由退货。",
]
SCRIPT = shutil.which("qwen3-rerank")
MODULE = [sys.executable, "-m", "qwen3_rerank_plugins"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TIMEOUT = 180
#: A hub id that exists nowhere, and a ModelScope endpoint that never resolves: "offline" at once.
MISSING_MODEL = "qwen3-rerank-test/no-such-model"
OFFLINE_MODELSCOPE = "http://modelscope.invalid"


def _script() -> list[str]:
    if SCRIPT is None:
        pytest.fail("the qwen3-rerank console script is not installed (pip install -e .)")
    return [SCRIPT]


def run(args: list[str], *, entry: list[str] | None = None, stdin: str | None = None, env=None):
    """The real command in a subprocess (console script unless ``entry`` says otherwise)."""
    return subprocess.run(
        [*(entry or _script()), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env or ENV,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


@dataclass(frozen=True)
class Done:
    returncode: int
    stdout: str
    stderr: str


class _Terminal(io.StringIO):
    """A stdin that is a terminal: nothing is piped."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Done]:
    """``main(argv)`` in this process; ``stdin=None`` is an empty pipe, ``stdin=_Terminal()`` a terminal."""

    def call(args: list[str], *, stdin: str | io.StringIO | None = None) -> Done:
        capsys.readouterr()
        monkeypatch.setattr(
            sys, "stdin", stdin if isinstance(stdin, io.StringIO) else io.StringIO(stdin or "")
        )
        try:
            code = main(args)
        except SystemExit as exc:  # --help, --version and usage errors
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        out, err = capsys.readouterr()
        return Done(code, out, err)

    return call


def _error_lines(stderr: str) -> list[str]:
    """The lines the command wrote itself on failure (log lines have a timestamp)."""
    return [line for line in stderr.splitlines() if line and not re.match(r"\d{4}-\d\d-\d\d ", line)]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture(scope="module")
def docs_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "docs.txt"
    path.write_text("\n".join([DOCS[0], "", *DOCS[1:], "   "]) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo_cache(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo-model cache holding the tiny model (the demo model is built by the same recipe)."""
    root = tmp_path_factory.mktemp("demo-cache")
    target = root / "random-qwen3-reranker-tiny"
    shutil.copytree(tiny_model_dir, target)
    (target / ".complete").write_text(json.dumps({"size": "tiny", "random_weights": True}))
    return root


# -- help --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["rank"], ["batch"], ["serve"], ["ui"], ["templates"], ["evaluate"]])
def test_help_of_every_command(cli, command: list[str]) -> None:
    done = cli([*command, "--help"])

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: qwen3-rerank {' '.join(command)}".rstrip())
    if command and command != ["templates"]:
        # The shared groups keep their headings in every command that inherits them.
        assert re.search(r"^model:\n(  .*\n)*?  --demo ", done.stdout, flags=re.M), done.stdout
        assert "--device" in done.stdout and "--source" in done.stdout
        assert re.search(r"^logging:\n  -v, --verbose", done.stdout, flags=re.M)
    if command in (["rank"], ["batch"], ["serve"], ["ui"]):
        assert re.search(r"^confidence bands:\n  --band-high", done.stdout, flags=re.M)
    if command == ["serve"]:
        for option in (
            "--host",
            "--port",
            "--api-key",
            "--max-documents",
            "--max-batch-pairs",
            "--band-high",
            "--graceful-timeout",
        ):
            assert option in done.stdout


def test_serve_defaults_come_from_server_defaults() -> None:
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port) == (defaults.DEFAULT_HOST, defaults.DEFAULT_PORT)
    assert args.max_documents == defaults.DEFAULT_MAX_DOCUMENTS
    assert args.max_body_bytes == defaults.DEFAULT_MAX_BODY_BYTES
    assert args.batch_wait_ms == defaults.DEFAULT_BATCH_WAIT_MS
    assert args.max_queue == defaults.DEFAULT_MAX_QUEUE
    assert args.graceful_timeout == defaults.DEFAULT_GRACEFUL_TIMEOUT_S
    # Not given is not the same as given with the default value.
    assert args.max_batch_pairs is None
    assert build_parser().parse_args(["serve", "--max-batch-pairs", "256"]).max_batch_pairs == 256
    assert build_parser().parse_args(["ui"]).port == defaults.DEFAULT_UI_PORT


def test_serve_passes_the_defaults_and_explicit_values_to_the_server(
    cli, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qwen3_rerank_plugins.server

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(
        qwen3_rerank_plugins.server, "serve", lambda factory, config, **kw: calls.append(vars(config))
    )
    base = ["serve", "--model", str(tiny_model_dir), "--port", str(free_port())]

    assert cli(base).returncode == 0
    assert cli([*base, "--max-batch-pairs", "64", "--max-queue", "8"]).returncode == 0

    first, second = calls
    assert first["max_batch_pairs"] == defaults.DEFAULT_MAX_BATCH_PAIRS
    assert first["max_queue"] == defaults.DEFAULT_MAX_QUEUE
    assert first["batch_wait_ms"] == defaults.DEFAULT_BATCH_WAIT_MS
    assert (second["max_batch_pairs"], second["max_queue"]) == (64, 8)


@pytest.mark.slow
def test_python_dash_m_is_the_same_command() -> None:
    done = run(["--help"], entry=MODULE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: qwen3-rerank")
    for command in ("rank", "batch", "serve", "ui", "templates", "evaluate"):
        assert command in done.stdout


def test_templates_lists_every_named_template(cli) -> None:
    done = cli(["templates", "--json"])
    assert done.returncode == 0, done.stderr
    assert [t["name"] for t in json.loads(done.stdout)] == [t.name for t in list_instruction_templates()]


@pytest.mark.parametrize(
    ("args", "command", "options"),
    [
        (["rank", "-q", QUERY, "--model", "x", "--demo"], "rank", "--model and --demo"),
        (["-v", "templates", "--quiet"], "templates", "--verbose and --quiet"),
    ],
    ids=["model and demo", "verbose and quiet"],
)
def test_options_that_exclude_each_other(cli, args: list[str], command: str, options: str) -> None:
    done = cli(args)
    assert done.returncode == 2
    prog = f"qwen3-rerank {command}"
    assert _error_lines(done.stderr) == [f"{prog}: error: {options} exclude each other (see '{prog} --help')"]


def test_calls_in_process_leave_logging_as_they_found_it(cli) -> None:
    import logging

    root = logging.getLogger()
    before = (root.level, list(root.handlers), logging.getLogger("transformers").level)
    assert cli(["--quiet", "templates"]).returncode == 0
    assert cli(["-v", "templates", "--json"]).returncode == 0
    assert (root.level, list(root.handlers), logging.getLogger("transformers").level) == before


# -- rank --------------------------------------------------------------------------------------------


def test_rank_prints_a_table_in_the_engines_order(
    cli, tiny_model_dir: Path, docs_file: Path, reranker: Reranker
) -> None:
    done = cli(
        [
            "rank",
            "--query",
            QUERY,
            "--docs",
            str(docs_file),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
        ]
    )

    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["rank", "score", "band", "document"]
    expected = reranker.rerank(QUERY, DOCS)
    assert len(rows) == len(DOCS)  # blank lines of the file are not documents
    for rank, (row, result) in enumerate(zip(rows, expected, strict=True), start=1):
        number, score, band, text = row.split(maxsplit=3)
        assert (int(number), band, text) == (rank, result.band, result.text)
        assert float(score) == pytest.approx(result.score, abs=1e-4)
    # The model, device and dtype in use are logged.
    assert f"Model {tiny_model_dir.name} on cpu (float32)" in done.stderr


def test_rank_reads_stdin_and_prints_json(cli, tiny_model_dir: Path, reranker: Reranker) -> None:
    done = cli(
        ["rank", "-q", QUERY, "--json", "--top-n", "2", "--instruction", "step_by_step",
         "--model", str(tiny_model_dir), "--device", "cpu", "--quiet"],
        stdin="\n".join(DOCS) + "\n",
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # --quiet: no log lines, no progress bars
    payload = json.loads(done.stdout)
    expected = reranker.rerank(QUERY, DOCS, top_n=2, instruction="step_by_step")
    assert payload["query"] == QUERY and payload["instruction"] == "step_by_step"
    assert [(r["rank"], r["index"], r["document"], r["band"]) for r in payload["results"]] == [
        (rank, e.index, e.text, e.band) for rank, e in enumerate(expected, start=1)
    ]
    assert [r["score"] for r in payload["results"]] == pytest.approx([e.score for e in expected], abs=1e-6)
    assert [r["logit"] for r in payload["results"]] == pytest.approx([e.logit for e in expected], abs=1e-5)


def test_rank_with_the_demo_model_warns_that_scores_are_meaningless(
    cli, demo_cache: Path, docs_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QWEN3_RERANK_DEMO_CACHE", str(demo_cache))
    done = cli(["rank", "-q", QUERY, "-d", str(docs_file), "--demo", "--device", "cpu", "--json"])

    assert done.returncode == 0, done.stderr
    assert "RANDOM weights" in done.stderr
    assert json.loads(done.stdout)["model"] == "random-qwen3-reranker-tiny"


@pytest.mark.slow
def test_the_console_script_ranks(tiny_model_dir: Path, docs_file: Path, reranker: Reranker) -> None:
    done = run(
        [
            "rank",
            "-q",
            QUERY,
            "-d",
            str(docs_file),
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--json",
        ]
    )

    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)["results"]
    assert [r["index"] for r in got] == [r.index for r in reranker.rerank(QUERY, DOCS)]
    assert f"Model {tiny_model_dir.name} on cpu (float32)" in done.stderr


_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available on this machine")

BAD_INPUT = [
    # arguments, stdin, exit status, words of the one-line error
    pytest.param(
        ["-q", QUERY, "-d", "/nonexistent/docs.txt"], None, 1, "documents file not found", id="no file"
    ),
    pytest.param(["-q", QUERY], "\n \n", 1, "no documents in stdin", id="no documents on stdin"),
    pytest.param(["-q", QUERY], None, 1, "no documents in stdin", id="nothing piped"),
    pytest.param(["-q", QUERY], "tty", 1, "no documents: pass --docs FILE", id="stdin is a terminal"),
    pytest.param(["-q", "  ", "-d", "-"], "doc\n", 1, "--query must not be empty", id="empty query"),
    pytest.param(
        ["-q", QUERY, "--top-n", "0"], "doc\n", 2, "expected a positive integer, got 0", id="top-n 0"
    ),
    pytest.param(
        ["-q", QUERY, "--band-high", "1.5"], "doc\n", 2, "expected a number in [0, 1]", id="band out of range"
    ),
    pytest.param(
        ["-q", QUERY, "--band-high", "0.5", "--band-medium", "0.6"],
        "doc\n",
        1,
        "must not exceed",
        id="crossed",
    ),
    pytest.param(
        ["-q", QUERY, "--device", "cuda"], "doc\n", 1, "CUDA is not available", id="no CUDA", marks=_CUDA
    ),
    pytest.param(["-q", QUERY, "--device", "tpu"], "doc\n", 1, "device", id="unknown device"),
    pytest.param(["-q", QUERY, "--dtype", "int4"], "doc\n", 1, "dtype must be", id="unknown dtype"),
    pytest.param(
        ["-q", QUERY, "--instruction", " "],
        "doc\n",
        1,
        "instruction must not be empty",
        id="empty instruction",
    ),
    pytest.param(["-d", "-"], "doc\n", 2, "--query", id="missing query"),
]


@pytest.mark.parametrize(("args", "stdin", "status", "words"), BAD_INPUT)
def test_bad_input_exits_non_zero_with_one_line(
    cli, tiny_model_dir: Path, args: list[str], stdin: Any, status: int, words: str
) -> None:
    done = cli(
        ["rank", *args, "--model", str(tiny_model_dir)], stdin=_Terminal() if stdin == "tty" else stdin
    )

    assert done.returncode == status, done.stderr
    assert done.stdout == ""
    lines = _error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert "error: " in lines[0] and words in lines[0]
    assert "Traceback" not in done.stderr


# -- a model that cannot be found ------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither hub can be reached: Hugging Face offline, ModelScope's host never resolves."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MODELSCOPE_ENDPOINT", OFFLINE_MODELSCOPE)
    monkeypatch.delenv("QWEN3_RERANK_SOURCE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def _offline_command(command: str) -> list[str]:
    data = ROOT / "examples" / "data" / "hotline_eval.jsonl"
    return {
        "rank": ["rank", "-q", QUERY, "-d", "-"],
        "batch": ["batch", "-"],
        "serve": ["serve", "--port", str(free_port())],
        "ui": ["ui", "--port", str(free_port())],
        "evaluate": ["evaluate", str(data), "--first-stage", "none"],
    }[command]


@pytest.mark.parametrize("command", ["rank", "batch", "serve", "ui", "evaluate"])
def test_a_model_that_cannot_be_found_says_what_to_type(cli, offline: None, command: str) -> None:
    args = [*_offline_command(command), "--model", MISSING_MODEL]
    stdin = json.dumps({"query": QUERY, "documents": DOCS}) if command == "batch" else "doc\n"
    done = cli(args, stdin=stdin)

    assert done.returncode == 1, done.stderr
    # The command's message is last (serve's log also quotes the exception, under a timestamp).
    message = done.stderr[done.stderr.rindex("\nerror: ") + 1 :]
    lines = message.splitlines()
    assert lines[0] == f"error: Could not get model '{MISSING_MODEL}'. Tried:", done.stderr
    assert lines[1].startswith("  huggingface: ") and lines[2].startswith("  modelscope: ")
    assert lines[3] == "To go on, type one of:"
    typed = [line.split("  # ")[0].strip() for line in lines[4:7]]
    base = shlex.join(["qwen3-rerank", *args[:-2]])
    assert typed == [f"{base} --demo", f"{base} --source modelscope", f"{base} --model DIR"]
    for line in typed:  # each is a command line this very parser accepts
        parsed = build_parser().parse_args(shlex.split(line)[1:])
        assert parsed.command == command
    assert any(f"hf download {MISSING_MODEL} --local-dir DIR" in line for line in lines)
    assert "source='" not in message and "Traceback" not in done.stderr


def test_a_missing_local_directory_speaks_shell_syntax(cli) -> None:
    done = cli(["rank", "-q", QUERY, "--model", "/nonexistent/model", "--source", "local"], stdin="doc\n")

    assert done.returncode == 1
    lines = _error_lines(done.stderr)
    assert lines[0] == "error: model directory '/nonexistent/model' does not exist (--source local)"
    typed = [line.split("  # ")[0].strip() for line in lines[2:]]
    base = shlex.join(["qwen3-rerank", "rank", "-q", QUERY])
    assert typed[:3] == [f"{base} --demo", f"{base} --source modelscope", f"{base} --model DIR"]


# -- serve and ui ------------------------------------------------------------------------------------


class Background:
    """A long-running command; stopped with SIGTERM (then killed) when the test ends."""

    def __init__(self, args: list[str], log: Path, *, entry: list[str] | None = None, env=None) -> None:
        self.log_path = log
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [*(entry or _script()), *args], stdout=self._log, stderr=subprocess.STDOUT, env=env or ENV
        )

    def wait_http(self, url: str, timeout: float = TIMEOUT) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log
            try:
                response = httpx.get(url, timeout=5)
                if response.status_code == 200:
                    return response
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{url} did not answer 200 in {timeout} s:\n{self.log}")

    @property
    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def background(tmp_path: Path) -> Iterator[Callable[..., Background]]:
    started: list[Background] = []

    def start(args: list[str], **kwargs) -> Background:
        bg = Background(args, tmp_path / f"command-{len(started)}.log", **kwargs)
        started.append(bg)
        return bg

    yield start
    for bg in started:
        bg.stop()


@pytest.mark.slow
def test_serve_answers_http_with_an_api_key(tiny_model_dir: Path, background, reranker: Reranker) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = background(
        ["serve", "--model", str(tiny_model_dir), "--device", "cpu", "--port", str(port), "--api-key", "k3y",
         "--band-high", "0.2", "--band-medium", "0.1", "--served-model-name", "qwen3-reranker-test"]
    )  # fmt: skip

    health = server.wait_http(f"{url}/health")
    body = {"query": QUERY, "documents": DOCS}
    refused = httpx.post(f"{url}/v1/rerank", json=body)
    served = httpx.post(f"{url}/v1/rerank", json=body, headers={"Authorization": "Bearer k3y"}, timeout=60)
    ranked = httpx.post(f"{url}/rank", json=body, headers={"Authorization": "Bearer k3y"}, timeout=60)
    code = server.stop()

    assert health.json()["model"] == "qwen3-reranker-test"
    assert refused.status_code == 401
    assert served.status_code == 200, served.text
    assert served.json()["model"] == "qwen3-reranker-test"
    assert [r["index"] for r in served.json()["results"]] == [r.index for r in reranker.rerank(QUERY, DOCS)]
    bands = [r["band"] for r in ranked.json()["results"]]
    expected = [
        "high" if r.score >= 0.2 else "medium" if r.score >= 0.1 else "low"
        for r in reranker.rerank(QUERY, DOCS)
    ]
    assert bands == expected
    log = server.log
    assert f"Model {tiny_model_dir.name} on cpu (float32)" in log
    assert "API key required" in log
    assert code in (0, -signal.SIGTERM)


@pytest.mark.parametrize("command", ["serve", "ui"])
def test_a_taken_port_fails_at_once_and_names_the_option(
    cli, tiny_model_dir: Path, taken_port: int, command: str
) -> None:
    done = cli([command, "--model", str(tiny_model_dir), "--port", str(taken_port)])

    assert done.returncode == 1
    reason = "Address already in use (choose another port with --port)"
    assert _error_lines(done.stderr) == [f"error: cannot listen on 127.0.0.1:{taken_port}: {reason}"]
    assert "Loading" not in done.stderr and "Model " not in done.stderr  # failed before loading the model


@pytest.mark.slow
def test_ui_serves_the_page_with_the_demo_banner(demo_cache: Path, background) -> None:
    port = free_port()
    env = {**ENV, "QWEN3_RERANK_DEMO_CACHE": str(demo_cache), "GRADIO_ANALYTICS_ENABLED": "False"}
    page = background(["ui", "--demo", "--port", str(port)], entry=MODULE, env=env)

    home = page.wait_http(f"http://127.0.0.1:{port}/")
    config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=30).json()

    assert "<html" in home.text.lower()
    props = {c["props"].get("elem_id"): c["props"] for c in config["components"] if c["props"].get("elem_id")}
    assert "random weights" in props["demo-warning"]["value"]
    assert "RANDOM weights" in page.log
    assert "Model random-qwen3-reranker-tiny on cpu (float32)" in page.log


# -- deployment files ----------------------------------------------------------------------------


def _serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse a deployment's command line with the real parser; it must run ``qwen3-rerank serve``."""
    assert Path(argv[0]).name == "qwen3-rerank", argv
    args = build_parser().parse_args(argv[1:])
    assert args.command == "serve"
    return args


def test_supervisor_program_starts_serve_and_outwaits_the_drain(tmp_path: Path) -> None:
    from supervisor.options import ServerOptions

    section = (ROOT / "deploy" / "supervisor" / "qwen3-rerank.conf").read_text()
    # Only what supervisord checks on this machine changes: the user must exist, the log folder too.
    section = section.replace("user=qwen3-rerank", f"user={getpass.getuser()}")
    section = section.replace("/var/log/qwen3-rerank", str(tmp_path))
    conf = tmp_path / "supervisord.conf"
    conf.write_text(f"[supervisord]\nlogfile={tmp_path}/d.log\npidfile={tmp_path}/d.pid\n\n{section}")
    options = ServerOptions()
    options.realize(args=["-c", str(conf)])

    [group] = options.process_group_configs
    [program] = group.process_configs
    args = _serve_args(shlex.split(program.command))
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert program.stopsignal == signal.SIGTERM
    assert program.stopwaitsecs > args.graceful_timeout
    assert program.autorestart and program.stopasgroup


def test_systemd_unit_starts_serve_and_outwaits_the_drain() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=False)
    unit.optionxform = str
    text = (ROOT / "deploy" / "systemd" / "qwen3-rerank.service").read_text()
    unit.read_string(text.replace("\\\n", " "))
    service = unit["Service"]

    args = _serve_args(shlex.split(service["ExecStart"]))
    assert args.host == "0.0.0.0"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > args.graceful_timeout
    assert service["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_dockerfile_starts_serve_for_cpu_and_cuda() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    instructions = dict(re.findall(r"^(ENTRYPOINT|CMD|STOPSIGNAL|EXPOSE) (.+)$", text, flags=re.MULTILINE))

    args = _serve_args(json.loads(instructions["ENTRYPOINT"]) + json.loads(instructions["CMD"]))
    assert (args.host, str(args.port)) == ("0.0.0.0", instructions["EXPOSE"])
    assert instructions["STOPSIGNAL"] == "SIGTERM"
    assert "ARG DEVICE=cpu" in text
    assert re.search(r"cpu\) wheels=cpu ;;", text) and re.search(r'cuda\) wheels="\$CUDA_WHEELS" ;;', text)
    demo = build_parser().parse_args(
        ["serve", "--demo", "--host", "0.0.0.0"]
    )  # the offline trial it documents
    assert demo.demo


@pytest.mark.slow
def test_supervisor_runs_restarts_and_gracefully_stops_the_service(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The deploy program section under a real supervisord; only the machine-specific parts change."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [*MODULE, "serve", "--model", str(tiny_model_dir), "--device", "cpu",
             "--host", "127.0.0.1", "--port", str(port), "--graceful-timeout", "30"]  # fmt: skip
    section = (ROOT / "deploy" / "supervisor" / "qwen3-rerank.conf").read_text()
    section = re.sub(r"^command=.*?\n(?=\S)", f"command={shlex.join(serve)}\n", section, flags=re.M | re.S)
    section = section.replace("user=qwen3-rerank", f"user={getpass.getuser()}")
    section = section.replace("directory=/opt/qwen3-rerank", f"directory={tmp_path}")
    section = section.replace("/var/log/qwen3-rerank", str(tmp_path))
    conf = tmp_path / "supervisord.conf"
    conf.write_text(
        f"[unix_http_server]\nfile={tmp_path}/supervisor.sock\n\n"
        f"[supervisord]\nnodaemon=true\nlogfile={tmp_path}/supervisord.log\npidfile={tmp_path}/supervisord.pid\n\n"
        "[rpcinterface:supervisor]\n"
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
        f"[supervisorctl]\nserverurl=unix://{tmp_path}/supervisor.sock\n\n{section}"
    )
    ctl = [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf)]
    daemon = Background(
        ["-m", "supervisor.supervisord", "-c", str(conf)], tmp_path / "d.out", entry=[sys.executable]
    )
    try:
        daemon.wait_http(f"{url}/health")
        first = int(run(["pid", "qwen3-rerank"], entry=ctl).stdout)
        os.kill(first, signal.SIGKILL)  # a crash: supervisor starts it again
        deadline = time.monotonic() + TIMEOUT
        while (second := run(["pid", "qwen3-rerank"], entry=ctl).stdout.strip()) in ("", "0", str(first)):
            assert time.monotonic() < deadline, "supervisor did not restart the service"
            time.sleep(0.2)
        restarted = daemon.wait_http(f"{url}/health")
        stopped = run(["stop", "qwen3-rerank"], entry=ctl)
        status = run(["status", "qwen3-rerank"], entry=ctl)
        run(["shutdown"], entry=ctl)
        daemon.proc.wait(timeout=60)
    finally:
        daemon.stop()

    assert restarted.json()["status"] == "ok" and int(second) != first
    assert stopped.stdout.strip() == "qwen3-rerank: stopped"
    assert status.stdout.split()[:2] == ["qwen3-rerank", "STOPPED"]
    service_log = (tmp_path / "service.log").read_text()
    assert service_log.count("Serving tiny-qwen3 on cpu (float32)") == 2
    assert "Batcher drained; shutting down" in service_log
    supervisor_log = (tmp_path / "supervisord.log").read_text()
    assert "stopped: qwen3-rerank (terminated by SIGTERM)" in supervisor_log


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--replicas", "2"], "--replicas only apply with --ray"),
        (
            ["--ray", "--replicas", "3", "--max-replicas", "2"],
            "--max-replicas (2) must be at least --replicas (3)",
        ),
        # The service's settings are one configuration, checked the same with and without --ray.
        (["--ray", "--api-key", " "], "--api-key must not be empty"),
    ],
    ids=["ray option without --ray", "max below min", "service setting with --ray"],
)
def test_serve_ray_options_are_checked_before_anything_starts(
    cli, tiny_model_dir: Path, args: list[str], words: str
) -> None:
    done = cli(["serve", "--model", str(tiny_model_dir), "--port", "9", *args])

    assert done.returncode == 1, done.stderr
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and words in lines[0], done.stderr


@pytest.mark.slow
def test_a_reader_that_stops_early_ends_the_command_quietly(tiny_model_dir: Path, tmp_path: Path) -> None:
    # `qwen3-rerank rank ... | head -c 100`: the pipe closes while the output is being written.
    docs = tmp_path / "many.txt"
    docs.write_text("\n".join(f"文档内容比较长的一行 {i}" for i in range(3000)), encoding="utf-8")
    args = ["rank", "--quiet", "--model", str(tiny_model_dir), "-q", QUERY, "-d", str(docs), "--json"]
    proc = subprocess.Popen(
        [*_script(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=ENV
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.read(100)
    proc.stdout.close()
    status = proc.wait(timeout=TIMEOUT)
    stderr = proc.stderr.read().decode()
    assert status == 141, stderr
    assert "error" not in stderr.lower() and "Traceback" not in stderr


# -- batch -------------------------------------------------------------------------------------------

BATCH_BANDS = ConfidenceBands(high=0.5, medium=0.2)
BATCH_OPTIONS = ["--device", "cpu", "--band-high", "0.5", "--band-medium", "0.2"]


def _batch_records(count: int) -> list[dict[str, Any]]:
    """Hotline-like records: plain documents or {id, text} candidates, some with an instruction or top_n."""
    streets = ["建国路", "朝阳路", "中关村大街", "长安街", "望京西路"]
    problems = ["电梯故障", "路灯不亮", "施工噪音扰民", "暖气不热", "井盖丢失", "垃圾清运不及时"]
    records = []
    for i in range(count):
        street, problem = streets[i % 5], problems[i % 6]
        query = f"{street}{i}号小区{problem}，已经三天了"
        pool = [f"{streets[(i + k) % 5]}{problems[(i + 2 * k) % 6]}，工单已处理" for k in range(2 + i % 5)]
        record: dict[str, Any] = {"query": query}
        if i % 3 == 0:
            record["candidates"] = [{"id": f"T-{i}-{k}", "text": text} for k, text in enumerate(pool)]
        else:
            record["documents"] = pool
        if i % 4 != 1:
            record["id"] = f"Q-{i}" if i % 2 else i
        if i % 5 == 0:
            record["instruction"] = "similar_ticket"
        if i % 7 == 0:
            record["top_n"] = 2
        records.append(record)
    return records


def _write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def batch_expected(reranker: Reranker) -> list[list[float]]:
    """The engine's scores of every document of ``_batch_records(240)`` (shorter lists are prefixes).

    One ``score_pairs`` call per instruction: the engine's own cross-query scoring, tested
    against ``score`` in the engine's tests, is the reference here; the command's part is the
    chunking, the bookkeeping and the output.
    """
    records = _batch_records(240)
    expected: list[list[float]] = [[] for _ in records]
    for instruction in {r.get("instruction") for r in records}:
        members = [k for k, r in enumerate(records) if r.get("instruction") == instruction]
        texts = {k: [d if isinstance(d, str) else d["text"] for d in _docs(records[k])] for k in members}
        flat = reranker.score_pairs(
            [(records[k]["query"], t) for k in members for t in texts[k]], instruction
        )
        for k in members:
            expected[k], flat = flat[: len(texts[k])], flat[len(texts[k]) :]
    return expected


def _docs(record: dict[str, Any]) -> list[Any]:
    return record.get("documents") or record["candidates"]


def _check_rankings(
    rows: list[dict[str, Any]], records: list[dict[str, Any]], expected: list[list[float]], top_n=None
) -> None:
    """Each output row against the engine's scores of its record."""
    assert len(rows) == len(records)
    # ``expected`` covers the longest record list; shorter ones are its prefixes.
    for line, (row, record, scores) in enumerate(zip(rows, records, expected, strict=False), start=1):
        docs = _docs(record)
        keep = record.get("top_n") or top_n or len(docs)
        assert (row["id"], row["line"]) == (record.get("id"), line)
        got = row["results"]
        assert len(got) == min(keep, len(docs))
        assert [r["score"] for r in got] == sorted((r["score"] for r in got), reverse=True)
        # The kept documents are the best ones (up to float noise between batchings).
        assert min(r["score"] for r in got) >= sorted(scores, reverse=True)[len(got) - 1] - 1e-5
        for r in got:
            assert r["score"] == pytest.approx(scores[r["index"]], abs=1e-5)
            assert r["band"] == BATCH_BANDS.classify(r["score"])
            if "candidates" in record:
                assert r["id"] == docs[r["index"]]["id"]
            else:
                assert "id" not in r


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records how many pairs each engine call of the command scored (the real engine scores them)."""
    calls: list[int] = []
    real_get_reranker = qwen3_rerank_plugins.get_reranker

    class Counting:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def score_groups(self, groups, **kwargs):
            calls.append(sum(len(g.texts) for g in groups))
            return self._inner.score_groups(groups, **kwargs)

        def score_pairs(self, pairs, *args, **kwargs):
            calls.append(len(pairs))
            return self._inner.score_pairs(pairs, *args, **kwargs)

    monkeypatch.setattr(
        qwen3_rerank_plugins, "get_reranker", lambda *a, **k: Counting(real_get_reranker(*a, **k))
    )
    return calls


def test_batch_ranks_a_file_of_many_records_in_few_engine_calls(
    cli, tiny_model_dir: Path, batch_expected: list[list[float]], tmp_path: Path, engine_calls: list[int]
) -> None:
    records = _batch_records(240)
    source = _write_jsonl(tmp_path / "tickets.jsonl", records)
    out = tmp_path / "ranked.jsonl"
    done = cli(["batch", str(source), "-o", str(out), "--model", str(tiny_model_dir), *BATCH_OPTIONS,
                "--chunk-pairs", "100"])  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    _check_rankings(rows, records, batch_expected)
    pairs = sum(len(_docs(r)) for r in records)
    # Many queries per engine call: whole records, about --chunk-pairs pairs each.
    assert sum(engine_calls) == pairs
    assert len(engine_calls) <= pairs // 100 + 1 < len(records) // 10
    assert all(n < 100 + 6 for n in engine_calls)
    assert f"Ranked 240 records ({pairs} pairs)" in done.stderr


def test_batch_and_rank_take_a_score_cache(cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    """A file whose queries repeat (the nightly re-match): the repeats are answered from the cache."""
    records = _batch_records(4)
    source = _write_jsonl(tmp_path / "tickets.jsonl", records + records[:3])
    out = tmp_path / "ranked.jsonl"
    done = cli(["batch", str(source), "-o", str(out), "--model", str(tiny_model_dir), *BATCH_OPTIONS,
                "--chunk-pairs", "1", "--cache-size", "1000"])  # fmt: skip

    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["results"] for row in rows[4:]] == [row["results"] for row in rows[:3]]
    repeated = sum(len(_docs(r)) for r in records[:3])
    unique = sum(len(_docs(r)) for r in records)
    assert f"Score cache: {repeated} hit(s) (memory {repeated}), {unique} miss(es)" in done.stderr

    plain = cli(["batch", str(source), "-o", str(tmp_path / "plain.jsonl"), "--model", str(tiny_model_dir),
                 *BATCH_OPTIONS, "--chunk-pairs", "1"])  # fmt: skip
    assert plain.returncode == 0 and "Score cache" not in plain.stderr  # off by default
    docs = tmp_path / "docs.txt"
    docs.write_text("工单甲\n工单乙\n工单甲\n", encoding="utf-8")
    ranked = cli(["rank", "-q", "电梯故障", "--docs", str(docs), "--model", str(tiny_model_dir),
                  "--device", "cpu", "--cache-size", "10", "--json"])  # fmt: skip
    assert ranked.returncode == 0, ranked.stderr
    assert "Score cache: 0 hit(s) (memory 0), 2 miss(es)" in ranked.stderr  # the twin computed once
    bad = cli(
        ["rank", "-q", "x", "--docs", str(docs), "--model", str(tiny_model_dir), "--cache-url", "http://x"]
    )
    assert bad.returncode == 1 and "redis://" in bad.stderr


def test_batch_reads_stdin_writes_stdout_and_shows_progress(
    cli, tiny_model_dir: Path, batch_expected: list[list[float]]
) -> None:
    records = _batch_records(12)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines.insert(3, "   ")  # blank lines are skipped but counted
    done = cli(["batch", "--model", str(tiny_model_dir), *BATCH_OPTIONS, "--top-n", "3", "--progress"],
               stdin="\n".join(lines) + "\n")  # fmt: skip

    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["line"] for row in rows] == [1, 2, 3, *range(5, 14)]
    for row in rows:
        row["line"] -= row["line"] > 4
    _check_rankings(rows, records, batch_expected, top_n=3)
    assert "12record" in done.stderr.replace(" ", "")  # the tqdm bar, on stderr


def test_batch_resume_skips_what_is_done_and_redoes_a_half_written_line(
    cli, tiny_model_dir: Path, batch_expected: list[list[float]], tmp_path: Path, engine_calls: list[int]
) -> None:
    records = _batch_records(210)
    source = _write_jsonl(tmp_path / "tickets.jsonl", records)
    full = tmp_path / "full.jsonl"
    assert (
        cli(
            ["batch", str(source), "-o", str(full), "--model", str(tiny_model_dir), *BATCH_OPTIONS]
        ).returncode
        == 0
    )
    finished = full.read_text(encoding="utf-8").splitlines(keepends=True)
    # A run killed after 80 records, in the middle of writing the 81st.
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(finished[:80]) + finished[80][:25], encoding="utf-8")
    engine_calls.clear()

    done = cli(
        ["batch", str(source), "-o", str(partial), "--resume", "--model", str(tiny_model_dir), *BATCH_OPTIONS]
    )

    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in partial.read_text(encoding="utf-8").splitlines()]
    _check_rankings(rows, records, batch_expected)
    assert sum(engine_calls) == sum(len(_docs(r)) for r in records[80:])
    assert "line 81 was left half-written" in done.stderr
    assert "80 were already in" in done.stderr
    # Resuming a finished job scores nothing.
    engine_calls.clear()
    again = cli(
        ["batch", str(source), "-o", str(partial), "--resume", "--model", str(tiny_model_dir), *BATCH_OPTIONS]
    )
    assert again.returncode == 0 and engine_calls == []
    assert partial.read_text(encoding="utf-8").count("\n") == 210


def test_rank_jsonl_is_the_batch_job_from_python(
    reranker: Reranker, batch_expected: list[list[float]], tmp_path: Path
) -> None:
    """The job behind `qwen3-rerank batch`, called as a library function: paths or streams."""
    from qwen3_rerank_plugins.batch import BatchError, rank_jsonl

    engine = reranker.with_settings(bands=BATCH_BANDS)
    records = _batch_records(30)
    source = _write_jsonl(tmp_path / "tickets.jsonl", records)
    out = tmp_path / "ranked.jsonl"
    summary = rank_jsonl(engine, source, out, chunk_pairs=40)
    assert (summary.records, summary.skipped, summary.bad) == (30, 0, [])
    assert summary.pairs == sum(len(_docs(r)) for r in records)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    _check_rankings(rows, records, batch_expected)

    # Resume: a run cut after 10 records (and mid-way through the 11th) is finished, not redone.
    finished = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text("".join(finished[:10]) + finished[10][:20], encoding="utf-8")
    again = rank_jsonl(engine, source, out, resume=True)
    assert (again.records, again.skipped) == (20, 10)
    resumed = [json.loads(line) for line in out.read_text("utf-8").splitlines()]
    _check_rankings(resumed, records, batch_expected)

    # Streams in and out; a bad record is skipped and reported by line, or stops the job.
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records[:3]]
    lines.insert(1, '{"query": "q"}\n')
    sink = io.StringIO()
    skipped = rank_jsonl(engine, lines, sink, top_n=1)
    assert (skipped.records, skipped.bad) == (3, [2])
    # top_n=1 for records that give none (the first gives top_n=2).
    assert [len(json.loads(row)["results"]) for row in sink.getvalue().splitlines()] == [2, 1, 1]
    with pytest.raises(BatchError, match=r"^stdin line 2: no 'documents'"):
        rank_jsonl(engine, lines, io.StringIO(), on_error="stop")
    with pytest.raises(ValueError, match="resume=True needs output to be a file path"):
        rank_jsonl(engine, lines, io.StringIO(), resume=True)
    with pytest.raises(ValueError, match="chunk_pairs must be a positive int"):
        rank_jsonl(engine, lines, io.StringIO(), chunk_pairs=0)


BAD_RECORDS = [
    # (line text, words of its report)
    ("{not json", "not valid JSON"),
    ('["a list"]', "expected a JSON object, got a list"),
    ('{"documents": ["x"]}', "no 'query'"),
    ('{"query": " ", "documents": ["x"]}', "'query' must be a non-empty string"),
    ('{"query": "q"}', "no 'documents' (or 'candidates')"),
    ('{"query": "q", "documents": []}', "'documents' must be a non-empty list"),
    (
        '{"query": "q", "candidates": [{"id": 1}]}',
        "'candidates[0]' must be a string or an object with a string 'text'",
    ),
    ('{"query": "q", "documents": ["x"], "candidates": ["y"]}', "give 'documents' or 'candidates', not both"),
    ('{"query": "q", "documents": ["x"], "top_n": 0}', "'top_n' must be a positive integer, got 0"),
    ('{"query": "q", "documents": ["x"], "id": true}', "'id' must be a string or an integer, got a boolean"),
    ('{"query": "q", "documents": ["x"], "instruction": ""}', "'instruction': instruction must not be empty"),
    ('{"query": "q", "docs": ["x"]}', "unknown field 'docs'"),
]


def test_batch_reports_bad_records_by_line_and_goes_on(
    cli, tiny_model_dir: Path, batch_expected: list[list[float]], tmp_path: Path
) -> None:
    good = _batch_records(len(BAD_RECORDS))
    lines = []
    for record, (bad, _) in zip(good, BAD_RECORDS, strict=True):
        lines += [json.dumps(record, ensure_ascii=False), bad]
    source = tmp_path / "mixed.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")

    done = cli(["batch", str(source), "--model", str(tiny_model_dir), *BATCH_OPTIONS])

    assert done.returncode == 1
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["line"] for row in rows] == list(range(1, 2 * len(good), 2))
    for row in rows:
        row["line"] = (row["line"] + 1) // 2
    _check_rankings(rows, good, batch_expected)
    for k, (_, words) in enumerate(BAD_RECORDS):
        assert f"mixed.jsonl line {2 * k + 2}: {words}" in done.stderr
    shown = ", ".join(str(2 * k + 2) for k in range(10))
    assert _error_lines(done.stderr) == [
        f"error: {len(BAD_RECORDS)} bad record(s) skipped: {source} line {shown}, ..."
    ]


def test_batch_on_error_stop_writes_what_came_before(
    cli, tiny_model_dir: Path, batch_expected: list[list[float]], tmp_path: Path
) -> None:
    records = _batch_records(5)
    source = tmp_path / "stop.jsonl"
    rows = [json.dumps(r, ensure_ascii=False) for r in records]
    source.write_text("\n".join([*rows[:3], '{"query": "q"}', *rows[3:]]) + "\n", encoding="utf-8")

    done = cli(["batch", str(source), "--on-error", "stop", "--model", str(tiny_model_dir), *BATCH_OPTIONS])

    assert done.returncode == 1
    _check_rankings([json.loads(line) for line in done.stdout.splitlines()], records[:3], batch_expected)
    assert _error_lines(done.stderr) == [f"error: {source} line 4: no 'documents' (or 'candidates'): "
                                         'a list of strings or {"text": ...} objects']  # fmt: skip


@pytest.mark.parametrize(
    ("args", "stdin", "words"),
    [
        (["--resume"], "", "--resume needs --output FILE"),
        (["/nonexistent/in.jsonl"], None, "input file not found: /nonexistent/in.jsonl"),
        ([], "tty", "no input: pass a JSONL file or pipe records on stdin"),
        ([], "\n\n", "no records in stdin"),
        (["--instruction", " "], "", "instruction must not be empty"),
    ],
    ids=["resume without output", "missing input", "nothing piped", "empty input", "empty instruction"],
)
def test_batch_usage_errors(
    cli, tiny_model_dir: Path, args: list[str], stdin: str | None, words: str
) -> None:
    done = cli(["batch", *args, "--model", str(tiny_model_dir), "--device", "cpu"],
               stdin=_Terminal() if stdin == "tty" else stdin)  # fmt: skip
    assert done.returncode == 1
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], done.stderr


def _read_line(fd: int, pending: bytearray, timeout: float) -> bytes:
    """One line from a pipe, waiting at most ``timeout`` seconds for it."""
    deadline = time.monotonic() + timeout
    while b"\n" not in pending:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no line within {timeout} s"
        chunk = os.read(fd, 65536)
        assert chunk, "the command closed its stdout"
        pending += chunk
    line, _, rest = bytes(pending).partition(b"\n")
    pending[:] = rest
    return line


@pytest.mark.slow
def test_batch_streams_each_chunk_and_stops_quietly_when_the_reader_goes(tiny_model_dir: Path) -> None:
    """`... | qwen3-rerank batch | reader`: lines come out while input still comes in; `| head` ends it."""
    args = ["batch", "--model", str(tiny_model_dir), "--device", "cpu", "--chunk-pairs", "4", "--quiet"]
    proc = subprocess.Popen(
        [*_script(), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    pending = bytearray()
    try:
        record = {"query": QUERY, "documents": DOCS}
        for i in range(3):
            proc.stdin.write((json.dumps({**record, "id": i}, ensure_ascii=False) + "\n").encode())
            proc.stdin.flush()
            # Each record fills a chunk: its ranking arrives while stdin is still open.
            row = json.loads(_read_line(proc.stdout.fileno(), pending, TIMEOUT))
            assert row["id"] == i and len(row["results"]) == len(DOCS)
        proc.stdout.close()  # the reader goes away (`| head -n 3`)
        with contextlib.suppress(BrokenPipeError):
            for i in range(3, 50):
                proc.stdin.write((json.dumps({**record, "id": i}, ensure_ascii=False) + "\n").encode())
                proc.stdin.flush()
            proc.stdin.close()
        status = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode()
    assert status == 141, stderr
    assert "error" not in stderr.lower() and "Traceback" not in stderr
