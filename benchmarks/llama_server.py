"""llama.cpp as a peer path of ``benchmarks/run.py``: its ``llama-server`` reranking a GGUF.

The user brings a ``llama-server`` binary and GGUF files converted from the same checkpoint the
other paths load (docs/performance.md gives the conversion and build steps). The server is
started on a free port of 127.0.0.1 with the settings under which its float32 log-odds agree
with the engine's (an f32 key/value cache, flash attention off), and scores through its
``/v1/rerank`` endpoint, one request per rerank call, as a RAG stack would call it.

llama.cpp's rerank prompt is the model card's, with the model card's default instruction fixed
in the GGUF's ``rerank`` template, so ``run.py`` gives every path that instruction when a
llama.cpp path runs: all paths then read the same tokens.
"""

from __future__ import annotations

import atexit
import json
import math
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["LlamaServer"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """A running ``llama-server --reranking`` over one GGUF file.

    Args:
        binary: Path of the ``llama-server`` executable.
        gguf: The GGUF file (converted from a Qwen3-Reranker checkpoint: its ``rerank`` template
            and two-row classifier head are what make ``/v1/rerank`` work).
        threads: Threads for generation and batch processing (``-t``/``-tb``); ``None``: its default.
        parallel: Slots (``-np``): documents of one request are evaluated in parallel slots,
            batched into shared forward passes, the way llama.cpp runs many sequences at once.
        slot_tokens: Context of one slot; a prompt must fit in it (and in one micro-batch).
        startup_timeout: Seconds to wait for ``/health``.
    """

    def __init__(
        self,
        binary: str | Path,
        gguf: str | Path,
        *,
        threads: int | None = None,
        parallel: int = 4,
        slot_tokens: int = 2048,
        startup_timeout: float = 300.0,
    ) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.settings = (
            f"-np {parallel}, {slot_tokens} tokens per slot, f32 KV cache, flash attention off"
            + (f", -t {threads}" if threads else "")
        )
        cmd = [str(binary), "-m", str(gguf), "--reranking", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["-c", str(parallel * slot_tokens), "-np", str(parallel)]
        cmd += ["-b", str(parallel * slot_tokens), "-ub", str(slot_tokens)]
        cmd += ["-ctk", "f32", "-ctv", "f32", "-fa", "off"]
        if threads:
            cmd += ["-t", str(threads), "-tb", str(threads)]
        # The server's log, read back when it fails to start.
        self._log = tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False)  # noqa: SIM115
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        atexit.register(self.close)
        self._wait(startup_timeout)

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                status = self._proc.returncode
                raise RuntimeError(f"llama-server exited with status {status}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base}/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.close()
        raise RuntimeError(f"llama-server was not healthy within {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 5) -> str:
        text = Path(self._log.name).read_text(errors="replace").strip().splitlines()
        return " / ".join(text[-lines:])

    def rerank(self, query: str, documents: list[str]) -> list[float]:
        """Each document's relevance, in input order: for a Qwen3 reranker GGUF the sigmoid of
        its log-odds ``z_yes - z_no``, as the engine's probabilities."""
        body = json.dumps({"query": query, "documents": documents, "top_n": len(documents)}).encode()
        request = urllib.request.Request(
            f"{self.base}/v1/rerank", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=600) as resp:
            results = json.loads(resp.read())["results"]
        scores = [math.nan] * len(documents)
        for item in results:
            scores[item["index"]] = float(item["relevance_score"])
        if any(math.isnan(s) for s in scores):
            raise RuntimeError(f"llama-server answered {len(results)} of {len(documents)} documents")
        return scores

    def peak_mb(self) -> float:
        """The server's peak resident memory so far (VmHWM), in MiB."""
        try:
            with open(f"/proc/{self._proc.pid}/status") as fh:
                for line in fh:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return math.nan

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._log.close()
