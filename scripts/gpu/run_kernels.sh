#!/usr/bin/env bash
# The kernels' GPU tests and micro-benchmarks on the GPU machine, one call of at most 10 minutes.
#
# Device tool: run(command="bash scripts/gpu/run_kernels.sh [PHASE]", carry=[".peer-wheels"], timeout_s=600)
#   PHASE tests (default): pytest -m gpu over tests/kernels (real sizes, bf16; ~2-3 min, most of it
#         Triton compiling each kernel once).
#   PHASE bench: scripts/gpu/bench_kernels.py (each op vs reference vs torch.compile; ~4-5 min).
#   PHASE qlora: scripts/gpu/bench_qlora.py (dequant vs fused per Llama-3.1-8B projection, whole MLP; ~2 min).
# .peer-wheels (see scripts/gpu/run_bench.sh) is optional: with it the tests also compare the 4-bit
# kernels against bitsandbytes itself. Output: $OUT/kernels-<PHASE>.txt.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
PHASE=${1:-tests}
OUT=${OUT:-/tmp/kernels-results}
mkdir -p "$OUT"
if compgen -G ".peer-wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .peer-wheels/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "$PHASE" in
    tests) python3 -m pytest tests/kernels -m gpu -q -p no:cacheprovider --durations=10 2>&1 | tee "$OUT/kernels-tests.txt" ;;
    bench) python3 scripts/gpu/bench_kernels.py 2>&1 | tee "$OUT/kernels-bench.txt" ;;
    qlora) python3 scripts/gpu/bench_qlora.py 2>&1 | tee "$OUT/kernels-qlora.txt" ;;
    *) echo "unknown phase $PHASE (tests | bench | qlora)"; exit 2 ;;
esac
exit "${PIPESTATUS[0]}"
