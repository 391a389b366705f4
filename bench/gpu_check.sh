#!/usr/bin/env bash
# One prepared benchmark run for a GPU machine (H100 / H200), under 9 minutes:
# bench_model.py at batch 64 (ViT-B/16, bf16: img/s, peak memory, MFU against timm + HF PEFT,
# the paper-style peer and full fine-tuning, and ours with the FP8 backbone), every
# registered fine-tuning method at batch 64 (--methods all: DoRA and IA3 against HF PEFT's
# at the same targets, train and eval img/s, peak memory, trainable parameters), the
# compiled contenders (ours eager and compiled vs PEFT eager and compiled at batch 128; CUDA
# graphs, --compile_mode reduce-overhead, at batch 32 against PEFT eager), bench_lora_layer.py
# (the LoRA layer's forward + backward, new vs the earlier formulation), profile_step.py
# (bf16 step time per operator group), bench_data.py (per-core rates: 1024-px PNG vs exact
# cache vs lossy cache, evaluation cache) and bench_epoch.py on NIH-like data (2,000
# 1024-px 8-bit PNGs, and a JPEG-DICOM variant): epochs/s of (a) ours from the exact cache,
# compiled, (b) ours from the PNGs, (c) the paper's pipeline (PIL + torchvision in 10
# workers, paper-style model under fp16 autocast). JSON and logs written to $OUT.
#
#   bash bench/gpu_check.sh                  # on the GPU machine; OUT defaults to bench/results/gpu_check
#   DEVICE=cpu bash bench/gpu_check.sh       # the same steps, CPU-sized (--quick), to test this script
#   DEVICE=cpu TINY=1 bash bench/gpu_check.sh  # every step with tiny models and data (~2 min)
#   COMPILED=0 bash bench/gpu_check.sh       # skip the compiled contenders (they compile for ~2 min)
#   DICOM=1 DATA=1 bash bench/gpu_check.sh   # also the JPEG-DICOM epoch and the per-core data rates
#   FP8_COMPILE=1 bash bench/gpu_check.sh    # also ours with the FP8 backbone compiled (+60 s)
#   B128=1 bash bench/gpu_check.sh           # also the eager contenders at batch 128 (+60 s)
#   EPOCH_IMAGES=3000 bash bench/gpu_check.sh  # a larger end-to-end data set
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

IMPLS="ours,ours_bf16w,ours_fp8,peft,paper,full"

EPOCH_IMAGES="${EPOCH_IMAGES:-2000}"
if [ "${TINY:-0}" = 1 ]; then
  TINY_MODEL=(--model vit_tiny_patch16 --img_size 32)
  MODEL_64=(--device "$DEVICE" --quick --amp fp32 --batch_size 2 "${TINY_MODEL[@]}" --impls ours,peft,paper,full)
  MODEL_128=()
  METHODS_ARGS=(--device "$DEVICE" --quick --amp fp32 --batch_size 2 "${TINY_MODEL[@]}"
                --impls ours --methods all)
  COMPILED_ARGS=(--device "$DEVICE" --quick --amp fp32 --batch_size 2 "${TINY_MODEL[@]}"
                 --impls ours,peft,peft_compile --no_memory)
  SMALL_ARGS=()
  LORA_ARGS=(--device "$DEVICE" --batch 1 --rounds 2 --calls 1 --amp fp32)
  PROFILE_ARGS=(--device "$DEVICE" --batch_size 2 --amp fp32 "${TINY_MODEL[@]}" --impls ours,peft)
  DATA_ARGS=(--num_images 12 --image_size 64 --cache_size 32 --input_size 32 --repeats 1)
  EPOCH_PNG=(--device "$DEVICE" --quick --num_workers 0 --num_images 12 --image_size 64 --depth 2
             "${TINY_MODEL[@]}" --batch_size 4 --rank 2)
  EPOCH_DICOM=("${EPOCH_PNG[@]}" --source dicom-jpeg --variants exact,paper)
  PROFILE_TIMEOUT=300; MODEL_TIMEOUT=600; DATA_TIMEOUT=300; EPOCH_TIMEOUT=300
elif [ "$DEVICE" = cpu ]; then
  MODEL_64=(--device cpu --quick --amp fp32 --impls "${IMPLS/ours_bf16w,ours_fp8,/}")
  MODEL_128=()
  METHODS_ARGS=(--device cpu --quick --amp fp32 --impls ours --methods dora,ia3)
  COMPILED_ARGS=()
  SMALL_ARGS=()
  LORA_ARGS=(--device cpu --batch 2 --rounds 3 --calls 2 --amp fp32)
  PROFILE_ARGS=(--device cpu --batch_size 2 --amp fp32 --impls ours,peft,paper,full)
  DATA_ARGS=(--num_images 32)
  EPOCH_PNG=(--device cpu --quick)
  EPOCH_DICOM=(--device cpu --quick --source dicom-jpeg --variants exact,paper)
  PROFILE_TIMEOUT=600
  MODEL_TIMEOUT=1500  # a busy 2-core machine: ~3 min idle, much longer under load
  DATA_TIMEOUT=600
  EPOCH_TIMEOUT=600
else
  MODEL_64=(--device "$DEVICE" --batch_size 64 --amp bf16,fp16 --impls "$IMPLS"
            --steps 10 --rounds 3 --warmup 2 --mem_steps 2)
  MODEL_128=()
  if [ "${B128:-0}" = 1 ]; then
    MODEL_128=(--device "$DEVICE" --batch_size 128 --amp bf16,fp16 --impls "$IMPLS"
               --steps 10 --rounds 3 --warmup 2 --mem_steps 2)
  fi
  # Every registered method, and HF PEFT's DoRA and IA3 at the same targets (dora_qkv vs
  # peft_dora, ia3_qkv vs peft_ia3, ours vs peft): one round-robin at batch 64, bf16.
  METHODS_ARGS=(--device "$DEVICE" --batch_size 64 --amp bf16 --impls ours --methods all
                --steps 5 --rounds 3 --warmup 1 --mem_steps 1)
  # Both compiled at batch 128 (the >= 1.25x goal; ours eager gives the FLOPs of the MFU of
  # ours compiled), and CUDA graphs where launches dominate.
  COMPILED_IMPLS="ours,ours_compile,peft_compile,peft"
  if [ "${FP8_COMPILE:-0}" = 1 ]; then COMPILED_IMPLS="$COMPILED_IMPLS,ours_fp8_compile"; fi
  COMPILED_ARGS=(--device "$DEVICE" --batch_size 128 --amp bf16 --impls "$COMPILED_IMPLS"
                 --steps 10 --rounds 3 --warmup 3 --no_memory)
  SMALL_ARGS=(--device "$DEVICE" --batch_size 32 --amp bf16 --impls ours,ours_cudagraphs,peft
              --steps 20 --rounds 3 --warmup 3 --no_memory)
  LORA_ARGS=(--device "$DEVICE" --batch 64 --rounds 10 --calls 5 --amp bf16,fp32 --dropout_study)
  WORKERS=$(( $(nproc) > 12 ? 12 : $(nproc) ))
  PROFILE_ARGS=(--device "$DEVICE" --batch_size 64 --amp bf16 --impls ours,ours_bf16w,peft,paper,full)
  DATA_ARGS=(--num_images 64)
  # ViT-B/16 224 px, batch 64, rank 4; 2 epochs per variant (the first pays start-up and compile).
  EPOCH_COMMON=(--device "$DEVICE" --epochs 2 --num_workers "$WORKERS" --paper_workers 10
                --model vit_base_patch16 --img_size 224 --batch_size 64 --rank 4
                --num_images "$EPOCH_IMAGES" --image_size 1024)
  EPOCH_PNG=("${EPOCH_COMMON[@]}" --data_path /tmp/gpu_check_data/NIH_bench)
  EPOCH_DICOM=("${EPOCH_COMMON[@]}" --data_path /tmp/gpu_check_data/NIH_bench --source dicom-jpeg
               --variants exact,paper)
  # The timeouts add up to 540 s (9 minutes). Left out unless asked for: the JPEG-DICOM
  # epoch (DICOM=1, 50 s) and the per-core data rates (DATA=1, 40 s; measured on any CPU).
  # The batch-128 eager step (B128=1) adds 60 s: over 540 s.
  PROFILE_TIMEOUT=20
  MODEL_TIMEOUT=60  # per batch size
  METHODS_TIMEOUT=75  # 14 contenders, each built twice (memory, then throughput)
  COMPILED_TIMEOUT=150  # two inductor compiles of ViT-B, forward and backward
  if [ "${FP8_COMPILE:-0}" = 1 ]; then COMPILED_TIMEOUT=210; fi  # a third compile: over 540 s
  SMALL_TIMEOUT=75  # one compile with CUDA graphs
  LORA_TIMEOUT=15
  DATA_TIMEOUT=40
  EPOCH_TIMEOUT=125  # the PNG run also writes the data (in parallel) and compiles
  DICOM_TIMEOUT=50
  DICOM="${DICOM:-0}"
  DATA="${DATA:-0}"
  # The adamw recipe's RandAugment + erasing on the GPU (--device_aug) vs per image on a core.
  DEVAUG_ARGS=(--num_images 64 --recipe adamw --device_aug "$DEVICE" --batch_size 128)
  DEVAUG_TIMEOUT=20
fi
METHODS_TIMEOUT="${METHODS_TIMEOUT:-$MODEL_TIMEOUT}"
COMPILED_TIMEOUT="${COMPILED_TIMEOUT:-$MODEL_TIMEOUT}"; SMALL_TIMEOUT="${SMALL_TIMEOUT:-$MODEL_TIMEOUT}"
LORA_TIMEOUT="${LORA_TIMEOUT:-$PROFILE_TIMEOUT}"
if [ "${COMPILED:-1}" = 0 ]; then COMPILED_ARGS=(); SMALL_ARGS=(); fi
DICOM_TIMEOUT="${DICOM_TIMEOUT:-$EPOCH_TIMEOUT}"

status=0
# step SECONDS NAME SCRIPT ARGS...: one benchmark under timeout, its output also in $OUT/NAME.log
step() {
  local seconds=$1 name=$2
  shift 2
  timeout "$seconds" python3 "$@" 2>&1 | tee "$OUT/$name.log" || status=1
}
# model_step SECONDS NAME ARGS...: bench_model.py, JSON to $OUT/NAME.json; skipped without ARGS
model_step() {
  if [ $# -gt 2 ]; then step "$1" "$2" bench/bench_model.py "${@:3}" --json "$OUT/$2.json"; fi
}
model_step "$MODEL_TIMEOUT" model "${MODEL_64[@]}"
model_step "$MODEL_TIMEOUT" model_b128 "${MODEL_128[@]}"
model_step "$METHODS_TIMEOUT" model_methods "${METHODS_ARGS[@]}"
model_step "$COMPILED_TIMEOUT" model_compiled "${COMPILED_ARGS[@]}"
model_step "$SMALL_TIMEOUT" model_b32 "${SMALL_ARGS[@]}"
step "$LORA_TIMEOUT" lora_layer bench/bench_lora_layer.py "${LORA_ARGS[@]}" --json "$OUT/lora_layer.json"
step "$PROFILE_TIMEOUT" profile bench/profile_step.py "${PROFILE_ARGS[@]}"
if [ "${DATA:-1}" != 0 ]; then
  step "$DATA_TIMEOUT" data bench/bench_data.py "${DATA_ARGS[@]}" --out "$OUT/data.json"
fi
step "$EPOCH_TIMEOUT" epoch_png bench/bench_epoch.py "${EPOCH_PNG[@]}" --json "$OUT/epoch_png.json"
if [ "${DICOM:-1}" != 0 ]; then
  step "$DICOM_TIMEOUT" epoch_dicom bench/bench_epoch.py "${EPOCH_DICOM[@]}" --json "$OUT/epoch_dicom.json"
fi
if [ -n "${DEVAUG_ARGS+x}" ]; then
  step "$DEVAUG_TIMEOUT" device_aug bench/bench_data.py "${DEVAUG_ARGS[@]}" --out "$OUT/device_aug.json"
fi
echo "gpu_check: results in $OUT (status $status)"
exit $status
