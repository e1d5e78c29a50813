#!/usr/bin/env python
"""Benchmark Qwen3-Reranker scoring paths on the same inputs, in one run.

Paths (each in its own subprocess, so peak memory is its own):

* ``model-card``: the model card's transformers code (full-vocabulary logits, left padding, one
  padded batch per request); the oracle in ``tests/reference.py``.
* ``sentence-transformers``: ``CrossEncoder`` on the causal LM as its docs describe (LogitScore
  on ``yes``/``no`` with ``logits_to_keep=1``), the model card's prompt as its chat template.
* ``engine``: this package's :class:`~qwen3_rerank_plugins.Reranker`, default settings.
* ``engine-no-prefix-cache``: the engine without prefix key/value reuse (what the reuse buys).
* ``engine-bf16``: the optional low-precision CPU path (bfloat16 weights, float32 head).
* ``engine-int8``: the opt-in int8 CPU path (int8 weights, two-digit int8 activations, float32 head).

Each path reports pairs/s per workload, latency p50/p95 of a 10-document request, peak memory
(RSS on CPU, ``max_memory_allocated`` on CUDA) and max |Δscore| against ``model-card``.

Usage::

    python benchmarks/run.py            # full CPU run, writes benchmarks/RESULTS.md and results.png
    python benchmarks/run.py --quick    # regression check (~2 min), exit status 1 on regression
    python benchmarks/run.py --device cuda --sizes issue   # on a GPU (bf16)
    python benchmarks/run.py --precision --layers 6 --threads 2 --rounds 3
        # engine fp32 / bf16 / int8 side by side: pairs/s, peak RSS, agreement with fp32
        # (writes benchmarks/RESULTS-precision.md)

Without a model hub the model is a random-weight Qwen3-Reranker of a real shape (``--shape``)
with the real Qwen3 tokenizer, built once under ``benchmarks/.work/``: speed and memory are
real, scores are meaningless. ``--model`` takes real weights (hub id or directory).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(ROOT / "tests"))  # the model-card oracle, tests/reference.py

from workloads import SIZES, Request, Workload, build_workloads, latency_request  # noqa: E402

PATHS: dict[str, str] = {
    "model-card": "model card's transformers code: full logits, left padding, one batch per request",
    "sentence-transformers": "sentence-transformers CrossEncoder on the causal LM (yes/no LogitScore)",
    "engine": "qwen3_rerank_plugins.Reranker, default settings",
    "engine-no-prefix-cache": "the engine with prefix_cache=False",
    "engine-bf16": "the engine with dtype='bfloat16' (optional low-precision path)",
    "engine-int8": "the engine with dtype='int8' (int8 weights, two-digit int8 activations, float32 head)",
    "engine-batched": "the engine scoring a workload's requests in one score_groups call (batch mode)",
    "llama.cpp-f32": "llama.cpp's llama-server /v1/rerank on an f32 GGUF (--llama-server, --gguf f32=FILE)",
    "llama.cpp-q8_0": "llama.cpp's llama-server /v1/rerank on a Q8_0 GGUF (--gguf q8_0=FILE)",
}
DEFAULT_PATHS = {
    "cpu": ["model-card", "sentence-transformers", "engine", "engine-no-prefix-cache", "engine-bf16"],
    "cuda": ["model-card", "sentence-transformers", "engine", "engine-batched"],
}
QUICK_PATHS = ["model-card", "engine"]
#: Paths measured on a subset of the workloads only (the rest would add minutes, not information).
PATH_WORKLOADS = {"engine-no-prefix-cache": {"W1", "W2"}}
# llama.cpp reads whole documents: W4's are cut to max_length by the other paths, so it would
# not read the same tokens there.
PATH_WORKLOADS.update({p: {"W1", "W2", "W3"} for p in PATHS if p.startswith("llama.cpp-")})
LOW_PRECISION_PATHS = {"engine-bf16", "engine-int8"}
#: ``--precision``: the engine in each CPU precision, compared with its own float32.
PRECISION_PATHS = ["engine", "engine-bf16", "engine-int8"]


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak memory of this process over a stretch of work: RSS on CPU, allocated bytes on CUDA."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS.
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass

    def peak_mb(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        kb = _status_kb("VmHWM")
        if not kb:
            import resource

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024

    def current_mb(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated() / 2**20
        return _status_kb("VmRSS") / 1024


# ---------------------------------------------------------------------------------------------
# The paths (run inside a worker subprocess)
# ---------------------------------------------------------------------------------------------


def _st_chat_template() -> str:
    """The model card's prompt as a chat template for sentence-transformers' query/document roles."""
    from qwen3_rerank_plugins.templates import DEFAULT_INSTRUCTION, PROMPT_PREFIX, PROMPT_SUFFIX

    def role(name: str) -> str:
        return f'messages | selectattr("role", "eq", "{name}") | map(attribute="content") | first'

    body = (
        f'<Instruct>: {{{{ {role("system")} | default("{DEFAULT_INSTRUCTION}") }}}}\n'
        f"<Query>: {{{{ {role('query')} }}}}\n<Document>: {{{{ {role('document')} }}}}"
    )
    # The trailing expression keeps Jinja from stripping the suffix's final newline.
    return PROMPT_PREFIX + body + PROMPT_SUFFIX + "{{ '' }}"


def _load_path(path: str, model_dir: str, device: str, dtype: str):
    """Load one path; return ``score(request, max_length) -> list[float]`` and a token counter."""
    import torch

    torch_dtype = getattr(torch, dtype)
    if path == "model-card":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from reference import model_card_scores

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        def score(req: Request, max_length: int) -> list[float]:
            pairs = [(req.query, d) for d in req.documents]
            return model_card_scores(model, tokenizer, pairs, req.instruction, max_length)

        return score

    if path == "sentence-transformers":
        from sentence_transformers import CrossEncoder

        encoder = CrossEncoder(
            model_dir,
            device=device,
            processor_kwargs={"chat_template": _st_chat_template()},
            model_kwargs={"dtype": torch_dtype},
        )

        def score(req: Request, max_length: int) -> list[float]:
            encoder.max_seq_length = max_length
            pairs = [(req.query, d) for d in req.documents]
            out = encoder.predict(pairs, prompt=req.instruction, show_progress_bar=False)
            return [float(x) for x in out]

        return score

    from qwen3_rerank_plugins import Reranker

    settings: dict[str, Any] = {}
    if path == "engine-no-prefix-cache":
        settings["prefix_cache"] = False
    if path == "engine-bf16":
        dtype = "bfloat16"
    if path == "engine-int8":
        dtype = "int8"
    rr = Reranker.from_pretrained(model_dir, device=device, dtype=dtype, **settings)
    views: dict[int, Any] = {}

    def score(req: Request, max_length: int) -> list[float]:
        view = views.setdefault(max_length, rr.with_settings(max_length=max_length))
        return view.score(req.query, req.documents, req.instruction)

    def score_all(requests: list[Request], max_length: int) -> list[list[float]]:
        from qwen3_rerank_plugins import ScoreGroup

        view = views.setdefault(max_length, rr.with_settings(max_length=max_length))
        groups = [ScoreGroup(r.query, r.documents, r.instruction) for r in requests]
        return [[1 / (1 + math.exp(-x)) for x in g.logits] for g in view.score_groups(groups)]

    score.reranker = rr  # type: ignore[attr-defined]
    if path == "engine-batched":
        score.batched = score_all  # type: ignore[attr-defined]
    return score


def _llama_cpp_path(spec: dict[str, Any], kind: str):
    """``score`` over llama.cpp's server on the GGUF given for ``kind`` (``f32``, ``q8_0``)."""
    from llama_server import LlamaServer

    server = LlamaServer(
        spec["llama_server"], spec["gguf"][kind], threads=spec.get("threads"), parallel=spec["llama_parallel"]
    )

    def score(req: Request, max_length: int) -> list[float]:
        return server.rerank(req.query, req.documents)  # probabilities, as the other paths give

    score.peak_mb = server.peak_mb  # type: ignore[attr-defined]
    return score


def _linear_params(reranker: Any) -> int:
    """Parameters a token passes through in the backbone (all but the embedding table)."""
    backbone = reranker._core.backbone
    embedding = backbone.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in backbone.parameters()) - embedding


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _timed(score, req: Request, max_length: int, device: str) -> tuple[float, list[float]]:
    _sync(device)
    start = time.perf_counter()
    scores = score(req, max_length)
    _sync(device)
    return time.perf_counter() - start, scores


def run_worker(path: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Measure one path on every workload of ``spec`` (called in a fresh subprocess)."""
    import torch

    from qwen3_rerank_plugins.templates import resolve_instruction

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, dtype = spec["device"], spec["dtype"]
    memory = PeakMemory(device)
    start = time.perf_counter()
    if path.startswith("llama.cpp-"):
        score = _llama_cpp_path(spec, path.removeprefix("llama.cpp-"))
    else:
        score = _load_path(path, spec["model_dir"], device, dtype)
    result: dict[str, Any] = {
        "path": path,
        "load_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "workloads": {},
    }
    warm = latency_request()
    score(Request(warm.query, warm.documents[:2]), 8192)
    result["loaded_mb"] = memory.current_mb()

    wanted = PATH_WORKLOADS.get(path)
    for data in spec["workloads"]:
        workload = Workload.from_dict(data)
        if wanted is not None and workload.name not in wanted:
            continue
        memory.reset()
        times, scores = [], []
        # W1 is the 10-document request whose latency is reported: its runs give p50/p95.
        runs = max(spec["repeats"], spec["latency_repeats"]) if workload.name == "W1" else spec["repeats"]
        for _ in range(runs):
            scores = []
            elapsed = 0.0
            batched = getattr(score, "batched", None)
            if batched is not None:  # every request of the workload in one call
                _sync(device)
                begin = time.perf_counter()
                scores = batched(workload.requests, workload.max_length)
                _sync(device)
                elapsed = time.perf_counter() - begin
            for req in workload.requests if batched is None else []:
                seconds, got = _timed(score, req, workload.max_length, device)
                elapsed += seconds
                scores.append(got)
            times.append(elapsed)
        server_peak = getattr(score, "peak_mb", None)
        entry = {
            "seconds": statistics.median(times),
            "runs_ms": [t * 1000 for t in times],
            "pairs": workload.pairs,
            "peak_mb": server_peak() if server_peak else memory.peak_mb(),
            "scores": scores,
        }
        rr = getattr(score, "reranker", None)
        if rr is not None:
            view = rr.with_settings(max_length=workload.max_length)
            ids = [view.prompt_ids(r.query, r.documents, r.instruction) for r in workload.requests]
            entry["prompt_tokens"] = sum(len(x) for group in ids for x in group)
            entry["max_prompt_tokens"] = max(len(x) for group in ids for x in group)
            entry["linear_params"] = _linear_params(rr)
        result["workloads"][workload.name] = entry

    lat = latency_request()
    w1 = result["workloads"].get("W1")
    if w1 is not None and w1["pairs"] == len(lat.documents):
        result["latency_ms"] = w1["runs_ms"]
    else:
        lat.instruction = resolve_instruction(lat.instruction)
        result["latency_ms"] = [
            _timed(score, lat, 8192, device)[0] * 1000 for _ in range(spec["latency_repeats"])
        ]

    if path == "engine" and spec.get("linearity"):
        base = latency_request()
        docs, instruction = base.documents, resolve_instruction(base.instruction)
        result["linearity"] = {
            n: _timed(score, Request(base.query, (docs * 2)[:n], instruction), 8192, device)[0]
            for n in (5, 10, 20)
        }
    return result


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (ties get their average rank)."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 1.0


def top_k_agreement(a: list[float], b: list[float], k: int = 3) -> float:
    """Share of ``a``'s top-k documents that are also in ``b``'s top-k."""
    k = min(k, len(a))

    def top(v: list[float]) -> set[int]:
        return set(sorted(range(len(v)), key=lambda i: (-v[i], i))[:k])

    return len(top(a) & top(b)) / k


def _machine(device: str) -> dict[str, str]:
    import torch
    import transformers

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    try:
        import sentence_transformers

        info["sentence-transformers"] = sentence_transformers.__version__
    except ImportError:
        info["sentence-transformers"] = "not installed"
    if device.startswith("cuda"):
        info["device"] = torch.cuda.get_device_name(0)
    else:
        with open("/proc/cpuinfo") as fh:
            names = [line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")]
        model = names[0] if names else platform.processor()
        mem_gb = _status_meminfo_gb()
        info["device"] = f"{model}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM"
        info["cpu capability"] = torch.backends.cpu.get_cpu_capability()
        from qwen3_rerank_plugins.device import cpu_features

        info["cpu features"] = cpu_features().describe()
        capped = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
        if capped:
            info["dispatch capped"] = (
                ", ".join(f"{k}={v}" for k, v in capped.items())
                + ": figures are emulated "
                + str(torch.backends.cpu.get_cpu_capability())
                + " (dispatch capped), not a real CPU of that kind"
            )
    return info


def _status_meminfo_gb() -> float:
    try:
        with open("/proc/meminfo") as fh:
            return int(fh.readline().split()[1]) / 2**20
    except OSError:
        return float("nan")


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _run_path(path: str, spec_file: Path, timeout: float) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", dir=spec_file.parent, delete=False) as fh:
        result_file = Path(fh.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", path, "--spec", str(spec_file)]
    cmd += ["--result", str(result_file)]
    print(f"[{time.strftime('%H:%M:%S')}] {path} ...", flush=True)
    try:
        proc = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {"path": path, "error": " / ".join(tail) or f"exit status {proc.returncode}"}
        return json.loads(result_file.read_text())
    except subprocess.TimeoutExpired:
        return {"path": path, "error": f"timed out after {timeout:.0f} s"}
    finally:
        result_file.unlink(missing_ok=True)


def _model_dir(args: argparse.Namespace) -> tuple[str, bool]:
    if args.model:
        from qwen3_rerank_plugins.sources import resolve_model_dir

        path, _ = resolve_model_dir(args.model)
        return str(path), False
    from qwen3_rerank_plugins.demo import demo_model_dir

    if args.layers:
        return str(_reduced_model_dir(args.shape, args.layers)), True
    return str(demo_model_dir(args.shape, cache_dir=WORK)), True


def _reduced_model_dir(shape: str, layers: int) -> Path:
    """A random-weight model of a real shape with fewer layers (every layer of the real size)."""
    import dataclasses

    from qwen3_rerank_plugins import demo

    target = WORK / f"random-qwen3-reranker-{shape}-{layers}layers"
    if (target / ".complete").is_file():
        return target
    name = f"{shape}-{layers}layers"
    demo.MODEL_SHAPES.setdefault(
        name, dataclasses.replace(demo.MODEL_SHAPES[shape], num_hidden_layers=layers)
    )
    demo.create_random_reranker(target, name, tokenizer="qwen")
    (target / ".complete").write_text(json.dumps({"shape": shape, "layers": layers, "random_weights": True}))
    return target


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _run_rounds(paths: list[str], spec_file: Path, rounds: int, timeout: float) -> list[dict[str, Any]]:
    """Each path in its own process, ``rounds`` times in alternating order; best time per workload."""
    best: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, Any]] = {}
    for n in range(rounds):
        for path in paths if n % 2 == 0 else paths[::-1]:
            if path in errors:
                continue
            res = _run_path(path, spec_file, timeout)
            if "error" in res:
                errors[path] = res
                continue
            kept = best.setdefault(path, res)
            kept.setdefault("rounds", 0)
            kept["rounds"] += 1
            if kept is res:
                continue
            for name, entry in res["workloads"].items():
                old = kept["workloads"][name]
                old["peak_mb"] = max(old["peak_mb"], entry["peak_mb"])
                old["runs_ms"] += entry["runs_ms"]
                old["seconds"] = min(old["seconds"], entry["seconds"])
            kept["latency_ms"] += res["latency_ms"]
    return [best[p] if p in best else errors[p] for p in paths if p in best or p in errors]


def _summarise_precision(results: list[dict[str, Any]], workloads: list[Workload]) -> dict[str, Any]:
    """Each precision against the engine's float32 in the same run."""
    by_path = {r["path"]: r for r in results if "error" not in r}
    ref = by_path.get("engine")
    rows = []
    for workload in workloads:
        base = ref["workloads"].get(workload.name) if ref else None
        for path, res in by_path.items():
            w = res["workloads"].get(workload.name)
            if w is None:
                continue
            row: dict[str, Any] = {
                "workload": workload.name,
                "path": path,
                "pairs": w["pairs"],
                "pairs_per_s": w["pairs"] / w["seconds"],
                "peak_mb": w["peak_mb"],
            }
            if base:
                row["speedup"] = row["pairs_per_s"] / (base["pairs"] / base["seconds"])
                groups = list(zip(base["scores"], w["scores"], strict=True))
                row["max_dlogit"] = max(
                    abs(_logit(a) - _logit(b)) for ga, gb in groups for a, b in zip(ga, gb, strict=True)
                )
                row["spearman_min"] = min(spearman(a, b) for a, b in groups)
                row["spearman_mean"] = statistics.fmean(spearman(a, b) for a, b in groups)
                row["top3"] = statistics.fmean(top_k_agreement(a, b) for a, b in groups)
            rows.append(row)
    return {"rows": rows, "errors": {r["path"]: r["error"] for r in results if "error" in r}}


def _precision_table(summary: dict[str, Any], results: list[dict[str, Any]]) -> str:
    rounds = {r["path"]: r.get("rounds", 1) for r in results if "error" not in r}
    lines = [
        "| workload | path | pairs | pairs/s (best) | × fp32 | peak RSS (MB) | max abs Δlogit "
        "| Spearman min / mean | top-3 agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        ref = row["path"] == "engine"
        lines.append(
            f"| {row['workload']} | {row['path']} | {row['pairs']} | {row['pairs_per_s']:.2f} | "
            f"{_fmt(row.get('speedup'), '.2f')} | {row['peak_mb']:.0f} | "
            + ("(reference) | | |" if ref else f"{row['max_dlogit']:.2e} | ")
            + ("" if ref else f"{row['spearman_min']:.4f} / {row['spearman_mean']:.4f} | {row['top3']:.0%} |")
        )
    lines += ["", "Rounds per path (best time kept): " + ", ".join(f"{p} {n}" for p, n in rounds.items())]
    for path, error in summary["errors"].items():
        lines.append(f"\n`{path}` did not run: {error}")
    return "\n".join(lines)


def _summarise(
    results: list[dict[str, Any]], workloads: list[Workload], peak_tflops: float | None = None
) -> dict[str, Any]:
    """Ratios against the model card, |Δscore|, agreement of low-precision paths with fp32."""
    by_path = {r["path"]: r for r in results if "error" not in r}
    ref = by_path.get("model-card")
    rows = []
    for workload in workloads:
        base = ref["workloads"][workload.name] if ref else None
        for path, res in by_path.items():
            w = res["workloads"].get(workload.name)
            if w is None:
                continue
            row = {
                "workload": workload.name,
                "path": path,
                "pairs": w["pairs"],
                "pairs_per_s": w["pairs"] / w["seconds"],
                "peak_mb": w["peak_mb"],
            }
            if base:
                row["speedup"] = row["pairs_per_s"] / (base["pairs"] / base["seconds"])
                row["memory_ratio"] = w["peak_mb"] / base["peak_mb"]
                flat = [x for group in w["scores"] for x in group]
                flat_ref = [x for group in base["scores"] for x in group]
                row["max_dscore"] = max(abs(a - b) for a, b in zip(flat, flat_ref, strict=True))
                if path in LOW_PRECISION_PATHS:
                    pairs = list(zip(base["scores"], w["scores"], strict=True))
                    row["spearman"] = statistics.fmean(spearman(a, b) for a, b in pairs)
                    row["top3"] = statistics.fmean(top_k_agreement(a, b) for a, b in pairs)
            if "max_prompt_tokens" in w:
                row["max_prompt_tokens"] = w["max_prompt_tokens"]
                row["max_length"] = workload.max_length
                row["prompt_tokens"] = w["prompt_tokens"]
                if peak_tflops:
                    # Model FLOPs of the full prompts (2 per parameter per token) over the GPU's peak.
                    flops = 2 * w["linear_params"] * w["prompt_tokens"] / w["seconds"]
                    row["mfu"] = flops / (peak_tflops * 1e12)
            rows.append(row)
    latency = {
        path: {
            "p50": _percentile(res["latency_ms"], 50),
            "p95": _percentile(res["latency_ms"], 95),
            "n": len(res["latency_ms"]),
        }
        for path, res in by_path.items()
    }
    return {
        "rows": rows,
        "latency": latency,
        "errors": {r["path"]: r["error"] for r in results if "error" in r},
    }


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def _tables(summary: dict[str, Any], results: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | path | pairs | pairs/s | × model card | peak memory (MB) | × model card "
        "| max abs Δscore |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["rows"]:
        dscore = row.get("max_dscore")
        lines.append(
            f"| {row['workload']} | {row['path']} | {row['pairs']} | {row['pairs_per_s']:.2f} | "
            f"{_fmt(row.get('speedup'), '.2f')} | {row['peak_mb']:.0f} | "
            f"{_fmt(row.get('memory_ratio'), '.2f')} | "
            f"{'' if dscore is None else f'{dscore:.1e}'} |"
        )
    lines += ["", "10-document request (W1's query, first 10 entries):", ""]
    lines += [
        "| path | p50 (ms) | p95 (ms) | runs | load (s) | RSS after load (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_path = {r["path"]: r for r in results if "error" not in r}
    for path, lat in summary["latency"].items():
        res = by_path[path]
        lines.append(
            f"| {path} | {lat['p50']:.0f} | {lat['p95']:.0f} | {lat['n']} | {res['load_s']:.1f} | "
            f"{res['loaded_mb']:.0f} |"
        )
    agreement = [r for r in summary["rows"] if "spearman" in r]
    if agreement:
        lines += ["", "Low-precision agreement with float32 (model card scores):", ""]
        lines += ["| workload | path | Spearman | top-3 agreement |", "|---|---|---:|---:|"]
        lines += [
            f"| {r['workload']} | {r['path']} | {r['spearman']:.4f} | {r['top3']:.0%} |" for r in agreement
        ]
    truncation = [r for r in summary["rows"] if r["path"] == "engine" and "max_prompt_tokens" in r]
    if truncation:
        lines += ["", "Engine prompt lengths (template included):", ""]
        lines += ["| workload | prompt tokens | longest prompt | max_length |", "|---|---:|---:|---:|"]
        lines += [
            f"| {r['workload']} | {r['prompt_tokens']} | {r['max_prompt_tokens']} | {r['max_length']} |"
            for r in truncation
        ]
    mfu = [r for r in summary["rows"] if "mfu" in r]
    if mfu:
        lines += ["", "Model FLOP utilisation (2 x backbone parameters x prompt tokens / time / peak):", ""]
        lines += ["| workload | path | MFU |", "|---|---|---:|"]
        lines += [f"| {r['workload']} | {r['path']} | {r['mfu']:.1%} |" for r in mfu]
    engine = by_path.get("engine", {})
    if "linearity" in engine:
        lines += ["", "Engine cost against the number of documents (W1 entries, one run each):", ""]
        lines += ["| documents | seconds | seconds per document |", "|---:|---:|---:|"]
        lines += [
            f"| {n} | {s:.2f} | {s / int(n):.3f} |"
            for n, s in sorted(engine["linearity"].items(), key=lambda x: int(x[0]))
        ]
    for path, error in summary["errors"].items():
        lines.append(f"\n`{path}` did not run: {error}")
    return "\n".join(lines)


def _chart(summary: dict[str, Any], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    paths = list(dict.fromkeys(r["path"] for r in rows))
    width = 0.8 / len(paths)
    fig, ax = plt.subplots(figsize=(7, 3.4), dpi=80)
    for i, path in enumerate(paths):
        values = [
            next((r["pairs_per_s"] for r in rows if r["workload"] == w and r["path"] == path), math.nan)
            for w in workloads
        ]
        ax.bar([x + i * width for x in range(len(workloads))], values, width, label=path)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))], workloads)
    ax.set_yscale("log")
    ax.set_ylabel("pairs/s (log)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _spec(args: argparse.Namespace, model_dir: str, workloads: list[Workload]) -> dict[str, Any]:
    from qwen3_rerank_plugins.templates import resolve_instruction

    # llama.cpp's rerank template fixes the model card's default instruction: with a llama.cpp
    # path in the run, every path reads it, so all read the same tokens.
    same_instruction = bool(args.gguf)

    def resolved(workload: Workload) -> dict[str, Any]:
        data = workload.to_dict()
        for req in data["requests"]:
            req["instruction"] = resolve_instruction(None if same_instruction else req["instruction"])
        return data

    return {
        "llama_server": args.llama_server,
        "gguf": args.gguf,
        "llama_parallel": args.llama_parallel,
        "model_dir": model_dir,
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "latency_repeats": args.latency_repeats,
        "workloads": [resolved(w) for w in workloads],
        "linearity": not args.quick,
    }


def _check_quick(summary: dict[str, Any], min_speedup: float) -> list[str]:
    problems = []
    for row in summary["rows"]:
        if row["path"] != "engine" or "speedup" not in row:
            continue
        if row["max_dscore"] > 1e-5:
            problems.append(f"{row['workload']}: engine max |Δscore| {row['max_dscore']:.1e} > 1e-5")
        if row["speedup"] < min_speedup:
            problems.append(
                f"{row['workload']}: engine {row['speedup']:.2f}x the model card < {min_speedup}x"
            )
    if summary["errors"]:
        problems += [f"{path} failed: {err}" for path, err in summary["errors"].items()]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="regression check: W1+W2 small, model card vs engine"
    )
    parser.add_argument(
        "--shape", default="0.6b", choices=["tiny", "0.6b", "4b", "8b"], help="random-weight model shape"
    )
    parser.add_argument("--model", help="real weights: hub id or local directory (instead of --shape)")
    parser.add_argument(
        "--layers", type=int, help="random-weight model of --shape with only this many layers (faster)"
    )
    parser.add_argument(
        "--precision",
        action="store_true",
        help="engine fp32 / bf16 / int8 side by side, agreement against fp32 (RESULTS-precision.md)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="--precision: alternating rounds (best kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", help="model dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--paths", help=f"comma-separated subset of {','.join(PATHS)}")
    parser.add_argument("--workloads", help="comma-separated subset of W1,W2,W3,W4")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of W2-W4's synthetic text (W1 is fixed); other seeds, other texts",
    )
    parser.add_argument(
        "--sizes", choices=sorted(SIZES), help="workload sizes (default: cpu on CPU, issue on CUDA)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over each workload (median)")
    parser.add_argument("--latency-repeats", type=int, default=3, help="runs of the 10-document request")
    parser.add_argument("--threads", type=int, help="torch threads per path (default: torch's choice)")
    parser.add_argument(
        "--min-speedup", type=float, default=2.0, help="--quick fails below this engine speedup"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds allowed per path")
    parser.add_argument(
        "--peak-tflops", type=float, default=989.0, help="GPU peak for MFU (default: H100 dense bf16)"
    )
    parser.add_argument(
        "--llama-server", help="llama.cpp's llama-server binary: adds the llama.cpp paths (with --gguf)"
    )
    parser.add_argument(
        "--gguf",
        action="append",
        default=[],
        metavar="KIND=FILE",
        help="a GGUF of the same model for llama.cpp, KIND f32 or q8_0 (repeatable)",
    )
    parser.add_argument("--llama-parallel", type=int, default=4, help="llama-server slots (-np)")
    parser.add_argument("--out", type=Path, help="results file (default: RESULTS.md, or .work/quick.md)")
    parser.add_argument("--reuse", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        result = run_worker(args.worker, json.loads(args.spec.read_text()))
        args.result.write_text(json.dumps(result))
        return 0

    device = "cuda" if args.device.startswith("cuda") else "cpu"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error(
                f"--device {args.device}: CUDA is not available on this machine (torch {torch.__version__})"
            )
    args.dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    sizes = sizes_name(args)
    args.gguf = _gguf_files(parser, args)
    default_paths = PRECISION_PATHS if args.precision else DEFAULT_PATHS[device]
    default_paths = default_paths + [f"llama.cpp-{kind}" for kind in args.gguf]
    paths = args.paths.split(",") if args.paths else (QUICK_PATHS if args.quick else default_paths)
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        parser.error(f"unknown paths {unknown}; choose from {list(PATHS)}")
    llama_paths = [p for p in paths if p.startswith("llama.cpp-")]
    without = [p for p in llama_paths if p.removeprefix("llama.cpp-") not in args.gguf]
    if without:
        parser.error(f"{', '.join(without)} needs --llama-server and --gguf KIND=FILE")
    if args.quick:
        args.latency_repeats = 1
    WORK.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    load_before = _load_average()
    model_dir, random_weights = _model_dir(args)
    workloads = build_workloads(sizes, args.workloads.split(",") if args.workloads else None, seed=args.seed)
    if args.precision:
        return _precision_run(args, paths, model_dir, workloads, started, load_before)
    if args.reuse:  # re-render a previous run's raw results
        results = json.loads(args.reuse.read_text())
    else:
        with tempfile.TemporaryDirectory(dir=WORK) as tmp:
            spec_file = Path(tmp) / "spec.json"
            spec_file.write_text(json.dumps(_spec(args, model_dir, workloads), ensure_ascii=False))
            results = [_run_path(path, spec_file, args.timeout) for path in paths]
        if not args.quick:
            (WORK / "last-results.json").write_text(json.dumps(results))
    peak = args.peak_tflops if args.device.startswith("cuda") else None
    summary = _summarise(results, workloads, peak)
    tables = _tables(summary, results)
    elapsed = time.perf_counter() - started

    machine = _machine(args.device)
    machine["load average (1/5/15 min) before / after"] = f"{load_before} / {_load_average()}"
    machine["run time"] = f"{elapsed / 60:.1f} min"
    model_line = (
        f"random-weight Qwen3-Reranker, {args.shape} shape, real Qwen3 tokenizer (scores meaningless)"
        if random_weights
        else args.model
    )
    header = [f"- model: {model_line}", f"- device / dtype: {args.device} / {args.dtype}"]
    header += [f"- torch threads per path: {args.threads or 'torch default'}"]
    header += [f"- {k}: {v}" for k, v in machine.items()]
    header += _llama_cpp_lines(args)
    header += [_workloads_line(args, workloads)]
    report = "\n".join(header) + "\n\n" + tables + "\n"
    print(report)

    out = args.out or (WORK / "quick.md" if args.quick else HERE / "RESULTS.md")
    if args.quick:
        out.write_text(report)
        problems = _check_quick(summary, args.min_speedup)
        for problem in problems:
            print("REGRESSION:", problem)
        print("quick check:", "FAILED" if problems else "passed")
        return 1 if problems else 0
    (WORK / "last-run.json").write_text(json.dumps({"summary": summary, "machine": machine}, indent=1))
    _write_results(out, report, args)
    shape = f"{args.shape} shape, random weights" if random_weights else args.model
    _chart(
        summary,
        out.with_name("results.png"),
        f"Qwen3-Reranker ({shape}), {args.device}: pairs/s, higher is better",
    )
    return 0


def _precision_run(
    args: argparse.Namespace,
    paths: list[str],
    model_dir: str,
    workloads: list[Workload],
    started: float,
    load_before: str,
) -> int:
    """``--precision``: the engine's CPU precisions side by side, each against its float32."""
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec = _spec(args, model_dir, workloads)
        spec["linearity"] = False
        spec_file.write_text(json.dumps(spec, ensure_ascii=False))
        results = _run_rounds(paths, spec_file, args.rounds, args.timeout)
    summary = _summarise_precision(results, workloads)
    machine = _machine(args.device)
    machine["load average (1/5/15 min) before / after"] = f"{load_before} / {_load_average()}"
    machine["run time"] = f"{(time.perf_counter() - started) / 60:.1f} min"
    shape = f"{args.shape} shape" + (f" with {args.layers} of its layers" if args.layers else "")
    header = [
        f"- model: random-weight Qwen3-Reranker, {shape}, real Qwen3 tokenizer (scores meaningless)"
        if not args.model
        else f"- model: {args.model}",
        f"- torch threads per path: {args.threads or 'torch default'}; rounds: {args.rounds}, "
        "alternating order, each path in its own process; best time per workload kept",
    ]
    header += [f"- {k}: {v}" for k, v in machine.items()]
    header += _llama_cpp_lines(args)
    header += [_workloads_line(args, workloads)]
    report = "\n".join(header) + "\n\n" + _precision_table(summary, results) + "\n"
    print(report)
    (WORK / "last-precision.json").write_text(json.dumps({"summary": summary, "machine": machine}, indent=1))
    out = args.out or HERE / "RESULTS-precision.md"
    command = "python benchmarks/run.py --precision" + "".join(
        f" --{k} {v}"
        for k, v in (
            ("layers", args.layers),
            ("threads", args.threads),
            ("rounds", args.rounds),
            ("workloads", args.workloads),
            ("seed", args.seed),
        )
        if v
    )
    if args.gguf:
        command += " --llama-server LLAMA_SERVER" + "".join(f" --gguf {kind}=FILE" for kind in args.gguf)
    out.write_text(
        "# CPU precision: engine float32, bfloat16 and int8 side by side\n\n"
        f"Measured by `{command}` in one run. Δlogit, Spearman and top-3 agreement are against the "
        "engine's own float32 scores of the same inputs (Spearman per request: the minimum and the mean "
        "over requests). Random weights give scores packed into a narrow range, so ranks flip on "
        "smaller errors than a trained model's would: the agreement here is a lower bound of the "
        "real one's difficulty, not the real model's agreement.\n\n" + report
    )
    return 0


def _llama_cpp_lines(args: argparse.Namespace) -> list[str]:
    """Header lines naming the llama.cpp build and settings, when it ran."""
    if not args.gguf:
        return []
    out = subprocess.run([args.llama_server, "--version"], capture_output=True, text=True, timeout=60)
    version = next((line for line in (out.stderr + out.stdout).splitlines() if "version" in line), "unknown")
    return [
        f"- llama.cpp: `{args.llama_server}` ({version.strip()}); -np {args.llama_parallel}, 2048 tokens "
        "per slot, f32 KV cache, flash attention off; GGUFs "
        + ", ".join(f"{kind} `{Path(file).name}`" for kind, file in args.gguf.items()),
        "- instruction: the model card's default for every path and request (llama.cpp's rerank "
        "template fixes it), so all paths read the same tokens",
    ]


def _gguf_files(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """``--gguf KIND=FILE`` options as ``{kind: absolute path}``, checked with ``--llama-server``."""
    files: dict[str, str] = {}
    for item in args.gguf:
        kind, sep, file = item.partition("=")
        if not sep or f"llama.cpp-{kind}" not in PATHS:
            parser.error(f"--gguf {item!r}: expected KIND=FILE with KIND f32 or q8_0")
        if not Path(file).is_file():
            parser.error(f"--gguf {item!r}: no such file {file}")
        files[kind] = str(Path(file).resolve())
    if files and not args.llama_server:
        parser.error("--gguf needs --llama-server PATH (llama.cpp's server binary)")
    if args.llama_server:
        if not files:
            parser.error("--llama-server needs at least one --gguf KIND=FILE")
        binary = Path(args.llama_server)
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            parser.error(f"--llama-server {args.llama_server}: not an executable file")
        args.llama_server = str(binary.resolve())
    return files


def _workloads_line(args: argparse.Namespace, workloads: list[Workload]) -> str:
    """The results header's line naming the workloads, their size preset and any text seed."""
    seed = f", text seed {args.seed}" if args.seed else ""
    return f"- workloads ({sizes_name(args)} sizes{seed}): " + "; ".join(
        f"{w.name} {w.description}" for w in workloads
    )


def sizes_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else (args.sizes or ("cpu" if args.device == "cpu" else "issue"))


def _write_results(out: Path, report: str, args: argparse.Namespace) -> None:
    command = "python benchmarks/run.py" + (f" --device {args.device}" if args.device != "cpu" else "")
    command += f" --threads {args.threads}" if args.threads else ""
    command += f" --seed {args.seed}" if args.seed else ""
    gpu_note = (
        ""
        if args.device.startswith("cuda")
        else "\nGPU figures were not measured here (no GPU on this machine); "
        "`python benchmarks/run.py --device cuda --sizes issue` measures them "
        "(bf16, `max_memory_allocated`).\n"
    )
    out.write_text(
        "# Benchmark results\n\n"
        f"Measured by `{command}` in one run: every path scored the same inputs, each in its own process.\n"
        "Peak memory is the peak RSS while scoring the workload (model weights included; "
        "`max_memory_allocated` on CUDA); × columns are ratios to the model card's code in the same run.\n"
        f"{gpu_note}\n" + report + "\n![pairs/s per workload and path](results.png)\n"
    )


if __name__ == "__main__":
    sys.exit(main())
