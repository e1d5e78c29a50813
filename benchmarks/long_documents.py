#!/usr/bin/env python
"""W4 (long documents) with the long-document mode off and on: pairs/s, windows/s, tokens read.

Off, each document is cut where ``max_length`` ends, as the model card does; on, it is read in
overlapping windows and scored by its best one. Best of ``--rounds`` alternating rounds, both
modes over one loaded model in this process.

Usage::

    python benchmarks/long_documents.py                   # 0.6B shape, random weights, CPU sizes
    python benchmarks/long_documents.py --device cuda --sizes issue --max-length 2048

Random weights (no model hub here): speed is real, scores are meaningless.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import build_workloads  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="0.6b", choices=["tiny", "0.6b", "4b", "8b"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--sizes", default="cpu", choices=["cpu", "issue"])
    parser.add_argument("--max-length", type=int, help="prompt budget (default: the workload's)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from qwen3_rerank_plugins import Reranker, ScoreGroup
    from qwen3_rerank_plugins.demo import demo_model_dir

    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    [w4] = [w for w in build_workloads(args.sizes) if w.name == "W4"]
    max_length = args.max_length or w4.max_length
    base = Reranker.from_pretrained(demo_model_dir(args.shape), device=args.device, dtype=dtype)
    modes = {
        "off (model card truncation)": base.with_settings(max_length=max_length),
        "on (windows, best one)": base.with_settings(max_length=max_length, long_documents=True),
    }
    groups = [ScoreGroup(r.query, r.documents, r.instruction) for r in w4.requests]
    pairs = sum(len(g.texts) for g in groups)
    rows = {
        name: sum(len(d) for g in groups for d in rr._encode(rr._checked_groups([g])[0]).documents)
        for name, rr in modes.items()
    }
    tokens = {name: sum(r.tokens for r in rr.score_groups(groups)) for name, rr in modes.items()}  # warm-up
    best = dict.fromkeys(modes, float("inf"))
    for _ in range(args.rounds):
        for name, rr in modes.items():
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            rr.score_groups(groups)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    print(
        f"W4 ({args.sizes} sizes): {len(groups)} query x {pairs} documents, max_length={max_length}, "
        f"{args.shape} shape ({dtype}) on {args.device}, random weights; "
        f"best of {args.rounds} alternating rounds"
    )
    print()
    print("| long-document mode | windows read | prompt tokens read | seconds | pairs/s | windows/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in modes:
        s = best[name]
        print(
            f"| {name} | {rows[name]} | {tokens[name]:,} | {s:.2f} | {pairs / s:.2f} | {rows[name] / s:.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
