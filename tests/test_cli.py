"""The ``qwen3-rerank`` command line through its real entry points, in subprocesses.

Both the console script and ``python -m qwen3_rerank_plugins`` are exercised; every command
runs on the tiny random model (or the demo model, built from the same recipe) on CPU.
"""

from __future__ import annotations

import argparse
import configparser
import getpass
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from qwen3_rerank_plugins import Reranker, list_instruction_templates
from qwen3_rerank_plugins.cli import build_parser

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


def _script() -> list[str]:
    if SCRIPT is None:
        pytest.fail("the qwen3-rerank console script is not installed (pip install -e .)")
    return [SCRIPT]


def run(args: list[str], *, entry: list[str] | None = None, stdin: str | None = None, env=None):
    return subprocess.run(
        [*(entry or _script()), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env or ENV,
        stdin=None if stdin is not None else subprocess.DEVNULL,
    )


def _error_lines(stderr: str) -> list[str]:
    """The lines the command wrote itself on failure (log lines have a timestamp)."""
    return [line for line in stderr.splitlines() if line and not re.match(r"\d{4}-\d\d-\d\d ", line)]


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


@pytest.mark.parametrize("command", [[], ["rank"], ["serve"], ["ui"], ["templates"]])
def test_help_of_every_command(command: list[str]) -> None:
    done = run([*command, "--help"])

    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: qwen3-rerank {' '.join(command)}".rstrip())
    if command in (["rank"], ["serve"], ["ui"]):
        assert "--model" in done.stdout and "--device" in done.stdout and "--demo" in done.stdout
    if command == ["serve"]:
        for option in (
            "--host",
            "--port",
            "--api-key",
            "--max-documents",
            "--band-high",
            "--graceful-timeout",
        ):
            assert option in done.stdout


def test_python_dash_m_is_the_same_command() -> None:
    done = run(["--help"], entry=MODULE)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: qwen3-rerank")
    for command in ("rank", "serve", "ui", "templates"):
        assert command in done.stdout


def test_templates_lists_every_named_template() -> None:
    done = run(["templates", "--json"], entry=MODULE)
    assert done.returncode == 0, done.stderr
    assert [t["name"] for t in json.loads(done.stdout)] == [t.name for t in list_instruction_templates()]


# -- rank --------------------------------------------------------------------------------------------


def test_rank_prints_a_table_in_the_engines_order(
    tiny_model_dir: Path, docs_file: Path, reranker: Reranker
) -> None:
    done = run(
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


def test_rank_reads_stdin_and_prints_json(tiny_model_dir: Path, reranker: Reranker) -> None:
    done = run(
        [
            "rank",
            "-q",
            QUERY,
            "--json",
            "--top-n",
            "2",
            "--instruction",
            "step_by_step",
            "--model",
            str(tiny_model_dir),
            "--quiet",
        ],
        entry=MODULE,
        stdin="\n".join(DOCS) + "\n",
    )

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
    demo_cache: Path, docs_file: Path
) -> None:
    env = {**ENV, "QWEN3_RERANK_DEMO_CACHE": str(demo_cache)}
    done = run(["rank", "-q", QUERY, "-d", str(docs_file), "--demo", "--json"], env=env)

    assert done.returncode == 0, done.stderr
    assert "RANDOM weights" in done.stderr
    assert json.loads(done.stdout)["model"] == "random-qwen3-reranker-tiny"


BAD_INPUT = [
    # (case, arguments, stdin, exit status, words of the one-line error)
    ("missing docs file", ["-q", QUERY, "-d", "/nonexistent/docs.txt"], None, 1, "documents file not found"),
    ("no documents on stdin", ["-q", QUERY], "\n \n", 1, "no documents in stdin"),
    ("nothing piped", ["-q", QUERY], None, 1, "no documents in stdin"),
    ("empty query", ["-q", "  ", "-d", "-"], "doc\n", 1, "--query must not be empty"),
    ("top-n zero", ["-q", QUERY, "--top-n", "0"], "doc\n", 2, "expected a positive integer, got 0"),
    ("band out of range", ["-q", QUERY, "--band-high", "1.5"], "doc\n", 2, "expected a number in [0, 1]"),
    (
        "bands crossed",
        ["-q", QUERY, "--band-high", "0.5", "--band-medium", "0.6"],
        "doc\n",
        1,
        "must not exceed",
    ),
    ("no CUDA", ["-q", QUERY, "--device", "cuda"], "doc\n", 1, "CUDA is not available"),
    ("unknown device", ["-q", QUERY, "--device", "tpu"], "doc\n", 1, "device"),
    ("unknown dtype", ["-q", QUERY, "--dtype", "int8"], "doc\n", 1, "dtype must be"),
    (
        "missing model",
        ["-q", QUERY, "--model", "/nonexistent/model", "--source", "local"],
        "doc\n",
        1,
        "/nonexistent",
    ),
    ("empty instruction", ["-q", QUERY, "--instruction", " "], "doc\n", 1, "instruction must not be empty"),
    ("missing query", ["-d", "-"], "doc\n", 2, "--query"),
]


@pytest.mark.parametrize(
    ("args", "stdin", "status", "words"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input_exits_non_zero_with_one_line(
    tiny_model_dir: Path, args: list[str], stdin: str | None, status: int, words: str
) -> None:
    if "--model" not in args:
        args = [*args, "--model", str(tiny_model_dir)]
    done = run(["rank", *args], stdin=stdin)

    assert done.returncode == status, done.stderr
    assert done.stdout == ""
    lines = _error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    assert "error: " in lines[0] and words in lines[0]
    assert "Traceback" not in done.stderr


# -- serve and ui ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def background(tmp_path: Path) -> Iterator[callable]:
    started: list[Background] = []

    def start(args: list[str], **kwargs) -> Background:
        bg = Background(args, tmp_path / f"command-{len(started)}.log", **kwargs)
        started.append(bg)
        return bg

    yield start
    for bg in started:
        bg.stop()


def test_serve_answers_http_with_an_api_key(tiny_model_dir: Path, background, reranker: Reranker) -> None:
    port = _free_port()
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


def test_serve_on_a_taken_port_fails_at_once_with_one_line(tiny_model_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(["serve", "--model", str(tiny_model_dir), "--port", str(port)], entry=MODULE)

    assert done.returncode == 1
    assert _error_lines(done.stderr) == [f"error: cannot listen on 127.0.0.1:{port}: Address already in use"]
    assert "Loading" not in done.stderr  # failed before loading the model


def test_ui_serves_the_page_with_the_demo_banner(demo_cache: Path, background) -> None:
    port = _free_port()
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


def test_supervisor_runs_restarts_and_gracefully_stops_the_service(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The deploy program section under a real supervisord; only the machine-specific parts change."""
    port = _free_port()
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
        (["--ray", "--max-batch-pairs", "64"], "--max-batch-pairs does not apply with --ray"),
    ],
    ids=["ray option without --ray", "max below min", "plain-server option with --ray"],
)
def test_serve_ray_options_are_checked_before_anything_starts(
    tiny_model_dir: Path, args: list[str], words: str
) -> None:
    done = run(["serve", "--model", str(tiny_model_dir), "--port", "9", *args])

    assert done.returncode == 1, done.stderr
    lines = _error_lines(done.stderr)
    assert len(lines) == 1 and words in lines[0], done.stderr


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
