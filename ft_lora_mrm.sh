#!/usr/bin/env bash
# Fine-tuning from MRM weights with the paper's recipe (paper README table: SGD, absolute lr,
# 100 epochs): LoRA by default, or any other method (METHOD), each with the same data,
# schedule and augmentation (docs/METHODS.md: each method's lr and size).
# Edit the variables (or set them in the environment); extra arguments pass through:
#   DATA_PATH=data/NIH_ChestX-ray DATASET=nih DATA_SIZE=1 NGPUS=4 ./ft_lora_mrm.sh --note try1
#   METHOD="lora vpt ssf" ./ft_lora_mrm.sh  # one method after another (see scripts/method_launch.sh)
#   SEEDS="0 1 2" ./ft_lora_mrm.sh        # three runs, one after another
#   DRY_RUN=1 ./ft_lora_mrm.sh            # print the command only
# docs/REPRODUCE.md lists the command for each of the paper's settings.
# Paths you set (DATA_PATH, WEIGHTS, OUTPUT_DIR, and paths among the extra arguments) are
# relative to the folder you run the script from; the defaults below are in the repository.
set -euo pipefail
REPO=$(cd "$(dirname "$0")" && pwd)

DATA_PATH=${DATA_PATH:-$REPO/data/NIH_ChestX-ray}      # folder with the images (+ split files)
DATASET=${DATASET:-nih}                                # nih | chexpert | rsna
DATA_SIZE=${DATA_SIZE:-1}                              # 1 | 10 | 100 (% of the training labels; 1% = 1)
WEIGHTS=${WEIGHTS:-$REPO/pretrained_weights/MRM.pth}   # see pretrained_weights/README.md
NGPUS=${NGPUS:-1}                                      # processes on this node (GPUs)
GLOBAL_BATCH=${GLOBAL_BATCH:-64}                       # the paper's; split over the processes
SEEDS=${SEEDS:-0}                                      # e.g. "0 1 2": one run per seed (--run_name X: X_s<seed>)
METHOD=${METHOD:-lora}                                 # e.g. "lora vpt": one run (per seed) per method
# Multi-node: also NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (see scripts/torchrun_launch.sh).
OUTPUT_DIR=${OUTPUT_DIR:-$REPO/output_dir/}

# The preset fills the paper's lr and rank for this data set and size (SGD, 100
# epochs, warmup 5, drop path 0.1, batch 64, no weight decay, no random erasing); another
# method than LoRA keeps all but the rank, with its own paper's lr (docs/METHODS.md).
source "$REPO/scripts/method_launch.sh"
launch_methods "${DATASET}-${DATA_SIZE%\%}-mrm" "$REPO/$(basename "$0")" "$@"
