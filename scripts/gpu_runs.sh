#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md, one command per figure, each with its HF transformers baseline run in
# the same command; each writes its JSON to $OUT (default results/) and its table (and plots) into
# docs/benchmarks.md. Run from the repository root on the GPU machine:
#
#   scripts/gpu_runs.sh kernels generate embed serving startup     # or any subset, one per 10-minute call
#
# The GPU image lacks a few of jaxserve's dependencies: scripts/fetch_gpu_wheels.sh downloads them (here, where
# PyPI is reachable) into .whl/, which this script installs first when present. The updated docs/benchmarks.md
# and docs/img/*.png are copied to $OUT to be brought back.
set -euo pipefail
OUT=$(realpath -m "${OUT:-results}")
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/jaxserve . >/dev/null
export PYTHONPATH=/tmp/jaxserve:${PYTHONPATH:-} PYTHONUNBUFFERED=1
cd scripts

for figure in "$@"; do
    case "$figure" in
        kernels)  python3 bench_kernels.py --json "$OUT/kernels.json" --docs ;;
        generate) python3 bench_generate.py --hf --batches 1 64 128 --json "$OUT/generate.json" --docs ;;
        embed)    python3 bench_embed.py --models bert-base xlmr-large --json "$OUT/embed.json" --docs ;;
        serving)  python3 bench_serving.py --llama-1b --hf --json "$OUT/serving.json" --docs ;;
        startup)  python3 bench_startup.py --llama-1b --json "$OUT/startup.json" --docs ;;
        *) echo "unknown figure: $figure (kernels, generate, embed, serving, startup)" >&2; exit 2 ;;
    esac
done
cp ../docs/benchmarks.md "$OUT/"
if compgen -G "../docs/img/*-gpu-*.png" >/dev/null; then cp ../docs/img/*-gpu-*.png "$OUT/"; fi
