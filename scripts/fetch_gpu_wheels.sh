#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels of jaxserve's dependencies that the GPU machine's image
# lacks, into .whl/ (ignored by git), for scripts/gpu_runs.sh to install there. The image has JAX, flax, PyTorch,
# transformers, tokenizers, safetensors, httpx, jinja2, prometheus-client, tqdm and matplotlib; Python 3.12.
set -euo pipefail
grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl fastapi starlette uvicorn pydantic pydantic-core typing-inspection annotated-types gguf \
    pytest pluggy iniconfig llguidance soundfile cffi pycparser soxr python-multipart jiwer rapidfuzz
