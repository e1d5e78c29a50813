"""Start-up time of the CLI with the demo model, against the floor of its imports.

Wall time of fresh processes, in alternating rounds (best and median of ``--rounds``):

* ``import torch``, and torch + transformers' ``AutoTokenizer``: the floor a run pays whatever
  this package does (the model runs on the package's own decoder, ``modeling.py``);
* torch + transformers' ``modeling_qwen3``: what loading through transformers' modelling code
  costs (the floor before ``modeling.py``);
* ``qwen3-rerank --help``;
* ``qwen3-rerank rank --demo -q ... `` (two documents on stdin), from start to exit;
* ``qwen3-rerank serve --demo``: time to the first ``/health`` answer (503 while loading) and to
  ``/health`` 200 (ready).

``--before SRC`` times a second source tree (``PYTHONPATH=SRC``) in the same rounds, alternating,
for before/after figures measured under the same load. The demo model must already be cached
(one ``rank --demo`` run builds it). Usage::

    flock /tmp/bench.lock python benchmarks/startup.py --rounds 5 [--before /tmp/base/src]

The scores of the demo model are meaningless (random weights); only the times are measured.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from service_throughput import _free_port  # serve --demo needs the [server] extra, as that script does

FLOOR_TORCH = [sys.executable, "-c", "import torch"]
FLOOR_QWEN3 = [
    sys.executable,
    "-c",
    "import torch, transformers; from transformers.models.qwen3 import modeling_qwen3",
]
#: What the native decoder (modeling.py) still imports beyond torch: transformers' tokenizer.
FLOOR_TOKENIZER = [
    sys.executable,
    "-c",
    "import torch, safetensors.torch; from transformers import AutoTokenizer",
]
CLI = [sys.executable, "-m", "qwen3_rerank_plugins"]


def _env(src: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if src:
        env["PYTHONPATH"] = src
    return env


def _wall(cmd: list[str], env: dict[str, str], stdin: str | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, input=stdin, env=env, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({done.returncode}): {done.stderr[-2000:]}")
    return took


def _serve(env: dict[str, str]) -> tuple[float, float]:
    """Seconds to the first /health answer and to /health 200 of ``serve --demo``."""
    port = _free_port()
    cmd = [*CLI, "serve", "--demo", "--port", str(port), "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    try:
        while time.perf_counter() - start < 300:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.02)
                continue
            now = time.perf_counter() - start
            first = now if first is None else first
            if status == 200:
                return first, now
            time.sleep(0.02)
        raise RuntimeError("serve --demo not ready in 300 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _cpu_line() -> str:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()
    return f"torch {torch.__version__}, CPU capability {capability}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"))
    parser.add_argument("--before", help="a second source tree to time in the same rounds")
    parser.add_argument("--no-serve", action="store_true")
    args = parser.parse_args()

    trees = {"after": args.src} if not args.before else {"before": args.before, "after": args.src}
    times: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        times.setdefault(key, []).append(value)

    print(_cpu_line())
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    _wall([*CLI, "rank", "--demo", "-q", "warm"], _env(args.src), stdin="d\n")  # builds the demo model once
    for _ in range(args.rounds):
        add("floor: import torch", _wall(FLOOR_TORCH, _env(None)))
        add("floor: torch + transformers' AutoTokenizer", _wall(FLOOR_TOKENIZER, _env(None)))
        add(
            "torch + transformers + modeling_qwen3 (not imported since modeling.py)",
            _wall(FLOOR_QWEN3, _env(None)),
        )
        for name, src in trees.items():
            env = _env(src)
            add(f"{name}: --help", _wall([*CLI, "--help"], env))
            add(
                f"{name}: rank --demo",
                _wall([*CLI, "rank", "--demo", "-q", "q"], env, stdin="doc one\ndoc two\n"),
            )
            if not args.no_serve:
                first, ready = _serve(env)
                add(f"{name}: serve --demo, first /health answer", first)
                add(f"{name}: serve --demo, /health 200", ready)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"\n| wall time, s ({args.rounds} rounds) | best | median |\n|---|---|---|")
    for key, values in times.items():
        print(f"| {key} | {min(values):.2f} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
