#!/usr/bin/env bash
# Full fine-tuning (the paper's FFT baseline) from CXR_MAE weights with the paper's recipe (AdamW, layer decay 0.65,
# RandAugment, random erasing).
# The presets hold the paper's LoRA settings; full fine-tuning reuses that recipe (its rank
# is ignored): override --lr / --blr / --epochs for your own FFT schedule.
# Edit the variables (or set them in the environment); extra arguments pass through:
#   DATA_PATH=data/NIH_ChestX-ray DATASET=nih DATA_SIZE=1 NGPUS=4 ./ft_mae.sh --note try1
set -euo pipefail
cd "$(dirname "$0")"

DATA_PATH=${DATA_PATH:-./data/NIH_ChestX-ray}          # folder with the images (+ split files)
DATASET=${DATASET:-nih}                                # nih | chexpert | rsna
DATA_SIZE=${DATA_SIZE:-1}                              # 1 | 10 | 100 (% of the training labels)
WEIGHTS=${WEIGHTS:-./pretrained_weights/CXR_MAE.pth}
NGPUS=${NGPUS:-1}                                      # processes on this node (GPUs)
# Multi-node: also NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (see scripts/torchrun_launch.sh).
OUTPUT_DIR=${OUTPUT_DIR:-./output_dir/}

# The preset fills the paper's settings for this data set and size (AdamW, epochs, base lr
# and rank per setting, layer decay 0.65, weight decay 0.05, random erasing 0.25, batch 64).
source scripts/torchrun_launch.sh
launch \
     --preset "${DATASET}-${DATA_SIZE}-cxr_mae" \
     --model vit_base_patch16 \
     --finetune "$WEIGHTS" \
     --data_path "$DATA_PATH" \
     --output_dir "$OUTPUT_DIR" \
     --num_workers 10 \
     --dist_eval \
     --script "$0" \
     --note full \
     "$@"
