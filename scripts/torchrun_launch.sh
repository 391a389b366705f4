#!/usr/bin/env bash
# Shared by the ft_*.sh scripts: `launch ARGS...` runs main_finetune_lora.py under torchrun
# with ARGS. Settings come from the environment:
#   NGPUS (processes on this node, default 1), NNODES (1), NODE_RANK (0),
#   MASTER_ADDR (127.0.0.1), MASTER_PORT (29500); DRY_RUN=1 prints the command instead.
launch() {
  local cmd=(torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}"
             --nproc_per_node "${NGPUS:-1}"
             --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}"
             main_finetune_lora.py "$@")
  if [ -n "${DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; return 0; fi
  exec "${cmd[@]}"
}
