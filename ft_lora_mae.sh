#!/usr/bin/env bash
# LoRA fine-tuning from CXR_MAE weights with the paper's recipe (AdamW, layer decay 0.65,
# RandAugment, random erasing).
# Edit the variables (or set them in the environment); extra arguments pass through:
#   DATA_PATH=data/NIH_ChestX-ray DATASET=nih DATA_SIZE=1 NGPUS=4 ./ft_lora_mae.sh --note try1
set -euo pipefail
cd "$(dirname "$0")"

DATA_PATH=${DATA_PATH:-./data/NIH_ChestX-ray}          # folder with the images (+ split files)
DATASET=${DATASET:-nih}                                # nih | chexpert | rsna
DATA_SIZE=${DATA_SIZE:-1}                              # 1 | 10 | 100 (% of the training labels)
WEIGHTS=${WEIGHTS:-./pretrained_weights/CXR_MAE.pth}
NGPUS=${NGPUS:-1}                                      # processes on this node (GPUs)
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
OUTPUT_DIR=${OUTPUT_DIR:-./output_dir/}

# The preset fills the paper's settings for this data set and size (AdamW, epochs, base lr
# and rank per setting, layer decay 0.65, weight decay 0.05, random erasing 0.25, batch 64).
CMD=(torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NGPUS"
     --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
     main_finetune_lora.py
     --preset "${DATASET}-${DATA_SIZE}-cxr_mae"
     --model vit_base_patch16_lora
     --finetune "$WEIGHTS"
     --data_path "$DATA_PATH"
     --output_dir "$OUTPUT_DIR"
     --lora_pos attn
     --num_workers 10
     --dist_eval
     --script "$0"
     --note lora
     "$@")
if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
