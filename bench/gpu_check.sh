#!/usr/bin/env bash
# One prepared benchmark run for a GPU machine (H100 / H200), well under 8 minutes:
# bench_model.py (ViT-B/16, batch 64, bf16 and fp32: img/s, peak memory, MFU against
# timm + HF PEFT, the paper-style peer and full fine-tuning), profile_step.py (bf16 step
# time per operator group, activations kept for backward) and bench_epoch.py (demo epoch
# with the real loader: data-bound or not), JSON and logs written to $OUT.
#
#   bash bench/gpu_check.sh                  # on the GPU machine; OUT defaults to bench/results/gpu_check
#   DEVICE=cpu bash bench/gpu_check.sh       # the same steps, CPU-sized (--quick), to test this script
#   COMPILE=1 bash bench/gpu_check.sh        # also time ours under torch.compile (adds ~2 min)
#
# Packages the machine lacks can travel as wheels in .whl/ at the repository root
# (see bench/README.md); they are installed into /tmp/site first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_check}"
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  git rev-parse --short HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || true
  python3 - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "timm", "peft", "transformers", "torchvision", "PIL", "numpy", "pandas", "sklearn"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError as err:
        print(name, "MISSING", err)
import torch
print("cuda available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee "$OUT/env.txt"

IMPLS="ours,ours_bf16w,peft,paper,full"
if [ "${COMPILE:-0}" = 1 ]; then IMPLS="$IMPLS,ours_compile"; fi

if [ "$DEVICE" = cpu ]; then
  MODEL_ARGS=(--device cpu --quick --amp fp32 --impls "${IMPLS/ours_bf16w,/}")
  EPOCH_DEMO=(--device cpu --quick)
  EPOCH_VITB=()
  PROFILE_ARGS=(--device cpu --batch_size 2 --amp fp32 --impls ours,peft,paper,full)
  PROFILE_TIMEOUT=600
  MODEL_TIMEOUT=1500  # a busy 2-core machine: ~3 min idle, much longer under load
  EPOCH_TIMEOUT=600
else
  MODEL_ARGS=(--device "$DEVICE" --batch_size 64 --amp bf16,fp32 --impls "$IMPLS"
              --steps 10 --rounds 3 --warmup 2 --mem_steps 2)
  WORKERS=$(( $(nproc) > 12 ? 12 : $(nproc) ))
  EPOCH_DEMO=(--device "$DEVICE" --epochs 3 --num_workers "$WORKERS")
  EPOCH_VITB=(--device "$DEVICE" --epochs 3 --num_workers "$WORKERS" --model vit_base_patch16
              --img_size 224 --batch_size 64 --rank 4)
  PROFILE_ARGS=(--device "$DEVICE" --batch_size 64 --amp bf16 --impls ours,ours_bf16w,peft,paper,full)
  PROFILE_TIMEOUT=60
  MODEL_TIMEOUT=300  # the timeouts add up to < 10 minutes
  EPOCH_TIMEOUT=100
fi

status=0
timeout "$MODEL_TIMEOUT" python3 bench/bench_model.py "${MODEL_ARGS[@]}" --json "$OUT/model.json" \
  2>&1 | tee "$OUT/model.log" || status=1
timeout "$PROFILE_TIMEOUT" python3 bench/profile_step.py "${PROFILE_ARGS[@]}" 2>&1 | tee "$OUT/profile.log" || status=1
timeout "$EPOCH_TIMEOUT" python3 bench/bench_epoch.py "${EPOCH_DEMO[@]}" --json "$OUT/epoch_demo.json" \
  2>&1 | tee "$OUT/epoch_demo.log" || status=1
if [ ${#EPOCH_VITB[@]} -gt 0 ]; then
  timeout "$EPOCH_TIMEOUT" python3 bench/bench_epoch.py "${EPOCH_VITB[@]}" --json "$OUT/epoch_vitb.json" \
    2>&1 | tee "$OUT/epoch_vitb.log" || status=1
fi
echo "gpu_check: results in $OUT (status $status)"
exit $status
