#!/usr/bin/env bash
# Full fine-tuning (the paper's FFT baseline) from MRM weights with the paper's recipe (SGD, absolute lr, 100 epochs).
# The presets hold the paper's LoRA settings; full fine-tuning reuses that recipe (its rank
# is ignored): override --lr / --blr / --epochs for your own FFT schedule.
# Edit the variables (or set them in the environment); extra arguments pass through:
#   DATA_PATH=data/NIH_ChestX-ray DATASET=nih DATA_SIZE=1 NGPUS=4 ./ft_mrm.sh --note try1
set -euo pipefail
cd "$(dirname "$0")"

DATA_PATH=${DATA_PATH:-./data/NIH_ChestX-ray}          # folder with the images (+ split files)
DATASET=${DATASET:-nih}                                # nih | chexpert | rsna
DATA_SIZE=${DATA_SIZE:-1}                              # 1 | 10 | 100 (% of the training labels)
WEIGHTS=${WEIGHTS:-./pretrained_weights/MRM.pth}
NGPUS=${NGPUS:-1}                                      # processes on this node (GPUs)
# Multi-node: also NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (see scripts/torchrun_launch.sh).
OUTPUT_DIR=${OUTPUT_DIR:-./output_dir/}

# The preset fills the paper's lr and rank for this data set and size (SGD, 100
# epochs, warmup 5, drop path 0.1, batch 64, no weight decay, no random erasing).
source scripts/torchrun_launch.sh
launch \
     --preset "${DATASET}-${DATA_SIZE}-mrm" \
     --model vit_base_patch16 \
     --finetune "$WEIGHTS" \
     --data_path "$DATA_PATH" \
     --output_dir "$OUTPUT_DIR" \
     --num_workers 10 \
     --dist_eval \
     --script "$0" \
     --note full \
     "$@"
