#!/usr/bin/env bash
# Several GPUs on one machine (the lead's 2 x H200 run), in one call of at most 10 minutes:
#   1. DDP scaling: QLoRA on the Llama-3.1-8B shape (r=16, batch 4 x 2048 per GPU, offloaded
#      checkpointing), 1 GPU then all GPUs; tokens/s of each and the ratio (target >= 0.9 x N).
#   2. FSDP2: a QLoRA step of the Llama-3-70B shape sharded over all GPUs (batch 1 x 2048 per GPU);
#      memory per GPU after sharding and at peak, seconds per step.
# Needs bitsandbytes, which the GPU image lacks: carry the peers' wheels (see run_bench.sh).
# Here, once (from the repo root; .peer-wheels/ is git-excluded):
#   bash ../shared/tools/peer-wheels/make_wheels.sh .peer-wheels
# Then the device tool: run(kind="nvidia-h200-x2", command="bash scripts/gpu/multi_gpu.sh",
#                           carry=[".peer-wheels"], timeout_s=600)
# PHASE (first argument): all (default) | ddp | fsdp. What comes back in $OUT: multi_gpu.jsonl (one
# JSON line per run) and multi_gpu.txt (the summary and the logs).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
PHASE=${1:-all}
OUT=${OUT:-/tmp/multi-gpu-results}
mkdir -p "$OUT"
RESULTS="$OUT/multi_gpu.jsonl"
: > "$RESULTS"

# NVLink multicast stays off on these shared hosts (KINDS.md): NCCL, PyTorch symmetric memory, NVSHMEM.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=4

if ls .peer-wheels/bitsandbytes-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .peer-wheels/*.whl \
    || { echo "installing .peer-wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -5
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bnb', bitsandbytes.__version__)" \
  || { echo "bitsandbytes/peft missing: carry .peer-wheels"; exit 1; }
echo "GPUs: $NGPU"
status=0

launch() {  # launch NPROC ARGS...: one torchrun job, its JSON line appended to $RESULTS
  local nproc=$1; shift
  echo "+ torchrun --standalone --nproc-per-node $nproc scripts/gpu/multi_gpu_step.py $*"
  timeout 280 python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
    scripts/gpu/multi_gpu_step.py --out "$RESULTS" "$@" || { echo "  (failed: exit $?)"; status=1; }
}

if [ "$PHASE" = all ] || [ "$PHASE" = ddp ]; then
  DDP=(--mode ddp --shape llama-8b --batch 4 --seq 2048 --rank 16 --checkpointing unsloth --warmup 3 --steps 10)
  launch 1 "${DDP[@]}"
  [ "$NGPU" -ge 2 ] && launch "$NGPU" "${DDP[@]}"
fi
if { [ "$PHASE" = all ] || [ "$PHASE" = fsdp ]; } && [ "$NGPU" -ge 2 ]; then
  launch "$NGPU" --mode fsdp --shape llama-70b --batch 1 --seq 2048 --rank 16 --checkpointing true --warmup 1 --steps 3
fi

python3 - "$RESULTS" <<'EOF' | tee "$OUT/multi_gpu.txt"
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
for r in rows:
    print(f"{r['mode']:4s} {r['shape']:9s} {r['gpus']} GPU(s): {r['tokens_per_s']:>10,.0f} tokens/s  "
          f"{r['step_s']:.3f} s/step  peak {r['peak_gib_max_rank']:.1f} GiB/GPU"
          + (f"  sharded {r['sharded_gib']:.1f} GiB/GPU" if r.get('sharded_gib') is not None else "")
          + f"  loss {r['last_loss']}  fused QLoRA layers {r['fused_qlora_layers']}  ({r['device']})")
ddp = {r["gpus"]: r["tokens_per_s"] for r in rows if r["mode"] == "ddp"}
if 1 in ddp and len(ddp) > 1:
    n = max(ddp)
    ratio = ddp[n] / ddp[1]
    print(f"DDP scaling 1 -> {n} GPUs: {ratio:.2f}x ({ratio / n:.2f} of linear; target >= 0.90)")
EOF
exit "$status"
