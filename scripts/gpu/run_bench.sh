#!/usr/bin/env bash
# `desktune bench` on the GPU machine in one call of at most 10 minutes, with the peers' wheels carried.
#
# Here, once (from the repo root; .peer-wheels/ is git-excluded, ~21 MB):
#   bash ../shared/tools/peer-wheels/make_wheels.sh .peer-wheels
# Then the device tool: run(command="bash scripts/gpu/run_bench.sh [PHASE] [BUDGETS] [LIMIT_S]",
#                           carry=[".peer-wheels"], timeout_s=600)
#   PHASE all (default): the throughput table of the 4 contenders (desktune, Unsloth, baseline,
#         Liger; Llama-3.1-8B shape, QLoRA r=16, batch 4 x 2048), then context cells (r=16;
#         desktune, Unsloth, baseline) for BUDGETS (GiB, default 16,32) in that order, as many
#         as fit in LIMIT_S (default 520 s).
#   PHASE context: only the context cells, for BUDGETS (e.g. 32,8,24).
#   PHASE smoke: the bench's GPU tests (tiny model, every contender, a 2 GiB context search; ~2 min).
# What comes back in $OUT: bench.txt (the printed tables), bench.json, throughput.csv, context.csv,
# context.png and logs.tar.gz (every worker's log and job). A cell the time limit cut short is
# reported as the bracket it reached ("a..b" or ">= a"), never as a number it did not measure.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
PHASE=${1:-all}
BUDGETS=${2:-16,32}
LIMIT=${3:-520}
OUT=${OUT:-/tmp/bench-results}
mkdir -p "$OUT"

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .peer-wheels/*.whl \
  || { echo "installing .peer-wheels failed: build them with make_wheels.sh and carry .peer-wheels"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)"

if [ "$PHASE" = smoke ]; then
  python3 -m pytest tests/bench/test_bench_gpu.py -v -p no:cacheprovider 2>&1 | tee "$OUT/bench.txt"
  exit "${PIPESTATUS[0]}"
fi

RESULTS=/tmp/bench-run
COMMON=(--model llama-3.1-8b --cache-dir /tmp/desktune-bench-cache --out "$RESULTS" --time-limit "$LIMIT"
        --context --ranks 16 --budgets "$BUDGETS" --context-contenders "desktune,unsloth,transformers" --plot)
case "$PHASE" in
  all) ARGS=(--contenders "desktune,unsloth,transformers,liger" --cell-time 130 "${COMMON[@]}") ;;
  context) ARGS=(--contenders "desktune,unsloth,transformers" --no-throughput --cell-time 170 "${COMMON[@]}") ;;
  *) echo "PHASE must be 'all', 'context' or 'smoke', got '$PHASE'"; exit 2 ;;
esac
echo "+ desktune bench ${ARGS[*]}"
python3 -m desktune.cli.main bench "${ARGS[@]}" 2>&1 | tee "$OUT/bench.txt"
status=${PIPESTATUS[0]}
for f in bench.json throughput.csv context.csv context.png; do
  [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"
done
tar czf "$OUT/logs.tar.gz" -C "$RESULTS" logs jobs 2>/dev/null
exit "$status"
