#!/usr/bin/env python
"""Forward passes and padded tokens of one merged service batch: 32 requests x 10 FAQ documents.

Counts, from outside the engine (a hook on the model's backbone), what the service's batcher
makes the model run when 32 concurrent ``/v1/rerank`` requests are merged: the number of forward
passes, the token positions run (rows x padded width), the padding among them, and the positions
attended (rows x (cached prefix + width)). Counts do not depend on the machine, so one run is
exact; a second source tree (``--baseline-src``, e.g. a checkout of an older commit) is measured
in its own process for comparison.

Usage::

    python benchmarks/forward_passes.py
    python benchmarks/forward_passes.py --baseline-src /tmp/old/src   # before/after table

The model is the random-weight demo model with the real Qwen3 tokenizer (the counts depend on
the tokenizer, not the weights); scores are meaningless and not shown.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parent / "examples" / "data"


def _requests(n: int, docs: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in (DATA / name).read_text("utf-8").splitlines() if line]

    kb = [r["text"] for r in rows("faq_kb.jsonl")]
    queries = [r["query"] for r in rows("faq_eval.jsonl")]
    rng = random.Random(seed)
    return [(queries[i % len(queries)], rng.sample(kb, docs)) for i in range(n)]


def measure(n: int, docs: int, budgets: list[int | None]) -> list[dict]:
    """Run in the process whose ``sys.path`` holds the source tree to measure."""
    from qwen3_rerank_plugins import get_reranker
    from qwen3_rerank_plugins.demo import demo_model_dir
    from qwen3_rerank_plugins.server.batcher import ScoreRequest, score_requests

    base = get_reranker(demo_model_dir("tiny"), device="cpu")
    requests = [ScoreRequest(q, d, None, False) for q, d in _requests(n, docs)]
    out = []
    for budget in budgets:
        rr = base if budget is None else base.with_settings(batch_tokens=budget, max_batch_size=100_000)
        calls: list[tuple[int, int, int, int]] = []
        pad = rr._core.pad_id

        def hook(module, args, kwargs, calls=calls, pad=pad):
            ids = kwargs["input_ids"]
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            cached = cache.get_seq_length() if cache is not None else 0
            real = int((ids != pad).sum())
            calls.append((ids.shape[0], ids.shape[1], cached, real))

        handle = rr._core.backbone.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            outcomes = score_requests(rr, requests)
        finally:
            handle.remove()
        assert not any(isinstance(o, Exception) for o in outcomes), outcomes
        run = sum(r * w for r, w, _, _ in calls)
        out.append(
            {
                "batch_tokens": rr.batch_tokens,
                "passes": len(calls),
                "positions": run,
                "padding": run - sum(real for *_, real in calls),
                "attended": sum(r * (w + c) for r, w, c, _ in calls),
            }
        )
    return out


def _in_process(src: Path | None, n: int, docs: int, budgets: list[int | None]) -> list[dict]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if src is not None:
        env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    code = (
        f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import forward_passes as fp; "
        f"print(json.dumps(fp.measure({n}, {docs}, {budgets!r})))"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--docs", type=int, default=10)
    parser.add_argument("--baseline-src", type=Path, help="another source tree to compare (its src/ folder)")
    args = parser.parse_args()
    budgets: list[int | None] = [None, 100_000]  # the CPU default (4096), and budget and row cap set high
    runs = {"current": _in_process(None, args.requests, args.docs, budgets)}
    if args.baseline_src is not None:
        runs = {"baseline": _in_process(args.baseline_src, args.requests, args.docs, budgets), **runs}
    print(f"{args.requests} merged requests x {args.docs} FAQ documents (demo model, real tokenizer)\n")
    print("| code | batch_tokens | forward passes | positions run | of which padding | attended |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rows in runs.items():
        for r in rows:
            print(
                f"| {name} | {r['batch_tokens']:,} | {r['passes']} | {r['positions']:,} | "
                f"{r['padding']:,} | {r['attended']:,} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
